"""MATH-500 (Lightman et al., 2023, "Let's Verify Step by Step"): 500 problems of the MATH test set.

Dataset: ``HuggingFaceH4/MATH-500`` (test) or ``<data-dir>/math500/test.jsonl``. Task id: ``unique_id``
(e.g. ``test/precalculus/807.json``).

Prompt (zero-shot chain of thought, DeepSeek / Qwen evaluation instruction; a user message when chatting)::

    <problem>
    Please reason step by step, and put your final answer within \\boxed{}.

Scoring: math-verify (``deepseek_v3.eval.math_grading.grade``) of the completion against the gold ``answer``;
metric ``accuracy`` (= pass@1, averaged over samples when ``n > 1``).
"""

from __future__ import annotations

from pathlib import Path

from .base import Task, register_task
from .data import read_jsonl
from .math_grading import grade

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_prompt(problem: str, chat: bool) -> str | list[dict]:
    text = f"{problem.strip()}\n{MATH_INSTRUCTION}"
    return [{"role": "user", "content": text}] if chat else text + "\n"


@register_task
class MATH500(Task):
    name = "math500"
    hub_id = "HuggingFaceH4/MATH-500"
    hub_split = "test"
    default_max_new_tokens = 2048

    def _load_local(self, data_dir: Path) -> list[dict]:
        return self._from_hub(read_jsonl(data_dir / "math500" / "test.jsonl"))

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        return [{**r, "task_id": r["unique_id"]} for r in rows]

    def build_prompt(self, doc: dict) -> str | list[dict]:
        return math_prompt(doc["problem"], self.chat)

    def score_one(self, doc: dict, completion: str) -> dict:
        extracted, correct = grade(doc["answer"], completion)
        return {"extracted": extracted, "gold": doc["answer"], "correct": correct}
