"""TRL scripts (SFT, GRPO, R1 distillation) on the tiny model with the local GSM8K/MATH-500/HumanEval files, and
the R1 rule rewards."""

import gzip
import json
import math
from pathlib import Path

import pytest
from data_files import require_file

from deepseek_v3.cli import main as cli_main
from deepseek_v3.trainers import rewards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gsm8k_train(data_dir) -> str:
    return str(require_file(data_dir / "gsm8k" / "train.jsonl"))


def read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_format_reward():
    completions = [
        "<think>\n2 + 2 = 4\n</think>\nThe answer is \\boxed{4}.",
        [{"role": "assistant", "content": "<think>x</think> 4"}],
        "The answer is 4.",
        "<think>a</think><think>b</think> 4",
        "<think>only thinking</think>",
    ]
    assert rewards.format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_arithmetic_steps_reward():
    from deepseek_v3.trainers.arithmetic_task import make_splits

    train, _ = make_splits(200, 10, seed=1)
    assert rewards.arithmetic_steps_reward([p["solution"] for p in train]) == [1.0] * 200
    completions = [
        "<think>6-4=2, 2+7=10</think> \\boxed{10}",        # right answer through a false step
        "<think>7+5=12, 12-3=9</think> \\boxed{8}",        # true steps, boxed answer is not their result
        "<think>no arithmetic here</think> \\boxed{9}",    # no step to check
        "7+5=12, 12-3=9 \\boxed{9}",                       # no reasoning block
        "<think>7+5=12, 12-3=9</think> \\boxed{9} or \\boxed{8}",  # two answers
        [{"role": "assistant", "content": "<think>4 * 5 = 20, 20 / 4 = 5, 9 x 2 = 18</think> \\boxed{18}"}],
        "<think>7/0=1</think> \\boxed{1}",
    ]
    assert rewards.arithmetic_steps_reward(completions) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert rewards.get_reward_funcs(["arithmetic_steps"]) == [rewards.arithmetic_steps_reward]


def test_math_reward_on_real_math500(data_dir):
    rows = read_jsonl(require_file(data_dir / "math500" / "test.jsonl"))[:20]
    gold = [r["answer"] for r in rows]
    right = [f"<think>...</think> The answer is $\\boxed{{{a}}}$." for a in gold]
    wrong = right[1:] + right[:1]
    assert rewards.math_accuracy_reward(right, answer=gold) == [1.0] * 20
    assert sum(rewards.math_accuracy_reward(wrong, answer=gold)) <= 2
    # the answer must come after the reasoning block
    assert rewards.math_accuracy_reward([f"<think>\\boxed{{{gold[0]}}}</think> no idea"], answer=gold[:1]) == [0.0]


def test_gsm8k_reward_on_real_rows(gsm8k_train):
    rows = read_jsonl(gsm8k_train)[:10]
    answers = [r["answer"] for r in rows]
    right = [f"<think>calc</think> #### {a.split('####')[-1].strip()}" for a in answers]
    assert rewards.gsm8k_accuracy_reward(right, answer=answers) == [1.0] * 10
    assert rewards.gsm8k_accuracy_reward(["#### -1"], answer=answers[:1]) == [0.0]


def test_code_reward_with_sandbox(data_dir):
    task = read_jsonl(require_file(data_dir / "humaneval" / "HumanEval.jsonl.gz"))[0]
    good = f"<think>easy</think>\n```python\n{task['prompt']}{task['canonical_solution']}\n```"
    bad = f"```python\n{task['prompt']}    return None\n```"
    scores = rewards.code_reward(
        [good, bad, "no code"], test=[task["test"]] * 3, entry_point=[task["entry_point"]] * 3
    )
    assert scores == [1.0, 0.0, 0.0]


def test_unknown_reward_name():
    with pytest.raises(ValueError, match="reward_funcs=\\['accuracy'\\] unknown"):
        rewards.get_reward_funcs(["accuracy"])


def test_sft_recipe_trains_tiny_model(tmp_path, gsm8k_train):
    out = tmp_path / "sft"
    cli_main(
        ["train", "sft", "--config", str(REPO / "recipes" / "sft_tiny.yaml"), "--dataset_name", gsm8k_train,
         "--max_samples", "16", "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_length", "512",
         "--output_dir", str(out), "--save_steps", "100", "--logging_steps", "1"]
    )
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    logs = [log for log in state["log_history"] if "loss" in log]
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) for log in logs)
    # the trained loss is the model's own: main + 0.3 * MTP (TRL's fused head alone would drop the MTP term)
    for log in logs:
        assert log["mtp_loss"] > 0 and log["loss"] == pytest.approx(log["main_loss"] + 0.3 * log["mtp_loss"], rel=1e-3)
        assert "moe/maxvio_step" in log  # the balancing callback is on
    assert (out / "model.safetensors").exists()
    assert (out / "moe_expert_load.png").exists()
    # the run's model card (ours, not TRL's generic one): front matter, the recipe, the run's final figures
    from deepseek_v3.trainers.model_card import read_front_matter

    front, body = read_front_matter(out / "README.md")
    assert front["library_name"] == "transformers" and "deepseek_v3" in front["tags"] and "base_model" not in front
    assert "fine-tuned version of [None]" not in body and "model_name_or_path: tiny" in body
    final = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    last_main = [log["main_loss"] for log in final if "main_loss" in log][-1]
    assert f"| final main_loss | {last_main:.4g} |" in body and "balancing: **on**" in body


