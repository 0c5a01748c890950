"""MBPP (Austin et al., 2021, "Program Synthesis with Large Language Models"), full version.

Dataset: ``google-research-datasets/mbpp`` config ``full``: test split (task ids 11-510, 500 problems) for
evaluation and the prompt split (ids 1-10) for the shots; or ``<data-dir>/mbpp/mbpp.jsonl`` (all 974 rows, split by
id). Task id: ``task_id`` (as a string).

Prompt (default, 3-shot with tasks 2, 3, 4, the format of the MBPP paper / DeepSeek-Coder evaluation)::

    You are an expert Python programmer, and here is your task: <text> Your code should pass these tests:

    <test 1>
    <test 2>
    <test 3>
    [BEGIN]
    <reference code>
    [DONE]

    ... (3 shots) ...

    You are an expert Python programmer, and here is your task: <text> Your code should pass these tests:

    <tests>
    [BEGIN]

Generation stops at ``[DONE]``. Prompt (``--chat``): the same task description and tests in a user message, asking
for the function in a ```python code block.

Scoring: the solution runs in the sandbox's candidate process and ``test_setup_code + test_list`` (asserts) in its
judge (``sandbox.run_tests``), after the solution is loaded because tasks 367 and 927 build their test data with a
class the solution defines (its objects stay in the candidate, see the sandbox docstring). A fenced code block in
the completion is used when present; ``[BEGIN]`` / ``[DONE]`` markers are stripped. Metrics: ``pass@1`` (primary
``score``) and ``pass@k``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import Task, register_task
from .code_utils import execute_jobs, extract_code_block, split_test_names, top_level_names
from .data import load_hub, read_jsonl

FEWSHOT_IDS = (2, 3, 4)


def _describe(doc: dict) -> str:
    tests = "\n".join(doc["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {doc['text'].strip()} "
            f"Your code should pass these tests:\n\n{tests}\n")


def extract_solution(completion: str) -> str:
    block = extract_code_block(completion)
    code = block if block is not None else completion
    return code.replace("[BEGIN]", "").split("[DONE]")[0].strip("\n")


@register_task
class MBPP(Task):
    name = "mbpp"
    hub_id = "google-research-datasets/mbpp"
    hub_config = "full"
    hub_split = "test"
    primary_metric = "pass@1"
    default_max_new_tokens = 512

    def __init__(self, *args, num_fewshot: int | None = None, chat: bool = False, **kwargs):
        if num_fewshot is None:
            num_fewshot = 0 if chat else 3
        super().__init__(*args, num_fewshot=num_fewshot, chat=chat, **kwargs)
        self._prompt_split: list[dict] | None = None

    @property
    def stop(self) -> Sequence[str]:  # type: ignore[override]
        return () if self.chat else ("[DONE]",)

    def _local_rows(self, data_dir: Path) -> list[dict]:
        return read_jsonl(data_dir / "mbpp" / "mbpp.jsonl")

    def _load_local(self, data_dir: Path) -> list[dict]:
        return self._from_hub([r for r in self._local_rows(data_dir) if 11 <= int(r["task_id"]) <= 510])

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        return [{**r, "task_id": str(r["task_id"])} for r in rows]

    def shots(self) -> list[dict]:
        if self._prompt_split is None:
            if self.data_dir is not None:
                rows = [r for r in self._local_rows(self.data_dir) if 1 <= int(r["task_id"]) <= 10]
            else:
                rows = load_hub(self.hub_id, self.hub_config, "prompt")
            self._prompt_split = [r for i in FEWSHOT_IDS for r in rows if int(r["task_id"]) == i]
        return self._prompt_split[: self.num_fewshot or 0]

    def build_prompt(self, doc: dict) -> str | list[dict]:
        if self.chat:
            return [{"role": "user", "content": _describe(doc) + "\nWrite the function in a ```python code block."}]
        shots = "".join(f"{_describe(s)}[BEGIN]\n{s['code'].strip()}\n[DONE]\n\n" for s in self.shots())
        return f"{shots}{_describe(doc)}[BEGIN]\n"

    def program(self, doc: dict, completion: str) -> str:
        tests = "\n".join(doc["test_list"])
        return f"{extract_solution(completion)}\n\n{doc.get('test_setup_code') or ''}\n\n{tests}\n"

    def job(self, doc: dict, completion: str) -> dict | str:
        """Sandbox job: the setup code and tests run in the judge, calling the solution's functions and classes
        (``sandbox.run_tests``; task 367 builds its trees from the solution's ``Node``, kept in the candidate)."""
        tests = f"{doc.get('test_setup_code') or ''}\n" + "\n".join(doc["test_list"]) + "\n"
        names = split_test_names(tests, sorted(top_level_names(doc.get("code") or "")))
        if names is None:
            return self.program(doc, completion)
        entry, modules = names
        return {"solution": extract_solution(completion), "tests": tests, "entry_points": entry,
                "prelude": "".join(f"import {m}\n" for m in modules), "fallback_inline": self.program(doc, completion)}

    def score_batch(self, items: Sequence[tuple[dict, str]]) -> list[dict]:
        jobs = [self.job(doc, c) for doc, c in items]
        results = execute_jobs(jobs, self.timeout, self.workers, self.progress, f"{self.name} execution")
        for (doc, c), res in zip(items, results):
            res["extracted"] = extract_solution(c)
        return results
