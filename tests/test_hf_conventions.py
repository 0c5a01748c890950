"""The transformers model conventions, each checked against transformers' built-in DeepseekV3 on the same weights.

Every test builds the built-in class from a config, saves it, loads it with our class (`import deepseek_v3` has
replaced the Auto mappings) and compares outputs within 1e-4.
"""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    StaticCache,
)
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as builtin_modeling
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as BuiltinConfig

import deepseek_v3
from deepseek_v3 import (
    DeepseekV3ForCausalLM,
    DeepseekV3ForSequenceClassification,
    DeepseekV3ForTokenClassification,
    load_config,
)
from deepseek_v3._compat import cache_kwargs, output_cache

ATOL = 1e-4


def builtin_config(**overrides) -> BuiltinConfig:
    ours = load_config("tiny").to_dict()
    kwargs = {k: v for k, v in ours.items() if k in BuiltinConfig.__dataclass_fields__}
    kwargs.update(num_mtp_layers=0, dtype=torch.float32)
    kwargs.update(overrides)
    return BuiltinConfig(**kwargs)


def builtin_model(cls=builtin_modeling.DeepseekV3ForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls(builtin_config(**overrides)).eval()
    with torch.no_grad():  # a non-zero balancing bias, so that "selection only" is exercised
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.05)
    return model


def ours_from(builtin, tmp_path, auto=AutoModelForCausalLM, **kwargs):
    builtin.save_pretrained(tmp_path)
    model, info = auto.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    input_ids = torch.randint(5, 300, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    attention_mask[2, :1] = 0
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(built-in, ours) on the same weights, eager attention (the implementation that returns probabilities)."""
    builtin = builtin_model()
    builtin.config._attn_implementation = "eager"
    ours = ours_from(builtin, tmp_path_factory.mktemp("pair"), attn_implementation="eager")
    assert isinstance(ours, DeepseekV3ForCausalLM)
    return builtin, ours


def test_output_attentions_prefill_and_absorbed_decode(pair, batch):
    builtin, ours = pair
    input_ids, attention_mask = batch
    with torch.no_grad():
        theirs = builtin(input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=True)
        mine = ours(input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=True)
        assert len(mine.attentions) == ours.config.num_hidden_layers
        for a, b in zip(mine.attentions, theirs.attentions):
            valid = attention_mask.bool()[:, None, :, None].expand_as(a)
            torch.testing.assert_close(a[valid], b[valid], atol=ATOL, rtol=0)
        # one decode step over the cache: "auto" would absorb; asking for probabilities returns those over the
        # cached positions (the same as the built-in's)
        step = torch.randint(5, 300, (3, 1))
        mask = torch.cat((attention_mask, torch.ones_like(step)), dim=1)
        # the built-in reads the cache only under the installed release's name
        theirs = builtin(step, attention_mask=mask, **cache_kwargs(output_cache(theirs)), output_attentions=True)
        mine = ours(step, attention_mask=mask, cache=output_cache(mine), output_attentions=True)
    for a, b in zip(mine.attentions, theirs.attentions):
        assert a.shape == (3, ours.config.num_attention_heads, 1, 13)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.logits, theirs.logits, atol=ATOL, rtol=0)


def test_return_dict_false_gives_the_standard_tuple(pair, batch):
    builtin, ours = pair
    input_ids, attention_mask = batch
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        theirs = builtin(input_ids, attention_mask=attention_mask, labels=labels, return_dict=False, use_cache=False)
        ours.config.mtp_loss_weight = 0.0  # the built-in has no MTP: compare the plain next-token loss
        mine = ours(input_ids, attention_mask=attention_mask, labels=labels, return_dict=False, use_cache=False)
        ours.config.mtp_loss_weight = 0.3
    assert isinstance(mine, tuple) and isinstance(theirs, tuple)
    # (loss, logits, ...) in transformers' order; ours appends its extra fields (main_loss) after the standard ones
    torch.testing.assert_close(mine[0], theirs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mine[1], theirs[1], atol=ATOL, rtol=0)
    with torch.no_grad():
        logits_only = ours(input_ids, attention_mask=attention_mask, return_dict=False, use_cache=False)
    torch.testing.assert_close(logits_only[0], theirs[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("from_config", [False, True])
def test_output_router_logits(pair, batch, from_config):
    builtin, ours = pair
    input_ids, attention_mask = batch
    with torch.no_grad():
        theirs = builtin(input_ids, attention_mask=attention_mask, output_router_logits=True).router_logits
        if from_config:
            ours.config.output_router_logits = True
            try:
                mine = ours(input_ids, attention_mask=attention_mask).router_logits
            finally:
                ours.config.output_router_logits = False
        else:
            mine = ours(input_ids, attention_mask=attention_mask, output_router_logits=True).router_logits
    assert mine is not None and len(mine) == len(theirs) == ours.config.num_moe_layers
    for a, b in zip(mine, theirs):
        assert a.shape == (3 * 12, ours.config.n_routed_experts)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    with torch.no_grad():
        assert ours(input_ids, attention_mask=attention_mask).router_logits is None


def test_loss_honours_shift_labels(pair, batch):
    builtin, ours = pair
    input_ids, attention_mask = batch
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shift_labels[1, 3] = -100  # differs from `labels`: shows which one is used
    with torch.no_grad():
        theirs = builtin(input_ids, attention_mask=attention_mask, labels=labels, shift_labels=shift_labels).loss
        ours.config.mtp_loss_weight = 0.0
        mine = ours(input_ids, attention_mask=attention_mask, labels=labels, shift_labels=shift_labels).loss
        unshifted = ours(input_ids, attention_mask=attention_mask, labels=labels).loss
        ours.config.mtp_loss_weight = 0.3
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    assert not torch.allclose(mine, unshifted)


def test_mtp_loss_honours_shift_labels():
    """The MTP depth-k targets follow `shift_labels` too: passing the shifted labels gives the same total loss."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    input_ids = torch.randint(5, 300, (2, 10))
    shift_labels = torch.nn.functional.pad(input_ids, (0, 1), value=-100)[:, 1:].contiguous()
    with torch.no_grad():
        a = model(input_ids, labels=input_ids)
        b = model(input_ids, labels=input_ids, shift_labels=shift_labels)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.mtp_loss, b.mtp_loss)


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32,
             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},  # fmt: skip
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.5, 2.0, 3.0, 4.0],
                 "original_max_position_embeddings": 8},  # fmt: skip
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},  # fmt: skip
}


