"""A synthetic verifiable task for CPU-sized recipes: two-number addition in GSM8K's answer format.

Rows: `question` ("What is 37 + 85?") and `answer` ("37 + 85 = 122\\n#### 122"), so the GSM8K accuracy rule
(`rewards.gsm8k_accuracy_reward`) verifies completions. `preference_pairs` turns rows into TRL preference data
(`prompt` / `chosen` / `rejected`: the right answer vs the same working with a wrong sum) for a reward model.

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


def wrong_answer(answer: str, rng: random.Random) -> str:
    """The same working with a wrong sum (off by 1..10, never negative)."""
    left, total = answer.split(" = ", 1)[0], int(answer.rsplit("#### ", 1)[1])
    wrong = total + rng.choice([d for d in range(-10, 11) if d != 0 and total + d >= 0])
    return f"{left} = {wrong}\n#### {wrong}"


def preference_pairs(rows: list[dict], seed: int = 0, system_prompt: str | None = None) -> list[dict]:
    """TRL preference rows (conversational): `prompt`, `chosen` (correct answer), `rejected` (wrong sum)."""
    from .common import to_conversation

    rng = random.Random(seed)
    return [
        {
            "prompt": to_conversation(r["question"], system_prompt),
            "chosen": [{"role": "assistant", "content": r["answer"]}],
            "rejected": [{"role": "assistant", "content": wrong_answer(r["answer"], rng)}],
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
