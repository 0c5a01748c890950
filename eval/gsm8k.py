"""GSM8K (Cobbe et al., 2021): 1,319 grade-school math word problems with integer answers.

Dataset: ``openai/gsm8k`` config ``main`` (test; shots from train) or ``<data-dir>/gsm8k/{test,train}.jsonl``.
Task id: the 0-based row index in the test split, as a string. Gold: the number after ``####`` (commas removed).

Two tasks reproduce lm-evaluation-harness (task YAMLs ``gsm8k`` and ``gsm8k_cot``, version 3.0) exactly, prompt and
metrics:

- ``gsm8k``: 5-shot. The shots are drawn by lm-eval's seeded sampler: one ``random.Random(1234)`` shared by the
  whole run, ``rnd.sample(train, 5)`` for each test document in order, so document 0 gets train rows
  6374, 3610, 957, 61, 742, document 1 the next draw, and so on (``--num-fewshot N`` draws N the same way). Format
  ``Question: <question>\nAnswer: <full train solution>`` joined by blank lines, then
  ``Question: <question>\nAnswer:``. Stops at ``Question:``, ``</s>``, ``<|im_end|>``.
- ``gsm8k_cot``: the 8 fixed chain-of-thought exemplars of Wei et al. (2022) as in lm-eval's ``gsm8k-cot.yaml``
  (first_n sampler): ``Q: <question> Please reason step by step A: <exemplar>`` joined by blank lines. Stops at
  ``Q:``, ``</s>``, ``<|im_end|>``.

Metrics (lm-eval's names with the filter after the comma):

- ``exact_match_strict`` (``exact_match,strict-match``): the first ``#### (-?[0-9.,]+)`` (``gsm8k``) or
  ``The answer is (-?[0-9.,]+).`` (``gsm8k_cot``), else ``[invalid]``;
- ``exact_match_flexible`` (``exact_match,flexible-extract``): the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``;
- both compared with lm-eval's ``exact_match``: case-insensitive *string* equality after removing ``,``, ``$``,
  everything up to the last ``#### `` and a final ``.`` from prediction and reference (so ``18.00 != 18``).

``accuracy`` (the primary ``score``) is ``exact_match_flexible``. Our own, more lenient scoring is kept under its
own names: ``numeric_flexible`` (last number, compared as a number: ``18.00 == 18``) and ``numeric_strict`` (the
number after ``####`` or ``The answer is``, also ``####18`` and ``#### $18``, compared as a number).

Chat runs (``--chat``) are *not* lm-eval: a zero-shot user message ``<question>\n`` + ``INSTRUCTION`` (asking for
``#### <answer>``); the same metrics apply.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

from .base import Task, register_task
from .data import load_hub, read_jsonl
from .metrics import summarize_correctness

INSTRUCTION = 'Please reason step by step, and put your final answer after "####", e.g. "#### 42".'
_STRICT = re.compile(r"(?:####|[Tt]he (?:final )?answer is)\s*:?\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"-?\$?\s?[0-9][0-9,]*(?:\.[0-9]+)?")


def to_number(text: str | None) -> Decimal | None:
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def gold_answer(solution: str) -> str:
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' line: {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def extract_strict(completion: str) -> str | None:
    m = _STRICT.search(completion)
    return m.group(1) if m else None


def extract_flexible(completion: str) -> str | None:
    found = _NUMBER.findall(completion)
    return found[-1].replace("$", "").replace(" ", "") if found else None


def same_number(a: str | None, gold: str) -> bool:
    x, y = to_number(a), to_number(gold)
    return x is not None and y is not None and x == y


# ---- lm-eval's filters and exact_match (lm_eval/tasks/gsm8k/*.yaml, version 3.0)
LM_EVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
LM_EVAL_COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
INVALID = "[invalid]"
LM_EVAL_FEWSHOT_SEED = 1234


def lm_eval_filter(pattern: re.Pattern, text: str, group_select: int = 0) -> str:
    """lm-eval's ``RegexFilter`` + ``take_first``: the ``group_select``-th match (first non-empty group), stripped."""
    found = pattern.findall(text)
    if not found:
        return INVALID
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's ``exact_match`` with the GSM8K options (regexes_to_ignore, ignore_case)."""
    for pattern in LM_EVAL_IGNORE:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


COT_EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
     "answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
     "did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)


