"""Config validation messages and the meta-device parameter accounting of `deepseek-v3 info`."""

import json

import pytest

from deepseek_v3 import DeepseekV3Config, load_config
from deepseek_v3.cli import main as cli_main
from deepseek_v3.info import parameter_report


@pytest.mark.parametrize(
    "overrides, key, constraint",
    [
        (dict(n_routed_experts=250, n_group=8), "n_routed_experts", "divisible by n_group=8"),
        (dict(topk_group=9), "topk_group", "in [1, n_group=8]"),
        (dict(num_experts_per_tok=257), "num_experts_per_tok", "<= n_routed_experts=256"),
        (dict(scoring_func="relu"), "scoring_func", "must be one of"),
        (dict(topk_method="aux_free"), "topk_method", "must be one of"),
        (dict(kv_lora_rank=0), "kv_lora_rank", "positive integer"),
        (dict(q_lora_rank=-3), "q_lora_rank", "positive integer, or null"),
        (dict(qk_rope_head_dim=63), "qk_rope_head_dim", "must be even"),
        (dict(num_attention_heads=0), "num_attention_heads", "positive integer"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size", "positive integer"),
        (dict(n_routed_experts=8, n_group=8, topk_group=2, num_experts_per_tok=2), "n_group", "top-2 experts"),
        (dict(mtp_loss_weight=-1.0), "mtp_loss_weight", ">= 0"),
        (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers", ">= 0"),
    ],
)
def test_invalid_config_names_key_value_and_constraint(overrides, key, constraint):
    with pytest.raises(ValueError) as err:
        DeepseekV3Config(**overrides)
    message = str(err.value)
    assert f"`{key}`" in message and repr(overrides[key]) in message and constraint in message, message


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="rope_type`='rotary2d'"):
        DeepseekV3Config(rope_parameters={"rope_type": "rotary2d", "rope_theta": 10000.0})


def test_unknown_config_name():
    with pytest.raises(ValueError, match="Unknown config 'huge'.*tiny"):
        load_config("huge")


def test_671b_parameter_counts():
    report = parameter_report(load_config("deepseek-v3"))
    assert report["main_params"] == pytest.approx(671.0e9, rel=0.01)
    assert report["activated_params_per_token"] == pytest.approx(37.5e9, rel=0.01)
    # DeepSeek's 36.7B leaves out the embedding matrix (a token reads one row of it)
    assert report["activated_params_per_token_without_embedding"] == pytest.approx(36.7e9, rel=0.01)
    assert report["mtp_params_unique"] == pytest.approx(11.5e9, rel=0.01)
    assert report["kv_cache_bytes_per_token_per_layer_mla"] == (512 + 64) * 2
    assert report["kv_cache_bytes_per_token_per_layer_mha"] == 128 * (128 + 64 + 128) * 2
    # FP8: about one byte per quantized weight
    assert 0.45 < report["weight_bytes_fp8"] / report["weight_bytes_bf16"] < 0.55


def test_tiny_and_small_sizes():
    tiny = parameter_report(load_config("tiny"))
    assert tiny["total_params_with_mtp"] < 1_000_000 and tiny["mtp_params_unique"] > 0
    small = parameter_report(load_config("small"))
    assert 30e6 <= small["total_params_with_mtp"] <= 100e6


def test_info_cli(capsys):
    assert cli_main(["info", "deepseek-v3"]) == 0
    text = capsys.readouterr().out
    assert "671.03B" in text and "36.7B" in text and "MTP modules, unique" in text
    assert cli_main(["info", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mtp_params_unique"] > 0
