"""Scoring on the real benchmark files: gold answers score 100 %, shuffled answers score near chance."""

import json
import random
import subprocess
import sys

import pytest

try:
    from data_files import require_file
except ImportError:  # tests/conftest.py before data_files.py existed
    from conftest import require_file
from deepseek_v3.eval import get_task, score_predictions
from deepseek_v3.eval.mmlu import LETTERS, SUBJECTS
from deepseek_v3.eval.runner import evaluate_task


def _shift(values, by=1):
    return values[by:] + values[:by]


@pytest.fixture(scope="module")
def files(data_dir):
    for rel in ("math500/test.jsonl", "gsm8k/test.jsonl", "gsm8k/train.jsonl", "humaneval/HumanEval.jsonl.gz",
                "aime24/test.jsonl", "mbpp/mbpp.jsonl"):
        require_file(data_dir / rel)
    for subject in SUBJECTS:
        require_file(data_dir / "mmlu" / "test" / f"{subject}_test.csv")
        require_file(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv")
    return data_dir


def test_math500_gold_is_100_and_shifted_is_near_zero(files):
    task = get_task("math500", data_dir=files)
    docs = task.docs()
    assert len(docs) == 500
    gold = [{"task_id": d["task_id"], "completion": f"So the answer is $\\boxed{{{d['answer']}}}$."} for d in docs]
    metrics, _ = score_predictions(task, gold)
    assert metrics["score"] == 1.0 and metrics["num_docs"] == 500
    full = [{"task_id": d["task_id"], "completion": d["solution"]} for d in docs[:100]]
    assert score_predictions(task, full)[0]["score"] == 1.0
    shifted = [{"task_id": d["task_id"], "completion": p["completion"]} for d, p in zip(docs, _shift(gold))]
    assert score_predictions(task, shifted)[0]["score"] < 0.03  # SOURCES.md: 3/500


def test_gsm8k_gold_is_100_strict_and_flexible_and_shuffled_is_low(files):
    task = get_task("gsm8k", data_dir=files)
    docs = task.docs()
    assert len(docs) == 1319 and docs[5]["task_id"] == "5"
    gold = [{"task_id": d["task_id"], "completion": d["answer"]} for d in docs]
    metrics, _ = score_predictions(task, gold)
    assert metrics["score"] == metrics["exact_match_strict"] == metrics["exact_match_flexible"] == 1.0
    assert metrics["numeric_strict"] == metrics["numeric_flexible"] == 1.0
    rng = random.Random(0)
    answers = [d["answer"] for d in docs]
    rng.shuffle(answers)
    shuffled = [{"task_id": d["task_id"], "completion": a} for d, a in zip(docs, answers)]
    metrics, _ = score_predictions(task, shuffled)
    assert metrics["score"] < 0.05 and metrics["exact_match_strict"] < 0.05 and metrics["numeric_flexible"] < 0.05


def test_gsm8k_extraction_variants(files):
    task = get_task("gsm8k", data_dir=files)
    doc = {"task_id": "x", "gold": "2125", "answer": "... so 2125.\n#### 2125"}
    assert task.score_one(doc, "... so she pays $2,125.")["correct"]
    assert task.score_one(doc, "#### 2,125")["correct_strict"]
    r = task.score_one(doc, "The answer is 2125.00.")
    assert r["correct_numeric_strict"] and not r["correct_strict"] and not r["correct"]  # lm-eval: string match
    r = task.score_one(doc, "It is 2125 apples, not 3 apples")
    assert not r["correct"] and not r["correct_strict"] and not r["correct_numeric"]  # last number is 3


def test_aime24_gold_is_100(files):
    task = get_task("aime24", data_dir=files)
    docs = task.docs()
    assert len(docs) == 30 and {d["task_id"] for d in docs} == {str(i) for i in range(60, 90)}
    preds = [{"task_id": d["task_id"], "completion": f"\\boxed{{{d['answer']}}}"} for d in docs]
    assert score_predictions(task, preds)[0]["score"] == 1.0
    assert score_predictions(task, [{"task_id": d["task_id"], "completion": p["completion"]}
                                    for d, p in zip(docs, _shift(preds))])[0]["score"] < 0.1


def test_humaneval_canonical_164_of_164_via_console_script(files, tmp_path):
    task = get_task("humaneval", data_dir=files)
    preds = tmp_path / "preds.jsonl"
    with open(preds, "w") as f:
        for d in task.docs():
            f.write(json.dumps({"task_id": d["task_id"], "completion": d["canonical_solution"]}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-c", "from deepseek_v3.cli import main; raise SystemExit(main())", "eval", "score",
         "--task", "humaneval", "--predictions", str(preds), "--data-dir", str(files), "--workers", "4",
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["num_docs"] == 164 and metrics["num_samples"] == 164
    assert metrics["score"] == metrics["pass@1"] == 1.0


def test_humaneval_shifted_solutions_fail(files):
    task = get_task("humaneval", data_dir=files, progress=False, workers=4)
    docs = task.docs()[:40]
    preds = [{"task_id": d["task_id"], "completion": o["canonical_solution"]} for d, o in zip(docs, _shift(docs))]
    assert score_predictions(task, preds)[0]["score"] < 0.1


def test_mbpp_reference_code_passes(files):
    task = get_task("mbpp", data_dir=files, progress=False, workers=4)
    docs = task.docs()
    assert len(docs) == 500 and docs[0]["task_id"] == "11" and docs[-1]["task_id"] == "510"
    chosen = docs[:60] + [d for d in docs if d["task_id"] == "367"]  # 367 needs test_setup_code after the solution
    metrics, records = score_predictions(task, [{"task_id": d["task_id"], "completion": d["code"]} for d in chosen])
    assert metrics["score"] == 1.0, [r["stderr"] for r in records if not r["correct"]][:3]
    wrong = [{"task_id": d["task_id"], "completion": o["code"]} for d, o in zip(chosen[:30], _shift(chosen[:30]))]
    assert score_predictions(task, wrong)[0]["score"] < 0.1
    assert "[BEGIN]" in task.build_prompt(docs[0]) and task.build_prompt(docs[0]).count("[DONE]") == 3


@pytest.mark.slow
def test_mbpp_all_500_reference_solutions(files):
    task = get_task("mbpp", data_dir=files, progress=False)
    preds = [{"task_id": d["task_id"], "completion": d["code"]} for d in task.docs()]
    assert score_predictions(task, preds)[0]["score"] == 1.0


def test_mmlu_gold_letters_100_and_shuffled_near_chance(files):
    task = get_task("mmlu", data_dir=files)
    docs = task.docs()
    assert len(docs) == 14042 and docs[0]["task_id"] == "abstract_algebra/0"
    gold = [{"task_id": d["task_id"], "completion": LETTERS[d["answer"]]} for d in docs]
    metrics, _ = score_predictions(task, gold)
    assert metrics["score"] == 1.0 and len(metrics["subjects"]) == 57
    assert metrics["category_counts"] == {"humanities": 4705, "other": 3107, "social_sciences": 3077, "stem": 3153}
    letters = [p["completion"] for p in gold]
    random.Random(0).shuffle(letters)
    metrics, _ = score_predictions(task, [{"task_id": d["task_id"], "completion": f"The answer is {x}."}
                                          for d, x in zip(docs, letters)])
    assert 0.22 < metrics["score"] < 0.30


class OracleBackend:
    """Knows the gold answer of each MMLU prompt: log-likelihood 0 for it, -5 for the other letters."""

    def __init__(self, task, docs, invert=False):
        self.gold = {task.build_prompt(d): f" {LETTERS[d['answer']]}" for d in docs}
        self.invert = invert

    def loglikelihood(self, requests):
        good, bad = (-5.0, 0.0) if self.invert else (0.0, -5.0)
        return [good if self.gold[ctx] == cont else bad for ctx, cont in requests]


def test_mmlu_oracle_loglikelihood_scorer_gives_100(files, tmp_path):
    task = get_task("mmlu", data_dir=files, progress=False)
    docs = task.docs()
    # 5-shot prompts from the dev split, as in the original MMLU
    prompt = task.build_prompt(docs[0])
    assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert prompt.count("Answer:") == 6 and prompt.endswith("D. 6\nAnswer:")
    out = evaluate_task(task, OracleBackend(task, docs), output_dir=tmp_path / "oracle", batch_size=512,
                        progress=False)
    m = out["metrics"]
    assert m["score"] == 1.0 and m["num_docs"] == 14042 and m["accuracy_macro"] == 1.0
    assert set(m["categories"].values()) == {1.0}
    out = evaluate_task(task, OracleBackend(task, docs, invert=True), output_dir=tmp_path / "anti",
                        limit=500, batch_size=512, progress=False)
    assert out["metrics"]["score"] == 0.0


def test_bad_input_errors_name_the_problem(files):
    with pytest.raises(KeyError, match="unknown task 'mmlu_pro'.*available tasks: .*gsm8k"):
        get_task("mmlu_pro")
    task = get_task("gsm8k", data_dir=files)
    with pytest.raises(ValueError, match="line 2 has no 'task_id' key"):
        score_predictions(task, [{"task_id": "0", "completion": "1"}, {"id": "1", "completion": "2"}])
    with pytest.raises(ValueError, match="line 1 has no 'completion' key"):
        score_predictions(task, [{"task_id": "0"}])
    with pytest.raises(ValueError, match="task_id '99999' is not a gsm8k task id"):
        score_predictions(task, [{"task_id": "99999", "completion": "1"}])


def test_score_cli_reports_errors(files, tmp_path, capsys):
    from deepseek_v3.cli import main

    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "0", "completion": "#### 18"}) + "\n")
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(preds), "--data-dir", str(files)]) == 2
    assert "no 'task_id' key" in capsys.readouterr().err
    assert main(["eval", "score", "--task", "nope", "--predictions", str(preds), "--data-dir", str(files)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    preds.write_text(json.dumps({"task_id": "0", "completion": "#### 18"}) + "\n")
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(preds), "--data-dir", str(files)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["score"] == 1.0 and last["num_docs"] == 1 and last["num_docs_total"] == 1319
