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


def test_heldout_rows_avoid_training_problems_and_negatives_are_wrong():
    rows = synthetic.addition_rows(300, seed=0)
    heldout = synthetic.heldout_addition_rows(50, exclude=rows, seed=1)
    assert len(heldout) == 50 and not {r["question"] for r in heldout} & {r["question"] for r in rows}
    for negatives in synthetic.NEGATIVES:
        for pair, row in zip(synthetic.preference_pairs(rows, seed=2, negatives=negatives), rows):
            right = int(row["answer"].rsplit("#### ", 1)[1])
            wrong = int(pair["rejected"][0]["content"].rsplit("#### ", 1)[1])
            assert wrong != right and 0 <= wrong <= 198
            if negatives == "near":
                assert 1 <= abs(wrong - right) <= 10
    with pytest.raises(ValueError, match="negatives='far'"):
        synthetic.preference_pairs(rows[:1], negatives="far")


def _suffix_pairs(rows, good=" ok", bad=" no"):
    """Pairs whose preference is readable from the last content token (tests the plumbing, not arithmetic)."""
    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "chosen": [{"role": "assistant", "content": r["answer"] + good}],
             "rejected": [{"role": "assistant", "content": r["answer"] + bad}]} for r in rows]


def test_reward_model_scores_the_last_real_token_and_learns_a_readable_preference(tmp_path):
    """The head reads the EOS the chat template appends (padding does not move a score) and the pairwise loss
    trains it: a preference visible at the end of the completion is learned in a few steps and holds on unseen
    problems. (Learning to verify sums is the slow test below.)"""
    from trl import RewardConfig

    from deepseek_v3.trainers.reward_model import (
        RewardScriptArguments,
        build_reward_trainer,
        pairwise_accuracy,
        reward_scores,
    )

    rows = synthetic.addition_rows(256, seed=0)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in _suffix_pairs(rows)) + "\n")
    heldout = _suffix_pairs(synthetic.heldout_addition_rows(64, exclude=rows, seed=1))
    script = RewardScriptArguments(model_name_or_path="tiny", dataset_name=str(data), prompt_column="prompt")
    config = RewardConfig(output_dir=str(tmp_path / "out"), max_steps=40, per_device_train_batch_size=16,
                          learning_rate=1e-3, max_length=128, logging_steps=10, save_strategy="no", report_to=[],
                          use_cpu=True)
    torch.manual_seed(0)
    trainer = build_reward_trainer(script, config)
    model, tokenizer = trainer.model, trainer.processing_class
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2
    texts = [tokenizer.apply_chat_template(heldout[0]["prompt"] + heldout[0]["chosen"], tokenize=False),
             tokenizer.apply_chat_template(heldout[1]["prompt"] + heldout[1]["rejected"] + [
                 {"role": "user", "content": "and now a much longer second turn"}], tokenize=False)]
    alone = reward_scores(model, tokenizer, texts[:1])
    padded = reward_scores(model, tokenizer, texts)  # texts[0] is right-padded here
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    before = pairwise_accuracy(model, tokenizer, heldout)
    trainer.train()
    after = pairwise_accuracy(model, tokenizer, heldout)
    losses = [h["loss"] for h in logs_of(trainer) if "loss" in h]
    assert losses[-1] < 0.1 < losses[0], losses  # from log 2 = 0.693 at step 0
    assert before < 0.8 and after >= 0.95, (before, after)


@pytest.mark.slow
def test_reward_recipe_learns_to_verify_sums(tmp_path):
    """The shipped chain (SFT on the addition task, then recipes/reward_tiny.yaml) ranks the right sum above a wrong
    one on unseen problems (measured 0.92; random init stays near chance with near-miss negatives). ~1.5 min."""
    data = synthetic.write_addition_dataset(str(tmp_path / "addition.jsonl"), n=8192)
    sft_dir, rm_dir = tmp_path / "sft", tmp_path / "rm"
    cli_main(["train", "sft", "--config", str(REPO / "recipes" / "sft_addition_tiny.yaml"), "--dataset_name", data,
              "--output_dir", str(sft_dir)])
    cli_main(["train", "reward", "--config", str(REPO / "recipes" / "reward_tiny.yaml"), "--model_name_or_path",
              str(sft_dir), "--output_dir", str(rm_dir)])
    history = json.loads((rm_dir / "heldout_accuracy.json").read_text())
    assert history[0]["pairs"] == 256
    assert history[0]["heldout_accuracy"] < 0.65 and history[-1]["heldout_accuracy"] >= 0.8, history


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


def test_logit_distillation_on_policy_fraction_generates_and_lowers_heldout_kl(tmp_path):
    """lmbda 0.5: about half the steps train on completions the student generates (counted), and the held-out
    KL(teacher || student) still falls by >= 30%."""
    data = synthetic.write_addition_dataset(str(tmp_path / "add.jsonl"), n=40)
    teacher_dir = tmp_path / "teacher"  # a trained teacher: two random tiny models are already close (KL ~0.03)
    cli_main(["train", "sft", "--config", str(REPO / "recipes" / "sft_addition_tiny.yaml"), "--dataset_name", data,
              "--max_steps", "30", "--per_device_train_batch_size", "8", "--output_dir", str(teacher_dir)])
    from deepseek_v3.trainers.distill import main

    trainer = main(["--config", str(REPO / "recipes" / "distill_logits_tiny.yaml"), "--teacher_name_or_path",
                    str(teacher_dir), "--dataset_name", data, "--max_samples", "40", "--heldout_samples", "8",
                    "--max_steps", "8", "--per_device_train_batch_size", "4", "--learning_rate", "2e-2",
                    "--max_completion_length", "24", "--lmbda", "0.5", "--logging_steps", "1",
                    "--output_dir", str(tmp_path / "out")])
    history = logs_of(trainer)
    steps = [h for h in history if "on_policy_fraction" in h]
    on_policy = sum(h["on_policy_fraction"] for h in steps)
    assert len(steps) == 8 and 0 < on_policy < 8  # both branches ran (seeded draw)
    assert trainer.on_policy_completions == 4 * on_policy  # one student generation per prompt of an on-policy step
    kls = [h["distill/heldout_kl"] for h in history if "distill/heldout_kl" in h]
    assert len(kls) == 2 and kls[1] <= 0.7 * kls[0], kls


def test_reward_model_then_grpo_with_rule_and_model_reward(tmp_path):
    rm_dir = tmp_path / "rm"
    cli_main(["train", "reward", "--config", str(REPO / "recipes" / "reward_tiny.yaml"), "--model_name_or_path",
              "tiny", "--synthetic_rows", "16", "--heldout_pairs", "8", "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--output_dir", str(rm_dir)])
    history = json.loads((rm_dir / "heldout_accuracy.json").read_text())
    assert [h["step"] for h in history] == [0, 2] and all(0 <= h["heldout_accuracy"] <= 1 for h in history)
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
