"""A synthetic verifiable task for CPU-sized recipes: two-number addition in GSM8K's answer format.

Rows: `question` ("What is 37 + 85?") and `answer` ("37 + 85 = 122\\n#### 122"), so the GSM8K accuracy rule
(`rewards.gsm8k_accuracy_reward`) verifies completions. `preference_pairs` turns rows into TRL preference data
(`prompt` / `chosen` / `rejected`: the right answer vs the same working with a wrong sum) for a reward model;
`heldout_addition_rows` draws problems that a training set does not contain, for held-out preference accuracy.

    deepseek-v3 train sft --config recipes/sft_lora_tiny.yaml --dataset_name addition.jsonl
    python -m deepseek_v3.trainers.synthetic addition.jsonl --rows 512     # writes the file
"""

from __future__ import annotations

import argparse
import json
import os
import random


def addition_rows(n: int, seed: int = 0, max_operand: int = 99) -> list[dict]:
    """`n` addition problems with operands in [0, max_operand]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def write_addition_dataset(path: str, n: int = 512, seed: int = 0) -> str:
    """Write `addition_rows(n, seed)` as JSON lines to `path`; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in addition_rows(n, seed):
            f.write(json.dumps(row) + "\n")
    return path


def heldout_addition_rows(n: int, exclude: list[dict], seed: int = 1, max_operand: int = 99) -> list[dict]:
    """`n` addition problems none of which is a question of `exclude` (e.g. the training rows)."""
    seen = {r["question"] for r in exclude}
    if (max_operand + 1) ** 2 - len(seen) < n:
        raise ValueError(f"only {(max_operand + 1) ** 2 - len(seen)} problems are left outside the {len(seen)} "
                         f"excluded ones; n={n}")
    rows, batch = [], 0
    while len(rows) < n:
        for r in addition_rows(4 * n, seed=seed * 1_000_003 + batch, max_operand=max_operand):
            if r["question"] not in seen and len(rows) < n:
                seen.add(r["question"])
                rows.append(r)
        batch += 1
    return rows


NEGATIVES = ("any", "near")


def wrong_answer(answer: str, rng: random.Random, negatives: str = "any", max_operand: int = 99) -> str:
    """The same working with a wrong sum: `any` = uniform over the wrong sums in [0, 2 * max_operand]; `near` = off
    by 1..10 (never negative; 90% of them differ from the right sum in the last digit only)."""
    left, total = answer.split(" = ", 1)[0], int(answer.rsplit("#### ", 1)[1])
    if negatives == "any":
        wrong = rng.choice([s for s in range(2 * max_operand + 1) if s != total])
    elif negatives == "near":
        wrong = total + rng.choice([d for d in range(-10, 11) if d != 0 and total + d >= 0])
    else:
        raise ValueError(f"negatives={negatives!r}: use one of {NEGATIVES}")
    return f"{left} = {wrong}\n#### {wrong}"


def preference_pairs(rows: list[dict], seed: int = 0, system_prompt: str | None = None,
                     negatives: str = "any") -> list[dict]:
    """TRL preference rows (conversational): `prompt`, `chosen` (correct answer), `rejected` (wrong sum, drawn as
    `wrong_answer(negatives)` says)."""
    from .common import to_conversation

    rng = random.Random(seed)
    return [
        {
            "prompt": to_conversation(r["question"], system_prompt),
            "chosen": [{"role": "assistant", "content": r["answer"]}],
            "rejected": [{"role": "assistant", "content": wrong_answer(r["answer"], rng, negatives)}],
        }
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the synthetic addition task as JSON lines")
    parser.add_argument("path")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_addition_dataset(args.path, args.rows, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
