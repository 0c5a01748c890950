"""`MoEBalancingCallback`: auxiliary-loss-free load balancing and expert-load metrics for transformers/TRL trainers.

Works with `transformers.Trainer` and everything built on it (TRL's `SFTTrainer`, `GRPOTrainer`, ...)::

    from deepseek_v3.trainers.balancing import BalancingConfig
    from deepseek_v3.trainers.callbacks import MoEBalancingCallback

    trainer = SFTTrainer(model=model, ..., callbacks=[MoEBalancingCallback(BalancingConfig(gamma=0.001))])

What it does (the code is `deepseek_v3.trainers.balancing.ExpertLoadBalancer`, shared with custom loops):

- `on_init_end`: freezes the router weights if `freeze_router=True` (before the optimizer / DDP wrapper exist);
- `on_train_begin`: resets every router's `tokens_per_expert`, hooks the sequence-wise balance-loss reporting,
  and on resume reloads the MaxVio history saved next to the checkpoint (`moe_balancing.json`);
- `on_substep_end`: records each micro-batch's MaxVio (gradient accumulation);
- `on_step_end` (once per optimizer step, after accumulation, on every rank): all-reduces the counts and updates
  `e_score_correction_bias`; the biases are model buffers, so checkpoints carry them;
- `on_log`: adds the metrics, averaged over the steps since the previous log, to the trainer's logs
  (`moe/maxvio_step`, `moe/maxvio_batch`, `moe/load_entropy`, `moe/dead_expert_fraction`, `moe/bias_range`,
  `moe/seq_balance_loss`, and per layer `moe/layer_{i}/...`);
- `on_train_end` (and every `plot_every` steps): writes `moe_expert_load.png` and `moe_maxvio.png` into
  `args.output_dir`.

Reporting integrations (TensorBoard, W&B, ...) only see metrics added by callbacks that run before them: pass the
callback through `callbacks=[...]` *and* call `add_balancing_callback(trainer, ...)` instead, which puts it first.
"""

from __future__ import annotations

import json
import math
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .balancing import BalancingConfig, ExpertLoadBalancer, find_routers, freeze_router, unwrap_model
from .plots import save_balancing_plots

STATE_FILE = "moe_balancing.json"


class MoEBalancingCallback(TrainerCallback):
    """Aux-loss-free expert balancing (bias update once per optimizer step) + expert-load metrics and plots.

    Args:
        config: a `BalancingConfig`; keyword arguments build one instead (`MoEBalancingCallback(gamma=0.01)`).
    """

    def __init__(self, config: BalancingConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError(f"Pass either a BalancingConfig or keyword arguments, not both (got {sorted(kwargs)})")
        self.config = config if config is not None else BalancingConfig(**kwargs)
        self.balancer = ExpertLoadBalancer(self.config)
        self._pending: list[dict[str, float]] = []

    # -- setup -------------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.config.freeze_router:
            freeze_router(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("MoEBalancingCallback needs the model: use it with a transformers Trainer")
        if self.config.freeze_router:
            routers = find_routers(model)
            if any(info.router.weight.requires_grad for info in routers):
                if unwrap_model(model) is not model:
                    raise ValueError(
                        "freeze_router=True but the model was wrapped before the router was frozen: pass the callback "
                        "to the Trainer constructor (callbacks=[...]) or call "
                        "deepseek_v3.trainers.balancing.freeze_router(model) before creating the Trainer"
                    )
                freeze_router(model)
        self.balancer.start(model)
        self._pending = []
        if state.global_step > 0:  # resumed: reload the history written next to the checkpoint
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    self.balancer.load_state_dict(json.load(f))
                self.balancer.history = [e for e in self.balancer.history if e["step"] <= state.global_step]
            else:  # checkpoint from another output_dir: fall back to the logged steps of the restored TrainerState
                self.balancer.history = self._history_from_logs(state.log_history)

    def _history_from_logs(self, log_history: list[dict]) -> list[dict]:
        p = self.config.metric_prefix
        layers = [int(label.split()[1]) for label in self.balancer.layer_labels]
        history = []
        for entry in log_history:
            keys = [f"{p}/layer_{i}/maxvio_step" for i in layers]
            if all(key in entry for key in keys):
                batch = [entry.get(f"{p}/layer_{i}/maxvio_batch", math.nan) for i in layers]
                history.append({"step": entry["step"], "maxvio_step": [entry[k] for k in keys], "maxvio_batch": batch})
        return history

    # -- per micro-batch / optimizer step -------------------------------------------------------------------------

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.balancer.micro_batch_end(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        metrics = self.balancer.step(model, step=state.global_step)
        self._pending.append(metrics)
        if self.config.log_every and state.global_step % self.config.log_every == 0:
            control.should_log = True
        if self.config.plots and self.config.plot_every and state.global_step % self.config.plot_every == 0:
            self._write_plots(args, state)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._pending:
            return
        averaged = {}
        for key in self._pending[-1]:
            if key.endswith("/bias_range") or key.endswith("/gamma"):
                averaged[key] = self._pending[-1][key]  # current value, not an average
                continue
            values = [m[key] for m in self._pending if key in m and not math.isnan(m[key])]
            averaged[key] = sum(values) / len(values) if values else math.nan
        self._pending = []
        logs.update(averaged)
        # Trainer.log appended a copy of `logs` to the history before calling us: keep the history complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(averaged)

    # -- checkpoints / plots ------------------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.balancer.state_dict(), f)

    def on_train_end(self, args, state, control, **kwargs):
        if self.config.plots:
            self._write_plots(args, state)
        self.balancer.stop()

    def _write_plots(self, args, state):
        if state.is_world_process_zero and args.output_dir:
            save_balancing_plots(self.balancer, args.output_dir, prefix=self.config.metric_prefix)
        else:
            self.balancer.take_window_load()


def add_balancing_callback(trainer, config: BalancingConfig | None = None, **kwargs) -> MoEBalancingCallback:
    """Add a `MoEBalancingCallback` to an existing trainer, right after transformers' `DefaultFlowCallback`, so the
    reporting integrations (TensorBoard, W&B, ...) that run after it see the MoE metrics; freezes the router now if
    asked (before `train()` creates the optimizer and the DDP wrapper). Returns the callback."""
    callback = MoEBalancingCallback(config, **kwargs)
    handler = trainer.callback_handler
    handler.remove_callback(MoEBalancingCallback)
    handler.callbacks.insert(min(1, len(handler.callbacks)), callback)
    if callback.config.freeze_router:
        freeze_router(trainer.model)
    return callback


class HeldOutMetricCallback(TrainerCallback):
    """Logs a held-out figure (`key`: `metric()`) through `trainer.log` at the start and the end of training, and
    every `every` optimizer steps in between; the history goes to `output_dir/filename` on the main process at the
    end (the reward model's held-out pairwise accuracy, the distillation student's held-out KL)."""

    def __init__(self, trainer, key: str, metric, filename: str, every: int | None = None, record: dict | None = None):
        self.trainer, self.key, self.metric, self.filename, self.every = trainer, key, metric, filename, every
        self.record = dict(record or {})
        self.history: list[dict] = []

    def _log(self, state) -> None:
        value = self.metric()
        self.trainer.log({self.key: value})
        self.history.append({"step": state.global_step, self.key.rsplit("/", 1)[-1]: value, **self.record})

    def on_train_begin(self, args, state, control, **kwargs):
        self._log(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self._log(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._log(state)
        if state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, self.filename), "w") as f:
                json.dump(self.history, f, indent=2)


__all__ = ["HeldOutMetricCallback", "MoEBalancingCallback", "add_balancing_callback", "STATE_FILE"]
