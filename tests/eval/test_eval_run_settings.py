"""Eval runs never mix settings and never print invalid JSON (issue 15, defects 7-8). A scripted backend stands in
for the model: the runner's bookkeeping is what is tested."""

import json
import math

import pytest

from deepseek_v3.cli import main
from deepseek_v3.eval.base import get_task
from deepseek_v3.eval.runner import run_evaluation


class EchoBackend:
    """Answers every GSM8K/MATH prompt with a fixed text and records the max_new_tokens it was asked for."""

    has_chat_template = False

    def __init__(self, text="The answer is 3."):
        self.text = text
        self.max_new = []

    def describe(self):
        return {"model_class": "Echo"}

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, stop):
        self.max_new.append(max_new_tokens)
        return [self.text for _ in prompts]


def _run(out, data_dir, tasks, **kw):
    return run_evaluation(model="echo", tasks=tasks, output_dir=out, data_dir=data_dir, limit=3, progress=False,
                          backend_obj=kw.pop("backend", EchoBackend()), **kw)


def test_overwrite_of_one_task_keeps_the_others_settings(data_dir, tmp_path):
    out = tmp_path / "run"
    _run(out, data_dir, ["gsm8k", "math500"], max_new_tokens=16)
    before = (out / "math500" / "samples.jsonl").read_text()
    _run(out, data_dir, ["gsm8k"], max_new_tokens=32, overwrite=True)  # redo gsm8k only, other settings
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["gsm8k"]["config"]["max_new_tokens"] == 32
    assert results["tasks"]["math500"]["config"]["max_new_tokens"] == 16  # what its samples were made with
    assert results["tasks"]["math500"]["settings"]["max_new_tokens"] == 16
    assert (out / "math500" / "samples.jsonl").read_text() == before
    # math500 with the new settings must not reuse its old samples silently
    with pytest.raises(ValueError, match="math500 holds samples from a run with different settings.*max_new_tokens"):
        _run(out, data_dir, ["math500"], max_new_tokens=32)
    backend = EchoBackend()
    _run(out, data_dir, ["gsm8k"], max_new_tokens=32, backend=backend)  # gsm8k resumes with its own settings
    assert backend.max_new == []


def test_wrong_model_path_writes_nothing_and_the_corrected_rerun_works(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    rc = main(["eval", "run", "--model", str(tmp_path / "nope"), "--tasks", "gsm8k", "--output-dir", str(out),
               "--data-dir", str(data_dir), "--limit", "2", "--no-progress"])
    assert rc == 2 and "error:" in capsys.readouterr().err
    assert not out.exists() or list(out.rglob("*")) == []
    _run(out, data_dir, ["gsm8k"], max_new_tokens=8)  # the corrected rerun into the same dir is accepted


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "--limit must be >= 1"), ({"limit": -1}, "--limit must be >= 1"),
    ({"ks": [2]}, "--k values must be between 1 and --num-samples=1"), ({"timeout": -1.0}, "--timeout must be"),
])
def test_run_arguments_are_validated_before_anything_runs(data_dir, tmp_path, kwargs, message):
    backend = EchoBackend()
    with pytest.raises(ValueError, match=message):
        run_evaluation(model="echo", tasks=["gsm8k"], output_dir=tmp_path / "r", data_dir=data_dir, progress=False,
                       backend_obj=backend, **kwargs)
    assert backend.max_new == [] and not (tmp_path / "r").exists()


