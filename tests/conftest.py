import os
import sys
from pathlib import Path

# Triton kernels run on CPU only through the interpreter, which must be switched on before triton is first imported
# (`import deepseek_v3` already imports it): set it here, before any test module is collected.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/data_files.py, importable from every test folder

from data_files import DATA_ENV, default_data_dir, require_file  # noqa: E402

__all__ = ["require_file"]


@pytest.fixture(autouse=True, scope="session")
def single_intra_op_thread():
    """The suite runs tiny models and small kernels: with one intra-op thread they are overhead-bound and fast, while
    OpenMP barriers across threads on a small shared CPU made them 10-1000x slower. Restored at the end."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Directory with the real benchmark files.

    `.ci/run` sets DEEPSEEK_V3_DATA_DIR; when it is set, a missing directory is an error, not a skip.
    """
    value = os.environ.get(DATA_ENV)
    if not value:
        default = default_data_dir()
        if default.is_dir():
            return default
        pytest.skip(f"{DATA_ENV} is not set and {default} does not exist")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{DATA_ENV}={value} does not exist")
    return path
