"""MoEBalancingCallback under transformers.Trainer: balancing a skewed router, gradient accumulation, resume, freezing,
logs and plots."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from deepseek_v3.trainers.balancing import BalancingConfig, find_routers
from deepseek_v3.trainers.callbacks import STATE_FILE, MoEBalancingCallback, add_balancing_callback
from deepseek_v3.trainers.plots import expert_load_heatmap_figure, maxvio_figure

from _moe_helpers import skew_router, tiny_model, token_dataset

BATCH = 8


def _args(output_dir, max_steps, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH,
        max_steps=max_steps,
        learning_rate=1e-3,
        logging_steps=5,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _biases(model) -> torch.Tensor:
    return torch.stack([info.router.e_score_correction_bias.clone() for info in find_routers(model)])


def _mean_maxvio(history) -> list[float]:
    return [sum(e["maxvio_step"]) / len(e["maxvio_step"]) for e in history]


def _train_skewed(tmp_path, gamma, steps=40, **config):
    model = tiny_model(seed=0)
    skew_router(model)
    callback = MoEBalancingCallback(BalancingConfig(gamma=gamma, **config))
    trainer = Trainer(
        model=model, args=_args(tmp_path, steps), train_dataset=token_dataset(steps * BATCH), callbacks=[callback]
    )
    trainer.train()
    return trainer, callback


def test_balancing_fixes_skewed_router_and_gamma_zero_does_not(tmp_path):
    curves = {}
    for gamma in (0.02, 0.0):
        trainer, callback = _train_skewed(tmp_path / f"gamma{gamma}", gamma)
        curve = _mean_maxvio(callback.balancer.history)
        assert len(curve) == 40  # one update per optimizer step
        curves[gamma] = (curve[0], sum(curve[-5:]) / 5)
        biases = _biases(trainer.model)
        print(
            f"gamma={gamma}: MaxVio (mean over 3 MoE layers) step 1 = {curve[0]:.3f}, "
            f"mean of the last 5 steps = {curves[gamma][1]:.3f}, bias range = {biases.max() - biases.min():.3f}"
        )
        logged = [entry for entry in trainer.state.log_history if "moe/maxvio_step" in entry]
        assert len(logged) == 8 and "moe/layer_3/maxvio_batch" in logged[-1]  # in the Trainer logs, MTP layer included
    start_on, end_on = curves[0.02]
    start_off, end_off = curves[0.0]
    assert start_on == start_off and start_on > 2.0  # same seed, same data, deliberately skewed
    assert end_on < 0.5 * start_on
    assert end_off > 0.5 * start_off


def test_gradient_accumulation_one_update_per_optimizer_step(tmp_path):
    loads, biases = [], []

    class Recording(MoEBalancingCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            before = _biases(model)
            super().on_step_end(args, state, control, model=model, **kwargs)
            loads.append(self.balancer.last_load.clone())
            biases.append((before, _biases(model)))

    model = tiny_model(seed=0)
    callback = Recording(gamma=0.01)
    args = _args(tmp_path, 3, gradient_accumulation_steps=2, per_device_train_batch_size=2, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(12, seq_len=16), callbacks=[callback])
    trainer.train()
    assert len(loads) == 3
    for load, (before, after) in zip(loads, biases):
        # both micro-batches (2 x 2 sequences x 16 tokens, top-2) are in the one update of the step
        assert load.sum(dim=1).tolist() == [2 * 2 * 16 * 2] * 3
        torch.testing.assert_close(after - before, 0.01 * torch.sign(load.mean(1, keepdim=True) - load))
    history = callback.balancer.history
    assert [e["step"] for e in history] == [1, 2, 3]
    assert all(v == v for e in history for v in e["maxvio_batch"])  # micro-batch MaxVio recorded (not NaN)


def test_resume_restores_biases_and_losses(tmp_path):
    steps, save_at = 12, 6

    def make(output_dir):
        model = tiny_model(seed=0)
        skew_router(model)
        args = _args(output_dir, steps, logging_steps=1, save_strategy="steps", save_steps=save_at)
        callback = MoEBalancingCallback(gamma=0.02, plots=False)
        return Trainer(model=model, args=args, train_dataset=token_dataset(steps * BATCH), callbacks=[callback])

    full = make(tmp_path / "full")
    full.train()
    # the checkpoint carries the (non-zero) biases under their checkpoint names
    saved = load_file(tmp_path / "full" / f"checkpoint-{save_at}" / "model.safetensors")
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert key in saved and saved[key].abs().max() > 0

    # interrupted run: same schedule (max_steps=12), killed right after the step-6 checkpoint is written
    class StopAfterSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == save_at:
                control.should_training_stop = True

    first = make(tmp_path / "resumed")
    first.add_callback(StopAfterSave())
    first.train()
    assert first.state.global_step == save_at
    resumed = make(tmp_path / "resumed")  # a fresh model: biases zero until the checkpoint is loaded
    assert torch.equal(_biases(resumed.model), torch.zeros(3, 8))
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / f"checkpoint-{save_at}"))

    assert torch.equal(_biases(resumed.model), _biases(full.model))

    def losses(trainer):
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > save_at}

    assert losses(resumed) == losses(full) and len(losses(full)) == steps - save_at
    print(f"resume: losses steps {save_at + 1}-{steps} identical: {list(losses(full).values())}")
    # the MaxVio history continues across the restart
    callback = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, MoEBalancingCallback))
    assert [e["step"] for e in callback.balancer.history] == list(range(1, steps + 1))
    with open(tmp_path / "full" / f"checkpoint-{save_at}" / STATE_FILE) as f:
        assert len(json.load(f)["history"]) == save_at


def test_freeze_router_and_gamma_zero(tmp_path):
    model = tiny_model(seed=0)
    routers = find_routers(model)
    weights_before = [info.router.weight.detach().clone() for info in routers]
    other_before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    callback = MoEBalancingCallback(gamma=0.0, freeze_router=True, plots=False)
    data = token_dataset(3 * BATCH)
    trainer = Trainer(model=model, args=_args(tmp_path, 3), train_dataset=data, callbacks=[callback])
    trainer.train()
    for info, before in zip(routers, weights_before):
        assert not info.router.weight.requires_grad
        assert torch.equal(info.router.weight, before)
    assert torch.equal(_biases(model), torch.zeros(3, 8))
    assert not torch.equal(model.model.layers[1].mlp.experts.gate_up_proj, other_before)  # the rest trains


def test_add_balancing_callback_runs_before_reporting_callbacks(tmp_path):
    model = tiny_model(seed=0)
    trainer = Trainer(model=model, args=_args(tmp_path, 2, logging_steps=1), train_dataset=token_dataset(2 * BATCH))
    seen = []

    class Reporter(TrainerCallback):  # added before ours, like the reporting integrations
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer.add_callback(Reporter())
    callback = add_balancing_callback(trainer, gamma=0.01, plots=False)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("MoEBalancingCallback") < names.index("Reporter")
    trainer.train()
    assert any("moe/maxvio_step" in logs for logs in seen)
    assert callback.balancer.history


def test_plots_written_with_labelled_axes(tmp_path):
    trainer, callback = _train_skewed(tmp_path, 0.02, steps=10)
    for name in ("moe_expert_load.png", "moe_maxvio.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 5000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = callback.balancer.layer_labels
    assert labels == ["layer 1", "layer 2", "layer 3 (MTP)"]
    load = torch.tensor([[10.0, 0, 2, 4, 4, 4, 4, 4], [4.0] * 8, [0.0, 8, 8, 0, 4, 4, 4, 4]])
    fig = expert_load_heatmap_figure(load, labels, "t")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "MoE layer"
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    image = ax.get_images()[0].get_array()
    assert image.shape == (3, 8)  # one row per MoE layer, one column per expert
    assert image[0, 0] == pytest.approx(10 / 4) and image[1].tolist() == [1.0] * 8
    fig2 = maxvio_figure(callback.balancer.history, labels)
    ax2 = fig2.axes[0]
    assert ax2.get_xlabel() == "optimizer step" and "MaxVio" in ax2.get_ylabel()
    assert len(ax2.get_lines()) == len(labels) + 2  # per layer + mean (step) + mean (batch)


def test_works_under_trl_sft_trainer(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from deepseek_v3.tokenizer import byte_level_tokenizer

    texts = [f"question {i}: what is {i} plus {3 * i}? answer " + str(4 * i) * (i % 5 + 1) for i in range(8)]
    callback = MoEBalancingCallback(gamma=0.01, plots=False)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", max_length=64,
    )
    model = tiny_model(seed=0)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=byte_level_tokenizer(), callbacks=[callback],
    )
    real_tokens = []  # per forward: tokens the attention mask marks as real
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: real_tokens.append(int(kwargs["attention_mask"].sum())), with_kwargs=True
    )
    trainer.train()
    logged = [e for e in trainer.state.log_history if "moe/maxvio_step" in e]
    assert len(logged) == 2 and len(callback.balancer.history) == 2
    assert _biases(model)[:2].abs().sum() > 0  # main MoE layers balanced
    # padding is masked out of the counts: 2 selections per real token (activation checkpointing is on in SFTConfig)
    assert len(real_tokens) == 2 and real_tokens[1] < 4 * 64
    assert callback.balancer.last_load[:2].sum(dim=1).tolist() == [2 * real_tokens[1]] * 2


@pytest.mark.slow
def test_callback_under_ddp_two_gloo_processes(tmp_path):
    """torchrun, 2 CPU processes: identical biases on both ranks, updated from the summed (all-reduced) loads."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "_ddp_trainer_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["wrapped"] == "DistributedDataParallel"
    assert torch.equal(r0["biases"], r1["biases"]) and r0["biases"].abs().sum() > 0
    assert len(r0["global"]) == 4
    for step in range(4):
        assert not torch.equal(r0["local"][step], r1["local"][step])  # each rank routed its own data
        torch.testing.assert_close(r0["global"][step], r0["local"][step] + r1["local"][step])
        torch.testing.assert_close(r1["global"][step], r0["global"][step])


