"""Optional-Triton plumbing shared by the FP8 kernels.

Triton is an optional extra (``pip install deepseek-v3-hf[kernels]``). Nothing in ``deepseek_v3.kernels`` imports it
at module import time of the public API; the kernel modules guard the import and every public op takes a
``backend`` argument:

- ``"triton"``: the Triton kernel (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``);
- ``"torch"``:  the plain-torch reference with identical semantics;
- ``None`` / ``"auto"``: ``$DEEPSEEK_V3_FP8_BACKEND`` if set, else Triton for CUDA tensors when Triton is
  importable and the GPU has FP8 dots (compute capability >= 8.9), else torch.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "DEEPSEEK_V3_FP8_BACKEND"
_VALID = ("auto", "triton", "torch")

try:  # pragma: no cover - exercised implicitly depending on the environment
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as err:  # ImportError, or a broken install raising at import
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = err


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_supports_fp8(device: torch.device) -> bool:
    """FP8 tensor-core dots need compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def triton_can_run(t: torch.Tensor) -> bool:
    """True when the FP8 Triton kernels can run on tensors living where ``t`` lives."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return triton_interpret() or cuda_supports_fp8(t.device)
    return t.device.type == "cpu" and triton_interpret()


def resolve_backend(t: torch.Tensor, backend: str | None = None) -> str:
    """Pick ``"triton"`` or ``"torch"`` for an op on tensor ``t`` (see module docstring)."""
    if backend is None or backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in _VALID:
        raise ValueError(f"FP8 backend {backend!r} is not one of {_VALID}; pass backend='triton', 'torch' or 'auto'")
    if backend == "auto":
        return "triton" if (t.is_cuda and triton_can_run(t)) else "torch"
    if backend == "triton" and not triton_can_run(t):
        if not HAS_TRITON:
            raise RuntimeError(
                f"backend='triton' requested but Triton cannot be imported ({TRITON_IMPORT_ERROR!r}); "
                "install the 'kernels' extra or use backend='torch'"
            )
        raise RuntimeError(
            f"backend='triton' requested for a tensor on {t.device}; the FP8 kernels need CUDA tensors on a GPU "
            "with compute capability >= 8.9 (or TRITON_INTERPRET=1 set before importing triton, for CPU). "
            "Use backend='torch' instead."
        )
    return backend
