"""LoRA (peft) on the tiny model: preset targets, the router state saved with the adapter, merged checkpoints, and
LoRA over a frozen FP8 base."""

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import deepseek_v3  # noqa: E402
from deepseek_v3.trainers.lora import (  # noqa: E402
    LoraArguments,
    apply_lora,
    resolve_targets,
    save_lora_outputs,
)

REPO = Path(__file__).resolve().parents[2]


def tiny(seed=0):
    torch.manual_seed(seed)
    return deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny"))


def leaf_set(names):
    return {n.split("layers.", 1)[1].split(".", 1)[1] for n in names}


def test_presets_target_shared_experts_dense_mlp_never_router():
    model = tiny()
    attn, attn_p = resolve_targets(model, LoraArguments(lora_preset="attention"))
    assert leaf_set(attn) == {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                              "self_attn.kv_b_proj", "self_attn.o_proj"} and attn_p == []
    experts, experts_p = resolve_targets(model, LoraArguments(lora_preset="experts"))
    assert "model.layers.0.mlp.gate_proj" in experts  # dense MLP of layer 0
    assert "model.layers.1.mlp.shared_experts.down_proj" in experts
    assert "model.layers.1.mlp.experts.gate_up_proj" in experts_p and "model.layers.2.mlp.experts.down_proj" in experts_p
    everything, _ = resolve_targets(model, LoraArguments(lora_preset="all"))
    assert set(everything) == set(attn) | set(experts)
    assert not any(n.endswith("mlp.gate") or "eh_proj" in n or "lm_head" in n for n in everything)
    with_eh, _ = resolve_targets(model, LoraArguments(lora_preset="all", lora_target_eh_proj=True))
    assert set(with_eh) - set(everything) == {"model.layers.3.eh_proj"}
    dense_only, none = resolve_targets(model, LoraArguments(lora_target_modules=["gate_proj", "up_proj", "down_proj"]))
    assert none == [] and "model.layers.1.mlp.shared_experts.down_proj" in dense_only  # `down_proj`: modules only
    _, routed = resolve_targets(model, LoraArguments(lora_target_modules=["o_proj", "experts"]))
    assert routed == experts_p
    with pytest.raises(ValueError, match="router"):
        resolve_targets(model, LoraArguments(lora_target_modules=["gate"]))
    with pytest.raises(ValueError, match="lora_preset"):
        resolve_targets(model, LoraArguments(lora_preset="mlp"))


