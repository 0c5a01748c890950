"""``deepseek-v3 eval`` subcommands.

- ``deepseek-v3 eval run --model PATH_OR_ID --tasks mmlu,gsm8k --output-dir out/ [--data-dir DIR] [--limit N] ...``
- ``deepseek-v3 eval score --task T --predictions FILE [--data-dir DIR]``: score a predictions JSONL (one
  ``{"task_id": ..., "completion": ...}`` per line, several lines per id for pass@k) without a model; the metrics are
  printed as one JSON object on the last line of stdout, the primary metric under ``score``.
- ``deepseek-v3 eval list``: the available tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects comma-separated integers like '1,10', got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="local benchmark copy (layout of ../shared/data, see SOURCES.md); default: the Hugging Face Hub")
    p.add_argument("--k", type=_ks, default=[1], help="pass@k values, comma separated (default: 1)")
    p.add_argument("--timeout", type=_positive_float, default=10.0,
                   help="per-program wall-clock timeout in seconds (code tasks)")
    p.add_argument("--workers", type=_positive_int, default=None, help="parallel sandboxed executions (code tasks)")
    p.add_argument("--strip-reasoning", choices=["auto", "on", "off"], default="auto",
                   help="score only the text after the reasoning block (auto: on for chat runs / when a closing tag "
                        "occurs in the predictions; an unclosed block is no answer)")
    p.add_argument("--reasoning-tags", default="<think>,</think>", help="OPEN,CLOSE reasoning tags")
    p.add_argument("--allow-weak-sandbox", action="store_true",
                   help="run untrusted code even where bubblewrap isolation is unavailable (weaker: see docs/eval.md)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="run or score benchmarks (MMLU, MATH-500, GSM8K, HumanEval, ...)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="eval_command", required=True)

    run = sub.add_parser("run", help="evaluate a model on tasks")
    run.add_argument("--model", required=True, help="AutoModelForCausalLM path or hub id")
    run.add_argument("--tasks", required=True, help="comma-separated task names (see `deepseek-v3 eval list`)")
    run.add_argument("--output-dir", required=True, help="results.json and <task>/samples.jsonl go here (resumable)")
    run.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    run.add_argument("--limit", type=_positive_int, default=None,
                     help="evaluate only the first N documents of each task")
    run.add_argument("--num-samples", "-n", type=_positive_int, default=1, help="samples per problem (for pass@k)")
    run.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's own budget")
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                     help="use chat prompts (auto: when the tokenizer has a chat template)")
    run.add_argument("--num-fewshot", type=int, default=None, help="override the task's number of shots")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    run.add_argument("--device", default=None)
    run.add_argument("--overwrite", action="store_true", help="discard existing samples in --output-dir")
    run.add_argument("--update-card", action="store_true",
                     help="add the results table and model-index entries to the model directory's README.md card")
    _add_common(run)
    run.set_defaults(func=run_command)

    score = sub.add_parser("score", help="score a predictions JSONL without a model")
    score.add_argument("--task", required=True)
    score.add_argument("--predictions", required=True, help="JSONL with task_id and completion on each line")
    score.add_argument("--output", default=None, help="also write per-sample records to this JSONL")
    _add_common(score)
    score.set_defaults(func=score_command)

    lst = sub.add_parser("list", help="list the available tasks")
    lst.set_defaults(func=list_command)


def _sandbox_policy(args) -> None:
    if getattr(args, "allow_weak_sandbox", False):
        import os

        from .sandbox import WEAK_ENV

        os.environ[WEAK_ENV] = "1"


ERRORS = (KeyError, ValueError, FileNotFoundError, NotADirectoryError, OSError)


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def run_command(args) -> int:
    from .reasoning import parse_tags
    from .runner import json_safe, run_evaluation
    from .sandbox import SandboxUnavailableError

    _sandbox_policy(args)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        results = run_evaluation(
            model=args.model, tasks=tasks, output_dir=args.output_dir, data_dir=args.data_dir, backend=args.backend,
            limit=args.limit, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, chat=args.chat,
            num_fewshot=args.num_fewshot, seed=args.seed, ks=args.k, timeout=args.timeout, workers=args.workers,
            dtype=args.dtype, device=args.device, overwrite=args.overwrite, progress=not args.no_progress,
            strip_reasoning=args.strip_reasoning, reasoning_tags=parse_tags(args.reasoning_tags),
        )
    except (*ERRORS, SandboxUnavailableError) as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2
    if args.update_card:
        from deepseek_v3.trainers.model_card import add_eval_results

        try:
            print(f"model card updated: {add_eval_results(args.model, {t: results['results'][t] for t in tasks})}")
        except FileNotFoundError as err:  # a hub id, or a directory without a card
            print(f"error: --update-card: {err}", file=sys.stderr)
            return 2
    print(json.dumps(json_safe({t: m["score"] for t, m in results["results"].items() if t in tasks}), allow_nan=False))
    return 0


def read_predictions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg}); expected one object per line "
                                 'like {"task_id": ..., "completion": ...}') from None
    return out


def score_command(args) -> int:
    from .base import get_task, score_predictions
    from .reasoning import parse_tags, resolve_policy
    from .runner import json_safe
    from .sandbox import SandboxUnavailableError

    _sandbox_policy(args)
    try:
        task = get_task(args.task, data_dir=args.data_dir, ks=args.k, timeout=args.timeout, workers=args.workers,
                        progress=not args.no_progress)
        predictions = read_predictions(args.predictions)
        policy = resolve_policy(args.strip_reasoning, parse_tags(args.reasoning_tags),
                                completions=[p.get("completion") for p in predictions if isinstance(p, dict)
                                             and isinstance(p.get("completion"), str)])
        predictions = [{**p, "completion": policy.answer(p["completion"])}
                       if isinstance(p, dict) and isinstance(p.get("completion"), str) else p for p in predictions]
        metrics, records = score_predictions(task, predictions)
        metrics["reasoning"] = policy.describe()
    except (*ERRORS, SandboxUnavailableError) as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(json_safe(rec), ensure_ascii=False) + "\n")
    print(json.dumps(json_safe({"task": task.name, **metrics}), allow_nan=False))
    return 0


def list_command(args) -> int:
    from .base import TASK_REGISTRY, list_tasks

    for name in list_tasks():
        cls = TASK_REGISTRY[name]
        print(f"{name:16s} {cls.output_type:14s} {cls.hub_id}{':' + cls.hub_config if cls.hub_config else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-v3")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
