"""Block-scaled FP8 GEMMs: ``fp8_gemm`` (dense) and ``fp8_grouped_gemm`` (MoE experts, tokens sorted by expert).

Convention (as in DeepSeek-V3's inference kernels): ``c = a @ b.T``.

- ``a [M, K]`` e4m3 with ``a_s [M, ceil(K/128)]`` -- 1x128 scales (per row, per 128 of K);
- ``b [N, K]`` e4m3 with either ``b_s [ceil(N/128), ceil(K/128)]`` -- 128x128 block scales (weights), or
  ``b_s [N, ceil(K/128)]`` -- 1x128 scales (a re-tiled activation, for the Wgrad GEMM). The two are told apart by
  ``b_s.shape[0]``; when ``N == 1`` both readings are the same.
- accumulation: for every 128-wide slice of K, the FP8 partial product is computed with FP32 accumulation, scaled
  by ``a_s[:, kb, None] * b_s[None, :, kb]`` and added to an FP32 accumulator (the paper's "promotion to CUDA
  cores every 128 elements"); ``c`` is written in ``out_dtype`` (bf16 or fp32).

Any strides are accepted (transposed views are how Dgrad/Wgrad reuse the kernel). Ragged M, N and K are masked.
The torch reference computes exactly the same per-128 partial sums; only the summation order inside one 128-wide
partial product may differ (FP32 rounding, ~1e-7 relative).
"""

from __future__ import annotations

import os

import torch

from ._triton_utils import BACKEND_ENV, HAS_TRITON, resolve_backend, tl, triton
from .fp8_quant import BLOCK_SIZE, FP8_DTYPE, _cdiv

if HAS_TRITON:
    from .fp8_quant import _cast_out

_FP8_DTYPES = (torch.float8_e4m3fn,)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_operands(a, a_s, b, b_s, out_dtype, batched_b: bool = False):
    if a.dtype not in _FP8_DTYPES or b.dtype not in _FP8_DTYPES:
        raise TypeError(
            f"fp8 GEMM operands must be {FP8_DTYPE} (got a={a.dtype}, b={b.dtype}); quantize them first with "
            "act_quant / weight_quant"
        )
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype} is not one of {_OUT_DTYPES}")
    if a.dim() != 2 or b.dim() != (3 if batched_b else 2):
        raise ValueError(f"bad operand ranks: a {tuple(a.shape)}, b {tuple(b.shape)}")
    M, K = a.shape
    N, Kb_ = b.shape[-2], b.shape[-1]
    if Kb_ != K:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (c = a @ b.T)")
    Kb = _cdiv(K, BLOCK_SIZE)
    if tuple(a_s.shape) != (M, Kb):
        raise ValueError(f"a_s has shape {tuple(a_s.shape)}, expected (M, ceil(K/128)) = {(M, Kb)}")
    lead = tuple(b.shape[:-2])
    ok = {(*lead, _cdiv(N, BLOCK_SIZE), Kb), (*lead, N, Kb)}
    if tuple(b_s.shape) not in ok:
        raise ValueError(
            f"b_s has shape {tuple(b_s.shape)}, expected {(*lead, _cdiv(N, BLOCK_SIZE), Kb)} (128x128 blocks) "
            f"or {(*lead, N, Kb)} (1x128 rows)"
        )
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got a_s={a_s.dtype}, b_s={b_s.dtype}")
    return M, N, K


def _b_is_block_scaled(b_s: torch.Tensor, N: int) -> bool:
    return b_s.shape[-2] != N or N == 1


# ----------------------------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------------------------


def _b_row_scales(b_s: torch.Tensor, N: int) -> torch.Tensor:
    """[N, Kb] per-row view of b's scales (expanding 128x128 block scales)."""
    if b_s.shape[0] == N:
        return b_s
    return b_s.repeat_interleave(BLOCK_SIZE, dim=0)[:N]


