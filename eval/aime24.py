"""AIME 2024 (American Invitational Mathematics Examination I and II, 30 problems, integer answers 0-999).

Dataset: ``HuggingFaceH4/aime_2024`` (train, its only split) or ``<data-dir>/aime24/test.jsonl``. Task id: ``id``.
The gold answer is the integer value (local files zero-pad it, e.g. ``"025"``).

Prompt: the MATH-500 one (``<problem>\\nPlease reason step by step, and put your final answer within \\boxed{}.``).
Scoring: math-verify against the integer answer; ``accuracy`` is pass@1 averaged over the ``n`` samples per problem
(AIME is usually reported with several samples, e.g. ``--num-samples 16 --temperature 0.6``), plus pass@k for the
requested ``k``.
"""

from __future__ import annotations

from pathlib import Path

from .base import Task, register_task
from .data import read_jsonl
from .math500 import math_prompt
from .math_grading import grade


@register_task
class AIME24(Task):
    name = "aime24"
    hub_id = "HuggingFaceH4/aime_2024"
    hub_split = "train"
    default_max_new_tokens = 4096

    def _load_local(self, data_dir: Path) -> list[dict]:
        return self._from_hub(read_jsonl(data_dir / "aime24" / "test.jsonl"))

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        return [{**r, "task_id": str(r["id"]), "answer": str(int(str(r["answer"]).strip()))} for r in rows]

    def build_prompt(self, doc: dict) -> str | list[dict]:
        return math_prompt(doc["problem"], self.chat)

    def score_one(self, doc: dict, completion: str) -> dict:
        extracted, correct = grade(doc["answer"], completion)
        return {"extracted": extracted, "gold": doc["answer"], "correct": correct}
