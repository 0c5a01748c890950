"""Absorbed MLA decoding (attention over the cached latent) equals the expanded path."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

import deepseek_v3
from deepseek_v3.attention import absorbed_attention_torch, attention_bias
from deepseek_v3.speculative import cache_bytes_per_token_per_layer


def tiny_model(attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = deepseek_v3.load_config("tiny")
    config._attn_implementation = attn_implementation
    model = deepseek_v3.DeepseekV3ForCausalLM(config).eval()
    # Random init is near-uniform; scale the attention projections up so the softmax is far from flat and a wrong
    # mask / position / absorption would show.
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_b_proj", "kv_b_proj", "kv_a_proj_with_mqa"):
                getattr(layer.self_attn, name).weight.mul_(8.0)
    return model


def left_padded_batch(vocab: int, lengths=(9, 5, 7), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 2, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def decode(model, ids, mask, steps: int, mla_absorb):
    """Prefill + `steps` greedy steps with an explicit cache; returns the per-step logits [B, V] and the cache."""
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, mla_absorb=mla_absorb)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)  # [B, 1]
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
        positions = positions[:, -1:] + 1
        out = model(token, attention_mask=mask, position_ids=positions, past_key_values=cache, mla_absorb=mla_absorb)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_absorbed_decode_matches_expanded(attn_implementation):
    model = tiny_model(attn_implementation)
    ids, mask = left_padded_batch(model.config.vocab_size)
    with torch.no_grad():
        expanded, _ = decode(model, ids, mask, 30, mla_absorb="off")
        absorbed, _ = decode(model, ids, mask, 30, mla_absorb="on")
        auto, _ = decode(model, ids, mask, 30, mla_absorb=None)  # config default "auto": absorbed decode steps
    torch.testing.assert_close(absorbed, expanded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(auto, expanded, rtol=1e-4, atol=1e-4)
    assert torch.equal(absorbed.argmax(-1), expanded.argmax(-1))
    # the check has teeth: the greedy continuation is not constant and the logits are not flat
    assert expanded.argmax(-1).unique().numel() > 3


def test_absorbed_multi_token_query_with_holes_in_mask():
    """A verification-style call: 3 new tokens over a cache whose mask has a hole (a rejected draft)."""
    model = tiny_model()
    ids, mask = left_padded_batch(model.config.vocab_size, lengths=(6, 4))
    mask = mask.clone()
    mask[1, -2] = 0  # a masked slot in the middle of the cache
    new = torch.randint(3, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(3))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat((mask, torch.ones(2, 3, dtype=torch.long)), 1)
    new_positions = positions[:, -1:] + torch.arange(1, 4)
    outs = {}
    with torch.no_grad():
        for mode in ("off", "on"):
            cache = DynamicCache(config=model.config)
            model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, mla_absorb="off")
            outs[mode] = model(
                new, attention_mask=full_mask, position_ids=new_positions, past_key_values=cache, mla_absorb=mode
            ).logits
    torch.testing.assert_close(outs["on"], outs["off"], rtol=1e-4, atol=1e-4)


def test_auto_selection():
    model = tiny_model()
    attn = model.model.layers[0].self_attn
    assert not attn.use_absorption(query_len=16, past_len=0)  # prefill: expanded
    assert attn.use_absorption(query_len=1, past_len=100)  # decode: absorbed
    assert attn.use_absorption(query_len=2, past_len=100)  # speculative verification: absorbed
    r, dn, dv = attn.kv_lora_rank, attn.qk_nope_head_dim, attn.v_head_dim
    long_query = r * (dn + dv) // (2 * r - dn - dv) + 1
    assert not attn.use_absorption(query_len=long_query, past_len=100)  # chunked prefill: expanded is cheaper
    assert attn.use_absorption(query_len=16, past_len=0, mode="on")
    assert not attn.use_absorption(query_len=1, past_len=100, mode="off")
    model.train()
    assert not attn.use_absorption(query_len=1, past_len=100)
    with pytest.raises(ValueError):
        attn.use_absorption(1, 1, mode="sometimes")


def test_absorbed_attention_equals_expanded_math():
    """The identity behind absorption, on one layer with random tensors (no model plumbing)."""
    torch.manual_seed(0)
    model = tiny_model()
    attn = model.model.layers[1].self_attn
    B, H, S, T = 2, attn.num_heads, 3, 11
    q_nope, q_pe = torch.randn(B, H, S, attn.qk_nope_head_dim), torch.randn(B, H, S, attn.qk_rope_head_dim)
    c_kv, k_pe = torch.randn(B, 1, T, attn.kv_lora_rank), torch.randn(B, 1, T, attn.qk_rope_head_dim)
    key, value = attn.expand_kv(c_kv, k_pe)
    bias = attention_bias(None, B, S, T, q_nope.device, torch.float32)
    scores = torch.cat((q_nope, q_pe), -1) @ key.transpose(-1, -2) * attn.scaling + bias
    expected = (scores.softmax(-1) @ value).transpose(1, 2).reshape(B, S, -1)
    got = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    w_uk, _ = attn.absorbed_weights()
    o_lat = absorbed_attention_torch(torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk), q_pe, c_kv, k_pe, attn.scaling, bias)
    assert o_lat.shape == (B, H, S, attn.kv_lora_rank)


def test_cache_holds_only_latent_and_rope_key():
    model = tiny_model()
    ids, mask = left_padded_batch(model.config.vocab_size)
    with torch.no_grad():
        _, cache = decode(model, ids, mask, 4, mla_absorb="on")
    config = model.config
    per_layer = cache_bytes_per_token_per_layer(cache)
    assert len(per_layer) == config.num_hidden_layers
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * torch.finfo(torch.float32).bits // 8
    assert per_layer == [expected] * config.num_hidden_layers
    assert cache.get_seq_length() == ids.shape[1] + 4