@register_task
class GSM8K(Task):
    name = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    hub_split = "test"
    default_max_new_tokens = 512
    default_fewshot = 5
    strict_pattern = LM_EVAL_STRICT

    def __init__(self, *args, num_fewshot: int | None = None, chat: bool = False, **kwargs):
        if num_fewshot is None:
            num_fewshot = 0 if chat else self.default_fewshot
        super().__init__(*args, num_fewshot=num_fewshot, chat=chat, **kwargs)
        self._train: list[dict] | None = None
        self._draws: list[list[int]] = []
        self._rnd = random.Random(LM_EVAL_FEWSHOT_SEED)

    @property
    def stop(self) -> Sequence[str]:  # type: ignore[override]
        return () if self.chat else ("Question:", "</s>", "<|im_end|>")

    def _load_local(self, data_dir: Path) -> list[dict]:
        return self._from_hub(read_jsonl(data_dir / "gsm8k" / "test.jsonl"))

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        return [{**r, "task_id": str(i), "gold": gold_answer(r["answer"])} for i, r in enumerate(rows)]

    def train(self) -> list[dict]:
        if self._train is None:
            if self.data_dir is not None:
                self._train = read_jsonl(self.data_dir / "gsm8k" / "train.jsonl")
            else:
                self._train = load_hub(self.hub_id, self.hub_config, "train")
        return self._train

    def shot_rows(self, doc: dict) -> list[int]:
        """Train rows lm-eval's sampler gives test document ``doc`` (the draw numbered by its row index)."""
        index = int(doc["task_id"])
        n = len(self.train())
        while len(self._draws) <= index:
            self._draws.append(self._rnd.sample(range(n), self.num_fewshot or 0))
        return self._draws[index]

    def shots(self, doc: dict) -> list[tuple[str, str]]:
        train = self.train()
        return [(train[i]["question"], train[i]["answer"]) for i in self.shot_rows(doc)]

    def build_prompt(self, doc: dict) -> str | list[dict]:
        if self.chat:
            return [{"role": "user", "content": f"{doc['question'].strip()}\n{INSTRUCTION}"}]
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in self.shots(doc))
        return f"{shots}Question: {doc['question']}\nAnswer:"

    def reference(self, doc: dict) -> str:
        """lm-eval's ``doc_to_target`` for the test document (the full solution; exact_match strips to the number)."""
        return doc["answer"]

    def score_one(self, doc: dict, completion: str) -> dict:
        strict = lm_eval_filter(self.strict_pattern, completion)
        flexible = lm_eval_filter(LM_EVAL_FLEXIBLE, completion, group_select=-1)
        numeric_strict = extract_strict(completion)
        numeric = extract_flexible(completion)
        return {
            "extracted": flexible,
            "extracted_strict": strict,
            "gold": doc["gold"],
            "correct": lm_eval_exact_match(flexible, self.reference(doc)),
            "correct_strict": lm_eval_exact_match(strict, self.reference(doc)),
            "correct_numeric": same_number(numeric, doc["gold"]),
            "correct_numeric_strict": same_number(numeric_strict, doc["gold"]),
        }

    def aggregate(self, docs: Sequence[dict], records: dict[str, list[dict]]) -> dict[str, Any]:
        metrics = super().aggregate(docs, records)
        for key, field in (("exact_match_strict", "correct_strict"), ("numeric_flexible", "correct_numeric"),
                           ("numeric_strict", "correct_numeric_strict")):
            per_doc = [[bool(r[field]) for r in records[d["task_id"]]] for d in docs if records.get(d["task_id"])]
            metrics[key] = summarize_correctness(per_doc)["accuracy"]
        metrics["exact_match_flexible"] = metrics["accuracy"]
        return metrics

    def config(self) -> dict:
        return {**super().config(), "reproduces": None if self.chat else f"lm-eval {self.name} (version 3.0)",
                "fewshot_seed": LM_EVAL_FEWSHOT_SEED if self.name == "gsm8k" else None}


@register_task
class GSM8KCoT(GSM8K):
    name = "gsm8k_cot"
    default_fewshot = 8
    strict_pattern = LM_EVAL_COT_STRICT

    def __init__(self, *args, num_fewshot: int | None = None, **kwargs):
        if num_fewshot is not None and num_fewshot > len(COT_EXEMPLARS):
            raise ValueError(f"gsm8k_cot has {len(COT_EXEMPLARS)} exemplars; --num-fewshot {num_fewshot} is too many")
        super().__init__(*args, num_fewshot=num_fewshot, **kwargs)

    @property
    def stop(self) -> Sequence[str]:  # type: ignore[override]
        return () if self.chat else ("Q:", "</s>", "<|im_end|>")

    def shots(self, doc: dict) -> list[tuple[str, str]]:
        return list(COT_EXEMPLARS[: self.num_fewshot or 0])

    def build_prompt(self, doc: dict) -> str | list[dict]:
        if self.chat:
            return super().build_prompt(doc)
        shots = "".join(f"Q: {q} Please reason step by step A: {a}\n\n" for q, a in self.shots(doc))
        return f"{shots}Q: {doc['question']} Please reason step by step A:"

    def reference(self, doc: dict) -> str:
        return doc["answer"].split("####")[-1].strip()