def fp8_gemm_torch(a, a_s, b, b_s, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference for :func:`fp8_gemm` (same per-128-K FP32 promotion)."""
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    bs_rows = _b_row_scales(b_s.float(), N)
    acc = torch.zeros((M, N), dtype=torch.float32, device=a.device)
    with torch.autocast(device_type=a.device.type, enabled=False):
        for kb in range(_cdiv(K, BLOCK_SIZE)):
            k0, k1 = kb * BLOCK_SIZE, min(K, (kb + 1) * BLOCK_SIZE)
            part = a[:, k0:k1].float() @ b[:, k0:k1].float().t()
            acc += part * a_s[:, kb, None] * bs_rows[None, :, kb]
    return acc.to(out_dtype)


def grouped_gemm_per_expert(gemm, a, a_s, b, b_s, offs, out_dtype: torch.dtype) -> torch.Tensor:
    """A grouped GEMM as one dense ``gemm(a_rows, a_s_rows, b[e], b_s[e], out_dtype)`` per expert's row range
    (``offs``: cumulative row ends); rows past ``offs[-1]`` are 0."""
    M, N = a.shape[0], b.shape[1]
    out = torch.zeros((M, N), dtype=out_dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = gemm(a[start:end], a_s[start:end], b[e], b_s[e], out_dtype)
        start = end
    return out


def fp8_grouped_gemm_torch(a, a_s, b, b_s, offs, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference for :func:`fp8_grouped_gemm`: one :func:`fp8_gemm_torch` per expert's row range."""
    return grouped_gemm_per_expert(fp8_gemm_torch, a, a_s, b, b_s, offs, out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _fp8_gemm_tile(
        a_ptr, b_ptr, as_ptr, bs_ptr, row_start, row_end, pid_n, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask, stride_bsn, stride_bsk,
        B_BLOCK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        offs_m = row_start + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < row_end
        mask_n = offs_n < N
        if B_BLOCK_SCALE:
            bs_rows = offs_n // BLOCK_K
        else:
            bs_rows = offs_n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k = kb * BLOCK_K + offs_k
            mask_k = k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
            a_s = tl.load(as_ptr + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)
            b_s = tl.load(bs_ptr + bs_rows * stride_bsn + kb * stride_bsk, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        return acc, offs_m, offs_n, mask_m, mask_n

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bsn, stride_bsk,
        B_BLOCK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        acc, offs_m, offs_n, mask_m, mask_n = _fp8_gemm_tile(
            a_ptr, b_ptr, as_ptr, bs_ptr, pid_m * BLOCK_M, M, pid_n, N, K,
            stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask, stride_bsn, stride_bsk,
            B_BLOCK_SCALE, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, _cast_out(acc, OUT_BF16).to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _fp8_grouped_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tile_group_ptr, tile_start_ptr, tile_end_ptr, N, K,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
        B_BLOCK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):  # fmt: skip
        """One program = one (row tile of one expert, column tile). Row tiles never straddle two experts."""
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.load(tile_group_ptr + pid_t).to(tl.int64)
        row_start = tl.load(tile_start_ptr + pid_t)
        row_end = tl.load(tile_end_ptr + pid_t)
        acc, offs_m, offs_n, mask_m, mask_n = _fp8_gemm_tile(
            a_ptr, b_ptr + g * stride_be, as_ptr, bs_ptr + g * stride_bse, row_start, row_end, pid_n, N, K,
            stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask, stride_bsn, stride_bsk,
            B_BLOCK_SCALE, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, _cast_out(acc, OUT_BF16).to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _tile_sizes(M: int, N: int) -> tuple[int, int]:
    # 128-row tiles (8 warps: twice the FP8 MMA work per loaded 64x128 tile) once they still give >= 128 programs
    # (H100: 132 SMs); fewer, larger tiles left SMs idle at M = 128..512 (measured, docs/fp8.md)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if M > 64 and _cdiv(M, 128) * _cdiv(N, 128) >= 128:
        block_m = 128
    block_n = 64 if N <= 64 else 128
    return block_m, block_n


def _num_warps(block_m: int, block_n: int) -> int:
    return 8 if block_m * block_n >= 64 * 128 else 4


def _fp8_gemm_triton(a, a_s, b, b_s, out_dtype):
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    block_m, block_n = _tile_sizes(M, N)
    grid = (_cdiv(M, block_m), _cdiv(N, block_n))
    _fp8_gemm_kernel[grid](
        a, b, c, a_s, b_s, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1),
        B_BLOCK_SCALE=_b_is_block_scaled(b_s, N), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_SIZE,
        OUT_BF16=out_dtype == torch.bfloat16, num_warps=_num_warps(block_m, block_n), num_stages=3,
    )  # fmt: skip
    return c


def _group_tiles(offs: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles of ``block_m`` rows that never straddle two groups: (group id, first row, group end) per tile."""
    offs = offs.to(torch.int64)
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    counts = offs - starts
    tiles = (counts + block_m - 1) // block_m
    total = int(tiles.sum())  # one host sync, to size the grid
    group = torch.repeat_interleave(torch.arange(offs.numel(), device=offs.device), tiles, output_size=total)
    first_tile = torch.cumsum(tiles, 0) - tiles
    local = torch.arange(total, device=offs.device) - first_tile[group]
    row_start = starts[group] + local * block_m
    return group.to(torch.int32), row_start.to(torch.int32), offs[group].to(torch.int32)


def _fp8_grouped_gemm_triton(a, a_s, b, b_s, offs, out_dtype):
    M, K = a.shape
    N = b.shape[1]
    c = torch.zeros((M, N), dtype=out_dtype, device=a.device)
    block_m, block_n = _tile_sizes(max(1, M // max(1, b.shape[0])), N)
    tg, ts, te = _group_tiles(offs.to(a.device), block_m)
    if tg.numel() == 0:
        return c
    grid = (tg.numel(), _cdiv(N, block_n))
    _fp8_grouped_gemm_kernel[grid](
        a, b, c, a_s, b_s, tg, ts, te, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), b_s.stride(2),
        B_BLOCK_SCALE=_b_is_block_scaled(b_s, N), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_SIZE,
        OUT_BF16=out_dtype == torch.bfloat16, num_warps=_num_warps(block_m, block_n), num_stages=3,
    )  # fmt: skip
    return c


# ----------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------


def _dispatch_auto(a: torch.Tensor, backend: str | None) -> bool:
    """True for ``backend=None/"auto"`` (and no ``$DEEPSEEK_V3_FP8_BACKEND`` override) on CUDA tensors: the GEMM
    goes through the per-shape rule of ``fp8_dispatch``."""
    if backend not in (None, "auto") or not a.is_cuda:
        return False
    return (os.environ.get(BACKEND_ENV, "auto") or "auto") == "auto"


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> torch.Tensor:
    """``c = (a * a_s) @ (b * b_s).T`` with FP8 inputs, FP32 accumulation promoted every 128 of K.

    ``backend``: ``"torch"`` (reference), ``"triton"`` (our kernel), ``"scaled_mm"`` / ``"torchao"`` (one candidate
    of ``fp8_dispatch``, directly), or ``None``/``"auto"``: on CUDA the per-shape rule of ``fp8_dispatch`` (cuBLAS
    block-wise, torchao or our Triton kernel, whichever the rule picks), elsewhere the torch reference."""
    M, N, K = _check_operands(a, a_s, b, b_s, out_dtype)
    if M == 0 or N == 0:
        return torch.zeros((M, N), dtype=out_dtype, device=a.device)
    if backend in ("scaled_mm", "torchao"):
        from .fp8_dispatch import run_direct

        return run_direct(backend, a, a_s, b, b_s, out_dtype)
    if _dispatch_auto(a, backend):
        from .fp8_dispatch import GEMM

        return GEMM(a, a_s, b, b_s, out_dtype)
    if resolve_backend(a, backend) == "triton":
        return _fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    return fp8_gemm_torch(a, a_s, b, b_s, out_dtype)


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped GEMM for MoE experts: rows ``offs[e-1]:offs[e]`` of ``a`` (tokens sorted by expert) times
    ``b[e].T``.

    ``a [T, K]`` e4m3 with 1x128 scales ``a_s [T, ceil(K/128)]``; ``b [E, N, K]`` e4m3 with ``b_s`` either
    ``[E, ceil(N/128), ceil(K/128)]`` (block) or ``[E, N, ceil(K/128)]`` (rows); ``offs [E]`` int cumulative row
    ends (the ``torch._grouped_mm`` convention). Rows past ``offs[-1]`` are zero.
    """
    M, N, K = _check_operands(a, a_s, b, b_s, out_dtype, batched_b=True)
    if offs.dim() != 1 or offs.numel() != b.shape[0]:
        raise ValueError(f"offs must be 1-D with one entry per expert ({b.shape[0]}), got shape {tuple(offs.shape)}")
    if offs.numel() and int(offs[-1]) > M:
        raise ValueError(f"offs[-1]={int(offs[-1])} exceeds the number of rows of a ({M})")
    if _dispatch_auto(a, backend):
        from .fp8_dispatch import GROUPED_GEMM

        return GROUPED_GEMM(a, a_s, b, b_s, offs, out_dtype)
    if resolve_backend(a, backend) == "triton":
        return _fp8_grouped_gemm_triton(a, a_s, b, b_s, offs, out_dtype)
    return fp8_grouped_gemm_torch(a, a_s, b, b_s, offs, out_dtype)
