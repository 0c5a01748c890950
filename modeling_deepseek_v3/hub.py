"""Hugging Face Hub: push a training output directory, and say which revision a model id resolved to.

- `deepseek-v3 push OUTPUT_DIR --repo-id ORG/NAME [--private] [--revision BRANCH]` (and `push_to_hub: true` in a
  train recipe): `huggingface_hub.create_repo` + `upload_folder` of the directory with its model card, without the
  in-progress checkpoints (`checkpoint-*/`) and optimizer / scheduler / RNG states (`PUSH_IGNORE_PATTERNS`).
  `upload_listing(OUTPUT_DIR)` lists the files that would be uploaded (`deepseek-v3 push --dry-run`), filtered by
  the same `huggingface_hub.utils.filter_repo_objects` call and default patterns `upload_folder` applies.
- `resolve_model_revision(model)`: for a hub id, the commit hash of the snapshot in huggingface_hub's cache (what
  `from_pretrained` loaded, online or with `HF_HUB_OFFLINE=1`); for a local directory, its absolute path.
  `deepseek-v3 eval run` records it in `results.json`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

PUSH_IGNORE_PATTERNS = [
    "checkpoint-*/**",  # in-progress Trainer checkpoints (the final model sits at the top of the directory)
    "**/optimizer.pt", "optimizer.pt",
    "**/scheduler.pt", "scheduler.pt",
    "**/rng_state*.pth", "rng_state*.pth",
    "**/*.tmp",
]
REQUIRED_FILES = ("config.json", "README.md")
_SNAPSHOT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})[\\/]")


def upload_listing(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> list[str]:
    """The paths (relative, POSIX) `upload_folder(folder_path=folder, ignore_patterns=...)` would upload."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory: pass a training output directory")
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    patterns = list(PUSH_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns) + list(DEFAULT_IGNORE_PATTERNS)
    return list(filter_repo_objects(paths, ignore_patterns=patterns))


def check_pushable(folder: str | os.PathLike) -> list[str]:
    """The upload listing; raises ValueError when the model config or the model card is missing."""
    files = upload_listing(folder)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(
            f"{folder} has no {', '.join(missing)}: push the output directory of a finished run (the train scripts "
            "and the demo write config.json, the weights and the README.md model card; "
            "deepseek_v3.trainers.model_card.write_model_card writes a card for any other checkpoint)"
        )
    if not any(f.endswith(".safetensors") or f.endswith(".bin") for f in files):
        raise ValueError(f"{folder} holds no model weights (*.safetensors): nothing to push")
    return files


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None):
    """`create_repo(repo_id, exist_ok=True)` (+ the branch `revision`), then `upload_folder` without checkpoints and
    optimizer states. Returns huggingface_hub's `CommitInfo`."""
    from huggingface_hub import HfApi

    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id={repo_id!r} must be ORG/NAME (your user name or an organisation, then the model name)")
    check_pushable(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type="model",
        commit_message=commit_message or f"Upload {Path(folder).resolve().name} with deepseek-v3-hf",
        ignore_patterns=list(PUSH_IGNORE_PATTERNS),
    )


def resolve_model_revision(model: str, revision: str | None = None) -> dict:
    """Where `model` comes from: {"source": "local", "path": ...} for a directory, {"source": "hub", "repo_id",
    "revision" (asked), "commit_hash" (the cached snapshot's commit, None when not in the cache)} for a hub id."""
    if os.path.isdir(model):
        return {"source": "local", "path": str(Path(model).resolve())}
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model, "config.json", revision=revision)
    match = _SNAPSHOT.search(path) if isinstance(path, str) else None
    return {"source": "hub", "repo_id": model, "revision": revision or "main",
            "commit_hash": match.group(1) if match else None}


def run(args: argparse.Namespace) -> int:
    try:
        files = check_pushable(args.output_dir)
    except (ValueError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(files)} files from {args.output_dir} -> {args.repo_id}" + (f"@{args.revision}" if args.revision else ""))
    for name in files:
        print(f"  {name}")
    if args.dry_run:
        return 0
    info = push_folder(args.output_dir, args.repo_id, private=args.private or None, revision=args.revision,
                       commit_message=args.commit_message)
    print(f"pushed: {getattr(info, 'commit_url', info)}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="upload a training output directory (model, tokenizer, card) to the Hugging Face Hub",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", help="a finished run's output directory (config.json, weights, README.md)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded and stop")
    parser.set_defaults(func=run)