def test_grpo_recipe_runs(tmp_path, gsm8k_train):
    out = tmp_path / "grpo"
    cli_main(
        ["train", "grpo", "--config", str(REPO / "recipes" / "grpo_tiny.yaml"), "--dataset_name", gsm8k_train,
         "--max_samples", "8", "--max_steps", "2", "--per_device_train_batch_size", "2", "--num_generations", "2",
         "--max_completion_length", "8", "--output_dir", str(out)]
    )
    assert (out / "model.safetensors").exists()


def test_distill_traces_resume_and_filter(tmp_path, gsm8k_train):
    from deepseek_v3.trainers.distill import DistillScriptArguments, build_student_dataset, generate_traces

    args = DistillScriptArguments(
        teacher_name_or_path="tiny", dataset_name=gsm8k_train, max_samples=4, max_new_tokens=6,
        generation_batch_size=2, num_samples_per_prompt=2, filter_reward="gsm8k_accuracy",
    )
    traces = tmp_path / "traces.jsonl"
    generate_traces(args, str(traces))
    records = read_jsonl(traces)
    assert len(records) == 8 and {r["prompt_index"] for r in records} == {0, 1, 2, 3}
    generate_traces(args, str(traces))  # resume: everything is done, nothing is generated again
    assert len(read_jsonl(traces)) == 8
    # a random tiny teacher is never right: rejection sampling keeps nothing and says so
    assert not any(r["kept"] for r in records)
    with pytest.raises(ValueError, match="no teacher trace"):
        build_student_dataset(args, str(traces))
    # with a correct trace appended, only that one is kept
    answer = read_jsonl(gsm8k_train)[0]["answer"].split("####")[-1].strip()
    with open(traces, "a") as f:
        f.write(json.dumps({"prompt_index": 0, "prompt": "q", "completion": f"#### {answer}", "reward": 1.0, "kept": True}) + "\n")
    dataset = build_student_dataset(args, str(traces))
    assert len(dataset) == 1 and dataset[0]["completion"][0]["content"] == f"#### {answer}"


def test_distill_cli_end_to_end(tmp_path, gsm8k_train):
    out = tmp_path / "distill"
    cli_main(
        ["train", "distill", "--config", str(REPO / "recipes" / "distill_r1.yaml"), "--teacher_name_or_path", "tiny",
         "--model_name_or_path", "tiny", "--dataset_name", gsm8k_train, "--max_samples", "4",
         "--num_samples_per_prompt", "1", "--max_new_tokens", "16", "--filter_reward", "none", "--max_steps", "2",
         "--per_device_train_batch_size", "2", "--max_length", "512", "--output_dir", str(out), "--use_cpu", "true",
         "--save_strategy", "no", "--logging_steps", "1"]
    )
    assert len(read_jsonl(out / "traces.jsonl")) == 4
    assert (out / "model.safetensors").exists()


def test_sft_with_fp8_switch(tmp_path, gsm8k_train):
    from deepseek_v3.kernels.fp8_training import fp8_module_names
    from deepseek_v3.trainers.common import run_training
    from deepseek_v3.trainers.sft import SFTScriptArguments, build_sft_trainer
    from trl import SFTConfig

    trainer = run_training(
        SFTScriptArguments, SFTConfig, build_sft_trainer,
        ["--config", str(REPO / "recipes" / "sft_tiny.yaml"), "--dataset_name", gsm8k_train, "--fp8", "true",
         "--max_samples", "8", "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "512",
         "--output_dir", str(tmp_path), "--save_strategy", "no", "--logging_steps", "1"],
    )
    names = fp8_module_names(trainer.model)
    assert "model.layers.1.self_attn.q_b_proj" in names and "model.layers.1.mlp.experts" in names
    assert not any(n.endswith(("lm_head", "mlp.gate", "eh_proj")) for n in names)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe):
    """Each YAML recipe only uses keys its script and TRL config know (typos fail here, not on a cluster)."""
    from trl import GRPOConfig, SFTConfig, TrlParser

    from deepseek_v3.trainers.distill import DistillScriptArguments
    from deepseek_v3.trainers.grpo import GRPOScriptArguments
    from deepseek_v3.trainers.sft import SFTScriptArguments

    from trl import DistillationConfig, RewardConfig

    from deepseek_v3.trainers.distill import requested_mode
    from deepseek_v3.trainers.distill_logits import LogitDistillScriptArguments
    from deepseek_v3.trainers.reward_model import RewardScriptArguments

    script = recipe.split("_")[0]
    if script == "distill" and requested_mode(["--config", str(REPO / "recipes" / recipe)]) == "logits":
        script = "distill_logits"
    classes = {
        "sft": (SFTScriptArguments, SFTConfig),
        "grpo": (GRPOScriptArguments, GRPOConfig),
        "distill": (DistillScriptArguments, SFTConfig),
        "distill_logits": (LogitDistillScriptArguments, DistillationConfig),
        "reward": (RewardScriptArguments, RewardConfig),
    }[script]
    import torch

    cpu_overrides = [] if torch.cuda.is_available() else ["--bf16", "false"]  # GPU recipes say bf16: true
    script_args, training_args = TrlParser(classes).parse_args_and_config(
        args=["--config", str(REPO / "recipes" / recipe), *cpu_overrides]
    )
    assert script_args.model_name_or_path and training_args.output_dir.startswith("outputs/")
