"""Bad inputs and configs fail loudly (naming the key, the value and the fix), edge inputs give finite losses, and
MTP speculation returns the scores/logits generate() promises. Each test reproduces a defect seen before the fix."""

import math

import pytest
import torch

from deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, load_config
from deepseek_v3._compat import output_cache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(load_config("tiny")).eval()


# ---- losses -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[[7, 9]], [[-100, 9]]], ids=["length-2", "single-label-at-the-end"])
def test_loss_is_finite_when_an_mtp_depth_has_no_target(model, labels):
    """Length 2 (or one label at position 1): MTP depth 1 targets token t+2, which does not exist. The empty MTP
    loss was 0/0 = NaN and made `loss` NaN while `main_loss` was finite."""
    input_ids = torch.tensor([[7, 9]])
    out = model(input_ids, labels=torch.tensor(labels))
    assert torch.isfinite(out.main_loss) and torch.isfinite(out.loss)
    assert out.mtp_loss == 0
    torch.testing.assert_close(out.loss, out.main_loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_mtp_loss_is_the_mean_over_valid_targets(model):
    """The MTP loss (sum / count written for the empty case) still equals the plain mean."""
    torch.manual_seed(3)
    input_ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        out = model(input_ids, labels=input_ids, return_mtp_logits=True)
        logits = out.mtp_logits[0][:, :-2]  # position t predicts token t+2
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-5, atol=1e-6)


# ---- inputs -----------------------------------------------------------------------------------------------------


def test_wrong_length_attention_mask_is_rejected(model):
    """A (2, 7) mask for 10 tokens was accepted and changed the logits by 0.125."""
    input_ids = torch.randint(5, 300, (2, 10))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\) but the input needs \(2, 10\)"):
        model(input_ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"needs \(2, 10\)"):
        model(input_ids, attention_mask=torch.ones(1, 10, dtype=torch.long))


def test_mask_covering_the_cache_is_accepted(model):
    input_ids = torch.randint(5, 300, (2, 6))
    with torch.no_grad():
        out = model(input_ids, attention_mask=torch.ones(2, 6, dtype=torch.long), use_cache=True)
        model(input_ids[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long), cache=output_cache(out), use_cache=True)
        with pytest.raises(ValueError, match=r"cached tokens 7 \+ new tokens 1"):
            model(input_ids[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long), cache=output_cache(out))


def test_empty_input_is_a_clear_error(model):
    with pytest.raises(ValueError, match="0 tokens"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_nan_tokens_are_not_counted_into_the_expert_load():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).train()
    embeds = torch.randn(2, 5, model.config.hidden_size)
    embeds[0, 2] = float("nan")
    for layer in model.model.decoder_layers:
        if layer.is_moe:
            layer.mlp.gate.tokens_per_expert.zero_()
    model(inputs_embeds=embeds, use_cache=False)
    k = model.config.num_experts_per_tok
    counts = [layer.mlp.gate.tokens_per_expert.sum().item() for layer in model.model.decoder_layers if layer.is_moe]
    # the dense first layer's attention spreads the NaN over its whole row (0 * NaN from the masked key), so every
    # MoE layer sees row 0 as NaN: only row 1's 5 tokens are counted (10 * k before the fix)
    assert counts == [5 * k] * len(counts)


# ---- configs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (dict(rope_scaling={"type": "yarn", "factor": 0, "original_max_position_embeddings": 4096}),
         "rope_parameters.factor", "> 0"),
        (dict(rope_scaling={"type": "yarn", "factor": -2.0, "original_max_position_embeddings": 4096}),
         "rope_parameters.factor", "> 0"),
        (dict(topk_group=0), "topk_group", "positive integer"),
        (dict(n_routed_experts="8"), "n_routed_experts", "not the string"),
        (dict(hidden_size="64"), "hidden_size", "not the string"),
        (dict(rms_norm_eps="1e-6"), "rms_norm_eps", "must be a number"),
        (dict(mla_absorb="maybe"), "mla_absorb", "'auto', 'on' or 'off'"),
        (dict(hidden_act="foo"), "hidden_act", "activation"),
        (dict(pad_token_id=129280), "pad_token_id", "< vocab_size=129280"),
        (dict(mtp_loss_weight=float("nan")), "mtp_loss_weight", "finite"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok", "positive integer"),
    ],
)  # fmt: skip
def test_bad_config_values_fail_at_construction(overrides, key, message):
    with pytest.raises(ValueError) as error:
        DeepseekV3Config(**overrides)
    text = str(error.value)
    assert f"`{key}`" in text and message in text, text


def test_first_k_dense_replace_beyond_the_layers_warns(caplog):
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            config = DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=5)
    finally:
        logging.disable_propagation()
    assert "`first_k_dense_replace`=5" in caplog.text and "dense" in caplog.text
    assert config.num_moe_layers == 0


def test_yarn_factor_must_be_finite():
    with pytest.raises(ValueError, match="factor"):
        DeepseekV3Config(rope_scaling={"type": "yarn", "factor": math.inf, "original_max_position_embeddings": 4096})


# ---- MTP speculation outputs ------------------------------------------------------------------------------------


def test_use_mtp_returns_scores_and_logits_of_the_plain_greedy_run(model):
    """`output_scores` / `output_logits` with use_mtp=True returned None silently; now they are the main model's
    scores per generated token, equal to plain greedy decoding's."""
    torch.manual_seed(5)
    input_ids = torch.randint(5, 300, (2, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=None, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)  # fmt: skip
    plain = model.generate(input_ids, **kwargs)
    spec = model.generate(input_ids, use_mtp=True, **kwargs)
    assert torch.equal(spec.sequences, plain.sequences)
    assert len(spec.scores) == len(plain.scores) == 8 and len(spec.logits) == 8
    for mine, theirs in zip(spec.logits, plain.logits):
        torch.testing.assert_close(mine, theirs.float(), atol=1e-4, rtol=0)
    for mine, theirs in zip(spec.scores, plain.scores):
        torch.testing.assert_close(mine, theirs.float(), atol=1e-4, rtol=0)


def test_use_mtp_rejects_attentions_and_hidden_states(model):
    input_ids = torch.randint(5, 300, (1, 4))
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(input_ids, use_mtp=True, max_new_tokens=2, return_dict_in_generate=True, output_attentions=True)
