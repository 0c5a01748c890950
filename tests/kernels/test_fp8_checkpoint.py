"""FP8 checkpoints of the tiny model: converter, CLI, from_pretrained (dequantize on CPU), save in FP8, round trip."""

import json

import pytest
import torch
from _helpers import rel_err, requires_triton
from safetensors import safe_open

import deepseek_v3
from deepseek_v3.kernels import weight_dequant, weight_quant
from deepseek_v3.kernels.fp8_checkpoint import convert_checkpoint, save_pretrained_fp8, use_deepseek_fp8_gemm


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny")).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("ckpt") / "bf16"
    model.save_pretrained(path, max_shard_size="200KB")  # several shards
    return model, path


def test_cli_roundtrip_and_layout(bf16_checkpoint, tmp_path):
    from deepseek_v3.cli import main

    model, src = bf16_checkpoint
    assert len(list(src.glob("*.safetensors"))) > 1
    fp8, back = tmp_path / "fp8", tmp_path / "back"
    assert main(["convert", "bf16-to-fp8", str(src), str(fp8), "--no-progress"]) == 0
    config = json.loads((fp8 / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["weight_block_size"] == [128, 128]
    t8 = _tensors(fp8)
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t8)
    assert sorted(p.name for p in fp8.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    assert (fp8 / "generation_config.json").exists()
    # published names: quantized linears (incl. per-expert) get weight_scale_inv; high-precision ones don't
    name = "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert t8[name].dtype == torch.float8_e4m3fn and t8[name + "_scale_inv"].dtype == torch.float32
    assert t8["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    for hp in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
               "model.layers.3.eh_proj.weight", "model.layers.0.input_layernorm.weight"):  # fmt: skip
        assert t8[hp].dtype == torch.bfloat16 and hp + "_scale_inv" not in t8
    # back to bf16: every tensor within e4m3 bounds of the original, no scales left, config cleaned
    assert main(["convert", "fp8-to-bf16", str(fp8), str(back), "--no-progress"]) == 0
    t0, tb = _tensors(src), _tensors(back)
    assert set(t0) == set(tb)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    for k, v in t0.items():
        assert tb[k].dtype == v.dtype
        if k + "_scale_inv" in t8:
            scale = t8[k + "_scale_inv"].repeat_interleave(128, 0)[: v.shape[0]].repeat_interleave(128, 1)[:, : v.shape[1]]
            bound = torch.maximum(v.float().abs() * 2.0**-4, scale * 2.0**-10) + v.float().abs() * 2.0**-8  # + bf16
            assert ((tb[k].float() - v.float()).abs() <= bound).all(), k
        else:
            assert torch.equal(tb[k], v), k
    # converting the round trip again is a fixed point (idempotent quantization)
    fp8b = tmp_path / "fp8b"
    convert_checkpoint(back, fp8b, "bf16-to-fp8", progress=False)
    t8b = _tensors(fp8b)
    for k, v in t8.items():
        assert torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                           t8b[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else t8b[k]), k  # fmt: skip


def test_cli_errors(bf16_checkpoint, tmp_path):
    from deepseek_v3.cli import main

    _, src = bf16_checkpoint
    assert main(["convert", "fp8-to-bf16", str(tmp_path / "missing"), str(tmp_path / "x"), "--no-progress"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["convert", "bf16-to-fp8", str(src), str(tmp_path / "full"), "--no-progress"]) == 2


def test_fp8_checkpoint_loads_and_matches_bf16_logits(bf16_checkpoint, tmp_path):
    model, src = bf16_checkpoint
    fp8 = convert_checkpoint(src, tmp_path / "fp8", "bf16-to-fp8", progress=False)
    loaded = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(fp8).eval()  # CPU: dequantized on load
    ref_bf16 = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(
        convert_checkpoint(fp8, tmp_path / "deq", "fp8-to-bf16", progress=False)
    ).eval()
    # transformers' dequantize-on-load == our converter's dequantization, tensor for tensor
    sd, sd_ref = loaded.state_dict(), ref_bf16.state_dict()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd_ref)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.float()
        ref = model(input_ids=ids).logits.float()
    err = rel_err(logits, ref)
    assert err < 0.08, err
    print(f"fp8 checkpoint logits vs bf16 model: relative error {err:.4f}")


def test_save_pretrained_fp8(bf16_checkpoint, tmp_path):
    model, src = bf16_checkpoint
    out = save_pretrained_fp8(model, tmp_path / "saved")
    t_saved, t_conv = _tensors(out), _tensors(convert_checkpoint(src, tmp_path / "conv", "bf16-to-fp8", progress=False))
    assert set(t_saved) == set(t_conv)
    for k in t_conv:
        a, b = t_saved[k], t_conv[k]
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else torch.equal(a, b)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


@requires_triton
def test_hf_fp8_linear_routed_through_our_gemm():
    """What from_pretrained builds on CUDA for an FP8 checkpoint, computed with our Triton fp8_gemm."""
    from transformers.integrations.finegrained_fp8 import FP8Linear as HFFP8Linear

    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.05
    q, s = weight_quant(w)
    lin = HFFP8Linear(200, 96, block_size=(128, 128))
    lin.weight.data, lin.weight_scale_inv.data = q, s
    holder = torch.nn.Sequential(lin)
    use_deepseek_fp8_gemm(holder, backend="triton")
    x = torch.randn(3, 5, 200)
    y = holder(x)
    assert y.shape == (3, 5, 96) and holder[0].weight.dtype == torch.float8_e4m3fn
    assert rel_err(y, x @ weight_dequant(q, s, torch.float32).t()) < 0.06


def test_scale_in_another_shard(bf16_checkpoint, tmp_path):
    """A weight_scale_inv stored in a different shard than its weight is fetched on its own."""
    from safetensors.torch import load_file, save_file

    _, src = bf16_checkpoint
    fp8 = convert_checkpoint(src, tmp_path / "fp8", "bf16-to-fp8", progress=False)
    index_file = fp8 / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    home = index["weight_map"][name]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != home)
    a, b = load_file(fp8 / home), load_file(fp8 / other)
    b[name] = a.pop(name)
    save_file(a, fp8 / home)
    save_file(b, fp8 / other)
    index["weight_map"][name] = other
    index_file.write_text(json.dumps(index))
    out = _tensors(convert_checkpoint(fp8, tmp_path / "bf16", "fp8-to-bf16", progress=False))
    ref = _tensors(src)
    w = "model.layers.0.self_attn.q_a_proj.weight"
    assert set(out) == set(ref) and out[w].dtype == torch.bfloat16
    assert rel_err(out[w], ref[w]) < 0.05
    # and a scale missing everywhere is a clear error
    index["weight_map"].pop(name)
    b.pop(name)
    save_file(b, fp8 / other)
    index_file.write_text(json.dumps(index))
    from deepseek_v3.kernels.fp8_checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="has no 'model.layers.0.self_attn.q_a_proj.weight_scale_inv'"):
        convert_checkpoint(fp8, tmp_path / "bf16b", "fp8-to-bf16", progress=False)
