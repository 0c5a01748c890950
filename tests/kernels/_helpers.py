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


def gemm_tol(device):
    """Norm-wise relative tolerance of a Triton FP8 GEMM result against the exact torch reference. On CPU (interpreter)
    only the FP32 summation order inside one 128-wide dot differs; on CUDA the fp8 tensor-core dot accumulates one
    128-wide K block with reduced precision (~14 bits, DeepSeek-V3 paper; hence the per-128 promotion to FP32)."""
    return 1e-5 if device.type == "cpu" else 2e-4


def assert_gemm_close(a, b, device, rtol=1e-5, atol=1e-5):
    """Elementwise closeness on CPU; on CUDA a norm-wise relative error below max(rtol, gemm_tol) (see gemm_tol)."""
    if device.type == "cpu":
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    else:
        assert rel_err(a, b) < max(rtol, gemm_tol(device))
