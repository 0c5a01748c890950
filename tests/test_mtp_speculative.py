"""MTP self-speculative decoding: `generate(..., use_mtp=True)` equals plain decoding (greedy: token for token;
sampling: in distribution), with the cache rolled back on rejection."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

import deepseek_v3
from deepseek_v3.speculative import SpeculativeGenerateOutput

PAD = 2


def progressions(n: int, length: int, generator: torch.Generator, low: int = 3, span: int = 64) -> torch.Tensor:
    """Arithmetic progressions mod `span` (random start, stride 1..3): predictable 1 and 2 tokens ahead."""
    start = torch.randint(0, span, (n, 1), generator=generator)
    stride = torch.randint(1, 4, (n, 1), generator=generator)
    return low + (start + stride * torch.arange(length)) % span


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def trained_tiny():
    """The tiny config trained briefly on progressions, main and MTP losses weighted equally."""
    torch.manual_seed(0)
    config = deepseek_v3.load_config("tiny", mtp_loss_weight=1.0)
    model = deepseek_v3.DeepseekV3ForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    for _ in range(70):
        batch = progressions(16, 20, generator)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def random_tiny():
    torch.manual_seed(1)
    return deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny")).eval()


@pytest.mark.parametrize("draft_tokens", [1, 2, 3])
def test_greedy_identical_random_weights(random_tiny, draft_tokens):
    g = torch.Generator().manual_seed(2)
    ids, mask = left_pad([torch.randint(3, 320, (n,), generator=g) for n in (9, 4, 6)])
    plain = random_tiny.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    spec = random_tiny.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, use_mtp=True, return_dict_in_generate=True,
        mtp_draft_tokens=draft_tokens,
    )  # fmt: skip
    assert isinstance(spec, SpeculativeGenerateOutput)
    assert torch.equal(spec.sequences, plain)
    # random drafts are (almost) always rejected: the rejection / rollback path did the work
    assert spec.acceptance_rate < 0.3
    assert spec.mean_accepted_tokens == pytest.approx(1 + draft_tokens * spec.acceptance_rate, abs=0.05)
    assert len(spec.acceptance_by_position) == draft_tokens


@pytest.mark.parametrize("draft_tokens", [1, 2, 3])
def test_greedy_identical_trained_model(trained_tiny, draft_tokens):
    g = torch.Generator().manual_seed(3)
    prompts = [progressions(1, n, g)[0] for n in (10, 6, 8)] + [torch.randint(3, 67, (5,), generator=g)]
    ids, mask = left_pad(prompts)
    plain = trained_tiny.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    spec = trained_tiny.generate(
        ids, attention_mask=mask, max_new_tokens=40, do_sample=False, use_mtp=True, return_dict_in_generate=True,
        mtp_draft_tokens=draft_tokens,
    )  # fmt: skip
    assert torch.equal(spec.sequences, plain)
    stats = trained_tiny.speculative_stats
    assert stats.draft_tokens == draft_tokens
    assert spec.acceptance_by_position[0] > 0.7  # the trained MTP head drafts the next token well ...
    assert stats.target_forwards < 40 and stats.mean_accepted_tokens > 1.5  # ... so fewer forwards than tokens
    assert stats.mean_accepted_tokens == pytest.approx(spec.mean_accepted_tokens)
    # acceptance_by_position[j]: drafts 1..j+1 all accepted, so it cannot grow with j; it sums to the accepted drafts
    by_position = spec.acceptance_by_position
    assert all(a >= b for a, b in zip(by_position, by_position[1:]))
    assert sum(by_position) == pytest.approx(stats.accepted / stats.row_forwards)
    # rows disagreed at some step (one accepted, another rejected): a dead slot stayed masked for one row only
    generated_slots = trained_tiny.speculative_decoder.attention_mask[:, ids.shape[1] :]
    mixed_columns = (generated_slots == 0).any(dim=0) & (generated_slots == 1).any(dim=0)
    assert bool(mixed_columns.any())


def test_use_mtp_from_generation_config(trained_tiny):
    g = torch.Generator().manual_seed(4)
    ids = progressions(2, 7, g)
    config = GenerationConfig(max_new_tokens=12, do_sample=False, use_mtp=True, eos_token_id=1, pad_token_id=PAD)
    spec = trained_tiny.generate(ids, generation_config=config)
    assert trained_tiny.speculative_decoder.stats.target_forwards < 12  # went through our loop
    plain = trained_tiny.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(spec, plain)


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_cache_rolled_back_exactly(random_tiny, draft_tokens):
    """Batch of one, mostly rejected drafts: every layer (MTP block included: the chained draft steps are dropped
    too) holds exactly the accepted tokens, and the main layers' latents equal those of a fresh forward."""
    model = random_tiny
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 320, (1, 7), generator=g)
    seq = model.generate(ids, max_new_tokens=20, do_sample=False, use_mtp=True, mtp_draft_tokens=draft_tokens)
    decoder = model.speculative_decoder
    assert decoder.stats.accepted < decoder.stats.drafted  # there were rejections to roll back
    cache = decoder.cache
    fed = seq.shape[1] - 1  # the last emitted token is never fed back
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert len(lengths) == model.config.num_hidden_layers + 1
    assert lengths == [fed] * len(lengths)
    assert bool(decoder.attention_mask.all()) and decoder.attention_mask.shape[1] == fed
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        model(seq[:, :fed], past_key_values=fresh)
    for layer, ref in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(layer.keys, ref.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values, ref.values, rtol=1e-4, atol=1e-5)


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with small expectation are pooled. p = Q(df/2, stat/2)."""
    n = observed.sum()
    expected = expected_probs.double() * n
    small = expected < min_expected
    obs = torch.cat((observed[~small].double(), observed[small].double().sum()[None]))
    exp = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(float(len(obs) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_sampling_preserves_target_distribution(draft_tokens):
    """Tiny vocabulary: the empirical law of (x1, x2) and of x3 under speculative sampling matches the main model's
    exact law, and differs from what always accepting the draft would give (the test has power). With 2 draft
    tokens, x2 and x3 are verified in the same forward (the chained draft of x3 included)."""
    torch.manual_seed(6)
    vocab = 16
    config = deepseek_v3.load_config("tiny", vocab_size=vocab, pad_token_id=2, eos_token_id=1, bos_token_id=0)
    model = deepseek_v3.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # sharper (not one-hot) distributions; the random draft then accepts ~60%
        model.lm_head.weight.mul_(4.0)
    prompt = torch.tensor([[5, 9, 3, 12]])
    n_rows = 6000

    with torch.no_grad():
        seqs = torch.cat((prompt.expand(vocab, -1), torch.arange(vocab)[:, None]), 1)  # [V, 5]: prompt + x1
        p1 = model(prompt).logits[0, -1].softmax(-1)  # [V]
        out2 = model(seqs, return_mtp_logits=True)
        p2 = out2.logits[:, -1].softmax(-1)  # [V(x1), V(x2)]
        q2 = out2.mtp_logits[0][:, -2].softmax(-1)  # the draft of x2 given x1: MTP at the last prompt position
        seqs3 = torch.cat((seqs.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab)[:, None]), 1)
        p3 = model(seqs3).logits[:, -1].softmax(-1).view(vocab, vocab, vocab)
    joint12 = p1[:, None] * p2  # [V, V]
    marginal3 = (joint12[..., None] * p3).sum((0, 1))  # [V]
    always_accept12 = p1[:, None] * q2

    config = GenerationConfig(do_sample=True, max_new_tokens=3, eos_token_id=None, pad_token_id=2, top_k=None)
    torch.manual_seed(7)
    out = model.generate(prompt.expand(n_rows, -1), generation_config=config, use_mtp=True,
                         return_dict_in_generate=True, mtp_draft_tokens=draft_tokens)  # fmt: skip
    x = out.sequences[:, prompt.shape[1] :]
    assert x.shape == (n_rows, 3)
    assert 0.05 < out.acceptance_rate < 0.95  # both branches of the rejection rule ran
    if draft_tokens == 2:
        assert out.acceptance_by_position[1] > 0.05  # some rows accepted both drafts

    counts12 = torch.bincount(x[:, 0] * vocab + x[:, 1], minlength=vocab * vocab)
    counts3 = torch.bincount(x[:, 2], minlength=vocab)
    assert chi2_pvalue(counts12, joint12.flatten()) > 1e-3
    assert chi2_pvalue(counts3, marginal3) > 1e-3
    # power: the draft's law is far from the target's, and the same statistic rejects it
    assert 0.5 * (always_accept12 - joint12).abs().sum() > 0.15
    assert chi2_pvalue(counts12, always_accept12.flatten()) < 1e-6


def test_bad_draft_tokens_is_a_clear_error(random_tiny):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="mtp_draft_tokens=0"):
        random_tiny.generate(ids, max_new_tokens=3, use_mtp=True, mtp_draft_tokens=0)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, use_mtp=True, mtp_draft_tokens=2, pad_token_id=PAD)
    random_tiny.generate(ids, generation_config=config)  # also read from the generation config
    assert random_tiny.speculative_stats.draft_tokens == 2
