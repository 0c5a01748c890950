"""PNG plots: the expert load (a heatmap of MoE layers x experts, MaxVio over optimizer steps) and the demo's
training figures (main / MTP loss curves, GRPO reward curve, held-out accuracy per phase).

matplotlib is imported lazily with the non-interactive Agg backend (install with `pip install deepseek-v3-hf[train]`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is in the [train] extra
        raise ImportError("Expert-load plots need matplotlib: pip install 'deepseek-v3-hf[train]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_expert_load_heatmap(
    load: torch.Tensor, layer_labels: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> str:
    """Save `expert_load_heatmap_figure` as a PNG; returns the path written."""
    return _save(expert_load_heatmap_figure(load, layer_labels, title), path)


def plot_maxvio_curve(
    history: Sequence[dict], layer_labels: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> str:
    """Save `maxvio_figure` as a PNG; returns the path written."""
    return _save(maxvio_figure(history, layer_labels, title), path)


def _save(fig, path) -> str:
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return str(path)


def expert_load_heatmap_figure(load: torch.Tensor, layer_labels: Sequence[str], title: str | None = None):
    """Heatmap of `load` [num_moe_layers, E] (token counts), one row per MoE layer, each row divided by its mean so
    1.0 is a perfectly balanced expert."""
    plt = _pyplot()
    load = torch.as_tensor(load).float().cpu()
    if load.dim() != 2 or load.shape[0] != len(layer_labels):
        raise ValueError(f"load has shape {tuple(load.shape)}; expected [{len(layer_labels)} layers, num_experts]")
    mean = load.mean(dim=-1, keepdim=True)
    relative = torch.where(mean > 0, load / mean.clamp_min(1e-12), torch.zeros_like(load)).numpy()
    num_layers, num_experts = relative.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * num_experts + 2.5), max(2.5, 0.35 * num_layers + 1.5)))
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(num_layers), labels=list(layer_labels))
    if num_experts <= 64:
        ax.set_xticks(range(num_experts))
    fig.colorbar(image, ax=ax, label="tokens / mean tokens per expert")
    ax.set_title(title or "Expert load")
    fig.tight_layout()
    return fig


def maxvio_figure(history: Sequence[dict], layer_labels: Sequence[str], title: str | None = None):
    """MaxVio of every MoE layer (and their mean) over optimizer steps, from `ExpertLoadBalancer.history`
    entries {"step", "maxvio_step": [L], "maxvio_batch": [L]}."""
    plt = _pyplot()
    if not history:
        raise ValueError("history is empty: no optimizer step has been recorded yet")
    steps = [entry["step"] for entry in history]
    step_vio = torch.tensor([entry["maxvio_step"] for entry in history], dtype=torch.float32)  # [S, L]
    batch_vio = torch.tensor([entry.get("maxvio_batch", [math.nan] * step_vio.shape[1]) for entry in history])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, label in enumerate(layer_labels):
        ax.plot(steps, step_vio[:, i].numpy(), linewidth=1.0, alpha=0.7, label=label)
    mean_step = torch.nanmean(step_vio, dim=1).numpy()
    ax.plot(steps, mean_step, color="black", linewidth=2.0, label="mean over layers (step)")
    if not torch.isnan(batch_vio).all():
        ax.plot(steps, torch.nanmean(batch_vio.float(), dim=1).numpy(), color="black", linestyle="--",
                linewidth=1.5, label="mean over layers (batch)")
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("MaxVio (max load / mean load - 1)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(layer_labels) > 6 else 1)
    ax.set_title(title or "Expert load violation per MoE layer")
    fig.tight_layout()
    return fig


def save_balancing_plots(balancer, output_dir: str | os.PathLike, prefix: str = "moe") -> list[str]:
    """Write `{prefix}_expert_load.png` (counts summed since the previous plot) and `{prefix}_maxvio.png` (the whole
    history) for an `ExpertLoadBalancer` into `output_dir`; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    load, start = balancer.take_window_load()
    if load is not None:
        last = balancer.history[-1]["step"] if balancer.history else start
        title = f"Expert load, optimizer steps {start}-{last}"
        path = os.path.join(output_dir, f"{prefix}_expert_load.png")
        paths.append(plot_expert_load_heatmap(load, balancer.layer_labels, path, title))
    if balancer.history:
        path = os.path.join(output_dir, f"{prefix}_maxvio.png")
        paths.append(plot_maxvio_curve(balancer.history, balancer.layer_labels, path))
    return paths


def save_figure(fig, path: str | os.PathLike) -> str:
    """Save any figure of this module as a PNG and close it; returns the path written."""
    return _save(fig, path)


def loss_curves_figure(phases: dict[str, dict[str, Sequence[Sequence[float]]]]):
    """Main (next-token) and MTP loss over the global optimizer step, one colour per phase. `phases` maps a phase
    name to its curves {"main_loss": [[step, value], ...], "mtp_loss": [...]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (phase, curves) in enumerate(phases.items()):
        for key, style, label in (("main_loss", "-", "main (next token)"), ("mtp_loss", "--", "MTP (token after next)")):
            points = curves.get(key) or []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, linestyle=style, color=colours[i % len(colours)], label=f"{phase}: {label}")
    ax.set_xlabel("optimizer step (all phases)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Training loss: main head and MTP module")
    fig.tight_layout()
    return fig


def reward_curve_figure(curves: dict[str, Sequence[Sequence[float]]]):
    """GRPO rewards per step: total, and each rule reward (`accuracy_reward`, `format_reward`) when logged."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("reward", "total reward"), ("accuracy_reward", "accuracy (math-verify)"),
                       ("format_reward", "format (<think>)")):
        points = curves.get(key) or []
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step (all phases)")
    ax.set_ylabel("mean reward of the sampled completions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("GRPO reward")
    fig.tight_layout()
    return fig


def accuracy_figure(accuracy: dict[str, dict[str, float]]):
    """Grouped bars: held-out greedy accuracy and sampled pass@1 after each phase."""
    plt = _pyplot()
    phases = list(accuracy)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.38
    for j, (key, label) in enumerate((("greedy", "greedy accuracy"), ("pass@1_sampled", "pass@1 (sampled)"))):
        values = [accuracy[p][key] for p in phases]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(phases))], values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize="small")
    ax.set_xticks(range(len(phases)), labels=["before" if p == "init" else f"after {p}" for p in phases])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize="small", loc="upper left")
    ax.set_title("Held-out accuracy per phase")
    fig.tight_layout()
    return fig


__all__ = [
    "accuracy_figure",
    "loss_curves_figure",
    "reward_curve_figure",
    "save_figure",
    "expert_load_heatmap_figure",
    "maxvio_figure",
    "plot_expert_load_heatmap",
    "plot_maxvio_curve",
    "save_balancing_plots",
]
