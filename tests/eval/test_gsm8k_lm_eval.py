"""`gsm8k` and `gsm8k_cot` reproduce lm-evaluation-harness (prompt, shots, strict-match / flexible-extract and
exact_match); our lenient numeric scoring keeps its own metric names (issue 15, defect 13)."""

import pytest

from deepseek_v3.eval.base import get_task
from deepseek_v3.eval.data import read_jsonl


@pytest.fixture(scope="module")
def train(data_dir):
    return read_jsonl(data_dir / "gsm8k" / "train.jsonl")


def test_gsm8k_prompt_is_lm_evals_seeded_5_shot(data_dir, train):
    task = get_task("gsm8k", data_dir=data_dir)
    docs = task.docs()
    second = task.build_prompt(docs[1])  # order does not matter: draws are numbered by document
    first = task.build_prompt(docs[0])
    rows = [6374, 3610, 957, 61, 742]  # lm-eval 0.4, fewshot seed 1234, first test document
    expected = "".join(f"Question: {train[i]['question']}\nAnswer: {train[i]['answer']}\n\n" for i in rows)
    assert first == expected + f"Question: {docs[0]['question']}\nAnswer:"
    assert task.shot_rows(docs[0]) == rows and task.shot_rows(docs[1]) != rows and second.count("Question:") == 6
    assert task.stop == ("Question:", "</s>", "<|im_end|>")
    assert get_task("gsm8k", data_dir=data_dir, num_fewshot=5).shot_rows(docs[0]) == rows  # not rows 0-4


def test_gsm8k_cot_prompt_is_the_8_exemplars(data_dir):
    task = get_task("gsm8k_cot", data_dir=data_dir)
    doc = task.docs()[0]
    prompt = task.build_prompt(doc)
    assert prompt.startswith("Q: There are 15 trees in the grove.") and prompt.count("The answer is") == 8
    assert prompt.endswith(f"Q: {doc['question']} Please reason step by step A:")
    assert "Olivia has $23." in prompt and task.stop[0] == "Q:"


# (completion, gold) -> lm-eval strict, lm-eval flexible, our numeric strict, our numeric flexible
CASES = [
    ("so #### 18", "18", True, True, True, True),
    ("####18", "18", False, True, True, True),
    ("#### $18", "18", False, True, True, True),
    ("#### 18.00", "18", False, False, True, True),
    ("The answer is 18.", "18", False, True, True, True),
    ("It costs $18.", "18", False, True, False, True),
    ("It is 18, not 3", "18", False, False, False, False),
    ("#### 1,800", "1800", True, True, True, True),
    ("#### -18", "18", False, False, False, False),
    ("no number at all", "18", False, False, False, False),
]


@pytest.mark.parametrize("completion, gold, strict, flexible, num_strict, num_flexible", CASES)
def test_gsm8k_metrics_match_lm_eval_and_keep_ours_apart(data_dir, completion, gold, strict, flexible, num_strict,
                                                         num_flexible):
    task = get_task("gsm8k", data_dir=data_dir)
    doc = {"task_id": "0", "gold": gold, "answer": f"Some steps.\n#### {gold}"}
    r = task.score_one(doc, completion)
    assert (r["correct_strict"], r["correct"], r["correct_numeric_strict"], r["correct_numeric"]) == (
        strict, flexible, num_strict, num_flexible)


def test_gsm8k_cot_strict_is_the_answer_is(data_dir):
    task = get_task("gsm8k_cot", data_dir=data_dir)
    doc = {"task_id": "0", "gold": "18", "answer": "Some steps.\n#### 18"}
    assert task.score_one(doc, "So 9 + 9 = 18. The answer is 18.")["correct_strict"]
    assert not task.score_one(doc, "#### 18")["correct_strict"]
    metrics = task.aggregate([doc], {"0": [task.score_one(doc, "The answer is 18.")]})
    assert metrics["exact_match_strict"] == metrics["exact_match_flexible"] == metrics["score"] == 1.0
    assert {"numeric_strict", "numeric_flexible"} <= set(metrics)
