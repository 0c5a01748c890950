import os
from pathlib import Path

import pytest

DATA_ENV = "DEEPSEEK_V3_DATA_DIR"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Directory with the real benchmark files (layout of ../shared/data, see its SOURCES.md).

    `.ci/run` sets DEEPSEEK_V3_DATA_DIR; when it is set, a missing directory is an error, not a skip.
    """
    value = os.environ.get(DATA_ENV)
    if not value:
        default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
        if default.is_dir():
            return default
        pytest.skip(f"{DATA_ENV} is not set and {default} does not exist")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{DATA_ENV}={value} does not exist")
    return path


def require_file(path: Path) -> Path:
    """Fail (never skip) when a benchmark file the test needs is missing."""
    if not path.exists():
        raise FileNotFoundError(f"benchmark file {path} is missing (check {DATA_ENV})")
    return path
