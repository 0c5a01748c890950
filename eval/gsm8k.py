"""GSM8K (Cobbe et al., 2021): 1,319 grade-school math word problems with integer answers.

Dataset: ``openai/gsm8k`` config ``main`` (test; shots from train) or ``<data-dir>/gsm8k/{test,train}.jsonl``.
Task id: the 0-based row index in the test split, as a string. Gold: the number after ``####`` (commas removed).

Prompt (default, 8-shot, lm-eval ``gsm8k`` format; the shots are the first 8 rows of the train split with their
reference solutions, calculator annotations included)::

    Question: <train question 1>
    Answer: <train solution 1, ending in "#### <number>">

    ... (8 shots) ...

    Question: <test question>
    Answer:

Generation stops at ``\\n\\nQuestion:``. Prompt (``--chat``, zero-shot user message)::

    <question>
    Please reason step by step, and put your final answer after "####", e.g. "#### 42".

Scoring: two extractions, both compared numerically with the gold number (``18``, ``18.00``, ``$18`` and ``1,8`` -> 18):

- ``strict``: the number after the first ``#### `` (lm-eval's strict-match), or after ``The answer is`` (the
  chain-of-thought variant's phrase);
- ``flexible``: the last number in the completion (lm-eval's flexible-extract).

``accuracy`` (the primary ``score``) is the flexible match; ``accuracy_strict`` the strict one.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

from .base import Task, register_task
from .data import load_hub, read_jsonl
from .metrics import summarize_correctness

INSTRUCTION = 'Please reason step by step, and put your final answer after "####", e.g. "#### 42".'
_STRICT = re.compile(r"(?:####|[Tt]he (?:final )?answer is)\s*:?\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"-?\$?\s?[0-9][0-9,]*(?:\.[0-9]+)?")


def to_number(text: str | None) -> Decimal | None:
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def gold_answer(solution: str) -> str:
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' line: {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def extract_strict(completion: str) -> str | None:
    m = _STRICT.search(completion)
    return m.group(1) if m else None


def extract_flexible(completion: str) -> str | None:
    found = _NUMBER.findall(completion)
    return found[-1].replace("$", "").replace(" ", "") if found else None


def same_number(a: str | None, gold: str) -> bool:
    x, y = to_number(a), to_number(gold)
    return x is not None and y is not None and x == y


@register_task
class GSM8K(Task):
    name = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    hub_split = "test"
    default_max_new_tokens = 512

    def __init__(self, *args, num_fewshot: int | None = None, chat: bool = False, **kwargs):
        if num_fewshot is None:
            num_fewshot = 0 if chat else 8
        super().__init__(*args, num_fewshot=num_fewshot, chat=chat, **kwargs)
        self._train: list[dict] | None = None

    @property
    def stop(self) -> Sequence[str]:  # type: ignore[override]
        return () if self.chat else ("\n\nQuestion:", "Question:")

    def _load_local(self, data_dir: Path) -> list[dict]:
        return self._from_hub(read_jsonl(data_dir / "gsm8k" / "test.jsonl"))

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        return [{**r, "task_id": str(i), "gold": gold_answer(r["answer"])} for i, r in enumerate(rows)]

    def shots(self) -> list[dict]:
        if self._train is None:
            if self.data_dir is not None:
                rows = read_jsonl(self.data_dir / "gsm8k" / "train.jsonl")
            else:
                rows = load_hub(self.hub_id, self.hub_config, "train")
            self._train = rows[: max(self.num_fewshot or 0, 8)]
        return self._train[: self.num_fewshot or 0]

    def build_prompt(self, doc: dict) -> str | list[dict]:
        if self.chat:
            return [{"role": "user", "content": f"{doc['question'].strip()}\n{INSTRUCTION}"}]
        shots = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['answer'].strip()}\n\n" for s in self.shots())
        return f"{shots}Question: {doc['question'].strip()}\nAnswer:"

    def score_one(self, doc: dict, completion: str) -> dict:
        strict = extract_strict(completion)
        flexible = extract_flexible(completion)
        return {
            "extracted": flexible,
            "extracted_strict": strict,
            "gold": doc["gold"],
            "correct": same_number(flexible, doc["gold"]),
            "correct_strict": same_number(strict, doc["gold"]),
        }

    def aggregate(self, docs: Sequence[dict], records: dict[str, list[dict]]) -> dict[str, Any]:
        metrics = super().aggregate(docs, records)
        strict = [[bool(r["correct_strict"]) for r in records[d["task_id"]]] for d in docs if records.get(d["task_id"])]
        metrics["accuracy_strict"] = summarize_correctness(strict)["accuracy"]
        metrics["accuracy_flexible"] = metrics["accuracy"]
        return metrics
