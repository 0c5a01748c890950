"""HumanEval solution extraction agrees with human-eval on raw completions (issue 15, defect 14)."""

from deepseek_v3.eval.base import get_task
from deepseek_v3.eval.code_utils import extract_code_block
from deepseek_v3.eval.humaneval import build_solution


def test_body_followed_by_a_comment_with_a_fence_is_scored_as_written(data_dir):
    task = get_task("humaneval", data_dir=data_dir, progress=False)
    doc = task.docs()[0]
    completion = doc["canonical_solution"] + "\n# usage:\n# ```python\n# has_close_elements([1.0], 0.5)\n# ```\n"
    assert build_solution(doc, completion) == doc["prompt"] + completion
    inline = doc["canonical_solution"].rstrip("\n") + "  # see ```the docs```\n"
    results = task.score_batch([(doc, completion), (doc, inline)])
    assert [r["correct"] for r in results] == [True, True]


def test_chat_answers_still_use_the_fenced_block(data_dir):
    task = get_task("humaneval", data_dir=data_dir, progress=False)
    doc = task.docs()[0]
    whole = doc["prompt"] + doc["canonical_solution"]
    chat = f"Here is the function:\n\n```python\n{whole}\n```\nIt compares every pair."
    assert build_solution(doc, chat).endswith(whole)
    assert task.score_batch([(doc, chat)])[0]["correct"]
    assert extract_code_block("x = 1  # ```py\n") is None
