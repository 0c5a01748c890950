"""Imports the built-in task modules so that they register themselves (see ``base.TASK_REGISTRY``)."""

from . import aime24, gsm8k, humaneval, math500, mbpp, mmlu  # noqa: F401
