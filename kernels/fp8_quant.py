"""Block-wise FP8 (e4m3) quantization, DeepSeek-V3 style.

Scaling layouts (scale = max|x| over the tile / 448, computed online; the stored scale is the *dequantization*
multiplier, i.e. the published checkpoints' ``weight_scale_inv``: ``x ~= q.float() * s``):

- activations, ``layout="1x128"``: one scale per token per 128 channels. ``x [M, K]`` -> ``q [M, K]``,
  ``s [M, ceil(K/128)]``. Used by Fprop (input) and Dgrad (output gradient).
- activations, ``layout="128x1"``: one scale per 128 tokens per channel. ``x [M, K]`` -> ``q [M, K]``,
  ``s [ceil(M/128), K]``. Used by Wgrad, whose GEMM reduces over tokens: ``q.t()`` with ``s.t()`` is a
  ``1x128``-scaled operand of shape ``[K, M]``.
- weights, 128x128 blocks: ``w [N, K]`` (or ``[E, N, K]``) -> ``q`` same shape,
  ``s [ceil(N/128), ceil(K/128)]`` (or ``[E, ...]``).

Ragged edges are handled: a partial tile's scale is computed from its valid elements only (equivalent to zero
padding). All-zero tiles get a tiny positive scale so that nothing divides by zero; values saturate at +-448
(e4m3fn has no inf), so huge tiles never produce inf/NaN.

Rounding is round-to-nearest-even, done explicitly in fp32 before the cast in the Triton kernels so that the
Triton path (GPU or interpreter) and the torch reference are bit-identical.
"""

from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, resolve_backend, tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_SIZE = 128
# smallest amax used to build a scale (tiles below it are flushed towards 0): keeps all-zero tiles finite.
AMAX_EPS = 1e-30
ACT_LAYOUTS = ("1x128", "128x1")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_block(block_size: int) -> None:
    if block_size != BLOCK_SIZE:
        raise ValueError(f"block_size={block_size} is not supported; DeepSeek-V3 FP8 uses block_size={BLOCK_SIZE}")


