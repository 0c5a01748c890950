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


# one arithmetic step of a chain of thought: "12-3=9", "4 * 5 = 20" (integers, + - * x /)
ARITHMETIC_STEP = re.compile(r"(-?\d+)\s*([-+*/x\u00d7])\s*(-?\d+)\s*=\s*(-?\d+)")
BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def _step_holds(a: str, op: str, b: str, result: str) -> bool:
    x, y, z = int(a), int(b), int(result)
    if op == "/":
        return y != 0 and x == y * z
    return z == {"+": x + y, "-": x - y}.get(op, x * y)


def arithmetic_steps_reward(completions, **kwargs) -> list[float]:
    """1.0 when the reasoning is arithmetic that checks out: the `<think>` block holds at least one step
    `a op b = c`, every such step is true, and the boxed answer equals the last step's result; else 0.0.

    A rule reward next to `math_accuracy` (which sees only the final answer): without it, RL also reinforces a
    right answer reached through wrong steps ("6-4=2, 2+7=10 -> \\boxed{10}"), and a small policy learns the wrong
    steps. Checking each step is what a verifiable task allows (like R1's rewards, no learned model)."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        if "</think>" not in text:
            rewards.append(0.0)
            continue
        thinking, answer = text.split("</think>", 1)
        steps = ARITHMETIC_STEP.findall(thinking)
        boxed = BOXED.findall(answer)
        ok = bool(steps) and len(boxed) == 1 and all(_step_holds(*s) for s in steps) and int(boxed[0]) == int(steps[-1][3])
        rewards.append(1.0 if ok else 0.0)
    return rewards


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
    "arithmetic_steps": arithmetic_steps_reward,
    "gsm8k_accuracy": gsm8k_accuracy_reward,
    "code": code_reward,
}


def get_reward_funcs(names: list[str]) -> list:
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"reward_funcs={unknown} unknown; choose from {sorted(REWARD_FUNCS)}")
    return [REWARD_FUNCS[n] for n in names]
