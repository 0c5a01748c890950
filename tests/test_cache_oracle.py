"""Cache oracle: decoding with the KV cache must give what recomputing the whole sequence from scratch gives.

Every scenario generates twice from the same random tiny model (fp32, eval): once the normal way (the cache is
built and passed by transformers' `generate`, or by our MTP speculative loop), once with `use_cache=False`, where
each step reruns the full sequence and no cache exists. The two can only agree if the model actually receives and
reads its cache at every step, whatever the calling convention of the installed transformers release names it
(`past_key_values` up to 5.23, `cache` from 5.24): the tests never name the argument themselves, except the
logit-level ones, which pass the cache under the name transformers' own `prepare_inputs_for_generation` uses.

The model is initialised with a larger weight scale than the default (0.1 instead of 0.02) so its next-token
distribution depends strongly on the context; each scenario also checks that its reference output is not
degenerate (not one repeated token), so "equal" is a real comparison. The negative controls run every scenario on
a model whose base forward drops the cache it is given (the failure mode of the 5.24 rename) and assert the oracle
fails.
"""

import inspect

import pytest
import torch
from transformers import GenerationMixin, pipeline
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

from deepseek_v3 import DeepseekV3ForCausalLM, load_config
from deepseek_v3.tokenizer import byte_level_tokenizer

NEW_TOKENS = 16
PAD = 2  # the tiny config's pad_token_id
# The name transformers' generate passes the cache under (read from the installed release, not assumed).
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(load_config("tiny", initializer_range=0.1)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def prompt(length: int = 7, seed: int = 0) -> torch.Tensor:
    """[1, length] ids of byte tokens (5..260 in the byte-level tokenizer's vocabulary)."""
    return torch.randint(5, 261, (1, length), generator=torch.Generator().manual_seed(seed))


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    rows = [prompt(n, seed=n)[0] for n in (9, 4, 6)]
    ids = torch.full((len(rows), 9), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row) :] = row
        mask[i, 9 - len(row) :] = 1
    return ids, mask


def generate_both(model, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(cached, recomputed): `generate` with the cache, then with `use_cache=False`; no EOS stop, so both run the
    full NEW_TOKENS. Sampling scenarios reseed torch before each run."""
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=PAD, **kwargs)
    seed = kwargs.pop("seed", None)
    outputs = []
    for use_cache in (True, False):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(model.generate(*args, use_cache=use_cache, **kwargs))
    return outputs[0], outputs[1]


def generate_mtp(model, draft_tokens: int):
    """MTP self-speculative decoding (our own loop, its own cache) against plain greedy recomputed from scratch."""
    ids, mask = left_padded_batch()
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_mtp=True,
                            mtp_draft_tokens=draft_tokens, pad_token_id=PAD, eos_token_id=None)  # fmt: skip
    recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False,
                                pad_token_id=PAD, eos_token_id=None)  # fmt: skip
    return cached[:, ids.shape[1] :], recomputed[:, ids.shape[1] :]


def run_pipeline(model, tokenizer):
    """`pipeline("text-generation")` on a text prompt; compares the generated token ids (decoded text could hide a
    difference between two invalid byte sequences)."""
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    outputs = []
    for use_cache in (True, False):
        (out,) = generator("The cache oracle", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           use_cache=use_cache, return_tensors=True)  # fmt: skip
        outputs.append(torch.tensor(out["generated_token_ids"][-NEW_TOKENS:]))
    return outputs[0], outputs[1]


class Collector(BaseStreamer):
    """Collects what `generate` streams: the prompt first, then one token per step."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        pass


def run_streamer(model):
    """A streamer sees the tokens as they are produced: the streamed new tokens with the cache must equal those of
    the recomputing run, and the returned sequences must agree with what was streamed."""
    ids = prompt(seed=3)
    streamed = []
    for use_cache in (True, False):
        collector = Collector()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=use_cache, streamer=collector, pad_token_id=PAD)  # fmt: skip
        new = [token for chunk in collector.chunks[1:] for token in chunk]
        assert collector.chunks[0] == ids[0].tolist() and new == out[0, ids.shape[1] :].tolist()
        streamed.append(torch.tensor(new))
    return streamed[0], streamed[1]


