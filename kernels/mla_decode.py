"""Absorbed-MLA decode attention (FlashMLA-style): one pass over the latent cache with an online softmax.

With kv_b_proj absorbed (see `deepseek_v3.attention`), every head attends over the same per-token cache entry:
the latent c_kv [r] and the rotated rope key k_pe [dr]. For a query row (batch b, query s, head h):

    score_t = (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t]) * scale + bias[s, t]
    o_lat[h] = sum_t softmax(score)_t * c_kv[t]                              -> [r], multiplied by W_UV afterwards

The Triton kernel gives each program a block of BLOCK_H heads of one (b, s) and one split of the cache, which it
streams in BLOCK_T tiles: each latent tile is loaded once and used twice (scores and output) for all heads of the
block -- the MQA-like sharing that makes absorbed MLA memory-efficient. Softmax statistics (running max, running
sum) are kept in fp32. With few (b, s, head-block) programs -- batch 1 decoding -- the cache is split along T
(flash-decoding) so every SM gets work: each split writes its unnormalized output and its (max, sum), and
`combine_splits` merges them exactly (rescale by exp(m_split - m) and divide by the merged sum).

Shapes: q_lat [B, H, S, r], q_pe [B, H, S, dr], c_kv [B, 1, T, r], k_pe [B, 1, T, dr], bias [B, 1, S, T] additive
(0 / very negative) or None = causal with the S queries being the last S cache positions. Output [B, H, S, r].

Runs on CUDA tensors, or on CPU under `TRITON_INTERPRET=1` (set before this module's first kernel call is built).
"""

from __future__ import annotations

import functools

import torch

from ._triton_utils import triton_interpret

