"""Conversion and FP8-checkpoint safety (issue 15, defects 4-6): a checkpoint that would load stale or garbage
weights is refused with an error naming the file; conversions are atomic."""

import json

import pytest
from transformers import AutoModelForCausalLM
import torch
from safetensors.torch import load_file, save_file

import deepseek_v3
from deepseek_v3.cli import main
from deepseek_v3.kernels.fp8_checkpoint import CheckpointError, check_fp8_scales, convert_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    model = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny")).to(torch.bfloat16).eval()
    root = tmp_path_factory.mktemp("ckpts")
    model.save_pretrained(root / "bf16", max_shard_size="200KB")
    convert_checkpoint(root / "bf16", root / "fp8", "bf16-to-fp8", progress=False)
    return root


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.converting-")] == []


@pytest.mark.parametrize("tensor", ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                                    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
                                    "model.layers.1.mlp.shared_experts.up_proj.weight"])
def test_fp8_checkpoint_without_a_non_expert_scale_is_refused(checkpoints, tmp_path, tensor):
    broken = _drop_scale(checkpoints / "fp8", tmp_path / "broken", tensor)
    with pytest.raises(CheckpointError, match=f"{tensor}.*has no.*_scale_inv.*re-download"):
        check_fp8_scales(broken)
    with pytest.raises(CheckpointError, match=tensor):
        convert_checkpoint(broken, tmp_path / "out", "fp8-to-bf16", progress=False)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path, "out")
    check_fp8_scales(checkpoints / "fp8")  # the complete checkpoint passes


def test_overwrite_removes_stale_weights_so_the_new_ones_load(checkpoints, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    torch.manual_seed(1)
    other = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny")).to(torch.bfloat16)
    other.save_pretrained(dst)  # a single-file model.safetensors + config
    assert (dst / "model.safetensors").exists()
    assert main(["convert", "fp8-to-bf16", str(checkpoints / "fp8"), str(dst), "--overwrite", "--no-progress"]) == 0
    assert not (dst / "model.safetensors").exists()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    loaded = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(dst)
    reference = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(
        convert_checkpoint(checkpoints / "fp8", tmp_path / "fresh", "fp8-to-bf16", progress=False))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    assert _no_leftovers(tmp_path, "dst")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_shard_names_the_file_and_leaves_no_destination(checkpoints, tmp_path, capsys, damage):
    broken = _copy(checkpoints / "bf16", tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else torch.randint(0, 256, (4096,)).byte().numpy().tobytes())
    dst = tmp_path / "out"
    assert main(["convert", "bf16-to-fp8", str(broken), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "Traceback" not in err
    assert not dst.exists() and _no_leftovers(tmp_path, "out")
    shard.write_bytes(data)  # repaired: a plain rerun works (nothing partial blocks it)
    assert main(["convert", "bf16-to-fp8", str(broken), str(dst), "--no-progress"]) == 0


def test_destination_file_and_malformed_index_errors_name_the_file(checkpoints, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["convert", "bf16-to-fp8", str(checkpoints / "bf16"), str(target), "--no-progress"]) == 2
    assert f"destination {target} is a file" in capsys.readouterr().err
    broken = _copy(checkpoints / "bf16", tmp_path / "broken")
    index = broken / "model.safetensors.index.json"
    for text in ("{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": {"a": 3}})):
        index.write_text(text)
        assert main(["convert", "bf16-to-fp8", str(broken), str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(index) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def _drop_scale(src, dst, tensor):
    broken = _copy(src, dst)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop(tensor + "_scale_inv")
    tensors = load_file(broken / shard)
    del tensors[tensor + "_scale_inv"]
    save_file(tensors, broken / shard, metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    return broken


def test_load_guard_refuses_a_missing_scale(checkpoints, tmp_path):
    from deepseek_v3.kernels.fp8_checkpoint import check_fp8_checkpoint_before_load

    broken = _drop_scale(checkpoints / "fp8", tmp_path / "broken", "model.layers.0.self_attn.o_proj.weight")
    with pytest.raises(CheckpointError, match="o_proj.weight"):
        check_fp8_checkpoint_before_load(broken)
    check_fp8_checkpoint_before_load(checkpoints / "fp8")  # complete FP8 checkpoint
    check_fp8_checkpoint_before_load(checkpoints / "bf16")  # not FP8
    check_fp8_checkpoint_before_load("deepseek-ai/DeepSeek-V3")  # hub id: left to transformers


def test_from_pretrained_refuses_an_fp8_checkpoint_without_a_scale(checkpoints, tmp_path):
    broken = _drop_scale(checkpoints / "fp8", tmp_path / "broken", "model.layers.0.self_attn.q_a_proj.weight")
    with pytest.raises(CheckpointError, match="q_a_proj.weight"):
        deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(broken)
    with pytest.raises(CheckpointError, match="q_a_proj.weight"):
        AutoModelForCausalLM.from_pretrained(broken)
