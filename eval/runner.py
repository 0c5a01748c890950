"""Run tasks with a model backend: generation / log-likelihood, scoring, resumable outputs.

Output directory layout::

    <output_dir>/results.json             per-task metrics, sample counts, config, versions, timings
    <output_dir>/<task>/samples.jsonl     one line per finished sample (prompt, completion, extracted answer,
                                          correctness, ...), appended and flushed as soon as it is scored

A rerun with the same output directory reads ``samples.jsonl`` and only runs the samples that are missing, so an
interrupted run loses nothing. Each task's generation settings are stored in ``<output_dir>/<task>/run_config.json``
(written once the model has loaded, just before the task's first sample); resuming a task with different settings
is refused (use another ``--output-dir``, or ``--overwrite`` to discard *that task's* samples: other tasks keep
theirs and their own settings). ``results.json`` reports each task with the settings its samples were made with.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .base import Task, get_task
from .data import iter_jsonl_records
from .reasoning import DEFAULT_TAGS, ReasoningPolicy, resolve_policy

RESUME_KEYS = ("model", "backend", "temperature", "top_p", "max_new_tokens", "num_samples", "chat", "num_fewshot",
               "seed", "strip_reasoning", "reasoning_tags")


def deviations() -> list[str]:
    """Every deliberate difference from the reference harnesses (also listed in docs/eval.md)."""
    return [
        "humaneval/mbpp: when prompt + completion is not valid Python, the longest fenced code block (a line starting "
        "with ```) is used; human-eval / the MBPP paper score the raw text",
        "humaneval/mbpp: tests run in a separate judge process; solutions' return values cross as plain builtin data "
        "(also collections' Counter/OrderedDict/defaultdict/deque); other objects are opaque handles that equal only "
        "themselves",
        "mbpp: test_setup_code runs with the tests, after the solution is loaded (task 367 builds the solution's "
        "classes)",
        "code sandbox: bubblewrap, no network (sockets can be created, connections fail), read-only /usr + Python, "
        "private 128 MiB /tmp, per-program wall-clock timeout (--timeout, default 10 s), 2 GiB address space, 64 "
        "processes, 64 MiB files",
        "gsm8k/gsm8k_cot --chat: zero-shot instruction prompt (lm-eval's prompts are completion-style few-shot)",
        "gsm8k: numeric_strict / numeric_flexible are our lenient numeric scorers (not lm-eval metrics)",
        "reasoning: with strip_reasoning, only the text after the last closing tag is scored and an unclosed "
        "reasoning block is no answer",
    ]


def versions() -> dict:
    out = {"python": platform.python_version()}
    from importlib import metadata

    for pkg in ("deepseek-v3-hf", "torch", "transformers", "datasets", "math-verify", "vllm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class SampleWriter:
    """Append-only jsonl writer; repairs a line truncated by an interruption before appending."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # drop the partial last line
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _task_settings(settings: dict, task: str, output_dir: Path) -> dict:
    """The settings of ``task``'s existing samples (its own run_config.json, or the directory-wide one that older
    versions wrote), or None when the task has no samples yet."""
    for path in (output_dir / task / "run_config.json", output_dir / "run_config.json"):
        if path.exists() and (output_dir / task / "samples.jsonl").exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); delete it together with "
                                 f"{output_dir / task / 'samples.jsonl'} or use --overwrite") from None
    return None


def _check_resume(output_dir: Path, tasks: Sequence[str], settings: dict, overwrite: bool) -> None:
    """Refuse (before anything is loaded or written) to add samples with other settings to a task's samples."""
    if overwrite:
        return
    for task in tasks:
        old = _task_settings(settings, task, output_dir)
        if old is None:
            continue
        diff = {k: (old.get(k), settings.get(k)) for k in RESUME_KEYS if old.get(k) != settings.get(k)}
        if diff:
            raise ValueError(
                f"{output_dir / task} holds samples from a run with different settings {diff} (old, new); use another "
                "--output-dir, or --overwrite to discard that task's samples"
            )