_KERNELS: dict[bool, object] = {}


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
        Q_LAT, Q_PE, C_KV, K_PE, BIAS, OUT, M_OUT, L_OUT,
        stride_qb, stride_qh, stride_qs,
        stride_pb, stride_ph, stride_ps,
        stride_cb, stride_ct,
        stride_kb, stride_kt,
        stride_bb, stride_bs,
        stride_on, stride_oh,
        H, S, T, R, DR, scale, SPLIT_T,
        HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, NORMALIZE: tl.constexpr,
    ):  # fmt: skip
        pid_bs = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_split = tl.program_id(2)
        num_splits = tl.num_programs(2)
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

        split_start = pid_split * SPLIT_T  # this program's keys: split_start .. split_end - 1
        split_end = tl.minimum(split_start + SPLIT_T, T)
        for start in range(split_start, split_end, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            mask_t = offs_t < split_end
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

        # row n = (b, s, split) of the [B * S * splits, H, R] outputs; one split: the normalized result, else the
        # unnormalized accumulator and its statistics for combine_splits
        n = pid_bs * num_splits + pid_split
        if NORMALIZE:
            acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        else:
            tl.store(M_OUT + n * H + offs_h, m_i, mask=mask_h)
            tl.store(L_OUT + n * H + offs_h, l_i, mask=mask_h)
        o_ptrs = OUT + n * stride_on + offs_h[:, None] * stride_oh + offs_r[None, :]
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])

    @triton.jit
    def _combine_splits_kernel(
        ACC, M_IN, L_IN, OUT, H, R, NUM_SPLITS,
        stride_on, stride_oh,
        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """One program per (row n = (b, s), head): merge the NUM_SPLITS partial results, see `combine_splits`."""
        n = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_r = tl.arange(0, BLOCK_R)
        mask_s = offs_s < NUM_SPLITS
        mask_r = offs_r < R
        rows = n * NUM_SPLITS + offs_s  # [BLOCK_S] rows of the [B * S * splits, H, ...] partial outputs
        m = tl.load(M_IN + rows * H + h, mask=mask_s, other=float("-inf"))
        l = tl.load(L_IN + rows * H + h, mask=mask_s, other=0.0)
        m_all = tl.max(m, 0)
        weight = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # 0 for splits that saw no key
        total = tl.sum(weight * l, 0)
        acc = tl.load(ACC + (rows[:, None] * H + h) * R + offs_r[None, :],
                      mask=mask_s[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
        out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(OUT + n * stride_on + h * stride_oh + offs_r, out.to(OUT.dtype.element_ty), mask=mask_r)

    return _mla_decode_kernel, _combine_splits_kernel


def _kernel():
    key = triton_interpret()
    if key not in _KERNELS:  # built lazily so TRITON_INTERPRET is read when the kernel is first needed
        _KERNELS[key] = _build_kernel()
    return _KERNELS[key]


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def combine_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge per-split online-softmax results (torch reference of the combine kernel).
    acc [N, splits, H, r] (unnormalized, fp32), m / l [N, splits, H]
    (running max / sum of each split; m = -inf for a split with no visible key) -> [N, H, r] fp32."""
    m_all = m.amax(1, keepdim=True)  # [N, 1, H]
    weight = torch.exp(m - torch.where(torch.isinf(m_all), 0.0, m_all))  # 0 for empty splits
    total = (l * weight).sum(1)  # [N, H]
    out = (acc * weight.unsqueeze(-1)).sum(1)
    return out / torch.where(total == 0.0, 1.0, total).unsqueeze(-1)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(programs: int, length: int, block_t: int, device: torch.device) -> int:
    """Cache splits so that about two programs run per SM, each split keeping at least 4 tiles of keys."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    wanted = -(-2 * sms // max(programs, 1))
    return max(1, min(wanted, length // (4 * block_t)))


def mla_decode_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    block_t: int | None = None,
    block_h: int = 16,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton absorbed-MLA attention; see the module docstring for shapes. Returns o_lat [B, H, S, r].
    block_t: cache tokens per tile (default 64, 32 for r > 256 so a [BLOCK_T, r] latent tile stays small);
    num_splits: parts of the cache processed by separate programs (default: enough to fill the GPU, 1 on CPU)."""
    batch, heads, seq, rank = q_lat.shape
    length, rope_dim = c_kv.shape[2], k_pe.shape[-1]
    if not (q_lat.is_cuda or triton_interpret()):
        raise RuntimeError("mla_decode_attention needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    q_lat = q_lat.contiguous()
    q_pe = q_pe.contiguous()
    c = c_kv.squeeze(1)  # [B, T, r]
    kp = k_pe.squeeze(1)  # [B, T, dr]
    if c.stride(-1) != 1:
        c = c.contiguous()
    if kp.stride(-1) != 1:
        kp = kp.contiguous()
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
    head_blocks = -(-heads // block_h)
    if num_splits is None:
        num_splits = default_num_splits(batch * seq * head_blocks, length, block_t, q_lat.device)
    split_t = -(-max(length, 1) // num_splits)
    split_t = -(-split_t // block_t) * block_t  # whole tiles per split
    num_splits = -(-max(length, 1) // split_t)
    rows = batch * seq * num_splits  # outputs [B * S * splits, H, r]; a single split writes the final result
    if num_splits == 1:
        out = torch.empty(rows, heads, rank, device=q_lat.device, dtype=q_lat.dtype)
        m_out = l_out = out  # unused
    else:
        out = torch.empty(rows, heads, rank, device=q_lat.device, dtype=torch.float32)
        m_out = torch.empty(rows, heads, device=q_lat.device, dtype=torch.float32)
        l_out = torch.empty_like(m_out)
    precision = "ieee" if q_lat.dtype == torch.float32 else "tf32"
    grid = (batch * seq, head_blocks, num_splits)
    attend_kernel, combine_kernel = _kernel()
    attend_kernel[grid](
        q_lat, q_pe, c, kp, bias_arg, out, m_out, l_out,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2),
        q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        c.stride(0), c.stride(1),
        kp.stride(0), kp.stride(1),
        stride_bb, stride_bs,
        out.stride(0), out.stride(1),
        heads, seq, length, rank, rope_dim, float(scaling), split_t,
        HAS_BIAS=bias is not None, BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_DR=block_dr,
        PRECISION=precision, UPCAST=triton_interpret() and q_lat.dtype == torch.bfloat16, NORMALIZE=num_splits == 1,
        num_warps=4 if block_h * block_r <= 16 * 512 else 8, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:  # merge the splits in one more launch (the torch `combine_splits` would take ~8)
        partial = out
        out = torch.empty(batch * seq, heads, rank, device=q_lat.device, dtype=q_lat.dtype)
        combine_kernel[(batch * seq, heads)](
            partial, m_out, l_out, out, heads, rank, num_splits, out.stride(0), out.stride(1),
            BLOCK_S=max(2, _next_pow2(num_splits)), BLOCK_R=block_r,
        )  # fmt: skip
    # [B * S, H, r] -> [B, H, S, r]
    return out.view(batch, seq, heads, rank).transpose(1, 2)
