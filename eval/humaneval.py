"""HumanEval (Chen et al., 2021): 164 hand-written Python functions with unit tests.

Dataset: ``openai/openai_humaneval`` (test) or ``<data-dir>/humaneval/HumanEval.jsonl.gz``. Task id: ``task_id``
(``HumanEval/0`` ...).

Prompt (default, completion style as in the Codex paper): the task's ``prompt`` verbatim (imports, signature and
docstring); the model continues the function body. Generation stops at ``\\nclass``, ``\\ndef``, ``\\n#``,
``\\nif``, ``\\nprint`` (the paper's stop sequences). Prompt (``--chat``, user message)::

    Complete the following Python function. Return the whole function in a ```python code block.

    ```python
    <prompt>
    ```

Scoring: the program ``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)"`` runs in the sandbox
(``deepseek_v3.eval.sandbox.run_code``: own process, wall-clock timeout, rlimits, no network, fresh temp dir); a
sample passes if the program runs to the end. If ``prompt + completion`` is not valid Python and the completion
contains a fenced code block (a line starting with ```), the block is used instead (a deviation from human-eval,
which would score it as a syntax error), and if that code defines ``def <entry_point>(`` at column 0 it is treated as the whole function (appended after the
prompt, so the prompt's imports stay available). Metrics: ``pass@1`` (primary ``score``) and ``pass@k`` with the
unbiased estimator for every requested ``k <= n`` samples per task.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .base import Task, register_task
from .code_utils import execute_jobs, extract_code_block, parses
from .data import read_jsonl


def build_solution(doc: dict, completion: str) -> str:
    """The code of the function (prompt + body, or the model's whole function).

    Like human-eval, ``prompt + completion`` is the solution whenever it is valid Python (so a body followed by a
    comment that contains a ``` fence is scored as written). Only when it is not (chat answers with prose around a
    fenced block) is the longest fenced block used."""
    if parses(doc["prompt"] + completion):
        return doc["prompt"] + completion
    block = extract_code_block(completion)
    code = block if block is not None else completion
    if re.search(rf"^(?:async\s+)?def\s+{re.escape(doc['entry_point'])}\s*\(", code, re.MULTILINE):
        return doc["prompt"] + "\n    pass\n\n" + code
    return doc["prompt"] + code


@register_task
class HumanEval(Task):
    name = "humaneval"
    hub_id = "openai/openai_humaneval"
    hub_split = "test"
    primary_metric = "pass@1"
    default_max_new_tokens = 512

    @property
    def stop(self) -> Sequence[str]:  # type: ignore[override]
        return () if self.chat else ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

    def _load_local(self, data_dir: Path) -> list[dict]:
        return self._from_hub(read_jsonl(data_dir / "humaneval" / "HumanEval.jsonl.gz"))

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        return [dict(r) for r in rows]

    def build_prompt(self, doc: dict) -> str | list[dict]:
        if self.chat:
            return [{"role": "user", "content": (
                "Complete the following Python function. Return the whole function in a ```python code block.\n\n"
                f"```python\n{doc['prompt'].strip()}\n```")}]
        return doc["prompt"]

    def program(self, doc: dict, completion: str) -> str:
        return f"{build_solution(doc, completion)}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"

    def job(self, doc: dict, completion: str) -> dict:
        """Sandbox job: the solution runs in the candidate process, the tests (with the prompt's helpers) in the
        judge (``sandbox.run_tests``)."""
        return {"solution": build_solution(doc, completion), "tests": f"{doc['test']}\n\ncheck({doc['entry_point']})\n",
                "entry_points": [doc["entry_point"]], "prelude": doc["prompt"],
                "fallback_inline": self.program(doc, completion)}

    def score_batch(self, items: Sequence[tuple[dict, str]]) -> list[dict]:
        jobs = [self.job(doc, c) for doc, c in items]
        results = execute_jobs(jobs, self.timeout, self.workers, self.progress, f"{self.name} execution")
        for (doc, c), res in zip(items, results):
            res["extracted"] = build_solution(doc, c)[len(doc["prompt"]):]
        return results