SCENARIOS = {
    "greedy": lambda m, tok: generate_both(m, prompt(), do_sample=False),
    "sampling": lambda m, tok: generate_both(m, prompt(seed=1), do_sample=True, top_k=0, temperature=0.7, seed=7),
    "beam_search": lambda m, tok: generate_both(m, prompt(seed=2), do_sample=False, num_beams=3),
    "left_padded_batch": lambda m, tok: generate_both(m, *left_padded_batch()[:1], attention_mask=left_padded_batch()[1], do_sample=False),  # fmt: skip
    "pipeline": run_pipeline,
    "streamer": lambda m, tok: run_streamer(m),
    "mtp_k1": lambda m, tok: generate_mtp(m, 1),
    "mtp_k2": lambda m, tok: generate_mtp(m, 2),
}


def new_tokens_per_row(sequences: torch.Tensor) -> torch.Tensor:
    """The last NEW_TOKENS of each row (generate returns prompt + new tokens; the helpers above may return either)."""
    sequences = sequences if sequences.dim() == 2 else sequences[None]
    return sequences[:, -NEW_TOKENS:]


def assert_not_degenerate(tokens: torch.Tensor):
    """Every row of the reference output has several distinct tokens: a model that repeats one token would make a
    cache that is ignored look correct."""
    for row in new_tokens_per_row(tokens):
        assert len(set(row.tolist())) >= 4, f"degenerate reference output {row.tolist()}: the oracle has no teeth"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cached_generation_equals_recomputed(model, tokenizer, scenario):
    """Generation with the cache is token for token the generation recomputed from scratch at each step."""
    cached, recomputed = SCENARIOS[scenario](model, tokenizer)
    assert_not_degenerate(recomputed)
    assert new_tokens_per_row(cached).tolist() == new_tokens_per_row(recomputed).tolist()


def manual_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by hand, one full forward per step (no generate, no cache): the reference for the reference."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_recompute_reference_is_plain_forwards(model):
    """The `use_cache=False` reference itself is what repeated full forwards give, so the oracle does not merely
    compare transformers with itself."""
    ids = prompt()
    reference = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               use_cache=False, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(reference, manual_greedy(model, ids, NEW_TOKENS))


@pytest.mark.parametrize("kwarg", sorted({CACHE_KWARG, "past_key_values"}))
def test_prefill_and_decode_logits_equal_full_forward(model, kwarg):
    """Logit-level oracle: prefill the prompt into a cache, then feed one token per step with that cache; every
    step's logits equal the full forward's logits at that position (atol 1e-4), and the cache grows by one token per
    step (the model wrote into the cache it was given). `kwarg` is the name the installed transformers' generate
    uses, plus the legacy `past_key_values` (transformers keeps accepting it)."""
    ids = manual_greedy(model, prompt(seed=4), NEW_TOKENS)
    prompt_len = ids.shape[1] - NEW_TOKENS
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        step_logits = [model(ids[:, :prompt_len], use_cache=True, **{kwarg: cache}).logits[:, -1]]
        assert cache.get_seq_length() == prompt_len
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t : t + 1], position_ids=torch.tensor([[t]]), use_cache=True, **{kwarg: cache})
            step_logits.append(out.logits[:, -1])
            assert cache.get_seq_length() == t + 1
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, prompt_len - 1 :], atol=1e-4, rtol=1e-4)


# ---- negative controls: a model that ignores its cache must be caught ----------------------------------------------


@pytest.fixture
def forgetful_model(model):
    """The same model with its base forward dropping the cache it is handed, under either name: each decoding step
    then sees only the new tokens, as our model did when transformers 5.24 renamed the argument."""
    original = model.model.forward

    def forward_without_cache(*args, **kwargs):
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache", None)
        return original(*args, **kwargs)

    model.model.forward = forward_without_cache
    yield model
    del model.model.forward  # back to the class's forward


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_oracle_detects_a_model_that_ignores_its_cache(forgetful_model, tokenizer, scenario):
    """Negative control: every scenario's oracle test fails when the model does not read its cache, by a token
    mismatch or by an error where the attention mask covers cached tokens the model no longer has (the MTP loop's
    4D mask; the model's own mask-shape check on left-padded batches)."""
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        test_cached_generation_equals_recomputed(forgetful_model, tokenizer, scenario)


def test_logit_oracle_detects_a_model_that_ignores_its_cache(forgetful_model):
    """Negative control for the logit-level oracle: the cache stays empty and the decode logits are wrong."""
    with pytest.raises(AssertionError):
        test_prefill_and_decode_logits_equal_full_forward(forgetful_model, CACHE_KWARG)