def test_history_rebuilt_from_logs_when_checkpoint_has_no_state_file():
    callback = MoEBalancingCallback(gamma=0.01)
    callback.balancer.layer_labels = ["layer 1", "layer 2 (MTP)"]
    logs = [
        {"loss": 1.0, "step": 1, "moe/layer_1/maxvio_step": 0.5, "moe/layer_2/maxvio_step": 0.7,
         "moe/layer_1/maxvio_batch": 0.6, "moe/layer_2/maxvio_batch": 0.8},
        {"loss": 0.9, "step": 2},
    ]
    assert callback._history_from_logs(logs) == [{"step": 1, "maxvio_step": [0.5, 0.7], "maxvio_batch": [0.6, 0.8]}]


def test_works_under_trl_grpo_trainer_and_skips_generation_forwards(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from deepseek_v3.tokenizer import byte_level_tokenizer

    callback = MoEBalancingCallback(gamma=0.01, plots=False)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=8, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    )
    model = tiny_model(seed=0)
    trainer = trl.GRPOTrainer(
        model=model, args=args, processing_class=byte_level_tokenizer(), callbacks=[callback],
        train_dataset=datasets.Dataset.from_dict({"prompt": [f"count to {i}:" for i in range(8)]}),
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
    )
    forwards = []  # (model in train mode, autograd on, real tokens)
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: forwards.append(
            (mod.training, torch.is_grad_enabled(), kwargs.get("attention_mask"), kwargs.get("input_ids"))
        ),
        with_kwargs=True,
    )
    trainer.train()
    generation = [f for f in forwards if f[0] and not f[1]]
    trained = [f for f in forwards if f[1]]
    assert generation and len(trained) == 2  # TRL generates with the model in train mode, without autograd
    assert len(callback.balancer.history) == 2
    # only the trained tokens count: 2 selections per real token of the last step's training forward
    mask, ids = trained[-1][2], trained[-1][3]
    real_tokens = int(mask.sum()) if mask is not None else ids.numel()
    assert callback.balancer.last_load[:2].sum(dim=1).tolist() == [2 * real_tokens] * 2
    assert [e for e in trainer.state.log_history if "moe/maxvio_step" in e]
