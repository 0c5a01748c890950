"""DeepSeek-R1 rule-based rewards, as small plain functions with the GRPOTrainer signature
`reward(completions, **dataset_columns) -> list[float]`.

Completions may be plain strings or conversational (`[{"role": "assistant", "content": ...}]`). Scoring reuses
the evaluation harness (`deepseek_v3.eval`): the math reward is exactly the MATH-500 metric (math-verify), the
GSM8K reward the GSM8K flexible match, and the code reward runs the program in the same sandbox as HumanEval.
"""

import re

from deepseek_v3.eval.code_utils import extract_code_block, split_test_names
from deepseek_v3.eval.gsm8k import extract_flexible, gold_answer, same_number
from deepseek_v3.eval.math_grading import grade
from deepseek_v3.eval.sandbox import run_code, run_tests

# R1's template: reasoning inside <think> ... </think>, then the answer (the paper's "format reward").
THINK_FORMAT = re.compile(r"^\s*<think>(?!.*<think>).*?</think>\s*\S.*$", re.DOTALL)
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process is enclosed within <think> </think> tags, followed by the answer, i.e., "
    "<think> reasoning process here </think> answer here. Put the final answer within \\boxed{}."
)


def completion_text(completion) -> str:
    """The assistant text of a plain or conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return completion[-1].get("content", "")
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def answer_part(text: str) -> str:
    """What follows the reasoning block (the whole text when there is none)."""
    return text.split("</think>", 1)[1] if "</think>" in text else text


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion is `<think> reasoning </think> answer`, else 0.0."""
    return [1.0 if THINK_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def math_accuracy_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when math-verify finds the gold `answer` column in the final answer (after </think>), else 0.0."""
    return [float(grade(str(gold), answer_part(completion_text(c)))[1]) for c, gold in zip(completions, answer)]


def gsm8k_accuracy_reward(completions, answer, **kwargs) -> list[float]:
    """GSM8K: the last number of the final answer equals the gold number after '####' in the `answer` column."""
    return [
        float(same_number(extract_flexible(answer_part(completion_text(c))), gold_answer(str(solution))))
        for c, solution in zip(completions, answer)
    ]


def code_reward(completions, test, entry_point=None, timeout: float = 10.0, **kwargs) -> list[float]:
    """1.0 when the last ```python block of the answer passes the `test` column's program in the sandbox.
    HumanEval-style rows (with `entry_point`) get `check(entry_point)` appended. The tests run in the sandbox's
    judge process, apart from the completion (`sandbox.run_tests`), so printing a sentinel, exiting early or an
    always-equal object earns nothing; tests that use a solution-defined value run as one program (`run_code`)."""
    rewards = []
    for i, completion in enumerate(completions):
        code = extract_code_block(answer_part(completion_text(completion)))
        if code is None:
            rewards.append(0.0)
            continue
        tests = f"{test[i]}\n" + (f"\ncheck({entry_point[i]})\n" if entry_point is not None else "")
        names = split_test_names(tests, [entry_point[i]] if entry_point is not None else [])
        if names is None:
            result = run_code(f"{code}\n\n{tests}", timeout=timeout)
        else:
            entry, modules = names
            result = run_tests(code, tests, entry, timeout, prelude="".join(f"import {m}\n" for m in modules),
                               fallback_inline=f"{code}\n\n{tests}")
        rewards.append(1.0 if result.passed else 0.0)
    return rewards


REWARD_FUNCS = {
    "format": format_reward,
    "math_accuracy": math_accuracy_reward,
    "gsm8k_accuracy": gsm8k_accuracy_reward,
    "code": code_reward,
}


def get_reward_funcs(names: list[str]) -> list:
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"reward_funcs={unknown} unknown; choose from {sorted(REWARD_FUNCS)}")
    return [REWARD_FUNCS[n] for n in names]
