"""The demo's synthetic verifiable task: seeded two-step arithmetic word problems with `\\boxed{}` answers.

    question: "Ann has 7 apples, buys 5 more, then gives away 3. How many apples now?"
    solution: "<think>7+5=12, 12-3=9</think> \\boxed{9}"          (R1's format: reasoning, then the answer)
    answer:   "9"

Training solutions come in two reasoning styles, as distilled chain-of-thought corpora do: *worked* (each step's
result written down, as above) and *terse* (the whole sum in one go: "<think>7+5-3=9</think> \\boxed{9}").
`worked_fraction` sets the share of worked ones (default: all). `reasoning_style` tells the two apart in a
completion, so an evaluation can report which style a model writes and how accurate each is: SFT copies the
corpus's mix, and a reward for correct answers (GRPO) can shift it where one style is the more accurate.

Every problem is defined by its numbers and operations (start in 2..9, two operands in 1..9, each operation + or -,
never below zero); the names, objects and verbs vary the wording. The held-out split holds problems whose
number/operation combination never occurs in the training split, so a model must compute, not recall.

`ArithmeticTask` plugs the held-out split into the evaluation harness (`deepseek_v3.eval.runner.evaluate_task`),
scored with the same math-verify grading as MATH-500 and as the GRPO accuracy reward.
"""

from __future__ import annotations

import json
import random
import re
from itertools import product
from pathlib import Path

from deepseek_v3.eval.base import Task
from deepseek_v3.eval.math_grading import grade

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hal", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned")
OBJECTS = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles", "cups", "kites")
ADD_VERBS = ("buys {n} more", "finds {n} more", "gets {n} more")
SUB_VERBS = ("gives away {n}", "loses {n}", "sells {n}")  # short, so the numbers sit close together


def _all_programs() -> list[tuple[int, str, int, str, int]]:
    """Every (start, op1, x, op2, y) whose intermediate and final values stay >= 0."""
    programs = []
    for start, x, y, op1, op2 in product(range(2, 10), range(1, 10), range(1, 10), "+-", "+-"):
        mid = start + x if op1 == "+" else start - x
        end = mid + y if op2 == "+" else mid - y
        if mid >= 0 and end >= 0:
            programs.append((start, op1, x, op2, y))
    return programs


def make_problem(program: tuple[int, str, int, str, int], rng: random.Random, worked: bool = True) -> dict:
    """One worded problem (question, chain-of-thought solution, gold answer) for a number/operation program; the
    solution writes each step's result down (`worked`) or the whole sum in one go."""
    start, op1, x, op2, y = program
    mid = start + x if op1 == "+" else start - x
    end = mid + y if op2 == "+" else mid - y
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    verb1 = rng.choice(ADD_VERBS if op1 == "+" else SUB_VERBS).format(n=x)
    verb2 = rng.choice(ADD_VERBS if op2 == "+" else SUB_VERBS).format(n=y)
    question = f"{name} has {start} {obj}, {verb1}, then {verb2}. How many {obj} now?"
    steps = f"{start}{op1}{x}={mid}, {mid}{op2}{y}={end}" if worked else f"{start}{op1}{x}{op2}{y}={end}"
    return {"question": question, "solution": f"<think>{steps}</think> \\boxed{{{end}}}", "answer": str(end),
            "program": f"{start}{op1}{x}{op2}{y}", "style": "worked" if worked else "terse"}


def make_splits(num_train: int, num_heldout: int, seed: int = 0,
                worked_fraction: float = 1.0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) problems; the held-out programs are disjoint from the training programs. A
    `worked_fraction` share of the training solutions (chosen at random, seeded) is worked, the rest terse; the
    held-out solutions are all worked (only their questions and answers are used)."""
    programs = _all_programs()
    if num_heldout >= len(programs):
        raise ValueError(f"num_heldout={num_heldout} must be < {len(programs)} distinct problems")
    if not 0.0 <= worked_fraction <= 1.0:
        raise ValueError(f"worked_fraction={worked_fraction} must be in [0, 1] (the share of training solutions "
                         "that write each step's result down)")
    rng = random.Random(seed)
    rng.shuffle(programs)
    heldout_programs, train_programs = programs[:num_heldout], programs[num_heldout:]
    heldout = [make_problem(p, rng) for p in heldout_programs]
    style_rng = random.Random(f"{seed}/style")  # its own stream: the problems do not change with the mix
    train = [make_problem(train_programs[i % len(train_programs)], rng, worked=style_rng.random() < worked_fraction)
             for i in range(num_train)]
    for i, row in enumerate(heldout):
        row["task_id"] = f"heldout/{i}"
    return train, heldout


_WORKED_STEP = re.compile(r"<think>\s*\d+\s*[-+]\s*\d+\s*=")


def reasoning_style(completion: str) -> str:
    """ "worked" when the completion's reasoning writes the first step's result down ("<think>7+5=12, ..."),
    "terse" otherwise (the whole sum in one go, or no reasoning)."""
    return "worked" if _WORKED_STEP.search(completion) else "terse"


def pretraining_text(problem: dict) -> str:
    """The plain-text (no chat template) form used for next-token + MTP pre-training."""
    return f"{problem['question']}\n{problem['solution']}"


def write_jsonl(rows: list[dict], path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


class ArithmeticTask(Task):
    """The held-out split as an evaluation-harness task (chat prompt = the bare question, as in SFT / GRPO)."""

    name = "arithmetic"
    hub_id = "local/synthetic-arithmetic"
    default_max_new_tokens = 48

    def __init__(self, problems: list[dict], **kwargs):
        super().__init__(chat=True, **kwargs)
        self._docs = [dict(p) for p in problems]

    def config(self) -> dict:
        return {"name": self.name, "chat": True, "num_fewshot": 0, "output_type": self.output_type,
                "dataset": f"synthetic arithmetic, {len(self._docs)} held-out problems"}

    def build_prompt(self, doc: dict) -> list[dict]:
        return [{"role": "user", "content": doc["question"]}]

    def score_one(self, doc: dict, completion: str) -> dict:
        answer = completion.split("</think>", 1)[1] if "</think>" in completion else completion
        extracted, correct = grade(doc["answer"], answer)
        return {"extracted": extracted, "gold": doc["answer"], "correct": correct}
