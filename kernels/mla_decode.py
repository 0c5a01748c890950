"""Absorbed-MLA decode attention (FlashMLA-style): one pass over the latent cache with an online softmax.

With kv_b_proj absorbed (see `deepseek_v3.attention`), every head attends over the same per-token cache entry:
the latent c_kv [r] and the rotated rope key k_pe [dr]. For a query row (batch b, query s, head h):

    score_t = (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t]) * scale + bias[s, t]
    o_lat[h] = sum_t softmax(score)_t * c_kv[t]                              -> [r], multiplied by W_UV afterwards

The Triton kernel gives each program a block of BLOCK_H heads of one (b, s) and streams the cache in BLOCK_T
tiles: each latent tile is loaded once and used twice (scores and output) for all heads of the block -- the MQA-like
sharing that makes absorbed MLA memory-efficient. Softmax statistics (running max, running sum) are kept in fp32.

Shapes: q_lat [B, H, S, r], q_pe [B, H, S, dr], c_kv [B, 1, T, r], k_pe [B, 1, T, dr], bias [B, 1, S, T] additive
(0 / very negative) or None = causal with the S queries being the last S cache positions. Output [B, H, S, r].

Runs on CUDA tensors, or on CPU under `TRITON_INTERPRET=1` (set before this module's first kernel call is built).
"""

from __future__ import annotations

import os

import torch

_KERNELS: dict[bool, object] = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mla_decode_attention_torch(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: materialized scores [B, H, S, T], fp32 softmax. Same signature and output as the kernel."""
    seq, length = q_lat.shape[2], c_kv.shape[2]
    scores = (q_lat.float() @ c_kv.float().transpose(-1, -2) + q_pe.float() @ k_pe.float().transpose(-1, -2)) * scaling
    if bias is None:
        causal = torch.ones(seq, length, dtype=torch.bool, device=q_lat.device).tril(length - seq)
        scores = scores.masked_fill(~causal, float("-inf"))
    else:
        scores = scores + bias.float()
    return (scores.softmax(-1) @ c_kv.float()).to(q_lat.dtype)


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _mla_decode_kernel(
        Q_LAT, Q_PE, C_KV, K_PE, BIAS, OUT,
        stride_qb, stride_qh, stride_qs,
        stride_pb, stride_ph, stride_ps,
        stride_cb, stride_ct,
        stride_kb, stride_kt,
        stride_bb, stride_bs,
        stride_ob, stride_oh, stride_os,
        H, S, T, R, DR, scale,
        HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_bs = tl.program_id(0)
        pid_h = tl.program_id(1)
        b = pid_bs // S
        s = pid_bs % S
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        offs_r = tl.arange(0, BLOCK_R)
        offs_dr = tl.arange(0, BLOCK_DR)
        mask_h = offs_h < H
        mask_r = offs_r < R
        mask_dr = offs_dr < DR

        q_ptrs = Q_LAT + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh + offs_r[None, :]
        q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
        p_ptrs = Q_PE + b * stride_pb + s * stride_ps + offs_h[:, None] * stride_ph + offs_dr[None, :]
        qp = tl.load(p_ptrs, mask=mask_h[:, None] & mask_dr[None, :], other=0.0)  # [BLOCK_H, BLOCK_DR]
        if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands: compute in fp32 there
            q = q.to(tl.float32)
            qp = qp.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
        causal_limit = T - S + s  # without a bias: query s sees keys 0 .. T - S + s

        for start in range(0, T, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            c = tl.load(
                C_KV + b * stride_cb + offs_t[:, None] * stride_ct + offs_r[None, :],
                mask=mask_t[:, None] & mask_r[None, :], other=0.0,
            )  # [BLOCK_T, BLOCK_R]  # fmt: skip
            kp = tl.load(
                K_PE + b * stride_kb + offs_t[:, None] * stride_kt + offs_dr[None, :],
                mask=mask_t[:, None] & mask_dr[None, :], other=0.0,
            )  # [BLOCK_T, BLOCK_DR]  # fmt: skip
            if UPCAST:
                c = c.to(tl.float32)
                kp = kp.to(tl.float32)
            scores = tl.dot(q, tl.trans(c), input_precision=PRECISION)
            scores += tl.dot(qp, tl.trans(kp), input_precision=PRECISION)
            scores = scores * scale  # [BLOCK_H, BLOCK_T] fp32
            if HAS_BIAS:
                bias = tl.load(BIAS + b * stride_bb + s * stride_bs + offs_t, mask=mask_t, other=0.0).to(tl.float32)
                scores += bias[None, :]
                valid = mask_t
            else:
                valid = mask_t & (offs_t <= causal_limit)
            scores = tl.where(valid[None, :], scores, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no visible key keeps the state
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
            m_i = m_new

        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        o_ptrs = OUT + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_r[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])

    return _mla_decode_kernel


def _kernel():
    key = _interpret()
    if key not in _KERNELS:  # built lazily so TRITON_INTERPRET is read when the kernel is first needed
        _KERNELS[key] = _build_kernel()
    return _KERNELS[key]


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def mla_decode_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    block_t: int | None = None,
    block_h: int = 16,
) -> torch.Tensor:
    """Triton absorbed-MLA attention; see the module docstring for shapes. Returns o_lat [B, H, S, r].
    block_t: cache tokens per tile (default 64, 32 for r > 256 so a [BLOCK_T, r] latent tile stays small)."""
    batch, heads, seq, rank = q_lat.shape
    length, rope_dim = c_kv.shape[2], k_pe.shape[-1]
    if not (q_lat.is_cuda or _interpret()):
        raise RuntimeError("mla_decode_attention needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    q_lat = q_lat.contiguous()
    q_pe = q_pe.contiguous()
    c = c_kv.squeeze(1)  # [B, T, r]
    kp = k_pe.squeeze(1)  # [B, T, dr]
    if c.stride(-1) != 1:
        c = c.contiguous()
    if kp.stride(-1) != 1:
        kp = kp.contiguous()
    out = torch.empty_like(q_lat)
    if bias is not None:
        bias = bias.expand(batch, 1, seq, length)
        if bias.stride(-1) != 1:
            bias = bias.contiguous()
        bias_arg, stride_bb, stride_bs = bias, bias.stride(0), bias.stride(2)
    else:
        bias_arg, stride_bb, stride_bs = c, 0, 0  # unused
    # tl.dot wants every dim >= 16 on GPUs: pad the tiles (masked loads)
    block_r, block_dr = max(16, _next_pow2(rank)), max(16, _next_pow2(rope_dim))
    if block_t is None:
        block_t = 64 if block_r <= 256 else 32
    precision = "ieee" if q_lat.dtype == torch.float32 else "tf32"
    grid = (batch * seq, -(-heads // block_h))
    _kernel()[grid](
        q_lat, q_pe, c, kp, bias_arg, out,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2),
        q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        c.stride(0), c.stride(1),
        kp.stride(0), kp.stride(1),
        stride_bb, stride_bs,
        out.stride(0), out.stride(1), out.stride(2),
        heads, seq, length, rank, rope_dim, float(scaling),
        HAS_BIAS=bias is not None, BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_DR=block_dr,
        PRECISION=precision, UPCAST=_interpret() and q_lat.dtype == torch.bfloat16, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
