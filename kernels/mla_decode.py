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

**FP8 latent cache.** `c_kv` may be float8_e4m3fn with one fp32 scale per token and 128 channels
(`quantize_latent_cache`, the 1x128 tiles of `act_quant`); the kernel dequantizes each loaded tile
(`c = q * s`) before both dots, `k_pe` stays bf16. A step then reads r + 4 r/128 + 2 dr bytes per token instead
of 2 (r + dr): 648 instead of 1152 at r = 512, dr = 64.

**Variants and the rule.** `MLAVariant` = (BLOCK_H heads per program, BLOCK_T tokens per tile, split factor =
target programs per SM when splitting along T (0: never), num_warps, num_stages); `VARIANTS` is the set that
`benchmarks/mla_decode.py --sweep` times on a GPU. Each call without an explicit `variant` asks `choose_variant`:
the measured entry of the kernel rule cache (`rule_cache`, keyed by chip, versions, cache dtype, batch x queries
and context rounded up to powers of two, H, r, dr), else `default_variant` (the first measured kernel's
configurations). The sweep stores its best per shape with `record_variant_choice`.

Runs on CUDA tensors, or on CPU under `TRITON_INTERPRET=1` (set before this module's first kernel call is built).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
        Q_LAT, Q_PE, C_KV, K_PE, BIAS, OUT, M_OUT, L_OUT, C_SCALE,
        stride_qb, stride_qh, stride_qs,
        stride_pb, stride_ph, stride_ps,
        stride_cb, stride_ct,
        stride_kb, stride_kt,
        stride_bb, stride_bs,
        stride_on, stride_oh,
        stride_sb, stride_st,
        H, S, T, R, DR, scale, SPLIT_T,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
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
            if HAS_SCALE:  # fp8 latent: dequantize with its 1x128 scales (one per token and 128 channels)
                cs = tl.load(
                    C_SCALE + b * stride_sb + offs_t[:, None] * stride_st + (offs_r // 128)[None, :],
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0,
                )  # fmt: skip
                c = c.to(tl.float32) * cs
                if not UPCAST:
                    c = c.to(q.dtype)
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


def default_num_splits(programs: int, length: int, block_t: int, device: torch.device, per_sm: int = 2) -> int:
    """Cache splits so that about ``per_sm`` programs run per SM, each split keeping at least 4 tiles of keys."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    wanted = -(-per_sm * sms // max(programs, 1))
    return max(1, min(wanted, length // (4 * block_t)))


# ----------------------------------------------------------------------------------------------------------------
# fp8 latent cache
# ----------------------------------------------------------------------------------------------------------------


def quantize_latent_cache(c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 latent cache with one fp32 scale per token and 128 channels (the 1x128 tiles of ``act_quant``):
    ``c_kv [B, 1, T, r]`` -> ``(q [B, 1, T, r] float8_e4m3fn, scale [B, 1, T, ceil(r/128)] fp32)``, with
    ``c_kv ~= q * scale`` per tile. The rope key ``k_pe`` stays in bf16 (as FlashMLA's FP8 cache keeps it): it is
    1/9 of the bytes and carries the position signal. Halves the latent bytes a decode step reads."""
    from .fp8_quant import act_quant

    batch, one, length, rank = c_kv.shape
    q, s = act_quant(c_kv.reshape(-1, rank), "1x128", backend="torch")
    return q.view(batch, one, length, rank), s.view(batch, one, length, -1)


def dequantize_latent_cache(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_latent_cache` (up to the e4m3 rounding)."""
    rank = q.shape[-1]
    expanded = scale.repeat_interleave(128, dim=-1)[..., :rank]
    return (q.float() * expanded).to(dtype)


def mla_decode_attention_fp8_torch(q_lat, q_pe, c_kv_q, c_kv_scale, k_pe, scaling, bias=None):
    """Reference for the fp8-cache kernel: dequantize the latent, then :func:`mla_decode_attention_torch`."""
    c_kv = dequantize_latent_cache(c_kv_q, c_kv_scale, torch.float32)
    return mla_decode_attention_torch(q_lat.float(), q_pe.float(), c_kv, k_pe.float(), scaling, bias).to(q_lat.dtype)


# ----------------------------------------------------------------------------------------------------------------
# variants and the per-shape rule
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLAVariant:
    """One launch configuration of the decode kernel.

    - ``block_h``: heads per program sharing each loaded latent tile (64 = FlashMLA's head block: each [BLOCK_T, r]
      tile feeds a [64, BLOCK_T] score tile, 4x the reuse of 16);
    - ``block_t``: cache tokens per tile;
    - ``split_factor``: target programs per SM when splitting the cache along T (flash-decoding), 0 = never split;
    - ``num_warps`` / ``num_stages``: Triton launch parameters (stages = software-pipelining depth of the loads).
    """

    block_h: int
    block_t: int
    split_factor: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"h{self.block_h}_t{self.block_t}_x{self.split_factor}_w{self.num_warps}_s{self.num_stages}"

    @classmethod
    def from_name(cls, name: str) -> "MLAVariant":
        try:
            h, t, x, w, s = (int(part[1:]) for part in name.split("_"))
        except ValueError:
            raise ValueError(f"{name!r} is not an MLA variant name like 'h64_t32_x2_w8_s2'") from None
        return cls(h, t, x, w, s)


# The set swept on the GPU (benchmarks/mla_decode.py --sweep): kept small enough to compile and time in about a
# minute. Around the two configurations of the first measured kernel (16-head blocks, and 64-head blocks at
# batch >= 8; 32-token tiles for r = 512): tile sizes, split policy, warps and pipelining depth one at a time.
_VARIANT_NAMES = (
    "h16_t32_x2_w4_s2",  # the first kernel's batch-1 configuration
    "h16_t64_x2_w4_s2",
    "h16_t32_x4_w4_s2",
    "h16_t32_x2_w4_s3",
    "h32_t32_x2_w4_s2",
    "h32_t32_x2_w8_s2",
    "h32_t64_x2_w8_s2",
    "h64_t32_x2_w8_s2",  # the first kernel's batch >= 8 configuration (FlashMLA's 64-head block)
    "h64_t16_x2_w8_s2",
    "h64_t64_x2_w8_s2",
    "h64_t32_x2_w8_s3",
    "h64_t32_x1_w8_s2",
    "h64_t32_x4_w8_s2",
    "h64_t32_x0_w8_s2",  # never split the cache
)


VARIANTS: dict[str, MLAVariant] = {n: MLAVariant.from_name(n) for n in _VARIANT_NAMES}
_RULE_CACHE = None


def _rule_cache():
    if _RULE_CACHE is not None:  # tests substitute their own
        return _RULE_CACHE
    from .rule_cache import default_cache

    return default_cache()


def _pow2_bucket(n: int) -> int:
    return _next_pow2(max(int(n), 1))


def variant_key(device: torch.device, batch: int, seq: int, length: int, heads: int, rank: int, rope_dim: int,
                cache_dtype: torch.dtype) -> str:  # fmt: skip
    """Rule-cache key: chip and versions, cache dtype, batch x queries and context rounded up to powers of two."""
    from .rule_cache import device_tag

    dt = str(cache_dtype).replace("torch.", "")
    return "|".join([device_tag(device), "mla_decode", dt, f"BS{_pow2_bucket(batch * seq)}", f"T{_pow2_bucket(length)}",
                     f"H{heads}", f"r{rank}", f"dr{rope_dim}"])  # fmt: skip


def default_variant(batch: int, seq: int, length: int, rank: int) -> MLAVariant:
    """Deterministic rule when nothing was measured: the configuration of the first measured kernel (H100, bf16):
    16-head blocks at batch x queries < 8, 64-head blocks from 8 rows on (best there in that table); 32-token tiles
    for r > 256 else 64; splits for about two programs per SM."""
    block_h = 64 if batch * seq >= 8 else 16
    block_t = 64 if rank <= 256 else 32
    num_warps = 8 if block_h * max(16, _next_pow2(rank)) > 16 * 512 or block_h >= 64 else 4
    return MLAVariant(block_h, block_t, 2, num_warps, 2)


def _key_for(q_lat: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> str:
    batch, heads, seq, rank = q_lat.shape
    return variant_key(q_lat.device, batch, seq, c_kv.shape[2], heads, rank, k_pe.shape[-1], c_kv.dtype)


def choose_variant(q_lat: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> MLAVariant:
    """The rule: the measured entry of the rule cache for this shape key, else :func:`default_variant`."""
    batch, heads, seq, rank = q_lat.shape
    entry = _rule_cache().get(_key_for(q_lat, c_kv, k_pe))
    if entry is not None and entry.get("choice") in VARIANTS:
        return VARIANTS[entry["choice"]]
    return default_variant(batch, seq, c_kv.shape[2], rank)


def record_variant_choice(q_lat: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, timings_ms: dict[str, float],
                          persist: bool = True) -> str:  # fmt: skip
    """Store the fastest of ``timings_ms`` (variant name -> median ms) as the rule for this shape; returns it."""
    if not timings_ms:
        raise ValueError("no timings to choose from")
    unknown = set(timings_ms) - set(VARIANTS)
    if unknown:
        raise ValueError(f"not variant names: {sorted(unknown)}")
    best = min(timings_ms, key=timings_ms.get)
    _rule_cache().put(_key_for(q_lat, c_kv, k_pe), {"choice": best, "ms": dict(timings_ms)}, persist=persist)
    return best


# ----------------------------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------------------------


def mla_decode_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    block_t: int | None = None,
    block_h: int | None = None,
    num_splits: int | None = None,
    *,
    c_kv_scale: torch.Tensor | None = None,
    variant: MLAVariant | str | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton absorbed-MLA attention; see the module docstring for shapes. Returns o_lat [B, H, S, r].

    ``c_kv`` bf16/fp16/fp32, or float8_e4m3fn with ``c_kv_scale [B, 1, T, ceil(r/128)]``
    (:func:`quantize_latent_cache`).
    Launch configuration: ``variant`` (an :class:`MLAVariant` or its name) or, when None, the per-shape rule
    (:func:`choose_variant`); explicit ``block_t`` / ``block_h`` / ``num_splits`` / ``num_warps`` / ``num_stages``
    override single fields. ``num_splits``: parts of the cache processed by separate programs (default: from the
    variant's ``split_factor``, 1 on CPU)."""
    batch, heads, seq, rank = q_lat.shape
    length, rope_dim = c_kv.shape[2], k_pe.shape[-1]
    if not (q_lat.is_cuda or triton_interpret()):
        raise RuntimeError("mla_decode_attention needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    fp8_cache = c_kv.dtype == torch.float8_e4m3fn
    if fp8_cache != (c_kv_scale is not None):
        raise ValueError("an e4m3 c_kv needs c_kv_scale [B, 1, T, ceil(r/128)], and only an e4m3 c_kv takes one")
    if fp8_cache and tuple(c_kv_scale.shape) != (batch, 1, length, -(-rank // 128)):
        expected = (batch, 1, length, -(-rank // 128))
        raise ValueError(f"c_kv_scale has shape {tuple(c_kv_scale.shape)}, expected {expected}")
    if isinstance(variant, str):
        variant = MLAVariant.from_name(variant)
    if variant is None:
        variant = choose_variant(q_lat, c_kv, k_pe)
    block_h = block_h or variant.block_h
    block_t = block_t or variant.block_t
    num_warps = num_warps or variant.num_warps
    num_stages = num_stages or variant.num_stages
    q_lat = q_lat.contiguous()
    q_pe = q_pe.contiguous()
    c = c_kv.squeeze(1)  # [B, T, r]
    kp = k_pe.squeeze(1)  # [B, T, dr]
    if c.stride(-1) != 1:
        c = c.contiguous()
    if kp.stride(-1) != 1:
        kp = kp.contiguous()
    if fp8_cache:
        cs = c_kv_scale.squeeze(1)
        if cs.stride(-1) != 1:
            cs = cs.contiguous()
        scale_arg, stride_sb, stride_st = cs, cs.stride(0), cs.stride(1)
    else:
        scale_arg, stride_sb, stride_st = c, 0, 0  # unused
    if bias is not None:
        bias = bias.expand(batch, 1, seq, length)
        if bias.stride(-1) != 1:
            bias = bias.contiguous()
        bias_arg, stride_bb, stride_bs = bias, bias.stride(0), bias.stride(2)
    else:
        bias_arg, stride_bb, stride_bs = c, 0, 0  # unused
    # tl.dot wants every dim >= 16 on GPUs: pad the tiles (masked loads)
    block_r, block_dr = max(16, _next_pow2(rank)), max(16, _next_pow2(rope_dim))
    head_blocks = -(-heads // block_h)
    if num_splits is None:
        if variant.split_factor == 0:
            num_splits = 1
        else:
            num_splits = default_num_splits(batch * seq * head_blocks, length, block_t, q_lat.device,
                                            per_sm=variant.split_factor)  # fmt: skip
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
        q_lat, q_pe, c, kp, bias_arg, out, m_out, l_out, scale_arg,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2),
        q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        c.stride(0), c.stride(1),
        kp.stride(0), kp.stride(1),
        stride_bb, stride_bs,
        out.stride(0), out.stride(1),
        stride_sb, stride_st,
        heads, seq, length, rank, rope_dim, float(scaling), split_t,
        HAS_SCALE=fp8_cache, HAS_BIAS=bias is not None, BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_R=block_r,
        BLOCK_DR=block_dr, PRECISION=precision, UPCAST=triton_interpret() and q_lat.dtype == torch.bfloat16,
        NORMALIZE=num_splits == 1, num_warps=num_warps, num_stages=num_stages,
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
