"""The Triton absorbed-MLA decode kernel equals the torch path (CPU: through the Triton interpreter)."""

import pytest
import torch

pytest.importorskip("triton")

from deepseek_v3.kernels.mla_decode import mla_decode_attention, mla_decode_attention_torch  # noqa: E402

# On CPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, H, S, T, r, dr, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=g) * 2).to(DEVICE, dtype)  # noqa: E731
    return make(B, H, S, r), make(B, H, S, dr), make(B, 1, T, r), make(B, 1, T, dr)


@pytest.mark.parametrize(
    "B,H,S,T,r,dr",
    [
        (2, 4, 1, 37, 32, 8),  # tiny config dims, T not a multiple of the tile
        (1, 5, 1, 64, 32, 8),  # heads not a multiple of BLOCK_H, T exactly one tile
        (2, 4, 2, 130, 32, 8),  # 2 queries (speculative verification), causal, 3 tiles
        (1, 16, 1, 9, 64, 16),  # a full head block, T smaller than a tile
    ],
)
@pytest.mark.parametrize("num_splits", [1, 3])  # 3: the cache split along T, partial results combined
def test_kernel_matches_reference_causal(B, H, S, T, r, dr, num_splits):
    q_lat, q_pe, c_kv, k_pe = inputs(B, H, S, T, r, dr)
    scale = 0.17
    got = mla_decode_attention(q_lat, q_pe, c_kv, k_pe, scale, block_t=32, num_splits=num_splits)
    ref = mla_decode_attention_torch(q_lat, q_pe, c_kv, k_pe, scale)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_kernel_with_padding_bias(num_splits):
    """Left padding and a dead slot (a rejected draft) given as an additive bias, one row fully padded but one key;
    with 4 splits of 16 keys, row 2's first splits see no key at all."""
    B, H, S, T, r, dr = 3, 4, 2, 50, 32, 8
    q_lat, q_pe, c_kv, k_pe = inputs(B, H, S, T, r, dr, seed=1)
    visible = torch.ones(B, 1, S, T, dtype=torch.bool, device=DEVICE).tril(T - S)
    visible[0, ..., :7] = False  # left padding
    visible[1, ..., 20] = False  # a hole
    visible[2, ..., : T - S] = False  # only the new tokens are visible
    bias = torch.zeros(B, 1, S, T, device=DEVICE).masked_fill(~visible, torch.finfo(torch.float32).min)
    got = mla_decode_attention(q_lat, q_pe, c_kv, k_pe, 0.2, bias, block_t=16, num_splits=num_splits)
    ref = mla_decode_attention_torch(q_lat, q_pe, c_kv, k_pe, 0.2, bias)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the mask matters: dropping it changes the result
    assert not torch.allclose(mla_decode_attention_torch(q_lat, q_pe, c_kv, k_pe, 0.2), ref, atol=1e-3)


