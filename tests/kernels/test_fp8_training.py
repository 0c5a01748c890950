"""The FP8 training switch on the tiny model: conversion, plain Accelerate loop, HF Trainer, save/resume."""

import importlib

import pytest
import torch
from _helpers import rel_err

import deepseek_v3
from deepseek_v3.kernels import FP8Linear
from deepseek_v3.kernels.fp8_training import (
    FP8ExpertsMixin,
    FP8TrainingCallback,
    disable_fp8,
    enable_fp8,
    fp8_module_names,
)

VOCAB = 320
# (the package re-exports a function named fp8_linear, which shadows the submodule attribute)
fp8_linear_mod = importlib.import_module("deepseek_v3.kernels.fp8_linear")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny"))


def batches(n, batch=2, seq=16, seed=1):
    """A learnable toy language: odd positions are a fixed function of the previous token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        ids[:, 1::2] = (ids[:, 0::2] * 7) % (VOCAB - 3) + 3
        out.append(ids)
    return out


@pytest.fixture
def gemm_counter(monkeypatch):
    calls = {"n": 0}
    orig, orig_grouped = fp8_linear_mod.fp8_gemm, fp8_linear_mod.fp8_grouped_gemm

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    def counting_grouped(*a, **k):
        calls["n"] += 1
        return orig_grouped(*a, **k)

    monkeypatch.setattr(fp8_linear_mod, "fp8_gemm", counting)
    monkeypatch.setattr(fp8_linear_mod, "fp8_grouped_gemm", counting_grouped)
    return calls


def test_enable_fp8_converts_the_right_modules():
    model = tiny_model()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    ids = batches(1)[0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    enable_fp8(model)
    names = set(fp8_module_names(model))
    assert "model.layers.0.self_attn.q_a_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert "model.layers.1.mlp.experts" in names and "model.layers.1.mlp.shared_experts.up_proj" in names
    assert "model.layers.3.self_attn.o_proj" in names  # the MTP block's transformer layer
    for hp in ("lm_head", "model.layers.3.eh_proj", "model.layers.1.mlp.gate", "model.embed_tokens"):
        assert hp not in names
    assert type(model.lm_head) is torch.nn.Linear and isinstance(model.model.layers[1].mlp.experts, FP8ExpertsMixin)
    # 5 attention projections x 4 layers + 3 dense MLP + 3x3 shared experts + 3 experts modules
    assert len(names) == 20 + 3 + 9 + 3
    # nothing about the parameters changed
    assert all(p is params[n] for n, p in model.named_parameters()) and list(model.state_dict()) == keys
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert 0 < rel_err(logits, ref) < 0.1  # e4m3 activations and weights in every converted layer (~0.06)
    enable_fp8(model)  # idempotent
    assert len(fp8_module_names(model)) == len(names)
    disable_fp8(model)
    assert fp8_module_names(model) == [] and type(model.model.layers[1].mlp.experts).__name__ == "DeepseekV3Experts"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_custom_filter():
    model = enable_fp8(tiny_model(), filter_fn=lambda name, m: name.endswith("o_proj"))
    names = fp8_module_names(model)
    assert len(names) == 4 and all(n.endswith("o_proj") for n in names)
    assert isinstance(model.model.layers[0].self_attn.o_proj, FP8Linear)


def test_plain_accelerate_loop_grad_accum_and_resume(tmp_path, gemm_counter):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    enable_fp8(accelerator.unwrap_model(model))  # after optimizer creation and prepare: parameters untouched
    data = batches(8)

    def step(ids):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            for p in model.parameters():
                assert p.grad is None or torch.isfinite(p.grad).all()
            optimizer.step()
            optimizer.zero_grad()
        return loss.item()

    first = [step(ids) for ids in data[:4]]
    assert gemm_counter["n"] > 0 and all(torch.isfinite(torch.tensor(first)))
    accelerator.save_state(tmp_path / "state")
    after = [step(ids) for ids in data[4:]]
    accelerator.load_state(tmp_path / "state")
    resumed = [step(ids) for ids in data[4:]]
    assert resumed == pytest.approx(after, rel=1e-6)
    assert fp8_module_names(accelerator.unwrap_model(model))  # still FP8 after load_state


def test_hf_trainer_with_fp8_callback(tmp_path, gemm_counter):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": ids, "labels": ids} for b in batches(6, batch=4) for ids in b]

    def make_trainer(out, max_steps):
        args = TrainingArguments(
            output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=2e-3, save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        return Trainer(model=tiny_model(), args=args, train_dataset=data, callbacks=[FP8TrainingCallback()])

    trainer = make_trainer(tmp_path / "run", 4)
    assert fp8_module_names(trainer.model)  # converted at the end of Trainer.__init__
    result = trainer.train()
    assert gemm_counter["n"] > 0 and torch.isfinite(torch.tensor(result.training_loss))
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())

    # FP8 does not change what is checkpointed: same tensors as a plain save of the same weights
    plain = tiny_model()
    plain.load_state_dict(final)
    plain.save_pretrained(tmp_path / "plain")
    from safetensors import safe_open

    def saved(path):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ckpt, ref = saved(tmp_path / "run" / "checkpoint-4"), saved(tmp_path / "plain")
    assert set(ckpt) == set(ref) and all(torch.equal(ckpt[k], ref[k]) for k in ref)
    # resuming from the step-2 checkpoint (weights, optimizer, scheduler, RNG) reproduces the same final weights
    resumed = make_trainer(tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and fp8_module_names(resumed.model)
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6, msg=k)


def test_trl_sft_trainer_with_fp8_callback(tmp_path, gemm_counter):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from deepseek_v3.tokenizer import byte_level_tokenizer

    texts = [f"question {i}: what is {i} plus {3 * i}? answer {4 * i}" for i in range(8)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", max_length=48, learning_rate=1e-3,
    )  # fmt: skip  (SFTConfig turns activation checkpointing on: the FP8 forward is recomputed in backward)
    model = tiny_model()
    before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=byte_level_tokenizer(), callbacks=[FP8TrainingCallback()],
    )  # fmt: skip
    trainer.train()
    assert fp8_module_names(trainer.model) and gemm_counter["n"] > 0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.model.layers[1].mlp.experts.gate_up_proj)
