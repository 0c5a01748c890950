"""Helpers shared by the code tasks: code-block extraction and sandboxed scoring of many programs."""

from __future__ import annotations

import ast
import builtins
import importlib.util
import re
from typing import Sequence

from .sandbox import run_many

# A fence opens at the start of a line (a ``` inside a comment or a string in the middle of a line is code, not a
# fence) and closes at the start of a line or at the end of the text.
_BLOCK = re.compile(r"(?:^|\n)[ \t]*```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|$)",
                    re.DOTALL | re.IGNORECASE)


def extract_code_block(text: str) -> str | None:
    """The longest fenced code block of ``text`` (an unterminated final fence counts), or None."""
    blocks = _BLOCK.findall(text)
    return max(blocks, key=len) if blocks else None


def parses(code: str) -> bool:
    """Whether ``code`` is syntactically valid Python (checked on the host, nothing is executed)."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def top_level_names(code: str) -> set[str]:
    """Names a (trusted, reference) solution defines at module level."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in getattr(node, "targets", [getattr(node, "target", None)]):
                if isinstance(t, ast.Name):
                    names.add(t.id)
    return names


def split_test_names(tests: str, entry_points: Sequence[str] = ()) -> tuple[list[str], list[str]] | None:
    """The names ``tests`` uses without defining them: (called names = the solution's entry points, importable
    modules such as ``math`` that the tests borrow from the solution's imports). None when another free name is used
    (e.g. a class the solution defines, used as a value) so the tests cannot run apart from the solution.
    ``entry_points`` are entry points even where the tests only pass them on (``check(candidate_name)``) or where
    they shadow a builtin (MBPP task 126 defines ``sum``): pass the names the *reference* solution defines, never
    names taken from the candidate (a candidate redefining ``set`` would otherwise answer both sides of
    ``set(f(x)) == set(y)``)."""
    tree = ast.parse(tests)
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    free = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    free -= defined
    entry = sorted(free & (called | set(entry_points)) - (set(dir(builtins)) - set(entry_points)))
    free -= set(dir(builtins)) - set(entry)
    others = sorted(free - set(entry))
    if any(importlib.util.find_spec(name) is None for name in others):
        return None
    return entry, others


def execute_jobs(jobs: Sequence, timeout: float, workers: int | None, progress: bool, desc: str) -> list[dict]:
    """Run sandbox jobs (``run_tests`` argument dicts, or self-checking program strings) and summarise each."""
    results = run_many(jobs, timeout, workers=workers, progress=progress, desc=desc)
    return [{
        "correct": r.passed,
        "status": r.status,
        "returncode": r.returncode,
        "verdict": r.verdict,
        "stderr": r.stderr[-1000:],
        "duration": round(r.duration, 4),
    } for r in results]
