"""`deepseek-v3 demo`: the synthetic task, the whole pipeline in --quick mode (summary, plots, card), and its exit
codes (a failed phase, reloaded logits that differ)."""

import json

import pytest
import torch

from deepseek_v3.cli import main as cli_main
from deepseek_v3.trainers.arithmetic_task import ArithmeticTask, make_splits, reasoning_style
from deepseek_v3.trainers.demo import check_reloaded_logits, sign_test_p
from deepseek_v3.trainers.model_card import read_front_matter
from deepseek_v3.trainers.rewards import format_reward, math_accuracy_reward


def test_task_split_is_disjoint_and_solutions_score_correct():
    train, heldout = make_splits(500, 40, seed=3)
    assert len(train) == 500 and len(heldout) == 40
    assert not {p["program"] for p in heldout} & {p["program"] for p in train}
    assert make_splits(500, 40, seed=3) == (train, heldout)  # seeded
    task = ArithmeticTask(heldout)
    solutions = [p["solution"] for p in heldout]
    answers = [p["answer"] for p in heldout]
    assert all(task.score_one(p, p["solution"])["correct"] for p in heldout)
    assert math_accuracy_reward(solutions, answer=answers) == [1.0] * 40
    assert format_reward(solutions) == [1.0] * 40
    wrong = [s.replace(f"\\boxed{{{a}}}", f"\\boxed{{{int(a) + 1}}}") for s, a in zip(solutions, answers)]
    assert not any(task.score_one(p, w)["correct"] for p, w in zip(heldout, wrong))


def test_reasoning_styles_mix_without_changing_the_problems():
    worked, _ = make_splits(400, 40, seed=3)
    mixed, heldout = make_splits(400, 40, seed=3, worked_fraction=0.5)
    assert [p["question"] for p in mixed] == [p["question"] for p in worked]  # same problems, other solutions
    assert {p["style"] for p in worked} == {"worked"}
    assert 150 < sum(p["style"] == "worked" for p in mixed) < 250
    for p in mixed:
        assert reasoning_style(p["solution"]) == p["style"]
        assert math_accuracy_reward([p["solution"]], answer=[p["answer"]]) == [1.0]
    terse = next(p for p in mixed if p["style"] == "terse")
    assert terse["solution"] == f"<think>{terse['program']}={terse['answer']}</think> \\boxed{{{terse['answer']}}}"
    assert reasoning_style("\\boxed{3}") == "terse"
    with pytest.raises(ValueError, match="worked_fraction=1.5"):
        make_splits(10, 4, worked_fraction=1.5)


def test_sign_test():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(5, 5) == 1.0
    assert sign_test_p(10, 0) == sign_test_p(0, 10) == 2 / 1024
    assert abs(sign_test_p(18, 11) - 0.2649) < 1e-4  # binomial(29, 1/2): 2 * P(X <= 11)


def test_reloaded_logits_check():
    from deepseek_v3 import DeepseekV3ForCausalLM, load_config

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    batch = {"input_ids": torch.randint(5, 200, (2, 9))}
    assert check_reloaded_logits(model, model, batch) == 0.0
    changed = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.lm_head.weight[7] += 0.5
    with pytest.raises(RuntimeError, match="reloaded model's logits differ"):
        check_reloaded_logits(model, changed, batch)


def test_failed_phase_exits_nonzero(tmp_path, capsys):
    code = cli_main(["demo", "--output-dir", str(tmp_path), "--num-heldout", "100000"])
    assert code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "num_heldout=100000" in summary["error"]


def test_demo_quick_end_to_end(tmp_path, data_dir, capsys):
    code = cli_main(["demo", "--quick", "--output-dir", str(tmp_path), "--data-dir", str(data_dir),
                     "--pretrain-steps", "6", "--sft-steps", "3", "--grpo-steps", "1", "--num-heldout", "4",
                     "--eval-samples", "1", "--max-new-tokens", "12", "--decode-prompts", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert set(summary["accuracy"]) == {"init", "pretrain", "sft", "grpo"}
    styles = summary["accuracy"]["sft"]["styles"]["sampled"]
    assert 0.0 <= styles["worked_share"] <= 1.0 and set(styles) == {"worked_share", "accuracy_worked", "accuracy_terse"}
    for phase in ("pretrain", "sft"):
        final = summary["phases"][phase]["final"]
        assert final["main_loss"] > 0 and final["mtp_loss"] > 0
        assert summary["phases"][phase]["maxvio"]["last"] is not None
    assert "reward" in summary["phases"]["grpo"]["final"]
    decode = summary["reload"]
    assert decode["model_class"] == "DeepseekV3ForCausalLM" and decode["reloaded_max_abs_logit_diff"] <= 1e-4
    assert 0.0 <= decode["mtp_acceptance_rate"] <= 1.0 and decode["mtp_tokens_per_target_forward"] >= 1.0
    assert decode["mtp_output_equals_greedy"] is True  # greedy MTP decoding is token-for-token plain greedy
    assert set(summary["real_benchmarks"]) == {"gsm8k", "math500"}
    for path in summary["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {p.split("/")[-1] for p in summary["plots"]} >= {"loss_curves.png", "reward_curve.png", "accuracy.png",
                                                              "maxvio.png", "expert_load_pretrain.png"}
    assert "held-out pass@1 before -> after SFT -> after GRPO" in printed and "MTP self-speculative" in printed
    # the final model's card carries the run's figures
    front, body = read_front_matter(tmp_path / "final" / "README.md")
    assert front["library_name"] == "transformers" and "deepseek_v3" in front["tags"]
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == round(summary["accuracy"]["grpo"]["greedy"], 6)
    assert metrics["pass@1_sampled"] == round(summary["accuracy"]["grpo"]["pass@1_sampled"], 6)
    assert f"| SFT: final main loss | {summary['phases']['sft']['final']['main_loss']:.4g} |" in body
    assert f"{summary['model']['total_params_with_mtp']:,}" in body
    # every phase's checkpoint has its own card, with that phase's evaluation
    for phase, folder in (("pretrain", "pretrain"), ("sft", "sft")):
        front, body = read_front_matter(tmp_path / folder / "README.md")
        assert front["model-index"][0]["name"] == f"deepseek-v3-demo-{phase}"
        metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
        assert metrics["accuracy"] == round(summary["accuracy"][phase]["greedy"], 6)
        assert "GRPO: optimizer steps" not in body and f"{'SFT' if phase == 'sft' else 'pretrain'}: optimizer steps" in body
    # paired per-problem changes between consecutive phases add up to the accuracies
    acc = summary["accuracy"]
    for before, after in (("init", "pretrain"), ("pretrain", "sft"), ("sft", "grpo")):
        change = acc[after]["vs_previous_greedy"]
        assert change["phase"] == before
        assert len(acc[before]["solved_greedy"]) + change["gained"] - change["lost"] == len(acc[after]["solved_greedy"])
        assert round(len(acc[after]["solved_greedy"]) / acc[after]["num_problems"], 6) == round(acc[after]["greedy"], 6)


def test_demo_restores_the_thread_count(tmp_path, monkeypatch):
    """`--threads` applies to the demo's run only: the caller's torch thread count is back afterwards, also when a
    phase fails."""
    import torch

    from deepseek_v3.trainers.demo import Demo, DemoArguments

    seen = []

    def failing_task(self):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop after the thread count was set")

    monkeypatch.setattr(Demo, "phase_task", failing_task)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="stop after"):
        Demo(DemoArguments(output_dir=str(tmp_path), threads=before + 1)).run()
    assert seen == [before + 1]
    assert torch.get_num_threads() == before
