"""Foundation: checkpoint compatibility with transformers' built-in DeepseekV3, MTP round trip, training step."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as BuiltinConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM as BuiltinForCausalLM

import deepseek_v3
from deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, load_config


def saved_tensor_names(directory) -> set[str]:
    names = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def builtin_tiny_model(seed: int = 0) -> BuiltinForCausalLM:
    ours = load_config("tiny").to_dict()
    kwargs = {k: v for k, v in ours.items() if k in BuiltinConfig.__dataclass_fields__}
    kwargs.update(num_mtp_layers=0, dtype=torch.float32)
    torch.manual_seed(seed)
    model = BuiltinForCausalLM(BuiltinConfig(**kwargs)).eval()
    with torch.no_grad():  # a non-zero balancing bias, so that "selection only" is exercised
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def padded_batch():
    torch.manual_seed(1)
    input_ids = torch.randint(5, 300, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[2, :1] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_parity_with_builtin_checkpoint(tmp_path, padded_batch, attn_implementation):
    builtin = builtin_tiny_model()
    builtin.save_pretrained(tmp_path)
    ours, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation=attn_implementation, output_loading_info=True
    )
    assert isinstance(ours, DeepseekV3ForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours.eval()
    builtin.config._attn_implementation = attn_implementation
    input_ids, attention_mask = padded_batch
    with torch.no_grad():
        expected = builtin(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-4, rtol=1e-4)
    # the balancing bias is loaded as fp32 and equals the built-in one
    for theirs, mine in zip(builtin.model.layers[1:], ours.model.layers[1:3]):
        torch.testing.assert_close(mine.mlp.gate.e_score_correction_bias, theirs.mlp.gate.e_score_correction_bias)


def test_greedy_generation_matches_builtin(tmp_path, padded_batch):
    builtin = builtin_tiny_model(seed=3)
    builtin.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    input_ids, attention_mask = padded_batch
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=20, do_sample=False, pad_token_id=2, eos_token_id=None)
    expected = builtin.generate(input_ids, **kwargs)
    actual = ours.generate(input_ids, **kwargs)
    assert actual.shape == (3, 32)
    assert torch.equal(actual, expected)


def test_builtin_class_reads_our_checkpoint(tmp_path, padded_batch):
    """Our save writes the published/built-in layout, so the built-in class loads it (MTP layer ignored)."""
    torch.manual_seed(0)
    ours = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    ours.save_pretrained(tmp_path)
    builtin = BuiltinForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    input_ids, attention_mask = padded_batch
    with torch.no_grad():
        torch.testing.assert_close(
            builtin(input_ids, attention_mask=attention_mask).logits,
            ours(input_ids, attention_mask=attention_mask).logits,
            atol=1e-4,
            rtol=1e-4,
        )


def test_mtp_round_trip_and_published_names(tmp_path, padded_batch):
    torch.manual_seed(0)
    config = load_config("tiny")
    model = DeepseekV3ForCausalLM(config).eval()
    input_ids, attention_mask = padded_batch
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        before = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert before.mtp_loss is not None and torch.isfinite(before.mtp_loss)
    torch.testing.assert_close(before.loss, before.main_loss + config.mtp_loss_weight * before.mtp_loss)

    model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    names = saved_tensor_names(tmp_path)
    mtp = f"model.layers.{config.num_hidden_layers}."
    for suffix in (
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "shared_head.norm.weight",
        "shared_head.head.weight",
        "embed_tokens.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "mlp.gate.weight",
        "mlp.gate.e_score_correction_bias",
        "mlp.experts.0.gate_proj.weight",
        "mlp.experts.7.down_proj.weight",
        "mlp.shared_experts.up_proj.weight",
    ):
        assert mtp + suffix in names, f"missing {mtp + suffix}"
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names), "fused expert tensors must be split on save"

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded.eval()
    with torch.no_grad():
        after = reloaded(input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(after.logits, before.logits, atol=0, rtol=0)
    torch.testing.assert_close(after.mtp_loss, before.mtp_loss, atol=0, rtol=0)
    # the MTP layer shares the main embedding and head: no second copy in memory
    params = dict(reloaded.named_parameters())
    assert not any(n.startswith(mtp) and ("embed_tokens" in n or "head.weight" in n) for n in params)


def test_mtp_loss_weight_zero_skips_mtp(padded_batch):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny", mtp_loss_weight=0.0))
    input_ids, _ = padded_batch
    calls = []
    model.model.mtp_layers[0].register_forward_hook(lambda *a: calls.append(1))
    out = model(input_ids, labels=input_ids)
    assert out.mtp_loss is None and not calls
    torch.testing.assert_close(out.loss, out.main_loss)


def test_mtp_predicts_the_token_after_next():
    """Depth-1 logits at position t are scored against token t+2, and never see tokens beyond t+1."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    input_ids = torch.randint(5, 300, (1, 10))
    with torch.no_grad():
        full = model(input_ids, return_mtp_logits=True).mtp_logits[0]
        changed = input_ids.clone()
        changed[0, 6] = 7  # token 6 may only influence MTP positions >= 5 (position 5 embeds token 6)
        other = model(changed, return_mtp_logits=True).mtp_logits[0]
    torch.testing.assert_close(full[0, :5], other[0, :5])
    assert not torch.allclose(full[0, 5], other[0, 5])
    labels = input_ids.clone()
    loss = torch.nn.functional.cross_entropy(full[0, :8], labels[0, 2:])
    with torch.no_grad():
        reported = model(input_ids, labels=labels).mtp_loss
    torch.testing.assert_close(reported, loss)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_step_gradients(gradient_checkpointing):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny", seq_aux_loss_alpha=1e-4)).train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    input_ids = torch.randint(5, 300, (2, 16))
    out = model(input_ids, labels=input_ids, output_router_stats=True)
    assert torch.isfinite(out.loss) and out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert not buffer.requires_grad and buffer.grad is None and buffer.dtype == torch.float32
    # router statistics: every token picks num_experts_per_tok experts in each MoE layer (2 main + 1 MTP)
    assert out.router_stats.shape == (3, 8)
    assert (out.router_stats.sum(-1) == 2 * 16 * 2).all()
    # the routers' running load counts saw each token once per layer, also when checkpointing re-ran the forward
    loads = [layer.mlp.gate.tokens_per_expert for layer in model.model.layers if layer.is_moe]
    assert all(load.sum() == 2 * 16 * 2 for load in loads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.step()
    assert torch.isfinite(model(input_ids, labels=input_ids).loss)


def test_published_config_is_accepted():
    config = load_config("deepseek-v3")
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 40
    assert config.num_nextn_predict_layers == 1 and config.quantization_config["weight_block_size"] == [128, 128]
    assert config.num_moe_layers == 58
    # configs written by transformers' built-in class (rope_parameters, num_mtp_layers) load too
    builtin = BuiltinConfig(num_mtp_layers=0, rope_interleave=False)
    ours = DeepseekV3Config(**json.loads(builtin.to_json_string()))
    assert ours.num_nextn_predict_layers == 0 and ours.rope_interleave is False


def test_yarn_matches_transformers_and_reference_scale():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    from deepseek_v3.rope import compute_inv_freq, softmax_scale

    config = load_config("deepseek-v3")
    ours, attention_factor = compute_inv_freq(config)
    builtin = BuiltinConfig(**{k: v for k, v in config.to_dict().items() if k in BuiltinConfig.__dataclass_fields__})
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](builtin)
    torch.testing.assert_close(ours, theirs)
    assert attention_factor == pytest.approx(their_factor) == pytest.approx(1.0)
    # reference: softmax_scale = qk_head_dim**-0.5 * (0.1 * mscale * ln(40) + 1)**2
    expected = 192**-0.5 * (0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0) ** 2
    assert softmax_scale(config) == pytest.approx(expected)
    assert softmax_scale(config) == pytest.approx(yarn_apply_mscale(builtin.rope_parameters, 192**-0.5))


def test_auto_classes_are_ours():
    from transformers import AutoConfig, AutoModel

    assert AutoConfig.for_model("deepseek_v3").__class__ is DeepseekV3Config
    assert AutoModel.from_config(load_config("tiny")).__class__ is deepseek_v3.DeepseekV3Model


def test_mtp_layer_dropped_on_request(tmp_path, padded_batch):
    """Loading an MTP checkpoint with num_nextn_predict_layers=0 skips the MTP layer explicitly (no unexpected keys)
    and leaves the main model's logits unchanged."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny")).eval()
    model.save_pretrained(tmp_path)
    main_only, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, num_nextn_predict_layers=0, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert len(main_only.model.layers) == model.config.num_hidden_layers
    input_ids, attention_mask = padded_batch
    with torch.no_grad():
        torch.testing.assert_close(
            main_only.eval()(input_ids, attention_mask=attention_mask).logits,
            model(input_ids, attention_mask=attention_mask).logits,
        )