@pytest.mark.parametrize("kind", sorted(ROPE_CASES))
def test_rope_types_match_builtin(tmp_path, kind):
    """Each rope type of transformers' ROPE_INIT_FUNCTIONS, over a sequence longer than the (tiny) original context
    so that dynamic / longrope switch their frequencies."""
    rope = {"rope_theta": 10000.0, **ROPE_CASES[kind]}
    builtin = builtin_model(rope_parameters=rope, max_position_embeddings=16)
    ours = ours_from(builtin, tmp_path)
    assert ours.config.rope_parameters["rope_type"] == kind
    input_ids = torch.randint(5, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, builtin(input_ids).logits, atol=ATOL, rtol=0)


def test_yarn_equals_deepseek_reference():
    """YaRN now comes from transformers' ROPE_INIT_FUNCTIONS: it equals DeepSeek's `precompute_freqs_cis`."""
    import math

    from deepseek_v3.rope import compute_inv_freq

    config = load_config("deepseek-v3")
    dim, base, factor = config.qk_rope_head_dim, 10000.0, 40.0
    params = config.rope_parameters
    original, beta_fast, beta_slow = params["original_max_position_embeddings"], params["beta_fast"], params["beta_slow"]

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    reference = freqs / factor * (1 - smooth) + freqs * smooth
    ours, attention_factor = compute_inv_freq(config)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(1.0)


