"""Without --data-dir every task loads its canonical Hugging Face dataset id. No network here: `load_hub` is replaced
by a fake that serves the local files in the hub's schema, and the documents must equal the --data-dir ones."""

import pytest

from deepseek_v3.eval import data as data_module
from deepseek_v3.eval import get_task, gsm8k, mbpp, mmlu
from deepseek_v3.eval.data import read_csv, read_jsonl

CANONICAL = {
    "mmlu": ("cais/mmlu", "all"),
    "math500": ("HuggingFaceH4/MATH-500", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "humaneval": ("openai/openai_humaneval", None),
    "aime24": ("HuggingFaceH4/aime_2024", None),
    "mbpp": ("google-research-datasets/mbpp", "full"),
}


def _fake_hub(data_dir, calls):
    def load_hub(dataset_id, config, split):
        calls.append((dataset_id, config, split))
        if dataset_id == "cais/mmlu":
            rows = []
            for subject in mmlu.SUBJECTS:
                for r in read_csv(data_dir / "mmlu" / split / f"{subject}_{split}.csv"):
                    rows.append({"question": r["question"], "subject": subject, "answer": int(r["answer"]),
                                 "choices": [r[f"choice{i}"] for i in range(4)]})
            return rows
        if dataset_id == "HuggingFaceH4/MATH-500":
            return read_jsonl(data_dir / "math500" / "test.jsonl")
        if dataset_id == "openai/gsm8k":
            return read_jsonl(data_dir / "gsm8k" / f"{split}.jsonl")
        if dataset_id == "openai/openai_humaneval":
            return read_jsonl(data_dir / "humaneval" / "HumanEval.jsonl.gz")
        if dataset_id == "HuggingFaceH4/aime_2024":  # the hub copy has unpadded answers and a year column
            return [{**r, "answer": str(int(r["answer"])), "year": 2024} for r in read_jsonl(data_dir / "aime24" / "test.jsonl")]
        if dataset_id == "google-research-datasets/mbpp":
            ranges = {"test": (11, 510), "prompt": (1, 10)}[split]
            return [r for r in read_jsonl(data_dir / "mbpp" / "mbpp.jsonl") if ranges[0] <= r["task_id"] <= ranges[1]]
        raise AssertionError(f"unexpected dataset {dataset_id}")

    return load_hub


@pytest.mark.parametrize("name", sorted(CANONICAL))
def test_hub_path_uses_canonical_id_and_matches_local_files(name, data_dir, monkeypatch):
    calls = []
    fake = _fake_hub(data_dir, calls)
    for module in (data_module, mmlu, gsm8k, mbpp):
        monkeypatch.setattr(module, "load_hub", fake)
    hub_task = get_task(name)
    local_task = get_task(name, data_dir=data_dir)
    hub_docs, local_docs = hub_task.docs(), local_task.docs()
    assert calls[0][:2] == CANONICAL[name]
    assert [d["task_id"] for d in hub_docs] == [d["task_id"] for d in local_docs]
    for h, l in zip(hub_docs[:50], local_docs[:50]):  # same prompts (shots included) and same gold
        assert hub_task.build_prompt(h) == local_task.build_prompt(l)
        assert h.get("answer") == l.get("answer")


def test_hub_errors_say_how_to_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="openai/gsm8k.*--data-dir"):
        get_task("gsm8k").docs()