class _Proc:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def _score(args, tmp_path, lines, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    try:
        rc = main(["eval", "score", "--predictions", str(preds), "--no-progress", *args])
    except SystemExit as exit_:  # argparse errors
        rc = exit_.code
    captured = capsys.readouterr()
    return _Proc(rc, captured.out, captured.err)


def test_score_cli_rejects_bad_inputs_with_clear_errors(data_dir, tmp_path, capsys):
    d = ["--data-dir", str(data_dir)]
    cases = [
        (["--task", "gsm8k", *d], [], "predictions are empty"),
        (["--task", "humaneval", "--k", "2", *d], [{"task_id": "HumanEval/0", "completion": "x"}], "pass@2 needs"),
        (["--task", "gsm8k", "--timeout", "-1", *d], [{"task_id": "0", "completion": "1"}], "positive number"),
        (["--task", "gsm8k", *d], [{"task_id": "0", "completion": "1"}, {"task_id": "0", "completion": "1"},
                                   {"task_id": "1", "completion": "2"}], "different numbers of predictions"),
        (["--task", "gsm8k", *d], [{"task_id": "0", "completion": "1", "sample_index": 0},
                                   {"task_id": "0", "completion": "2", "sample_index": 0}], "sample_index 0"),
    ]
    for args, lines, message in cases:
        proc = _score(args, tmp_path, lines, capsys)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_k_without_1_still_reports_pass_at_1_and_output_is_valid_json(data_dir, tmp_path, capsys):
    doc = get_task("humaneval", data_dir=data_dir).docs()[0]
    lines = [{"task_id": doc["task_id"], "completion": doc["canonical_solution"]}] * 2
    proc = _score(["--task", "humaneval", "--k", "2", "--data-dir", str(data_dir)], tmp_path, lines, capsys)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.splitlines()[-1])
    assert metrics["pass@1"] == 1.0 and metrics["pass@2"] == 1.0 and metrics["score"] == 1.0
    # a metric over zero documents (NaN) is written as null: NaN is not JSON
    from deepseek_v3.eval.runner import json_safe

    assert json.dumps(json_safe({"accuracy": math.nan, "x": [math.inf]}), allow_nan=False) == '{"accuracy": null, "x": [null]}'


def test_reasoning_is_removed_by_default_for_chat_runs_and_recorded(data_dir, tmp_path):
    class ChatBackend(EchoBackend):
        has_chat_template = True

    gold = get_task("gsm8k", data_dir=data_dir).docs()[0]["gold"]
    out = tmp_path / "chat"
    backend = ChatBackend(f"<think>maybe #### {gold}</think> The answer: #### 0")
    results = _run(out, data_dir, ["gsm8k"], backend=backend)
    assert results["results"]["gsm8k"]["exact_match_strict"] == 0.0  # the guess inside <think> is not the answer
    reasoning = results["tasks"]["gsm8k"]["config"]["reasoning"]
    assert reasoning["strip_reasoning"] is True and reasoning["tags"] == ["<think>", "</think>"]
    assert results["config"]["reasoning"]["strip_reasoning"] is True and results["config"]["deviations"]
    sample = json.loads((out / "gsm8k" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["completion"].startswith("<think>") and sample["answer_text"] == "The answer: #### 0"
    # unclosed reasoning = no answer; turned off: the whole text is scored; configurable tags
    unclosed = _run(tmp_path / "u", data_dir, ["gsm8k"], backend=ChatBackend(f"<think>#### {gold}"))
    assert unclosed["results"]["gsm8k"]["exact_match_strict"] == 0.0
    off = _run(tmp_path / "off", data_dir, ["gsm8k"], backend=ChatBackend(f"<think>#### {gold}"), strip_reasoning="off")
    assert off["results"]["gsm8k"]["exact_match_strict"] > 0
    tagged = _run(tmp_path / "t", data_dir, ["gsm8k"], backend=ChatBackend(f"[R]#### 0[/R] #### {gold}"),
                  reasoning_tags=("[R]", "[/R]"))
    assert tagged["results"]["gsm8k"]["exact_match_strict"] > 0


def test_score_cli_strips_reasoning_when_closing_tags_occur(data_dir, tmp_path, capsys):
    gold = get_task("gsm8k", data_dir=data_dir).docs()[0]["gold"]
    lines = [{"task_id": "0", "completion": f"<think>#### {gold}</think> #### 1"}]
    on = _score(["--task", "gsm8k", "--data-dir", str(data_dir)], tmp_path, lines, capsys)
    off = _score(["--task", "gsm8k", "--data-dir", str(data_dir), "--strip-reasoning", "off"], tmp_path, lines, capsys)
    assert json.loads(on.stdout.splitlines()[-1])["exact_match_strict"] == 0.0
    assert json.loads(off.stdout.splitlines()[-1])["exact_match_strict"] == 1.0