@pytest.mark.parametrize(
    "builtin_cls, auto, ours_cls",
    [
        (builtin_modeling.DeepseekV3ForSequenceClassification, AutoModelForSequenceClassification,
         DeepseekV3ForSequenceClassification),
        (builtin_modeling.DeepseekV3ForTokenClassification, AutoModelForTokenClassification,
         DeepseekV3ForTokenClassification),
    ],
)  # fmt: skip
def test_classification_heads_load_builtin_checkpoints(tmp_path, batch, builtin_cls, auto, ours_cls):
    builtin = builtin_model(builtin_cls, num_labels=3)
    ours = ours_from(builtin, tmp_path, auto=auto)
    assert isinstance(ours, ours_cls) and ours.config.num_nextn_predict_layers == 0
    input_ids, attention_mask = batch
    input_ids = input_ids.masked_fill(attention_mask == 0, 2)  # pad_token_id: the last non-pad token is scored
    labels = torch.tensor([0, 2, 1]) if auto is AutoModelForSequenceClassification else torch.randint(0, 3, (3, 12))
    with torch.no_grad():
        theirs = builtin(input_ids, attention_mask=attention_mask, labels=labels)
        mine = ours(input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(mine.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, atol=ATOL, rtol=0)


def test_sequence_classifier_from_a_causal_lm_checkpoint(tmp_path):
    """A reward model initialised from one of our causal-LM checkpoints (MTP layer included) loads its body."""
    torch.manual_seed(0)
    lm = DeepseekV3ForCausalLM(load_config("tiny"))
    lm.save_pretrained(tmp_path)
    rm, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1, output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"} or set(info["missing_keys"]) == {"score.weight"}
    torch.testing.assert_close(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_hidden_states_of_chosen_layers(pair, batch):
    builtin, ours = pair
    input_ids, attention_mask = batch
    with torch.no_grad():
        theirs = builtin(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        mine = ours(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        chosen = ours(input_ids, attention_mask=attention_mask, output_hidden_states=[1, -1]).hidden_states
    assert len(mine) == len(theirs) == ours.config.num_hidden_layers + 1
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert chosen[0] is None and chosen[2] is None
    torch.testing.assert_close(chosen[1], theirs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(chosen[-1], theirs[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_custom_4d_attention_mask(tmp_path, attn_implementation):
    """Two sequences packed in one row, attending only within themselves (a 4D float mask), as the built-in."""
    builtin = builtin_model()
    builtin.config._attn_implementation = attn_implementation
    ours = ours_from(builtin, tmp_path, attn_implementation=attn_implementation)
    input_ids = torch.randint(5, 300, (1, 10))
    allowed = torch.zeros(10, 10, dtype=torch.bool)
    allowed[:6, :6] = torch.ones(6, 6).tril().bool()
    allowed[6:, 6:] = torch.ones(4, 4).tril().bool()
    mask = torch.zeros(1, 1, 10, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    with torch.no_grad():
        theirs = builtin(input_ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(input_ids, attention_mask=mask, position_ids=positions).logits
        second_alone = ours(input_ids[:, 6:]).logits
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine[:, 6:], second_alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_experts_implementation_switch(tmp_path, batch, implementation):
    builtin = builtin_model()
    builtin.set_experts_implementation(implementation)
    ours = ours_from(builtin, tmp_path, experts_implementation=implementation)
    assert ours.config._experts_implementation == implementation
    input_ids, attention_mask = batch
    with torch.no_grad():
        expected = builtin(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask).logits
        ours.set_experts_implementation("eager")
        eager = ours(input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(actual[valid], eager[valid], atol=ATOL, rtol=0)


def test_tiny_random_config_the_builtin_accepts(tmp_path, batch, caplog):
    """8 experts in 2 groups, 1 group selected, 8 experts per token: more than the selected group holds. The
    built-in runs it (the unselected group's experts are taken among -inf scores); ours loads it, warns naming the
    key, and computes the same logits."""
    overrides = dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=8)
    builtin = builtin_model(**overrides)
    ours = ours_from(builtin, tmp_path)
    input_ids, attention_mask = batch
    with torch.no_grad():
        expected = builtin(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=ATOL, rtol=0)


def test_odd_config_warns_naming_the_key(caplog):
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            deepseek_v3.DeepseekV3Config(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=6)
    finally:
        logging.disable_propagation()
    assert "`num_experts_per_tok`=6" in caplog.text


def _greedy(model, input_ids, **kwargs):
    return model.generate(input_ids, max_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=None, **kwargs)


def test_static_cache_generation(tmp_path):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    input_ids = torch.randint(5, 300, (2, 6))
    dynamic = _greedy(model, input_ids)
    static = _greedy(model, input_ids, cache_implementation="static")
    recomputed = _greedy(model, input_ids, use_cache=False)
    assert torch.equal(static, dynamic) and torch.equal(dynamic, recomputed)


def test_compiled_fullgraph_static_cache_decoding():
    """torch.compile(fullgraph=True) over the forward (graph breaks would raise), decoding on a StaticCache:
    prefill and 6 decode steps give the eager model's tokens."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    input_ids = torch.randint(5, 300, (2, 5))
    expected = _greedy(model, input_ids, use_cache=False)[:, 5:11]
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    cache = StaticCache(config=model.config, max_cache_len=16)
    tokens, ids = [], input_ids
    with torch.no_grad():
        for i in range(6):
            past = input_ids.shape[1] + i - ids.shape[1]
            positions = torch.arange(past, past + ids.shape[1])[None].expand(2, -1)
            out = step(ids, position_ids=positions, cache=cache, use_cache=True)
            ids = out.logits[:, -1:].argmax(-1)
            tokens.append(ids)
    assert torch.equal(torch.cat(tokens, dim=1), expected)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_torch_compile_fp32_forward_on_cpu(implementation):
    """fp32 on CPU: torch's grouped GEMM has no fp32 graph kernel; both experts paths fall back inside a graph."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    model.set_experts_implementation(implementation)
    input_ids = torch.randint(5, 300, (2, 7))
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        actual = compiled(input_ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_init_empty_weights_dispatch_names_from_pretrained(tmp_path):
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    torch.manual_seed(0)
    DeepseekV3ForCausalLM(load_config("tiny")).save_pretrained(tmp_path)
    with init_empty_weights():
        model = DeepseekV3ForCausalLM(load_config("tiny"))
    with pytest.raises((RuntimeError, ValueError), match=r"from_pretrained\(.*device_map"):
        model = load_checkpoint_and_dispatch(model, str(tmp_path), device_map={"": "cpu"})
        model(torch.randint(5, 300, (1, 4)))