@pytest.mark.parametrize("targets", [None, ["all-linear"]])
def test_peft_wraps_what_we_asked_and_trains(targets):
    model = apply_lora(tiny(), LoraArguments(use_peft=True, lora_r=2, lora_target_modules=targets))
    wrapped = model._lora_targets
    # peft did not retarget gate_proj/up_proj/down_proj onto the fused experts: they are real LoRA modules
    assert "model.layers.1.mlp.shared_experts.gate_proj" in wrapped["lora_modules"]
    assert "model.layers.0.mlp.down_proj" in wrapped["lora_modules"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in wrapped["lora_parameters"]
    assert wrapped["saved_modules"] == [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]
    assert not any(n.endswith(".gate") for n in wrapped["lora_modules"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randint(3, 300, (2, 12))
    model.train()
    model(input_ids=x, labels=x).loss.backward()  # `all-linear` used to crash in the router's record_load
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    routers = [m for n, m in model.named_modules() if n.endswith("modules_to_save.default")]
    assert routers and all(r.tokens_per_expert.sum() > 0 for r in routers)  # the copies that run count the load


def test_lora_sft_cli_adapter_and_merged_agree(tmp_path, data_dir):
    """CLI LoRA SFT with balancing on: PeftModel.from_pretrained(base, out) == out/merged, router biases included."""
    from data_files import require_file
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deepseek_v3.cli import main as cli_main

    gsm8k = str(require_file(data_dir / "gsm8k" / "train.jsonl"))
    out = tmp_path / "lora"
    cli_main(["train", "sft", "--config", str(REPO / "recipes" / "sft_lora_tiny.yaml"), "--dataset_name", gsm8k,
              "--max_samples", "8", "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_length", "128",
              "--balancing_gamma", "0.01", "--output_dir", str(out), "--save_steps", "100", "--logging_steps", "1"])
    base_dir = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_dir) == out / "base"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_bias = base.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    bias = merged.model.layers[1].mlp.gate.e_score_correction_bias
    assert (bias - base_bias).abs().max() > 0  # balancing moved the biases ...
    x = torch.randint(3, 300, (2, 32))
    with torch.no_grad():
        diff = (adapted(input_ids=x).logits - merged(input_ids=x).logits).abs().max().item()
    assert diff <= 1e-5  # ... and the adapter carries them
    adapter_bytes = sum(f.stat().st_size for f in out.glob("adapter_model.*"))
    assert adapter_bytes < 0.1 * (out / "merged" / "model.safetensors").stat().st_size
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM as BuiltIn

    builtin = BuiltIn.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (builtin(input_ids=x).logits - merged(input_ids=x).logits).abs().max() < 1e-4


def test_lora_over_fp8_base(tmp_path):
    from deepseek_v3.kernels.fp8_frozen import FrozenFP8Linear
    from deepseek_v3.trainers.fp8_base import FrozenFP8Experts, fp8_base_bytes

    reference = tiny().to(torch.bfloat16)
    bf16_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    model = apply_lora(tiny().to(torch.bfloat16), LoraArguments(use_peft=True, lora_r=2, lora_preset="attention",
                                                                load_in_fp8=True))
    assert any(isinstance(m, FrozenFP8Linear) for m in model.modules())
    assert any(isinstance(m, FrozenFP8Experts) for m in model.modules())
    sizes = fp8_base_bytes(model)
    assert sizes["total"] < 0.6 * bf16_bytes  # embeddings / head / norms stay BF16 (12% of this tiny model)
    x = torch.randint(3, 300, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any("layers.0.self_attn.q_a_proj.lora_A" in n for n in grads)  # gradients flow through FP8 layers

    # merging into the FP8 base writes an FP8 checkpoint again, which reloads to the merged model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits.float()
    out = tmp_path / "fp8"
    out.mkdir()
    merged_dir = save_lora_outputs(model, str(out), fp8=True)
    config = json.loads((Path(merged_dir) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    from safetensors import safe_open

    with safe_open(os.path.join(merged_dir, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_a_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in f.keys()
    reloaded = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        got = reloaded(input_ids=x).logits.float()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 0.08  # requantized (the adapter's delta is rounded to e4m3 on the merged weight)


def test_fp8_base_keeps_the_checkpoint_codes(tmp_path):
    """From an FP8 checkpoint the frozen base holds the published e4m3 codes and scales, not a requantization."""
    from safetensors import safe_open

    from deepseek_v3.kernels.fp8_checkpoint import save_pretrained_fp8

    fp8_dir = tmp_path / "fp8"
    save_pretrained_fp8(tiny(), fp8_dir)
    loaded = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32)
    model = apply_lora(loaded, LoraArguments(use_peft=True, lora_r=2, lora_preset="attention", load_in_fp8=True))
    inner = model.base_model.model.model
    with safe_open(str(fp8_dir / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight")
        s = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight_scale_inv")
        up = f.get_tensor("model.layers.2.mlp.experts.5.up_proj.weight")
        up_s = f.get_tensor("model.layers.2.mlp.experts.5.up_proj.weight_scale_inv")
    kv_b = inner.layers[1].self_attn.kv_b_proj.base_layer
    assert torch.equal(kv_b.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(kv_b.weight_scale_inv, s)
    experts = inner.layers[2].mlp.experts
    I = experts.intermediate_size
    assert torch.equal(experts.gate_up_proj_fp8[5, I:].view(torch.uint8), up.view(torch.uint8))
    assert torch.equal(experts.gate_up_proj_scale_inv[5, 1:], up_s)


def _train(model, steps, seed=1):
    torch.manual_seed(seed)
    batches = [torch.randint(3, 300, (4, 16)) for _ in range(2)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for step in range(steps):
        x = batches[step % len(batches)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_on_routed_experts_over_fp8_base(tmp_path):
    """Preset `all` over an FP8 base: the routed experts stay e4m3 codes, their adapters (peft target_parameters)
    train like over a BF16 base, and the adapter loads onto an FP8 or a high-precision base."""
    from peft import PeftModel

    from deepseek_v3.trainers.fp8_base import FrozenFP8Experts, dequantize_base, fp8_base_bytes, quantize_base

    args = LoraArguments(use_peft=True, lora_r=2, lora_preset="all", load_in_fp8=True)
    bf16 = apply_lora(tiny().to(torch.bfloat16), LoraArguments(use_peft=True, lora_r=2, lora_preset="all"))
    model = apply_lora(tiny().to(torch.bfloat16), args)
    assert model._lora_targets["lora_parameters"] == bf16._lora_targets["lora_parameters"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in model._lora_targets["lora_parameters"]
    experts = [m for m in model.modules() if isinstance(m, FrozenFP8Experts)]
    assert len(experts) == 3
    for e in experts:
        assert e.gate_up_proj_fp8.dtype == e.down_proj_fp8.dtype == torch.float8_e4m3fn
        # the adapter slots own one element, not a high-precision copy of the experts
        assert e.gate_up_proj.untyped_storage().nbytes() <= 4 and not e.gate_up_proj.any()
    bf16_bytes = sum(p.numel() * p.element_size() for n, p in bf16.named_parameters() if "lora_" not in n)
    assert fp8_base_bytes(model)["total"] <= 0.6 * bf16_bytes
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in bf16.named_parameters() if p.requires_grad}

    fp8_losses, bf16_losses = _train(model, 8), _train(bf16, 8)
    assert fp8_losses[-1] < fp8_losses[0] - 0.05  # it trains (random-init tiny: slowly) ...
    assert abs(fp8_losses[-1] - bf16_losses[-1]) <= 0.02 * bf16_losses[-1]  # ... like over the BF16 base
    lora_b = {n: p for n, p in model.named_parameters() if "experts.base_layer.lora_B" in n and "shared" not in n}
    assert lora_b and all(p.abs().max() > 0 for p in lora_b.values())  # the routed experts' adapters moved

    # round trip at fp32: the trained adapter on an FP32-compute FP8 base, saved, then loaded onto a fresh FP8 base
    # and onto the dequantized (FP32) base
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    trained = apply_lora(tiny(), args)
    state = {k: v.float() for k, v in get_peft_model_state_dict(model).items()}
    assert any("experts.base_layer.lora_B" in k for k in state)
    set_peft_model_state_dict(trained, state)
    trained.eval()
    x = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        expected = trained(input_ids=x).logits
    out = tmp_path / "adapter"
    trained.save_pretrained(str(out))
    fp8_base = tiny().float()
    quantize_base(fp8_base)
    high = tiny().float()
    quantize_base(high)
    dequantize_base(high)
    for base in (fp8_base, high):
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        with torch.no_grad():
            assert (reloaded(input_ids=x).logits - expected).abs().max() <= 1e-5

    # merged: dequantize -> merge -> requantize, an FP8 checkpoint that reloads to the trained model
    merged_dir = save_lora_outputs(trained, str(out), fp8=True)
    from safetensors import safe_open

    with safe_open(os.path.join(merged_dir, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.float8_e4m3fn
    merged = trained.base_model.model  # merged in place, before the requantization: == the trained model
    with torch.no_grad():
        assert (merged(input_ids=x).logits - expected).abs().max() <= 1e-5
    reloaded = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    for layer in (1, 2, 3):  # the checkpoint holds e4m3(merged experts): only the requantization rounding apart
        for name in ("gate_up_proj", "down_proj"):
            want = getattr(merged.model.layers[layer].mlp.experts, name)
            got = getattr(reloaded.model.layers[layer].mlp.experts, name)
            assert ((got - want).norm() / want.norm()).item() < 0.05


def test_fp8_base_codes_survive_dtype_casts():
    """`model.to(dtype)` / `.half()` / `.float()` on a frozen FP8 base move the e4m3 codes and FP32 scales but never
    cast them (they would silently become high-precision copies, and the scales would be rounded); the compute
    dtype follows the cast, and the adapter slots stay stride-0."""
    from deepseek_v3.kernels.fp8_frozen import FrozenFP8Linear
    from deepseek_v3.kernels.fp8_quant import FP8_DTYPE
    from deepseek_v3.trainers.fp8_base import FrozenFP8Experts, fp8_base_bytes, quantize_base

    model = tiny().float()
    quantize_base(model)
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    frozen = {name: t.clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
              if name.endswith(("_fp8", "scale_inv")) or t.dtype == FP8_DTYPE}
    assert frozen and fp8_base_bytes(model)["fp8"] > 0
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.to(torch.float64), torch.float64), (lambda m: m.float(), torch.float32)):
        cast(model)
        tensors = dict([*model.named_parameters(), *model.named_buffers()])
        for name, original in frozen.items():
            assert tensors[name].dtype == original.dtype, (name, tensors[name].dtype)
            assert torch.equal(tensors[name], original), name
        for module in model.modules():
            if isinstance(module, (FrozenFP8Linear, FrozenFP8Experts)):
                assert module.compute_dtype == dtype
            if isinstance(module, FrozenFP8Experts):
                assert module.gate_up_proj.dtype == dtype and set(module.gate_up_proj.stride()) == {0}
    with torch.no_grad():
        after = model(input_ids=ids).logits  # embeddings / norms went through a float16 round trip: close, not equal
    assert (after - before).abs().max() < 0.05 * before.abs().max()
