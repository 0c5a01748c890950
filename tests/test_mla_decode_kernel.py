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