def _write_task_settings(output_dir: Path, task: str, settings: dict) -> None:
    path = output_dir / task / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def validate_run_args(*, limit: int | None, num_samples: int, ks: Sequence[int], timeout: float, batch_size: int,
                      max_new_tokens: int | None, temperature: float, top_p: float) -> None:
    """Clear errors for values that would otherwise run and be silently wrong (``--limit 0`` = everything)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (or omitted for all documents), got {limit}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if not ks or min(ks) < 1 or max(ks) > num_samples:
        raise ValueError(f"--k values must be between 1 and --num-samples={num_samples}, got {list(ks)}")
    if not timeout > 0 or timeout != timeout:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")


def evaluate_task(task: Task, backend, *, output_dir: Path, limit: int | None = None, num_samples: int = 1,
                  max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  batch_size: int = 8, progress: bool = True, reasoning: ReasoningPolicy | None = None) -> dict:
    """Run one task (resuming from ``<output_dir>/<task>/samples.jsonl``) and return its metrics and timings.

    With ``reasoning`` enabled, generated completions are scored on the text after the reasoning block (the record
    keeps the full ``completion`` and the scored ``answer_text``)."""
    reasoning = reasoning or ReasoningPolicy(False)
    stripped = 0
    from tqdm.auto import tqdm

    t_start = time.monotonic()
    docs = task.docs()[: limit] if limit else task.docs()
    sample_path = output_dir / task.name / "samples.jsonl"
    done: dict[tuple[str, int], dict] = {}
    doc_ids = {d["task_id"] for d in docs}
    for rec in iter_jsonl_records(sample_path):
        if rec.get("task_id") in doc_ids:
            done[(rec["task_id"], int(rec.get("sample_index", 0)))] = rec
    n = 1 if task.output_type == "loglikelihood" else num_samples
    pending = [(d, i) for d in docs for i in range(n) if (d["task_id"], i) not in done]
    resumed = len(done)
    writer = SampleWriter(sample_path)
    t_model = 0.0
    t_score = 0.0
    max_new = max_new_tokens or task.default_max_new_tokens
    try:
        bar = tqdm(total=len(pending), desc=f"{task.name} ({task.output_type})", disable=not progress or not pending)
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            t0 = time.monotonic()
            if task.output_type == "loglikelihood":
                prompts, completions, extra = [], [], []
                requests = [task.loglikelihood_requests(d) for d, _ in chunk]
                flat = [(ctx, cont) for ctx, conts in requests for cont in conts]
                lls = backend.loglikelihood(flat)
                pos = 0
                for (doc, _), (ctx, conts) in zip(chunk, requests):
                    doc_lls = lls[pos:pos + len(conts)]
                    pos += len(conts)
                    prompts.append(ctx)
                    completions.append(task.completion_from_loglikelihoods(doc, doc_lls))
                    extra.append({"loglikelihoods": dict(zip(conts, doc_lls))})
            else:
                prompts = [task.build_prompt(d) for d, _ in chunk]
                raw = backend.generate(prompts, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                                       stop=list(task.stop))
                completions = [task.postprocess(r) for r in raw]
                extra = [{} for _ in chunk]
            t1 = time.monotonic()
            answers = completions if task.output_type == "loglikelihood" else [reasoning.answer(c) for c in completions]
            stripped += sum(a != c for a, c in zip(answers, completions))
            scored = task.score_batch([(d, a) for (d, _), a in zip(chunk, answers)])
            t_score += time.monotonic() - t1
            t_model += t1 - t0
            for (doc, i), prompt, completion, answer, res, ext in zip(chunk, prompts, completions, answers, scored,
                                                                      extra):
                rec = {"task_id": doc["task_id"], "sample_index": i, "prompt": prompt, "completion": completion,
                       **({"answer_text": answer} if answer != completion else {}), **res, **ext}
                writer.write(rec)
                done[(doc["task_id"], i)] = rec
            bar.update(len(chunk))
        bar.close()
    finally:
        writer.close()
    records: dict[str, list[dict]] = {}
    for d in docs:
        records[d["task_id"]] = [done[(d["task_id"], i)] for i in range(n) if (d["task_id"], i) in done]
    metrics = task.aggregate(docs, records)
    return {
        "metrics": metrics,
        "num_docs": len(docs),
        "num_samples": sum(len(v) for v in records.values()),
        "resumed_samples": resumed,
        "new_samples": len(pending),
        "config": {**task.config(), "max_new_tokens": max_new, "stop": list(task.stop),
                   "reasoning": {**reasoning.describe(), "changed_new_samples": stripped}},
        "timings": {"total_s": round(time.monotonic() - t_start, 3), "model_s": round(t_model, 3),
                    "scoring_s": round(t_score, 3)},
    }


def run_evaluation(*, model: str, tasks: Sequence[str], output_dir: str | Path, data_dir: str | Path | None = None,
                   backend: str = "hf", limit: int | None = None, num_samples: int = 1,
                   max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                   batch_size: int = 8, chat: str = "auto", num_fewshot: int | None = None, seed: int = 0,
                   ks: Sequence[int] = (1,), timeout: float = 10.0, workers: int | None = None,
                   dtype: str = "auto", device: str | None = None, overwrite: bool = False, progress: bool = True,
                   strip_reasoning: str = "auto", reasoning_tags: Sequence[str] = DEFAULT_TAGS,
                   backend_obj: Any = None) -> dict:
    """Evaluate ``model`` on ``tasks``; writes ``results.json`` and per-task ``samples.jsonl`` under ``output_dir``."""
    from deepseek_v3.hub import resolve_model_revision

    from .base import list_tasks
    from .sandbox import sandbox_capabilities

    unknown = [t for t in tasks if t not in list_tasks()]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; available tasks: {', '.join(list_tasks())}")
    if chat not in ("auto", "on", "off"):
        raise ValueError(f"chat must be 'auto', 'on' or 'off', got {chat!r}")
    validate_run_args(limit=limit, num_samples=num_samples, ks=ks, timeout=timeout, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    ks = sorted(set(ks) | {1})  # pass@1 is every code task's primary metric
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file; give a directory")
    settings = {"model": model, "backend": backend, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "num_samples": num_samples, "chat": chat,
                "num_fewshot": num_fewshot, "seed": seed, "strip_reasoning": strip_reasoning,
                "reasoning_tags": list(reasoning_tags)}
    resolve_policy(strip_reasoning, tuple(reasoning_tags))  # validate before loading anything
    _check_resume(output_dir, tasks, settings, overwrite)

    import torch

    torch.manual_seed(seed)
    if backend_obj is None:
        from .backends import load_backend

        kwargs: dict[str, Any] = {"dtype": dtype, "seed": seed}
        if backend == "hf":
            kwargs.update(device=device, batch_size=batch_size)
        backend_obj = load_backend(backend, model, **kwargs)
    use_chat = chat == "on" or (chat == "auto" and bool(getattr(backend_obj, "has_chat_template", False)))
    reasoning = resolve_policy(strip_reasoning, tuple(reasoning_tags), chat=use_chat)
    if temperature == 0 and num_samples > 1:
        print(f"warning: {num_samples} samples per problem with greedy decoding are identical; "
              "set --temperature > 0 for pass@k", file=sys.stderr)

    results_path = output_dir / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    results: dict[str, Any] = {
        "results": dict(previous.get("results", {})),
        "tasks": dict(previous.get("tasks", {})),
        "config": {**settings, "limit": limit, "batch_size": batch_size, "chat_resolved": use_chat,
                   "data_dir": str(data_dir) if data_dir else None, "ks": list(ks), "timeout": timeout,
                   "sampling": "greedy" if temperature == 0 else f"sampling(temperature={temperature}, top_p={top_p})",
                   "reasoning": reasoning.describe(), "deviations": deviations(),
                   "backend_info": backend_obj.describe() if hasattr(backend_obj, "describe") else {}},
        "model_revision": resolve_model_revision(model),  # the hub snapshot's commit hash, or the local path
        "versions": versions(),
        "sandbox": sandbox_capabilities(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for name in tasks:
        if overwrite:  # only now (the model loaded): discard this task's old samples, never another task's
            for old in (output_dir / name / "samples.jsonl", output_dir / name / "run_config.json"):
                if old.exists():
                    old.unlink()
        _write_task_settings(output_dir, name, settings)
        task = get_task(name, chat=use_chat, num_fewshot=num_fewshot, data_dir=data_dir, ks=ks, timeout=timeout,
                        workers=workers, progress=progress)
        out = evaluate_task(task, backend_obj, output_dir=output_dir, limit=limit, num_samples=num_samples,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            batch_size=batch_size, progress=progress, reasoning=reasoning)
        results["results"][name] = out.pop("metrics")
        results["tasks"][name] = {**out, "settings": {**settings, "limit": limit, "ks": list(ks), "timeout": timeout,
                                                      "chat_resolved": use_chat}}
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
        os.replace(tmp, results_path)
    print(format_table(results, tasks))
    return results


def json_safe(value):
    """``value`` with NaN / infinities replaced by None, so results are valid JSON (``NaN`` is not)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_table(results: dict, tasks: Sequence[str] | None = None) -> str:
    tasks = list(tasks or results["results"])
    rows = [("task", "metric", "value", "docs", "samples")]
    for name in tasks:
        m = results["results"][name]
        info = results.get("tasks", {}).get(name, {})
        for key, value in m.items():
            if key == "pass@1" and "accuracy" in m:  # same number as accuracy for non-code tasks
                continue
            if isinstance(value, float) and value == value and key not in ("num_docs", "num_samples"):
                rows.append((name, key + (" *" if key == "score" else ""), f"{value:.4f}",
                             str(info.get("num_docs", m.get("num_docs", ""))), str(m.get("num_samples", ""))))
        for cat, value in m.get("categories", {}).items():
            rows.append((name, f"category/{cat}", f"{value:.4f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
