"""Auxiliary-loss-free load balancing for DeepSeek-V3 MoE layers (paper section 2.1.2), plus expert-load metrics.

The router (`deepseek_v3.moe.DeepseekV3TopkRouter`, checkpoint name `mlp.gate`) adds a per-expert bias b_i
(`e_score_correction_bias`, fp32 persistent buffer) to the affinities for top-k *selection* only, and counts the
tokens routed to each expert during training forwards (`tokens_per_expert`, fp32 non-persistent buffer). This
module turns those counts into bias updates, once per optimizer step:

1. read every router's `tokens_per_expert` (summed over all gradient-accumulation micro-batches since the last
   update) and reset it;
2. all-reduce (sum) the counts over the data-parallel ranks, so every rank sees the same global load;
3. update the bias in fp32, outside autograd, identically on every rank:

   - ``update="sign"`` (the paper): ``b_i += gamma * sign(mean_load - load_i)``: an overloaded expert is lowered by
     gamma, an underloaded one raised by gamma (an expert exactly at the mean is left alone);
   - ``update="proportional"``: ``b_i += gamma * (mean_load - load_i) / mean_load``: the step is proportional to the
     relative load violation (experts at twice the mean load are lowered by gamma, dead experts raised by gamma).

Layers that received no token in the step (e.g. the MTP layer when the MTP loss is off) are left unchanged.
Because the biases are persistent buffers they are saved with the model (`mlp.gate.e_score_correction_bias`) and
restored on resume.

Two entry points share this code: `ExpertLoadBalancer` (stateful: micro-batch MaxVio, MaxVio history for plots,
sequence-wise balance loss reporting) used by `deepseek_v3.trainers.callbacks.MoEBalancingCallback`, and the plain
function `update_expert_bias(model, gamma, accelerator=None)` for custom Accelerate loops.

Metrics, per MoE layer, from the token counts c_1..c_E of the layer:

- MaxVio = max_i c_i / mean_i c_i - 1 (paper eq. in section 4.5.2), for the *step* (global counts: all
  micro-batches, all ranks) and for the *batch* (each rank's micro-batch, averaged over micro-batches and ranks);
- load entropy = H(c / sum c) / log E, in [0, 1] (1 = perfectly uniform);
- dead-expert fraction = fraction of experts that received no token in the step;
- bias range = max_i b_i - min_i b_i after the update.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from deepseek_v3.moe import DeepseekV3TopkRouter

UPDATE_RULES = ("sign", "proportional")


@dataclass
class BalancingConfig:
    """Settings of the auxiliary-loss-free balancing and its metrics.

    Args:
        gamma: bias update speed (paper: 0.001 for most of pre-training, 0 at the end). 0 turns balancing off (the
            bias stays as loaded, e.g. for inference-style fine-tunes); loads and metrics are still tracked.
        update: "sign" (the paper's rule) or "proportional" (step proportional to the relative load violation).
        freeze_router: set `requires_grad=False` on every router weight (`mlp.gate.weight`), so routing only
            changes through the bias (or not at all with gamma=0).
        update_until_step: if set, gamma is treated as 0 from this optimizer step on (the paper's final phase).
        log_every: force a trainer log every this many optimizer steps (None: use the trainer's `logging_steps`).
        mask_padding: count only the tokens the forward's 2-D `attention_mask` marks as real (padding is routed
            too, but its load says nothing about the data and would skew the biases).
        count_no_grad_forwards: also count forwards run in training mode with autograd off (generation or old-policy
            log-probs in RL trainers, ...): by default only forwards that build a graph, i.e. the ones trained on.
        log_per_layer: also log the per-layer metrics (`moe/layer_{i}/...`), not only the means over layers.
        plot_every: write the PNG plots every this many optimizer steps (None: at the end of training only).
        plots: write the plots at all (into the trainer's output_dir).
        metric_prefix: prefix of the logged metric names.
    """

    gamma: float = 0.001
    update: str = "sign"
    freeze_router: bool = False
    update_until_step: int | None = None
    log_every: int | None = None
    mask_padding: bool = True
    count_no_grad_forwards: bool = False
    log_per_layer: bool = True
    plot_every: int | None = None
    plots: bool = True
    metric_prefix: str = "moe"

    def __post_init__(self):
        if not isinstance(self.gamma, (int, float)) or not math.isfinite(self.gamma) or self.gamma < 0:
            raise ValueError(
                f"BalancingConfig.gamma={self.gamma!r} must be a finite float >= 0 (0 turns balancing off)"
            )
        if self.update not in UPDATE_RULES:
            raise ValueError(f"BalancingConfig.update={self.update!r} must be one of {UPDATE_RULES}")
        for name in ("update_until_step", "log_every", "plot_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"BalancingConfig.{name}={value!r} must be a positive int or None")

    def gamma_at(self, step: int | None) -> float:
        """gamma for the update at optimizer step `step` (1-based, the step that has just finished)."""
        if self.update_until_step is not None and step is not None and step > self.update_until_step:
            return 0.0
        return float(self.gamma)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Finding the routers
# ----------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP / accelerate / torch.compile wrappers (`.module`, `._orig_mod`)."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class RouterInfo:
    name: str  # module name in the unwrapped model, e.g. "model.layers.1.mlp.gate"
    layer_idx: int  # index in model.model.layers (MTP layers come after the main layers)
    is_mtp: bool
    router: DeepseekV3TopkRouter

    @property
    def label(self) -> str:
        return f"layer {self.layer_idx} (MTP)" if self.is_mtp else f"layer {self.layer_idx}"


def find_routers(model: nn.Module) -> list[RouterInfo]:
    """Every `DeepseekV3TopkRouter` of `model` (wrappers removed), in layer order: main layers, then MTP layers."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    num_main = getattr(config, "num_hidden_layers", None)
    routers = []
    for position, (name, module) in enumerate(inner.named_modules()):
        if not isinstance(module, DeepseekV3TopkRouter) or ".original_module" in name:
            continue  # (peft `modules_to_save` keeps the untrained router as `original_module`; its copy runs)
        match = _LAYER_RE.search(name)
        layer_idx = int(match.group(1)) if match else position
        is_mtp = num_main is not None and layer_idx >= num_main
        routers.append(RouterInfo(name, layer_idx, is_mtp, module))
    if not routers:
        raise ValueError(
            f"No DeepseekV3TopkRouter found in {type(inner).__name__}: expert balancing needs a deepseek_v3 MoE model "
            "(e.g. `deepseek_v3.DeepseekV3ForCausalLM`), whose routers track `tokens_per_expert`."
        )
    return routers


def freeze_router(model: nn.Module, frozen: bool = True) -> int:
    """Set `requires_grad=not frozen` on every router weight; returns the number of routers touched.

    Call this before the optimizer / DDP wrapper is created (the callback does it in `on_init_end`)."""
    routers = find_routers(model)
    for info in routers:
        info.router.weight.requires_grad_(not frozen)
    return len(routers)


def reset_expert_load(model: nn.Module) -> None:
    """Zero every router's `tokens_per_expert`."""
    for info in find_routers(model):
        info.router.tokens_per_expert.zero_()


def collect_expert_load(model: nn.Module, reset: bool = False) -> torch.Tensor:
    """This rank's routed-token counts since the last reset, [num_moe_layers, E] fp32 (a copy)."""
    routers = find_routers(model)
    load = torch.stack([info.router.tokens_per_expert.detach().float().clone() for info in routers])
    if reset:
        for info in routers:
            info.router.tokens_per_expert.zero_()
    return load


def all_reduce_sum(tensor: torch.Tensor, accelerator=None, group=None) -> torch.Tensor:
    """Sum `tensor` over the data-parallel ranks (in place when torch.distributed is used); no-op on one process."""
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        return accelerator.reduce(tensor, reduction="sum")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# The update rule and the metrics
# ----------------------------------------------------------------------------------------------------------------


def compute_bias_update(load: torch.Tensor, gamma: float, update: str = "sign") -> torch.Tensor:
    """Bias increments for global token counts `load` [..., E] (fp32); rows with no token get 0.

    sign:         delta_i = gamma * sign(mean - load_i)
    proportional: delta_i = gamma * (mean - load_i) / mean
    """
    if update not in UPDATE_RULES:
        raise ValueError(f"update={update!r} must be one of {UPDATE_RULES}")
    if gamma < 0:
        raise ValueError(f"gamma={gamma!r} must be >= 0")
    load = load.float()
    mean = load.mean(dim=-1, keepdim=True)
    error = mean - load
    if update == "sign":
        delta = torch.sign(error)
    else:
        delta = torch.where(mean > 0, error / mean.clamp_min(1e-12), torch.zeros_like(error))
    return gamma * delta


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max load / mean load - 1 per row of `load` [..., E]; NaN for rows with no token."""
    load = load.float()
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.max(dim=-1).values / mean.clamp_min(1e-12) - 1, torch.full_like(mean, math.nan))


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Normalized entropy of the load distribution per row, in [0, 1]; NaN for rows with no token."""
    load = load.float()
    total = load.sum(dim=-1, keepdim=True)
    p = load / total.clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1) / math.log(load.shape[-1])
    return torch.where(total.squeeze(-1) > 0, entropy, torch.full_like(entropy, math.nan))


def dead_expert_fraction(load: torch.Tensor) -> torch.Tensor:
    """Fraction of experts with no token per row; NaN for rows with no token at all."""
    load = load.float()
    frac = (load == 0).float().mean(dim=-1)
    return torch.where(load.sum(dim=-1) > 0, frac, torch.full_like(frac, math.nan))


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else math.nan


# ----------------------------------------------------------------------------------------------------------------
# The stateful balancer shared by the callback and custom loops
# ----------------------------------------------------------------------------------------------------------------


class ExpertLoadBalancer:
    """Applies the bias update once per optimizer step and keeps the metrics history.

    Usage in a custom loop::

        balancer = ExpertLoadBalancer(BalancingConfig(gamma=0.001))
        balancer.start(model)                      # resets the counters, hooks the balance-loss reporting
        for step, batch in enumerate(loader, 1):
            for micro in split(batch):
                loss = model(**micro).loss / n_micro
                accelerator.backward(loss)
                balancer.micro_batch_end(model)    # optional: per-micro-batch MaxVio
            optimizer.step(); optimizer.zero_grad()
            metrics = balancer.step(model, accelerator=accelerator, step=step)
    """

    def __init__(self, config: BalancingConfig | None = None):
        self.config = config or BalancingConfig()
        self.history: list[dict] = []  # per step: {"step", "maxvio_step": [L], "maxvio_batch": [L]}
        self.layer_labels: list[str] = []
        self.window_load: torch.Tensor | None = None  # global counts summed since the last plot, [L, E]
        self.window_start_step: int | None = None
        self.last_load: torch.Tensor | None = None  # global counts of the last step, [L, E]
        self._snapshot: torch.Tensor | None = None
        self._batch_maxvio_sum: torch.Tensor | None = None
        self._batch_count = 0
        self._aux_sum = torch.zeros(())
        self._aux_count = 0
        self._hooks = []
        self._hooked_model = None
        self._routers: list[RouterInfo] = []
        self._num_updates = 0

    # -- setup ---------------------------------------------------------------------------------------------------

    def start(self, model: nn.Module) -> None:
        """Reset the routers' counters (tokens counted before training must not enter the first update), check the
        config against the model and hook the reporting of the sequence-wise balance loss."""
        routers = find_routers(model)
        inner = unwrap_model(model)
        topk_method = getattr(getattr(inner, "config", None), "topk_method", "noaux_tc")
        if self.config.gamma > 0 and topk_method != "noaux_tc":
            raise ValueError(
                f"BalancingConfig.gamma={self.config.gamma} but the model uses topk_method={topk_method!r}, which "
                "ignores e_score_correction_bias: set gamma=0 (metrics only) or use topk_method='noaux_tc'."
            )
        self.layer_labels = [info.label for info in routers]
        for info in routers:
            info.router.tokens_per_expert.zero_()
        self._snapshot = None
        self._batch_maxvio_sum = None
        self._batch_count = 0
        self._aux_sum = torch.zeros(())
        self._aux_count = 0
        if self._hooked_model is not inner:
            self.stop()
            self._hooks = [inner.register_forward_hook(self._after_forward)]
            self._hooked_model = inner
        self._routers = routers
        for info in routers:  # what the model counts (see DeepseekV3TopkRouter.record_load)
            info.router.count_padding = not self.config.mask_padding
            info.router.count_no_grad_forwards = self.config.count_no_grad_forwards

    def stop(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._hooked_model = None
        for info in self._routers:
            info.router.count_padding = False
            info.router.count_no_grad_forwards = False

    def _after_forward(self, module, args, output) -> None:
        aux = getattr(output, "aux_loss", None)
        if module.training and aux is not None:
            self._aux_sum = self._aux_sum + aux.detach().float().cpu()
            self._aux_count += 1

    # -- per micro-batch / per step --------------------------------------------------------------------------------

    def micro_batch_end(self, model: nn.Module) -> None:
        """Record the MaxVio of the micro-batch(es) forwarded since the previous call (this rank's tokens)."""
        current = collect_expert_load(model)
        previous = self._snapshot if self._snapshot is not None else torch.zeros_like(current)
        batch = current - previous
        self._snapshot = current
        if batch.sum() == 0:
            return
        maxvio = torch.nan_to_num(max_violation(batch), nan=0.0)
        self._batch_maxvio_sum = maxvio if self._batch_maxvio_sum is None else self._batch_maxvio_sum + maxvio
        self._batch_count += 1

    def step(self, model: nn.Module, accelerator=None, group=None, step: int | None = None) -> dict[str, float]:
        """Once per optimizer step, on every rank: all-reduce the counts, update the biases, return the metrics."""
        if self._snapshot is None or collect_expert_load(model).sum() > self._snapshot.sum():
            self.micro_batch_end(model)  # the last micro-batch of the step
        routers = find_routers(model)
        local = collect_expert_load(model, reset=True)
        num_layers, num_experts = local.shape
        if self._batch_maxvio_sum is not None:
            batch_maxvio = self._batch_maxvio_sum / self._batch_count  # this rank's mean over micro-batches
        else:
            batch_maxvio = torch.zeros(num_layers)
        device = routers[0].router.tokens_per_expert.device
        extras = [float(self._batch_count > 0), float(self._aux_sum), float(self._aux_count)]
        packed = torch.cat([local.flatten(), batch_maxvio.float(), torch.tensor(extras)]).to(device)
        packed = all_reduce_sum(packed, accelerator=accelerator, group=group).cpu()
        n = num_layers * num_experts
        load = packed[:n].view(num_layers, num_experts)
        ranks_with_batches = packed[n + num_layers]
        batch_maxvio = packed[n : n + num_layers] / ranks_with_batches.clamp_min(1)  # mean over ranks
        aux_sum, aux_count = packed[-2], packed[-1]

        gamma = self.config.gamma_at(step if step is not None else self._num_updates + 1)
        delta = compute_bias_update(load, gamma, self.config.update)
        with torch.no_grad():
            for info, row in zip(routers, delta):
                bias = info.router.e_score_correction_bias
                bias.copy_((bias.float() + row.to(bias.device)).to(bias.dtype))
        self._num_updates += 1
        biases = torch.stack([info.router.e_score_correction_bias.detach().float().cpu() for info in routers])

        step_maxvio = max_violation(load)
        active = load.sum(dim=-1) > 0
        batch_maxvio = torch.where(active, batch_maxvio, torch.full_like(batch_maxvio, math.nan))
        entropy = load_entropy(load)
        dead = dead_expert_fraction(load)
        bias_range = biases.max(dim=-1).values - biases.min(dim=-1).values

        step_id = step if step is not None else self._num_updates
        self.history.append(
            {"step": step_id, "maxvio_step": step_maxvio.tolist(), "maxvio_batch": batch_maxvio.tolist()}
        )
        self.last_load = load
        if self.window_load is None:
            self.window_load, self.window_start_step = load.clone(), step_id
        else:
            self.window_load += load
        self._snapshot = None
        self._batch_maxvio_sum = None
        self._batch_count = 0
        self._aux_sum = torch.zeros(())
        self._aux_count = 0

        p = self.config.metric_prefix
        metrics = {
            f"{p}/maxvio_step": _nanmean(step_maxvio),
            f"{p}/maxvio_batch": _nanmean(batch_maxvio),
            f"{p}/load_entropy": _nanmean(entropy),
            f"{p}/dead_expert_fraction": _nanmean(dead),
            f"{p}/bias_range": float(bias_range.max()),
            f"{p}/gamma": gamma,
        }
        if aux_count > 0:
            metrics[f"{p}/seq_balance_loss"] = float(aux_sum / aux_count)
        if self.config.log_per_layer:
            for info, mv_s, mv_b, ent, dd, br in zip(routers, step_maxvio, batch_maxvio, entropy, dead, bias_range):
                tag = f"{p}/layer_{info.layer_idx}"
                metrics[f"{tag}/maxvio_step"] = float(mv_s)
                metrics[f"{tag}/maxvio_batch"] = float(mv_b)
                metrics[f"{tag}/load_entropy"] = float(ent)
                metrics[f"{tag}/dead_expert_fraction"] = float(dd)
                metrics[f"{tag}/bias_range"] = float(br)
        return metrics

    # -- plots / checkpoint state ----------------------------------------------------------------------------------

    def take_window_load(self) -> tuple[torch.Tensor | None, int | None]:
        """Global counts summed since the previous call (for the heatmap) and the first step of that window."""
        load, start = self.window_load, self.window_start_step
        self.window_load, self.window_start_step = None, None
        return load, start

    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "layer_labels": self.layer_labels,
            "history": self.history,
            "num_updates": self._num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(entry) for entry in state.get("history", [])]
        self.layer_labels = list(state.get("layer_labels", self.layer_labels))
        self._num_updates = int(state.get("num_updates", len(self.history)))


def update_expert_bias(
    model: nn.Module,
    gamma: float = 0.001,
    update: str = "sign",
    accelerator=None,
    group=None,
    step: int | None = None,
) -> dict[str, float]:
    """One aux-loss-free balancing update for custom (Accelerate) loops; call once per optimizer step on every rank.

    Reads and resets every router's `tokens_per_expert` (so the counts of all gradient-accumulation micro-batches
    since the previous call are summed), all-reduces them over the data-parallel ranks (`accelerator` or
    torch.distributed, optionally within `group`), updates every `e_score_correction_bias` in fp32 and returns the
    step metrics (see the module docstring). Same code as `MoEBalancingCallback`; use `ExpertLoadBalancer` directly
    to also get per-micro-batch MaxVio, the MaxVio history and the balance-loss reporting."""
    balancer = ExpertLoadBalancer(BalancingConfig(gamma=gamma, update=update))
    return balancer.step(model, accelerator=accelerator, group=group, step=step)


__all__ = [
    "BalancingConfig",
    "ExpertLoadBalancer",
    "RouterInfo",
    "UPDATE_RULES",
    "all_reduce_sum",
    "collect_expert_load",
    "compute_bias_update",
    "dead_expert_fraction",
    "find_routers",
    "freeze_router",
    "load_entropy",
    "max_violation",
    "reset_expert_load",
    "unwrap_model",
    "update_expert_bias",
]
