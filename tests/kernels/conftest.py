"""Kernel tests run on CPU through the Triton interpreter; the variable must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402



@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    """The kernel tests run many tiny matmuls; on a small shared CPU, OpenMP barriers across 2 threads made them
    10-1000x slower. One intra-op thread per kernels test, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
