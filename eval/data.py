"""Dataset loading: the canonical Hugging Face dataset by default, or a local copy with ``--data-dir``.

The local layout is the one of ``../shared/data`` (see its SOURCES.md)::

    mmlu/{dev,test}/<subject>_{dev,test}.csv     question,choice0..choice3,answer(0-3)
    math500/test.jsonl                           problem, solution, answer, subject, level, unique_id
    gsm8k/{train,test}.jsonl                     question, answer ("... #### N")
    humaneval/HumanEval.jsonl.gz                 task_id, prompt, entry_point, canonical_solution, test
    aime24/test.jsonl                            id, problem, solution, answer (zero-padded string), url
    mbpp/mbpp.jsonl                              text, code, task_id, test_setup_code, test_list, challenge_test_list
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterator


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a ``.jsonl`` or ``.jsonl.gz`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (check --data-dir; expected layout in eval/data.py)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (check --data-dir; expected layout in eval/data.py)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_hub(dataset_id: str, config: str | None, split: str) -> list[dict]:
    """Load ``split`` of a Hugging Face dataset (needs network access or a populated HF cache)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is part of the eval extra
        raise ImportError("loading benchmarks from the Hub needs `datasets`: pip install 'deepseek-v3-hf[eval]'") from err
    args = (dataset_id, config) if config else (dataset_id,)
    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as err:
        raise RuntimeError(
            f"could not load {dataset_id!r} (config {config!r}, split {split!r}) from the Hugging Face Hub: {err}. "
            "Pass --data-dir with a local copy instead (layout in deepseek_v3/eval/data.py)."
        ) from err
    return [dict(row) for row in ds]


def iter_jsonl_records(path: str | Path) -> Iterator[dict]:
    """Yield the records of a (possibly partially written) jsonl file; a truncated last line is ignored."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # interrupted while writing the last line
                return
            raise ValueError(f"{path}:{i + 1} is not valid JSON") from None
