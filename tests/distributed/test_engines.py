"""Distributed engines in 2 CPU processes (gloo) against one process on the same global batch.

Training (the SFT trainer of `deepseek-v3 train sft`, plain SGD, fp32, main + MTP + balance loss, aux-loss-free
bias updates every step): weights and router biases after 3 optimizer steps equal the single-process run within
1e-5, the biases are the same on both ranks, and the logged main / MTP losses are the true values. Engines: DDP
(`accelerate launch --config_file recipes/accelerate/ddp.yaml`), DeepSpeed ZeRO-3 (`zero3.yaml`), FSDP2 as
transformers applies it (`DistributedConfig(fsdp_size=2)`; Accelerate's FSDP runs on accelerator devices only,
see test_fsdp2_accelerate_config), gradient accumulation in one process. Tensor / expert parallelism
(`tp_plan="auto"`, `DistributedConfig(tp_size=2, ep_size=2)`): logits, one training step's gradients and a bias
update equal to the unsharded model. Every sharded run saves, and the save reloads in one process with the
published tensor names and the trained weights.

Each 2-process run takes 15-45 s on a small shared CPU: those tests are marked slow.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
TRAIN_WORKER = HERE / "_train_worker.py"
PARALLEL_WORKER = HERE / "_parallel_worker.py"
TOLERANCE = 1e-5

sys.path.insert(0, str(HERE.parent / "trainers"))



def require_deepspeed():
    """ZeRO-3 needs the optional `distributed` extra: skipped without it, except where CI installed it
    (DEEPSEEK_V3_REQUIRE_DEEPSPEED=1), where a missing or broken deepspeed fails."""
    if os.environ.get("DEEPSEEK_V3_REQUIRE_DEEPSPEED") == "1":
        import deepspeed  # noqa: F401
    else:
        pytest.importorskip("deepspeed")

def _run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def torchrun(script, *args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args])


def accelerate_launch(config, script, *args):
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, script, *args])


@pytest.fixture(scope="module")
def init_checkpoints(tmp_path_factory):
    """The tiny model with a skewed router (the bias updates act), saved without and with a balance loss."""
    from _moe_helpers import skew_router, tiny_model

    from deepseek_v3.tokenizer import byte_level_tokenizer

    paths = {}
    for name, alpha in (("plain", 0.0), ("aux", 0.1)):
        path = tmp_path_factory.mktemp(f"init_{name}")
        model = tiny_model(seed=0, seq_aux_loss_alpha=alpha)
        skew_router(model)
        model.save_pretrained(path)
        byte_level_tokenizer().save_pretrained(path)
        paths[name] = path
    return paths


def train(out, init, *flags, launcher=None, config=None):
    """Run the training worker (one process, torchrun or accelerate launch); -> (rank results, rank-0 weights)."""
    args = [init, out, *flags]
    if launcher is None:
        _run([sys.executable, TRAIN_WORKER, *args])
        world = 1
    elif launcher == "torchrun":
        torchrun(TRAIN_WORKER, *args, "--expect-world", "2")
        world = 2
    else:
        accelerate_launch(ACCELERATE_CONFIGS / config, TRAIN_WORKER, *args, "--expect-world", "2")
        world = 2
    ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
    assert all(r["world"] == world for r in ranks)
    return ranks, torch.load(Path(out) / "weights.pt")


@pytest.fixture(scope="module")
def single(init_checkpoints, tmp_path_factory):
    """Single-process references: batch 8 with variable-length sequences, and with the balance loss on equal ones."""
    plain = train(tmp_path_factory.mktemp("single"), init_checkpoints["plain"], "--batch", "8")
    aux = train(tmp_path_factory.mktemp("single_aux"), init_checkpoints["aux"], "--batch", "8", "--equal-lengths")
    return {"plain": plain, "aux": aux}


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_matches(reference, run, expect_engine):
    (ref_rank,), ref_weights = reference
    ranks, weights = run
    assert all(expect_engine in f"{r['engine']}/{r['wrapped']}" for r in ranks), [r["engine"] for r in ranks]
    diff = max_weight_diff(ref_weights, weights)
    assert diff <= TOLERANCE, f"weights differ by {diff:.3g}"
    assert ref_rank["biases"].abs().max() > 0  # the balancing moved the biases
    for r in ranks:
        assert torch.equal(r["biases"], ranks[0]["biases"])  # every rank ends with the same biases
        torch.testing.assert_close(r["biases"], ref_rank["biases"], atol=TOLERANCE, rtol=0)
    # logged losses are the true values, not 1/world_size (or 1/accumulation) of them
    for expected, logged in zip(ref_rank["logs"], ranks[0]["logs"], strict=True):
        for key in expected:
            assert logged[key] == pytest.approx(expected[key], abs=1e-4), (key, expected, logged)
    return diff


def assert_reloads(saved: Path, weights: dict, published: Path):
    """The save reloads in one process with the trained weights and the published tensor names."""
    from transformers import AutoModelForCausalLM

    import deepseek_v3  # noqa: F401

    with safe_open(saved / "model.safetensors", "pt") as f, safe_open(published / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    assert max_weight_diff(weights, {k: v.float() for k, v in reloaded.state_dict().items() if k in weights}) == 0
    reference = AutoModelForCausalLM.from_pretrained(published, dtype=torch.float32)
    reference.load_state_dict(weights, strict=False)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_batch(single, init_checkpoints, tmp_path):
    run = train(tmp_path, init_checkpoints["plain"], "--batch", "4", "--grad-accum", "2")
    assert_matches(single["plain"], run, "NO/")


@pytest.mark.slow
def test_ddp_accelerate_config_matches_single_process(single, init_checkpoints, tmp_path):
    run = train(tmp_path, init_checkpoints["plain"], "--batch", "4", "--save", launcher="accelerate", config="ddp.yaml")
    assert_matches(single["plain"], run, "MULTI_CPU/DistributedDataParallel")
    assert_reloads(tmp_path / "final", run[1], init_checkpoints["plain"])


@pytest.mark.slow
def test_ddp_with_accumulation_and_balance_loss(single, init_checkpoints, tmp_path):
    """2 ranks x 2 micro-batches of 2 == one batch of 8, with the sequence-wise balance loss on."""
    run = train(tmp_path, init_checkpoints["aux"], "--batch", "2", "--grad-accum", "2", "--equal-lengths",
                launcher="torchrun")
    assert_matches(single["aux"], run, "MULTI_CPU/DistributedDataParallel")


@pytest.mark.slow
def test_balance_loss_with_accumulation_in_one_process(single, init_checkpoints, tmp_path):
    run = train(tmp_path, init_checkpoints["aux"], "--batch", "4", "--grad-accum", "2", "--equal-lengths")
    assert_matches(single["aux"], run, "NO/")


@pytest.mark.slow
def test_zero3_accelerate_config_matches_single_process(single, init_checkpoints, tmp_path):
    require_deepspeed()
    run = train(tmp_path, init_checkpoints["plain"], "--batch", "4", "--save", launcher="accelerate",
                config="zero3.yaml")
    assert_matches(single["plain"], run, "DEEPSPEED/DeepSpeedEngine")
    assert_reloads(tmp_path / "final", run[1], init_checkpoints["plain"])


@pytest.mark.slow
def test_fsdp2_transformers_matches_single_process(single, init_checkpoints, tmp_path):
    run = train(tmp_path, init_checkpoints["plain"], "--batch", "4", "--distributed", "fsdp", "--save",
                launcher="torchrun")
    assert_matches(single["plain"], run, "transformers-fsdp/FSDPDeepseekV3ForCausalLM")
    assert_reloads(tmp_path / "final", run[1], init_checkpoints["plain"])


def test_fsdp2_accelerate_config():
    """As far as it runs here: Accelerate parses fsdp2.yaml into an FSDP2 plugin whose wrap classes are our layer
    classes, with a sharded state dict and activation checkpointing. (Accelerate enables FSDP only on accelerator
    devices; on CPU the train scripts refuse the launch, see test_train_scripts_refuse_fsdp_on_cpu.)"""
    from accelerate.commands.config.config_args import load_config_from_file

    from deepseek_v3.decoder_layer import DeepseekV3DecoderLayer
    from deepseek_v3.mtp import DeepseekV3MultiTokenPredictionLayer

    config = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp2.yaml"))
    assert config.distributed_type.value == "FSDP" and config.num_processes == 2
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_activation_checkpointing"] is True
    wrapped = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert wrapped == [DeepseekV3DecoderLayer.__name__, DeepseekV3MultiTokenPredictionLayer.__name__]
    from accelerate.utils.dataclasses import get_module_class_from_name
    from _moe_helpers import tiny_model

    model = tiny_model()
    assert [get_module_class_from_name(model, name) for name in wrapped] == [
        DeepseekV3DecoderLayer, DeepseekV3MultiTokenPredictionLayer
    ]


def test_train_scripts_refuse_fsdp_on_cpu(monkeypatch):
    """An FSDP / DeepSpeed launch that Accelerate would silently run as DDP (CPU) stops with a clear error."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from deepseek_v3.trainers.distributed import check_engine

    trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asked for FSDP .* runs MULTI_CPU"):
        check_engine(trainer)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_engine(trainer)
    trainer.accelerator.distributed_type = DistributedType.DEEPSPEED
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    check_engine(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tp", "tp_ep"])
def test_tensor_and_expert_parallel_forward_and_gradients(mode, init_checkpoints, tmp_path):
    torchrun(PARALLEL_WORKER, init_checkpoints["aux"], tmp_path, mode)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["world"] == 2
        assert r["logits_diff"] <= TOLERANCE, r["logits_diff"]
        assert r["generate_equal"] == {"off": True, "on": True}
        assert r["grad_diff"] <= TOLERANCE, (r["grad_worst"], r["grad_diff"])
        assert r["bias_diff"] == 0 and torch.equal(r["biases"], ranks[0]["biases"])
    assert ranks[0]["biases"].abs().max() > 0
    placements = ranks[0]["placements"]
    assert placements["model.layers.1.self_attn.q_b_proj.weight"] == "(Shard(dim=0),)"  # heads split
    experts = placements["model.layers.1.mlp.experts.gate_up_proj"]
    # TP splits each expert's intermediate dim; EP gives each rank whole experts (the expert dim)
    assert experts == ("(Shard(dim=0),)" if mode == "tp_ep" else "(_StridedShard(dim=1, sf=2),)")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f, \
            safe_open(init_checkpoints["aux"] / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for name in g.keys():  # the sharded model saved the full tensors it loaded
            assert torch.equal(f.get_tensor(name), g.get_tensor(name)) or "e_score_correction_bias" in name


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp2"])
def test_cli_sft_recipe_under_accelerate_config(engine, data_dir, tmp_path):
    """`deepseek-v3 train sft --config recipes/sft_tiny.yaml` launched with each Accelerate config in 2 processes:
    a checkpoint and a final model that reload in one process with the published names and the balanced router
    biases (both ranks' RNG states in the checkpoint show the 2 processes). fsdp2.yaml on a CPU-only machine stops
    with the clear error instead of silently training DDP."""
    if engine == "zero3":
        require_deepspeed()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIGS / f"{engine}.yaml",
           "-m", "deepseek_v3.cli", "train", "sft", "--config", ROOT / "recipes" / "sft_tiny.yaml",
           "--dataset_name", data_dir / "gsm8k" / "train.jsonl", "--max_samples", "32", "--max_steps", "2",
           "--per_device_train_batch_size", "4", "--save_steps", "2", "--logging_steps", "1", "--output_dir", out]
    if engine == "fsdp2" and not torch.cuda.is_available():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode != 0
        assert "asked for FSDP (ACCELERATE_USE_FSDP=true) but the trainer runs MULTI_CPU" in result.stderr
        return
    _run(cmd)
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    from transformers import AutoModelForCausalLM

    import deepseek_v3

    reference = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny"))
    reference.save_pretrained(tmp_path / "published")
    for saved in (out, out / "checkpoint-2"):
        with safe_open(saved / "model.safetensors", "pt") as f, \
                safe_open(tmp_path / "published" / "model.safetensors", "pt") as g:
            assert set(f.keys()) == set(g.keys())
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        biases = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.model.layers[1:]])
        assert biases.abs().max() > 0  # balanced during training, saved with the model
        with torch.no_grad():
            assert model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.isfinite().all()


@pytest.mark.slow
def test_cli_grpo_recipe_under_ddp_config(data_dir, tmp_path):
    """`train grpo` under ddp.yaml: the GRPO loss never runs the MTP module, so DDP must not wait for its gradients
    (the script turns on `ddp_find_unused_parameters`); the run ends with a model that reloads."""
    out = tmp_path / "out"
    accelerate_launch(ACCELERATE_CONFIGS / "ddp.yaml", "-m", "deepseek_v3.cli", "train", "grpo", "--config",
                      ROOT / "recipes" / "grpo_tiny.yaml", "--dataset_name", data_dir / "gsm8k" / "train.jsonl",
                      "--max_samples", "16", "--max_steps", "2", "--max_completion_length", "8", "--output_dir", out)
    from transformers import AutoModelForCausalLM

    import deepseek_v3  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.isfinite().all()