def _check_float(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name} must be a bf16/fp16/fp32 tensor to quantize, got dtype={x.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# plain-torch references
# ----------------------------------------------------------------------------------------------------------------


def _quantize_tiles_torch(xt: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xt: fp32 tiles [..., tile], amax: [..., 1]. Returns fp8 tiles and fp32 scales [...]."""
    # divide by a tensor, not the Python scalar: CUDA torch turns `t / scalar` into `t * (1 / scalar)`, which rounds
    # differently from the correctly rounded division the Triton kernels (and CPU torch) do
    s = amax.clamp_min(AMAX_EPS) / torch.full_like(amax, FP8_MAX)
    q = (xt / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s.squeeze(-1)


def act_quant_1x128_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    Kb = _cdiv(K, BLOCK_SIZE)
    xf = x.float()
    if Kb * BLOCK_SIZE != K:
        xf = torch.nn.functional.pad(xf, (0, Kb * BLOCK_SIZE - K))
    xt = xf.view(M, Kb, BLOCK_SIZE)
    q, s = _quantize_tiles_torch(xt, xt.abs().amax(dim=-1, keepdim=True))
    return q.view(M, Kb * BLOCK_SIZE)[:, :K].contiguous(), s


def act_quant_torch(x: torch.Tensor, layout: str = "1x128") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`act_quant` on a 2-D tensor."""
    if layout == "1x128":
        return act_quant_1x128_torch(x)
    q_t, s_t = act_quant_1x128_torch(x.t())
    return q_t.t().contiguous(), s_t.t().contiguous()


def weight_quant_torch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`weight_quant`; ``w`` is [N, K] or [E, N, K]."""
    if w.dim() == 3:
        qs = [weight_quant_torch(we) for we in w]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    N, K = w.shape
    Nb, Kb = _cdiv(N, BLOCK_SIZE), _cdiv(K, BLOCK_SIZE)
    wf = torch.nn.functional.pad(w.float(), (0, Kb * BLOCK_SIZE - K, 0, Nb * BLOCK_SIZE - N))
    wt = wf.view(Nb, BLOCK_SIZE, Kb, BLOCK_SIZE).permute(0, 2, 1, 3).reshape(Nb, Kb, BLOCK_SIZE * BLOCK_SIZE)
    q, s = _quantize_tiles_torch(wt, wt.abs().amax(dim=-1, keepdim=True))
    q = q.view(Nb, Kb, BLOCK_SIZE, BLOCK_SIZE).permute(0, 2, 1, 3).reshape(Nb * BLOCK_SIZE, Kb * BLOCK_SIZE)
    return q[:N, :K].contiguous(), s


def weight_dequant_torch(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference for :func:`weight_dequant`; ``q`` [N, K] or [E, N, K] fp8, ``s`` the 128x128 block scales."""
    if q.dim() == 3:
        return torch.stack([weight_dequant_torch(qe, se, dtype) for qe, se in zip(q, s)])
    N, K = q.shape
    s_full = s.float().repeat_interleave(BLOCK_SIZE, 0)[:N].repeat_interleave(BLOCK_SIZE, 1)[:, :K]
    return (q.float() * s_full).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round_to_e4m3(y):
        """Round fp32 values (|y| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

        The subsequent ``.to(float8)`` cast is then exact, which makes the result independent of the cast's own
        rounding mode (and of the interpreter's fp8 conversion)."""
        bits = y.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000  # RNE to 3 mantissa bits
        normal = rounded.to(tl.float32, bitcast=True)
        # e4m3 subnormal range: multiples of 2^-9, RNE via the 1.5 * 2^14 trick on |y|; keep the sign (also of -0)
        sub = (tl.abs(y) + 24576.0) - 24576.0
        sub = (sub.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(y) < 0.015625, sub, normal)

    @triton.jit
    def _round_to_bf16(y):
        """Round fp32 to the nearest bf16 value (ties to even), staying in fp32, so the store's cast is exact
        (the Triton interpreter truncates on fp32 -> bf16 casts; GPUs round to nearest even)."""
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _cast_out(y, OUT_BF16: tl.constexpr):
        if OUT_BF16:
            y = _round_to_bf16(y)
        return y

    @triton.jit
    def _act_quant_kernel(
        x_ptr, q_ptr, s_ptr, M, K,
        stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sk,
        AMAX_EPS_C: tl.constexpr, FP8_MAX_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One program quantizes BLOCK_M rows x BLOCK_K columns; one scale per (row, BLOCK_K tile)."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_EPS_C)
        s = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX_C, tl.float32))
        y = tl.math.div_rn(x, s[:, None])
        y = tl.minimum(tl.maximum(y, -FP8_MAX_C), FP8_MAX_C)
        y = _round_to_e4m3(y)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk,
                 y.to(q_ptr.dtype.element_ty), mask=mask)  # fmt: skip
        tl.store(s_ptr + offs_m * stride_sm + pid_k * stride_sk, s, mask=offs_m < M)

    @triton.jit
    def _weight_quant_kernel(
        w_ptr, q_ptr, s_ptr, N, K,
        stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
        AMAX_EPS_C: tl.constexpr, FP8_MAX_C: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_e = tl.program_id(2)
        offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
        offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w_ptr += pid_e * stride_we
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
        w = w.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(w)), AMAX_EPS_C)
        s = tl.math.div_rn(amax, FP8_MAX_C)
        y = tl.math.div_rn(w, tl.full(w.shape, 1.0, tl.float32) * s)
        y = tl.minimum(tl.maximum(y, -FP8_MAX_C), FP8_MAX_C)
        y = _round_to_e4m3(y)
        q_ptr += pid_e * stride_qe
        tl.store(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                 y.to(q_ptr.dtype.element_ty), mask=mask)  # fmt: skip
        tl.store(s_ptr + pid_e * stride_se + pid_n * stride_sn + pid_k * stride_sk, s)

    @triton.jit
    def _weight_dequant_kernel(
        q_ptr, s_ptr, w_ptr, N, K,
        stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_we, stride_wn, stride_wk,
        BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_e = tl.program_id(2)
        offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
        offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        q = tl.load(q_ptr + pid_e * stride_qe + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                    mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        s = tl.load(s_ptr + pid_e * stride_se + pid_n * stride_sn + pid_k * stride_sk)
        w = _cast_out(q * s, OUT_BF16)
        tl.store(w_ptr + pid_e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                 w.to(w_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def _act_quant_triton(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    if layout == "1x128":
        s = torch.empty((M, _cdiv(K, BLOCK_SIZE)), dtype=torch.float32, device=x.device)
        rows, cols = M, K
        xs, qs, ss = (x.stride(0), x.stride(1)), (q.stride(0), q.stride(1)), (s.stride(0), s.stride(1))
    else:  # 128x1: the same kernel on the transposed view
        s = torch.empty((_cdiv(M, BLOCK_SIZE), K), dtype=torch.float32, device=x.device)
        rows, cols = K, M
        xs, qs, ss = (x.stride(1), x.stride(0)), (q.stride(1), q.stride(0)), (s.stride(1), s.stride(0))
    block_m = 16
    grid = (_cdiv(rows, block_m), _cdiv(cols, BLOCK_SIZE))
    _act_quant_kernel[grid](
        x, q, s, rows, cols, *xs, *qs, *ss,
        AMAX_EPS_C=AMAX_EPS, FP8_MAX_C=FP8_MAX, BLOCK_M=block_m, BLOCK_K=BLOCK_SIZE,
    )  # fmt: skip
    return q, s


def _weight_quant_triton(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    E, N, K = w3.shape
    q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((E, _cdiv(N, BLOCK_SIZE), _cdiv(K, BLOCK_SIZE)), dtype=torch.float32, device=w.device)
    grid = (s.shape[1], s.shape[2], E)
    _weight_quant_kernel[grid](
        w3, q, s, N, K, *w3.stride(), *q.stride(), *s.stride(),
        AMAX_EPS_C=AMAX_EPS, FP8_MAX_C=FP8_MAX, BLOCK=BLOCK_SIZE,
    )  # fmt: skip
    return (q, s) if w.dim() == 3 else (q[0], s[0])


def _weight_dequant_triton(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q3 = q if q.dim() == 3 else q.unsqueeze(0)
    s3 = s if s.dim() == 3 else s.unsqueeze(0)
    E, N, K = q3.shape
    w = torch.empty((E, N, K), dtype=dtype, device=q.device)
    grid = (_cdiv(N, BLOCK_SIZE), _cdiv(K, BLOCK_SIZE), E)
    _weight_dequant_kernel[grid](q3, s3, w, N, K, *q3.stride(), *s3.stride(), *w.stride(), BLOCK=BLOCK_SIZE,
                                 OUT_BF16=dtype == torch.bfloat16)
    return w if q.dim() == 3 else w[0]


# ----------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------


def act_quant(
    x: torch.Tensor, layout: str = "1x128", block_size: int = BLOCK_SIZE, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 with per-tile scales (see module docstring for ``layout``).

    ``x`` may have any number of leading dims for ``layout="1x128"`` (they are flattened into tokens); the
    ``128x1`` layout needs a 2-D ``[tokens, channels]`` tensor. Returns ``(q, s)`` with ``q`` shaped like ``x``.
    """
    _check_block(block_size)
    _check_float(x, "x")
    if layout not in ACT_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {ACT_LAYOUTS}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"act_quant needs a non-empty last dimension, got shape {tuple(x.shape)}")
    if layout == "128x1" and x.dim() != 2:
        raise ValueError(f"layout='128x1' needs a 2-D [tokens, channels] tensor, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if resolve_backend(x, backend) == "triton":
        q, s = _act_quant_triton(x2, layout)
    else:
        q, s = act_quant_torch(x2, layout)
    if layout == "1x128":
        return q.view(*lead, x.shape[-1]), s.view(*lead, s.shape[-1])
    return q, s


def weight_quant(
    w: torch.Tensor, block_size: int = BLOCK_SIZE, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[N, K]`` (or stacked experts ``[E, N, K]``) with one scale per 128x128 block."""
    _check_block(block_size)
    _check_float(w, "w")
    if w.dim() not in (2, 3):
        raise ValueError(f"weight_quant expects a [N, K] or [E, N, K] weight, got shape {tuple(w.shape)}")
    if resolve_backend(w, backend) == "triton":
        return _weight_quant_triton(w)
    return weight_quant_torch(w)


def weight_dequant(
    q: torch.Tensor,
    s: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = BLOCK_SIZE,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of :func:`weight_quant`: ``w = q * s`` blockwise, in ``dtype``."""
    _check_block(block_size)
    if q.dim() not in (2, 3):
        raise ValueError(f"weight_dequant expects a [N, K] or [E, N, K] fp8 weight, got shape {tuple(q.shape)}")
    expected = (*q.shape[:-2], _cdiv(q.shape[-2], BLOCK_SIZE), _cdiv(q.shape[-1], BLOCK_SIZE))
    if tuple(s.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(s.shape)} but a weight of shape {tuple(q.shape)} needs {expected} "
            f"(one fp32 scale per {BLOCK_SIZE}x{BLOCK_SIZE} block)"
        )
    if resolve_backend(q, backend) == "triton":
        return _weight_dequant_triton(q, s.float(), dtype)
    return weight_dequant_torch(q, s, dtype)


def act_dequant(q: torch.Tensor, s: torch.Tensor, layout: str = "1x128", dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`act_quant` (torch; used to re-tile cached FP8 activations in the backward pass)."""
    if layout == "1x128":
        K = q.shape[-1]
        s_full = s.float().repeat_interleave(BLOCK_SIZE, dim=-1)[..., :K]
        return (q.float() * s_full).to(dtype)
    if layout == "128x1":
        M = q.shape[0]
        s_full = s.float().repeat_interleave(BLOCK_SIZE, dim=0)[:M]
        return (q.float() * s_full).to(dtype)
    raise ValueError(f"layout={layout!r} is not one of {ACT_LAYOUTS}")
