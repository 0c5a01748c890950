"""End to end: `deepseek-v3 eval run` with our tiny DeepSeek-V3 (random init) on 10 samples of every task from the
local data, then the same run interrupted and resumed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from data_files import require_file
except ImportError:  # tests/conftest.py before data_files.py existed
    from conftest import require_file
from deepseek_v3.eval import get_task, score_predictions

TASKS = ["mmlu", "mmlu_generative", "math500", "gsm8k", "humaneval", "aime24", "mbpp"]
LIMIT = 10


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from deepseek_v3 import DeepseekV3ForCausalLM, load_config
    from deepseek_v3.tokenizer import byte_level_tokenizer

    path = tmp_path_factory.mktemp("tiny-deepseek-v3")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny"))
    model.save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path



@pytest.fixture(scope="module")
def local_data(data_dir):
    for rel in ("mmlu/test/abstract_algebra_test.csv", "mmlu/dev/abstract_algebra_dev.csv", "math500/test.jsonl",
                "gsm8k/test.jsonl", "gsm8k/train.jsonl", "humaneval/HumanEval.jsonl.gz", "aime24/test.jsonl",
                "mbpp/mbpp.jsonl"):
        require_file(data_dir / rel)
    return data_dir


def _cli_args(model, out, data):
    return ["eval", "run", "--model", str(model), "--tasks", ",".join(TASKS), "--output-dir", str(out),
            "--data-dir", str(data), "--limit", str(LIMIT), "--max-new-tokens", "12", "--batch-size", "4",
            "--workers", "4", "--no-progress"]


def _read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_run_writes_results_samples_and_table(tiny_model, local_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", "from deepseek_v3.cli import main; raise SystemExit(main())",
                           *_cli_args(tiny_model, out, local_data)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| task" in proc.stdout and "score *" in proc.stdout  # the printed table
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == set(TASKS)
    cfg = results["config"]
    assert cfg["sampling"] == "greedy" and cfg["temperature"] == 0.0 and cfg["max_new_tokens"] == 12
    assert cfg["backend_info"]["model_class"] == "DeepseekV3ForCausalLM" and cfg["chat_resolved"] is True
    assert {"torch", "transformers", "math-verify"} <= set(results["versions"])
    for name in TASKS:
        metrics = results["results"][name]
        assert metrics["num_docs"] == LIMIT and metrics["num_samples"] == LIMIT
        assert 0.0 <= metrics["score"] <= 1.0
        info = results["tasks"][name]
        assert info["timings"]["total_s"] > 0 and info["new_samples"] == LIMIT
        samples = _read_samples(out / name / "samples.jsonl")
        assert len(samples) == LIMIT
        for s in samples:
            assert {"task_id", "sample_index", "prompt", "completion", "extracted", "correct"} <= set(s)
        # the stored samples re-score to the reported metrics without a model
        task = get_task(name, data_dir=local_data, progress=False)
        rescored, _ = score_predictions(task, [{"task_id": s["task_id"], "completion": s["completion"]}
                                               for s in samples])
        assert rescored["score"] == metrics["score"]
    mmlu = _read_samples(out / "mmlu" / "samples.jsonl")[0]
    assert set(mmlu["loglikelihoods"]) == {" A", " B", " C", " D"} and mmlu["prompt"].count("Answer:") == 6
    human = _read_samples(out / "humaneval" / "samples.jsonl")[0]
    assert human["status"] in ("passed", "failed", "timeout")
    assert results["tasks"]["humaneval"]["config"]["chat"] is True  # the tiny tokenizer has a chat template


class CountingBackend:
    """Wraps the HF backend, counts model calls and raises KeyboardInterrupt after ``interrupt_after`` calls."""

    def __init__(self, inner, interrupt_after=None):
        self.inner = inner
        self.has_chat_template = inner.has_chat_template
        self.calls = 0
        self.items = 0
        self.interrupt_after = interrupt_after

    def describe(self):
        return self.inner.describe()

    def _tick(self, n):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.items += n

    def generate(self, prompts, **kwargs):
        self._tick(len(prompts))
        return self.inner.generate(prompts, **kwargs)

    def loglikelihood(self, requests):
        self._tick(len(requests) // 4)
        return self.inner.loglikelihood(requests)


def test_interrupted_run_resumes_without_losing_samples(tiny_model, local_data, tmp_path):
    from deepseek_v3.eval.backends import HFBackend
    from deepseek_v3.eval.runner import run_evaluation

    hf = HFBackend(str(tiny_model), batch_size=4)
    kwargs = dict(model=str(tiny_model), tasks=TASKS, data_dir=local_data, limit=LIMIT, max_new_tokens=12,
                  batch_size=4, workers=4, progress=False)
    out = tmp_path / "resumable"
    # 1) interrupted in the middle of the third task (mmlu: 3 batches, mmlu_generative: 3 batches, math500: 1 of 3)
    first = CountingBackend(hf, interrupt_after=7)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(output_dir=out, backend_obj=first, **kwargs)
    done_before = {t: _read_samples(out / t / "samples.jsonl") for t in TASKS if (out / t / "samples.jsonl").exists()}
    assert [len(done_before[t]) for t in ("mmlu", "mmlu_generative", "math500")] == [10, 10, 4]
    assert set(json.loads((out / "results.json").read_text())["results"]) == {"mmlu", "mmlu_generative"}
    # an interruption while a line was being written leaves a partial last line: it must be dropped, not kept
    with open(out / "math500" / "samples.jsonl", "a") as f:
        f.write('{"task_id": "test/precalculus/807.json", "sample_index": 0, "compl')

    # 2) resumed: only the missing samples reach the model
    second = CountingBackend(hf)
    results = run_evaluation(output_dir=out, backend_obj=second, **kwargs)
    assert second.items == 6 + 10 * 4  # the rest of math500, then gsm8k, humaneval, aime24, mbpp
    assert results["tasks"]["mmlu"]["new_samples"] == 0 and results["tasks"]["math500"]["resumed_samples"] == 4
    for t in TASKS:
        samples = _read_samples(out / t / "samples.jsonl")
        assert len(samples) == LIMIT and len({(s["task_id"], s["sample_index"]) for s in samples}) == LIMIT
        assert samples[: len(done_before.get(t, []))] == done_before.get(t, [])  # finished samples untouched
        assert results["results"][t]["num_samples"] == LIMIT

    # 3) a third run has nothing left to do
    third = CountingBackend(hf)
    again = run_evaluation(output_dir=out, backend_obj=third, **kwargs)
    assert third.calls == 0
    assert {t: m["score"] for t, m in again["results"].items()} == {t: m["score"] for t, m in results["results"].items()}

    # 4) resuming with different generation settings is refused with a clear message
    with pytest.raises(ValueError, match="different settings.*temperature"):
        run_evaluation(output_dir=out, backend_obj=third, **{**kwargs, "temperature": 0.7})
