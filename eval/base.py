"""Task interface and registry.

A task turns documents into prompts (``build_prompt``), post-processes raw generations (``postprocess``), scores
completions (``score_batch``) and aggregates per-sample records into metrics (``aggregate``). Scoring never needs a
model, so ``deepseek-v3 eval score`` and the tests use exactly the code path of ``deepseek-v3 eval run``.

Every document carries a string ``task_id`` (the id used in predictions files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

from .metrics import summarize_correctness

TASK_REGISTRY: dict[str, type["Task"]] = {}


def register_task(cls: type["Task"]) -> type["Task"]:
    if cls.name in TASK_REGISTRY:
        raise ValueError(f"task {cls.name!r} registered twice")
    TASK_REGISTRY[cls.name] = cls
    return cls


def get_task(name: str, **kwargs) -> "Task":
    """Instantiate a registered task by name (``mmlu``, ``math500``, ``gsm8k``, ``humaneval``, ``aime24``, ``mbpp``...)."""
    from . import tasks  # noqa: F401  (registers the built-in tasks)

    if name not in TASK_REGISTRY:
        raise KeyError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASK_REGISTRY))}")
    return TASK_REGISTRY[name](**kwargs)


def list_tasks() -> list[str]:
    from . import tasks  # noqa: F401

    return sorted(TASK_REGISTRY)


class Task:
    """Base class. Subclasses set the class attributes and implement ``_load_local``, ``build_prompt`` and
    ``score_one`` (or ``score_batch``)."""

    name: ClassVar[str]
    hub_id: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    hub_split: ClassVar[str] = "test"
    output_type: ClassVar[str] = "generate"  # or "loglikelihood"
    primary_metric: ClassVar[str] = "accuracy"
    default_max_new_tokens: ClassVar[int] = 1024
    stop: ClassVar[Sequence[str]] = ()

    def __init__(self, chat: bool = False, num_fewshot: int | None = None, data_dir: str | Path | None = None,
                 ks: Sequence[int] = (1,), timeout: float = 10.0, workers: int | None = None, progress: bool = True):
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if any(int(k) < 1 for k in ks):
            raise ValueError(f"pass@k values must be >= 1, got {list(ks)}")
        self.chat = chat
        self.num_fewshot = num_fewshot
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.ks = tuple(sorted(set(ks) | {1}))  # pass@1 (the code tasks' primary metric) is always reported
        self.timeout = timeout
        self.workers = workers
        self.progress = progress
        self._docs: list[dict] | None = None

    # ------------------------------------------------------------------ data
    def docs(self) -> list[dict]:
        """The evaluation documents, each with a string ``task_id`` (cached)."""
        if self._docs is None:
            if self.data_dir is not None:
                docs = self._load_local(self.data_dir)
            else:
                from .data import load_hub

                docs = self._from_hub(load_hub(self.hub_id, self.hub_config, self.hub_split))
            self._docs = docs
        return self._docs

    def _load_local(self, data_dir: Path) -> list[dict]:
        raise NotImplementedError

    def _from_hub(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, "chat": self.chat, "num_fewshot": self.num_fewshot, "output_type": self.output_type,
                "dataset": str(self.data_dir) if self.data_dir else f"{self.hub_id}:{self.hub_config}:{self.hub_split}"}

    # ------------------------------------------------------------------ prompting
    def build_prompt(self, doc: dict) -> str | list[dict]:
        """A plain string for completion-style prompting, or chat messages when ``self.chat``."""
        raise NotImplementedError

    def postprocess(self, completion: str) -> str:
        """Cut a raw generation at the first stop sequence."""
        cut = len(completion)
        for s in self.stop:
            i = completion.find(s)
            if i != -1:
                cut = min(cut, i)
        return completion[:cut]

    # ------------------------------------------------------------------ scoring
    def score_one(self, doc: dict, completion: str) -> dict:
        """Return at least ``{"extracted": ..., "correct": bool}`` for one completion."""
        raise NotImplementedError

    def score_batch(self, items: Sequence[tuple[dict, str]]) -> list[dict]:
        return [self.score_one(doc, completion) for doc, completion in items]

    def aggregate(self, docs: Sequence[dict], records: dict[str, list[dict]]) -> dict[str, Any]:
        """Metrics over the documents that have records; ``score`` is the primary metric."""
        per_doc = [[bool(r["correct"]) for r in records[d["task_id"]]] for d in docs if records.get(d["task_id"])]
        metrics = summarize_correctness(per_doc, self.ks)
        metrics["score"] = metrics[self.primary_metric]
        return metrics


def check_scoring_input(task: Task, predictions: Sequence[dict]) -> dict[str, list[str]]:
    """Validate prediction lines (``task_id``, ``completion``) and group completions by task id."""
    if not predictions:
        raise ValueError("the predictions are empty: expected one JSON object per line like "
                         '{"task_id": ..., "completion": ...}')
    by_id = {d["task_id"]: d for d in task.docs()}
    grouped: dict[str, list[str]] = {}
    indexed: dict[tuple[str, int], int] = {}
    for lineno, pred in enumerate(predictions, 1):
        if not isinstance(pred, dict):
            raise ValueError(f"predictions line {lineno}: expected a JSON object, got {type(pred).__name__}")
        for key in ("task_id", "completion"):
            if key not in pred:
                raise ValueError(
                    f"predictions line {lineno} has no {key!r} key (keys: {sorted(pred)}); every line needs "
                    f"'task_id' and 'completion', e.g. {{\"task_id\": {next(iter(by_id), 'ID')!r}, \"completion\": \"...\"}}"
                )
        task_id = str(pred["task_id"])
        if task_id not in by_id:
            example = ", ".join(list(by_id)[:3])
            raise ValueError(
                f"predictions line {lineno}: task_id {task_id!r} is not a {task.name} task id (examples: {example})"
            )
        if not isinstance(pred["completion"], str):
            raise ValueError(f"predictions line {lineno}: 'completion' must be a string, got {type(pred['completion']).__name__}")
        if "sample_index" in pred:
            key = (task_id, int(pred["sample_index"]))
            if key in indexed:
                raise ValueError(f"predictions lines {indexed[key]} and {lineno} are both task_id {task_id!r} "
                                 f"sample_index {key[1]}; each sample must appear once")
            indexed[key] = lineno
        grouped.setdefault(task_id, []).append(pred["completion"])
    counts = {len(v) for v in grouped.values()}
    if len(counts) > 1:
        by_count: dict[int, list[str]] = {}
        for tid, comps in grouped.items():
            by_count.setdefault(len(comps), []).append(tid)
        rare = min(by_count.items(), key=lambda kv: len(kv[1]))
        raise ValueError(
            f"task ids have different numbers of predictions ({ {n: len(v) for n, v in sorted(by_count.items())} } "
            f"ids per count; e.g. {rare[1][:3]} have {rare[0]}): a duplicated line would silently become an extra "
            "pass@k sample. Give every task id the same number of lines (one per sample)")
    n = counts.pop()
    too_big = [k for k in task.ks if k > n]
    if too_big:
        raise ValueError(f"pass@{too_big[0]} needs at least {too_big[0]} predictions per task id, the file has {n}; "
                         f"lower --k or add samples")
    return grouped


def score_predictions(task: Task, predictions: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Score prediction lines without any model. Returns ``(metrics, per-sample records)``."""
    grouped = check_scoring_input(task, predictions)
    docs = [d for d in task.docs() if d["task_id"] in grouped]
    items = [(d, c) for d in docs for c in grouped[d["task_id"]]]
    results = task.score_batch(items)
    records: dict[str, list[dict]] = {}
    flat = []
    for (doc, completion), res in zip(items, results):
        rec = {"task_id": doc["task_id"], "completion": completion, **res}
        records.setdefault(doc["task_id"], []).append(rec)
        flat.append(rec)
    metrics = task.aggregate(docs, records)
    metrics["num_docs_total"] = len(task.docs())
    return metrics, flat
