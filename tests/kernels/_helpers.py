import pytest
import torch

from deepseek_v3.kernels._triton_utils import HAS_TRITON, triton_interpret

requires_triton = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or triton_interpret())),
    reason="triton not importable, or TRITON_INTERPRET unset on a CPU-only machine",
)
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
