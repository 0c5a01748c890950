"""Logit distillation (`train distill --mode logits`), reward-model training and GRPO with rule + model rewards, on
the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from deepseek_v3.cli import main as cli_main
from deepseek_v3.trainers import synthetic

REPO = Path(__file__).resolve().parents[2]


def logs_of(trainer):
    return trainer.state.log_history


def test_synthetic_pairs_are_verifiable():
    from deepseek_v3.trainers.rewards import gsm8k_accuracy_reward

    rows = synthetic.addition_rows(20, seed=3)
    pairs = synthetic.preference_pairs(rows, seed=3)
    chosen = [p["chosen"] for p in pairs]
    rejected = [p["rejected"] for p in pairs]
    answers = [r["answer"] for r in rows]
    assert gsm8k_accuracy_reward(chosen, answer=answers) == [1.0] * 20
    assert gsm8k_accuracy_reward(rejected, answer=answers) == [0.0] * 20


def test_distill_mode_is_read_from_flag_and_recipe(tmp_path):
    from deepseek_v3.trainers.distill import requested_mode

    assert requested_mode(["--config", str(REPO / "recipes" / "distill_logits_tiny.yaml")]) == "logits"
    assert requested_mode(["--config", str(REPO / "recipes" / "distill_r1.yaml")]) == "trace"
    assert requested_mode(["--mode=logits"]) == "logits"
    with pytest.raises(ValueError, match="mode='soft'"):
        requested_mode(["--mode", "soft"])


def test_logit_distillation_runs_with_mtp_loss_and_heldout_kl(tmp_path):
    import deepseek_v3

    torch.manual_seed(1)
    teacher_dir = tmp_path / "teacher"
    deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny")).save_pretrained(teacher_dir)
    from deepseek_v3.tokenizer import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(teacher_dir)
    data = synthetic.write_addition_dataset(str(tmp_path / "add.jsonl"), n=24)
    from deepseek_v3.trainers.distill import main

    trainer = main(["--config", str(REPO / "recipes" / "distill_logits_tiny.yaml"), "--teacher_name_or_path",
                    str(teacher_dir), "--dataset_name", data, "--max_samples", "24", "--heldout_samples", "4",
                    "--max_steps", "2", "--per_device_train_batch_size", "4", "--lmbda", "0.0",
                    "--logging_steps", "1", "--output_dir", str(tmp_path / "out")])
    history = logs_of(trainer)
    kls = [h["distill/heldout_kl"] for h in history if "distill/heldout_kl" in h]
    assert len(kls) == 2 and all(k > 0 for k in kls)  # before and after training
    steps = [h for h in history if "loss" in h and "mtp_loss" in h]
    assert steps and all(h["mtp_loss"] > 0 for h in steps)
    for h in steps:  # loss = divergence + mtp_loss_weight (0.3) x MTP loss
        assert h["loss"] == pytest.approx(h["distill_loss"] + 0.3 * h["mtp_loss"], rel=1e-2)
    assert all(h["on_policy_fraction"] == 0.0 for h in steps)
    assert any("moe/maxvio_step" in h for h in history)  # balancing callback on


def test_reward_model_then_grpo_with_rule_and_model_reward(tmp_path):
    rm_dir = tmp_path / "rm"
    cli_main(["train", "reward", "--config", str(REPO / "recipes" / "reward_tiny.yaml"), "--synthetic_rows", "16",
              "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir", str(rm_dir)])
    config = json.loads((rm_dir / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForSequenceClassification"] and config.get("num_labels", 1) == 1
    out = tmp_path / "grpo"
    from deepseek_v3.trainers.grpo import main

    trainer = main(["--config", str(REPO / "recipes" / "grpo_reward_model_tiny.yaml"), "--reward_models", str(rm_dir),
                    "--synthetic_rows", "8", "--max_steps", "1", "--per_device_train_batch_size", "2",
                    "--num_generations", "2", "--max_completion_length", "6", "--output_dir", str(out)])
    log = next(h for h in logs_of(trainer) if "reward" in h)
    assert "rewards/gsm8k_accuracy_reward/mean" in log and "rewards/rm/mean" in log
    expected = 1.0 * log["rewards/gsm8k_accuracy_reward/mean"] + 0.5 * log["rewards/rm/mean"]
    assert log["reward"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="reward_weights"):
        main(["--config", str(REPO / "recipes" / "grpo_reward_model_tiny.yaml"), "--reward_models", str(rm_dir),
              "--reward_weights", "1.0", "--output_dir", str(out)])
