"""Kernel tests run on CPU through the Triton interpreter (the variable must be set before triton is imported) and
compiled on a CUDA machine."""

import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
