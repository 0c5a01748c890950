"""Locating the real benchmark files (layout of ../shared/data, described in its SOURCES.md)."""

import os
from pathlib import Path

DATA_ENV = "DEEPSEEK_V3_DATA_DIR"


def require_file(path: Path) -> Path:
    """Fail (never skip) when a benchmark file a test needs is missing."""
    if not path.exists():
        raise FileNotFoundError(f"benchmark file {path} is missing (check {DATA_ENV}={os.environ.get(DATA_ENV)})")
    return path


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"
