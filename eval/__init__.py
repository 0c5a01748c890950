"""Evaluation harness: MMLU, MATH-500, GSM8K, HumanEval, AIME 2024, MBPP (``deepseek-v3 eval``).

- ``get_task(name, ...)`` / ``score_predictions(task, predictions)``: model-free scoring.
- ``run_evaluation(model=..., tasks=[...], output_dir=...)``: generation / log-likelihood with a backend, resumable.
- ``run_tests(solution, tests, entry_points)`` / ``run_code(program)``: the sandboxed executor (bubblewrap; tests
  judged outside the candidate's process), also used by the GRPO code reward.
- ``pass_at_k(n, c, k)``: the unbiased pass@k estimator.
"""

from .base import TASK_REGISTRY, Task, get_task, list_tasks, score_predictions
from .metrics import pass_at_k
from .sandbox import ExecutionResult, SandboxUnavailableError, run_code, run_many, run_tests, sandbox_capabilities


def __getattr__(name):  # lazy: the runner imports torch
    if name == "run_evaluation":
        from .runner import run_evaluation

        return run_evaluation
    raise AttributeError(name)


__all__ = ["TASK_REGISTRY", "Task", "get_task", "list_tasks", "score_predictions", "pass_at_k", "ExecutionResult",
           "SandboxUnavailableError", "run_code", "run_tests", "run_many", "sandbox_capabilities", "run_evaluation"]
