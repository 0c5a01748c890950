"""Helpers shared by the code tasks: code-block extraction and sandboxed scoring of many programs."""

from __future__ import annotations

import re
from typing import Sequence

from .sandbox import run_many

_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def extract_code_block(text: str) -> str | None:
    """The longest fenced code block of ``text`` (an unterminated final fence counts), or None."""
    blocks = _BLOCK.findall(text)
    return max(blocks, key=len) if blocks else None


def execute_programs(programs: Sequence[str], timeout: float, workers: int | None, progress: bool, desc: str) -> list[dict]:
    results = run_many(programs, timeout, workers=workers, progress=progress, desc=desc)
    return [{
        "correct": r.passed,
        "status": r.status,
        "returncode": r.returncode,
        "stderr": r.stderr[-1000:],
        "duration": round(r.duration, 4),
    } for r in results]
