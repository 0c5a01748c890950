"""Agreement checks: the harness's MATH-500 / GSM8K scores equal math-verify applied directly, and the pass@k
estimator equals the closed form."""

import random
from math import comb

import pytest
from math_verify import parse, verify

try:
    from data_files import require_file
except ImportError:  # tests/conftest.py before data_files.py existed
    from conftest import require_file
from deepseek_v3.eval import get_task, pass_at_k, score_predictions
from deepseek_v3.eval.metrics import summarize_correctness


def _math_predictions(docs, rng):
    preds = []
    for i, d in enumerate(docs):
        other = docs[(i + 7) % len(docs)]["answer"]
        kind = i % 6
        if kind == 0:
            text = f"Therefore the answer is $\\boxed{{{d['answer']}}}$."
        elif kind == 1:
            text = f"We get $\\boxed{{{other}}}$."
        elif kind == 2:
            text = d["solution"]
        elif kind == 3:
            text = f"First guess \\boxed{{{other}}}, but correcting: the final answer is \\boxed{{{d['answer']}}}"
        elif kind == 4:
            text = f"The answer is ${d['answer']}$"  # no box: math-verify's fallback extraction
        else:
            text = f"\\boxed{{{rng.randint(-50, 50)}}}"
        preds.append({"task_id": d["task_id"], "completion": text})
    return preds


def test_math500_matches_math_verify_directly(data_dir):
    require_file(data_dir / "math500" / "test.jsonl")
    task = get_task("math500", data_dir=data_dir)
    docs = task.docs()[:240]
    preds = _math_predictions(docs, random.Random(0))
    metrics, records = score_predictions(task, preds)
    direct = [bool(verify(parse(f"${d['answer']}$"), parse(p["completion"]))) for d, p in zip(docs, preds)]
    assert [r["correct"] for r in records] == direct
    assert metrics["score"] == pytest.approx(sum(direct) / len(direct))
    assert 0.3 < metrics["score"] < 0.9  # a mix of right and wrong answers, not a degenerate agreement


def test_gsm8k_matches_math_verify_directly(data_dir):
    require_file(data_dir / "gsm8k" / "test.jsonl")
    task = get_task("gsm8k", data_dir=data_dir)
    docs = task.docs()[:300]
    rng = random.Random(1)
    preds = []
    for i, d in enumerate(docs):
        value = int(d["gold"]) + (0 if i % 3 else rng.choice([-2, -1, 1, 5]))
        text = [f"Adding up, she has {value} left.\n#### {value}",
                f"So the total is {value}. The answer is {value}.",
                f"... which gives {value}.00 dollars.\n#### {value}"][i % 3]
        preds.append({"task_id": d["task_id"], "completion": text})
    metrics, records = score_predictions(task, preds)
    direct = [bool(verify(parse(d["gold"]), parse(p["completion"]))) for d, p in zip(docs, preds)]
    assert [r["correct_numeric"] for r in records] == direct  # our lenient numeric scoring
    assert [r["correct_numeric_strict"] for r in records] == direct
    assert metrics["numeric_flexible"] == metrics["numeric_strict"] == pytest.approx(sum(direct) / len(direct))
    assert metrics["score"] == metrics["exact_match_flexible"]
    assert 0.5 < metrics["numeric_flexible"] < 0.8


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0), (10, 1, 1, 0.1), (10, 3, 5, 1 - 21 / 252), (5, 5, 3, 1.0), (5, 2, 4, 1.0),
    (200, 17, 10, 1 - comb(183, 10) / comb(200, 10)), (4, 2, 2, 1 - 1 / 6),
])
def test_pass_at_k_hand_made_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_k_equals_closed_form_everywhere():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
    assert pass_at_k(10, 4, 1) == pytest.approx(0.4)  # pass@1 is the fraction of correct samples
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_pass_at_k_through_the_harness_with_real_executions(data_dir):
    """4 samples per HumanEval task, 2 correct (canonical) and 2 wrong: pass@1 = 0.5, pass@2 = 1 - 1/6."""
    require_file(data_dir / "humaneval" / "HumanEval.jsonl.gz")
    task = get_task("humaneval", data_dir=data_dir, ks=(1, 2, 4), progress=False, workers=4)
    docs = task.docs()[:6]
    preds = []
    for d in docs:
        preds += [{"task_id": d["task_id"], "completion": d["canonical_solution"]}] * 2
        preds += [{"task_id": d["task_id"], "completion": "    return None\n"}] * 2
    metrics, _ = score_predictions(task, preds)
    assert metrics["num_docs"] == 6 and metrics["num_samples"] == 24
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    assert metrics["pass@4"] == pytest.approx(1.0)
    assert summarize_correctness([[True, False, False], [False] * 3], ks=(1, 2, 3))["pass@2"] == pytest.approx(
        (1 - comb(2, 2) / comb(3, 2)) / 2)
