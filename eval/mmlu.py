"""MMLU (Hendrycks et al., 2021): 57 subjects, 4-way multiple choice.

Dataset: ``cais/mmlu`` config ``all`` (test split for evaluation, dev split for the 5 shots of each subject), or
``<data-dir>/mmlu/{test,dev}/<subject>_{test,dev}.csv``. Task ids: ``<subject>/<0-based row index>`` in the subject's
test rows (the original / ``cais/mmlu`` order).

Prompt (``mmlu``, log-likelihood, the original MMLU / lm-eval format, 5-shot from the subject's dev split)::

    The following are multiple choice questions (with answers) about abstract algebra.

    <dev question 1>
    A. <choice>
    B. <choice>
    C. <choice>
    D. <choice>
    Answer: B

    ... (5 shots) ...

    <test question>
    A. ...
    D. ...
    Answer:

The model's answer is the letter among `` A``, `` B``, `` C``, `` D`` with the highest log-likelihood as a continuation
of the prompt (all four are single short continuations, so no length normalisation is applied).

Prompt (``mmlu_generative``, zero-shot, chat message when the tokenizer has a template)::

    Answer the following multiple choice question about <subject>. Think step by step if needed, then finish your
    response with a line of the form "Answer: X" where X is one of A, B, C, D.

    <question>
    A. ...
    D. ...

Scoring (both variants, and ``eval score`` predictions): the completion is the answer letter or text ending in it
(e.g. ``"B"``, ``"(B)"``, ``"The answer is B."``); otherwise the last ``Answer: X`` / ``answer is X`` in the text.
Metrics: ``accuracy`` (micro average over questions, the primary ``score``), ``accuracy_macro`` (mean of subject
accuracies), ``subjects`` (per-subject accuracy) and ``categories`` (stem / humanities / social_sciences / other, the
lm-eval grouping, micro-averaged).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from .base import Task, register_task
from .data import load_hub, read_csv

LETTERS = ("A", "B", "C", "D")

SUBJECT_CATEGORIES = {
    **dict.fromkeys([
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning"], "stem"),
    **dict.fromkeys([
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions"], "humanities"),
    **dict.fromkeys([
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy"], "social_sciences"),
    **dict.fromkeys([
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology"], "other"),
}
SUBJECTS = sorted(SUBJECT_CATEGORIES)

_TRAILING_LETTER = re.compile(r"(?:^|[^A-Za-z0-9])\(?([ABCD])\)?[.:]?\s*$")
_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*[:：]?\s*\(?\**\s*([ABCD])\b", re.IGNORECASE)


def extract_letter(completion: str) -> str | None:
    """The answer letter of a completion: a trailing letter, else the last ``Answer: X`` / ``answer is X``."""
    text = completion.strip().replace("*", "")
    m = _TRAILING_LETTER.search(text)
    if m:
        return m.group(1)
    found = _ANSWER_IS.findall(text)
    return found[-1].upper() if found else None


def format_question(doc: dict, with_answer: bool = False) -> str:
    lines = [doc["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"])]
    lines.append("Answer:" + (f" {LETTERS[doc['answer']]}" if with_answer else ""))
    return "\n".join(lines)


def _pretty(subject: str) -> str:
    return subject.replace("_", " ")


def _csv_docs(rows: list[dict], subject: str) -> list[dict]:
    return [{
        "task_id": f"{subject}/{i}",
        "subject": subject,
        "question": r["question"],
        "choices": [r[f"choice{j}"] for j in range(4)],
        "answer": int(r["answer"]),
    } for i, r in enumerate(rows)]


def _hub_docs(rows: list[dict]) -> dict[str, list[dict]]:
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        subj = r["subject"]
        lst = by_subject.setdefault(subj, [])
        lst.append({"task_id": f"{subj}/{len(lst)}", "subject": subj, "question": r["question"],
                    "choices": list(r["choices"]), "answer": int(r["answer"])})
    return by_subject


@register_task
class MMLU(Task):
    name = "mmlu"
    hub_id = "cais/mmlu"
    hub_config = "all"
    hub_split = "test"
    output_type = "loglikelihood"
    default_max_new_tokens = 1

    def __init__(self, *args, num_fewshot: int | None = None, **kwargs):
        super().__init__(*args, num_fewshot=5 if num_fewshot is None else num_fewshot, **kwargs)
        self._dev: dict[str, list[dict]] | None = None

    def _load_local(self, data_dir: Path) -> list[dict]:
        docs = []
        for subject in SUBJECTS:
            docs += _csv_docs(read_csv(data_dir / "mmlu" / "test" / f"{subject}_test.csv"), subject)
        return docs

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        by_subject = _hub_docs(rows)
        return [d for s in SUBJECTS for d in by_subject.get(s, [])]

    def dev_docs(self) -> dict[str, list[dict]]:
        if self._dev is None:
            if self.data_dir is not None:
                self._dev = {s: _csv_docs(read_csv(self.data_dir / "mmlu" / "dev" / f"{s}_dev.csv"), s)
                             for s in SUBJECTS}
            else:
                self._dev = _hub_docs(load_hub(self.hub_id, self.hub_config, "dev"))
        return self._dev

    # ------------------------------------------------------------------ prompting
    def build_prompt(self, doc: dict) -> str | list[dict]:
        header = f"The following are multiple choice questions (with answers) about {_pretty(doc['subject'])}.\n\n"
        shots = self.dev_docs().get(doc["subject"], [])[: self.num_fewshot] if self.num_fewshot else []
        return header + "".join(format_question(s, with_answer=True) + "\n\n" for s in shots) + format_question(doc)

    def loglikelihood_requests(self, doc: dict) -> tuple[str, list[str]]:
        """(context, continuations) whose log-likelihoods pick the answer."""
        return self.build_prompt(doc), [f" {letter}" for letter in LETTERS]

    def completion_from_loglikelihoods(self, doc: dict, logprobs: Sequence[float]) -> str:
        best = max(range(len(LETTERS)), key=lambda i: logprobs[i])
        return LETTERS[best]

    # ------------------------------------------------------------------ scoring
    def score_one(self, doc: dict, completion: str) -> dict:
        letter = extract_letter(completion)
        return {"extracted": letter, "gold": LETTERS[doc["answer"]], "correct": letter == LETTERS[doc["answer"]]}

    def aggregate(self, docs: Sequence[dict], records: dict[str, list[dict]]) -> dict[str, Any]:
        metrics = super().aggregate(docs, records)
        subj: dict[str, list[float]] = {}
        cats: dict[str, list[float]] = {}
        for d in docs:
            recs = records.get(d["task_id"])
            if not recs:
                continue
            acc = sum(bool(r["correct"]) for r in recs) / len(recs)
            subj.setdefault(d["subject"], []).append(acc)
            cats.setdefault(SUBJECT_CATEGORIES.get(d["subject"], "other"), []).append(acc)
        subjects = {s: sum(v) / len(v) for s, v in sorted(subj.items())}
        metrics["accuracy_macro"] = sum(subjects.values()) / len(subjects) if subjects else float("nan")
        metrics["categories"] = {c: sum(v) / len(v) for c, v in sorted(cats.items())}
        metrics["category_counts"] = {c: len(v) for c, v in sorted(cats.items())}
        metrics["subjects"] = subjects
        return metrics


@register_task
class MMLUGenerative(MMLU):
    """Zero-shot generative / chat variant (same documents, ids and scorer)."""

    name = "mmlu_generative"
    output_type = "generate"
    default_max_new_tokens = 512

    def __init__(self, *args, num_fewshot: int | None = None, **kwargs):
        super().__init__(*args, num_fewshot=0 if num_fewshot is None else num_fewshot, **kwargs)

    def build_prompt(self, doc: dict) -> str | list[dict]:
        body = "\n".join([doc["question"].strip()] + [f"{l}. {c}" for l, c in zip(LETTERS, doc["choices"])])
        instruction = (
            f"Answer the following multiple choice question about {_pretty(doc['subject'])}. Think step by step if "
            'needed, then finish your response with a line of the form "Answer: X" where X is one of A, B, C, D.'
            f"\n\n{body}"
        )
        if self.chat:
            return [{"role": "user", "content": instruction}]
        return instruction + "\n\nAnswer:"