def test_model_decode_with_triton_backend():
    """The tiny model decodes the same logits with the Triton kernel as with the torch absorbed path."""
    import deepseek_v3
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    model = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny")).eval().to(DEVICE)
    ids = torch.randint(3, 300, (2, 6), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    logits = {}
    for backend in ("torch", "triton"):
        for layer in model.model.layers:
            layer.self_attn.decode_backend = backend
        cache = DynamicCache(config=model.config)
        step_mask = mask.clone()
        positions = (step_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(ids, attention_mask=step_mask, position_ids=positions, past_key_values=cache)
            steps = []
            for _ in range(4):
                token = out.logits[:, -1:].argmax(-1)
                step_mask = torch.cat((step_mask, torch.ones_like(token)), 1)
                positions = positions[:, -1:] + 1
                out = model(token, attention_mask=step_mask, position_ids=positions, past_key_values=cache,
                            mla_absorb="on")  # fmt: skip
                steps.append(out.logits[:, -1])
        logits[backend] = torch.stack(steps, 1)
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_kernel_half_precision(dtype, num_splits):
    """bf16 / fp16 cache and queries (fp32 softmax statistics and accumulation inside the kernel)."""
    q_lat, q_pe, c_kv, k_pe = inputs(2, 4, 2, 45, 32, 8, seed=2, dtype=dtype)
    got = mla_decode_attention(q_lat, q_pe, c_kv, k_pe, 0.1, block_t=16, num_splits=num_splits)
    assert got.dtype == dtype
    ref = mla_decode_attention_torch(q_lat, q_pe, c_kv, k_pe, 0.1)  # fp32 math on the same inputs
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_combine_splits_equals_one_softmax():
    """Merging per-split (unnormalized output, max, sum) gives the softmax over all keys; an empty split (max -inf,
    sum 0) contributes nothing."""
    from deepseek_v3.kernels.mla_decode import combine_splits

    g = torch.Generator().manual_seed(3)
    scores, values = torch.randn(2, 3, 12, generator=g) * 3, torch.randn(2, 12, 5, generator=g)  # [N, H, T], [N, T, r]
    scores[1, :, :4] = float("-inf")  # split 0 of row 1 sees nothing
    ref = torch.einsum("nht,ntr->nhr", scores.softmax(-1), values)
    parts = [(scores[..., i : i + 4], values[:, i : i + 4]) for i in (0, 4, 8)]
    m = torch.stack([s.amax(-1) for s, _ in parts], 1)  # [N, splits, H]
    safe = torch.where(torch.isinf(m), 0.0, m)
    p = [torch.exp(s - safe[:, i, :, None]) for i, (s, _) in enumerate(parts)]
    l = torch.stack([x.sum(-1) for x in p], 1)
    acc = torch.stack([torch.einsum("nht,ntr->nhr", x, v) for x, (_, v) in zip(p, parts)], 1)
    torch.testing.assert_close(combine_splits(acc, m, l), ref)

    # the Triton combine kernel (what mla_decode_attention launches) on the same partial results
    from deepseek_v3.kernels.mla_decode import _kernel

    N, splits, H, r = acc.shape
    out = torch.full((N, H, r), float("nan"), device=DEVICE)
    _kernel()[1][(N, H)](acc.to(DEVICE).contiguous(), m.to(DEVICE).contiguous(), l.to(DEVICE).contiguous(), out,
                         H, r, splits, out.stride(0), out.stride(1), BLOCK_S=4, BLOCK_R=8)  # fmt: skip
    torch.testing.assert_close(out.cpu(), ref)


# ---------------------------------------------------------------------------------------------------------------
# variants, fp8 latent cache, the per-shape rule
# ---------------------------------------------------------------------------------------------------------------

from deepseek_v3.kernels import mla_decode as md  # noqa: E402


@pytest.mark.parametrize("name", list(md.VARIANTS))
def test_every_variant_matches_reference(name):
    """Each launch configuration the GPU sweep may pick computes the same attention (heads not a multiple of the
    head block, ragged T, 2 queries); on CPU a split variant is run with 3 explicit splits."""
    variant = md.VARIANTS[name]
    q_lat, q_pe, c_kv, k_pe = inputs(1, 5, 2, 70, 32, 8, seed=5)
    splits = None if variant.split_factor == 0 else 3
    got = mla_decode_attention(q_lat, q_pe, c_kv, k_pe, 0.15, variant=name, num_splits=splits)
    ref = mla_decode_attention_torch(q_lat, q_pe, c_kv, k_pe, 0.15)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_latent_cache_fp8_roundtrip():
    c_kv = torch.randn(2, 1, 9, 300) * 3
    q, s = md.quantize_latent_cache(c_kv)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 1, 9, 3)
    deq = md.dequantize_latent_cache(q, s)
    bound = c_kv.abs() * 2**-4 + s.repeat_interleave(128, -1)[..., :300] * 2**-9
    assert (deq - c_kv).abs().le(bound).all()


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_kernel_matches_dequantized_reference(num_splits, dtype):
    """e4m3 latent (1x128 scales, r = 160 spans two scale tiles) + bf16 rope key: the kernel equals attention over
    the dequantized cache, with and without a padding bias."""
    B, H, S, T, r, dr = 2, 4, 2, 41, 160, 8
    q_lat, q_pe, c_kv, k_pe = inputs(B, H, S, T, r, dr, seed=6)
    cq, cs = md.quantize_latent_cache(c_kv)
    q_lat, q_pe, k_pe = q_lat.to(dtype), q_pe.to(dtype), k_pe.to(dtype)
    got = mla_decode_attention(q_lat, q_pe, cq, k_pe, 0.05, block_t=16, num_splits=num_splits, c_kv_scale=cs)
    ref = md.mla_decode_attention_fp8_torch(q_lat, q_pe, cq, cs, k_pe, 0.05)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    visible = torch.ones(B, 1, S, T, dtype=torch.bool, device=DEVICE).tril(T - S)
    visible[0, ..., :5] = False
    bias = torch.zeros(B, 1, S, T, device=DEVICE).masked_fill(~visible, torch.finfo(torch.float32).min)
    got = mla_decode_attention(q_lat, q_pe, cq, k_pe, 0.05, bias, block_t=16, num_splits=num_splits, c_kv_scale=cs)
    ref = md.mla_decode_attention_fp8_torch(q_lat, q_pe, cq, cs, k_pe, 0.05, bias)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_fp8_cache_needs_its_scales():
    q_lat, q_pe, c_kv, k_pe = inputs(1, 4, 1, 16, 32, 8)
    cq, cs = md.quantize_latent_cache(c_kv)
    with pytest.raises(ValueError, match="c_kv_scale"):
        mla_decode_attention(q_lat, q_pe, cq, k_pe, 0.1)
    with pytest.raises(ValueError, match="c_kv_scale"):
        mla_decode_attention(q_lat, q_pe, c_kv, k_pe, 0.1, c_kv_scale=cs)
    with pytest.raises(ValueError, match="shape"):
        mla_decode_attention(q_lat, q_pe, cq, k_pe, 0.1, c_kv_scale=cs[..., :8, :])


def test_variant_rule_default_measured_and_persisted(tmp_path, monkeypatch):
    from deepseek_v3.kernels.rule_cache import RuleCache

    monkeypatch.setattr(md, "_RULE_CACHE", RuleCache(tmp_path / "rules.json", shipped=tmp_path / "none.json"))
    q1, _, c1, k1 = inputs(1, 16, 1, 64, 512, 64)
    q8, _, c8, k8 = inputs(8, 16, 1, 64, 512, 64)
    # deterministic default: the first measured kernel's configurations
    assert md.choose_variant(q1, c1, k1).name == "h16_t32_x2_w4_s2"
    assert md.choose_variant(q8, c8, k8).name == "h64_t32_x2_w8_s2"
    assert all(md.default_variant(b, s, t, r).name in md.VARIANTS for b in (1, 8) for s in (1, 2)
               for t in (64, 4096) for r in (32, 512))  # fmt: skip
    # a measurement for batch 8 wins there, and only there; it is written to the cache file
    best = md.record_variant_choice(q8, c8, k8, {"h64_t32_x2_w8_s2": 2.0, "h32_t32_x2_w8_s2": 1.5})
    assert best == "h32_t32_x2_w8_s2" and md.choose_variant(q8, c8, k8).name == best
    assert md.choose_variant(q1, c1, k1).name == "h16_t32_x2_w4_s2"
    q5, _, c5, k5 = inputs(5, 16, 1, 40, 512, 64)  # same buckets as (8, 64): batch 5 -> 8, context 40 -> 64
    assert md.choose_variant(q5, c5, k5).name == best
    monkeypatch.setattr(md, "_RULE_CACHE", RuleCache(tmp_path / "rules.json", shipped=tmp_path / "none.json"))
    assert md.choose_variant(q8, c8, k8).name == best  # reloaded from disk
    # the fp8 cache has its own entries
    cq, _ = md.quantize_latent_cache(c8)
    assert md.choose_variant(q8, cq, k8).name == "h64_t32_x2_w8_s2"
    with pytest.raises(ValueError, match="not variant names"):
        md.record_variant_choice(q8, c8, k8, {"h7_bogus": 1.0})
    with pytest.raises(ValueError, match="variant name"):
        md.MLAVariant.from_name("fast")
