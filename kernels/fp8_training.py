"""FP8 training switch: convert a model's eligible layers to block-scaled FP8, DeepSeek-V3 style.

One switch, for every Accelerate-launched run::

    from deepseek_v3.kernels.fp8_training import enable_fp8
    enable_fp8(model)                     # before or after optimizer creation / accelerator.prepare / Trainer(...)

or, when a trainer builds the model itself (HF ``Trainer``, TRL ``SFTTrainer``/``GRPOTrainer``/... from a model id)::

    trainer = SFTTrainer(..., callbacks=[FP8TrainingCallback()])

Conversion is *in place*: each eligible ``nn.Linear`` has its class switched to :class:`FP8Linear`, each routed
experts module (3-D ``gate_up_proj`` / ``down_proj``) to an FP8 subclass of its own class. No Parameter is
created, replaced or re-registered, so optimizer param groups, DDP/FSDP gradient hooks, gradient accumulation,
``state_dict`` keys/dtypes and checkpoint save/resume are all unchanged -- only the matmuls change.

Skipped by :func:`default_fp8_filter` (kept in BF16/FP32 as in the paper): the embeddings, the output head
(``lm_head``, MTP ``shared_head.head``), the MTP projection ``eh_proj``, the MoE router ``mlp.gate`` (also not an
``nn.Linear``), norms (not ``nn.Linear``) and attention's core (softmax/score matmuls are not ``nn.Linear``).
Layers whose dimensions are not multiples of 128 are converted too: the kernels treat partial tiles as
zero-padded, so the small test configs exercise the same code path as the full model.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8_linear import FP8Linear, fp8_grouped_linear

FilterFn = Callable[[str, nn.Module], bool]

# module-name patterns that stay in high precision (matched on the name with wrapper prefixes removed)
HIGH_PRECISION_PATTERNS = (
    r"(^|\.)embed_tokens$",
    r"(^|\.)lm_head$",
    r"(^|\.)shared_head(\.|$)",
    r"(^|\.)eh_proj$",
    r"(^|\.)gate$",  # MoE router (`mlp.gate`); `gate_proj` is not matched
)
_WRAPPER_PREFIX = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.|$)")


def _clean_name(name: str) -> str:
    return _WRAPPER_PREFIX.sub("", name).lstrip(".")


def is_experts_module(module: nn.Module) -> bool:
    """Routed experts in transformers' fused layout: 3-D ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def default_fp8_filter(name: str, module: nn.Module) -> bool:
    """True when ``module`` (named ``name`` in the model) should compute in FP8."""
    name = _clean_name(name)
    if any(re.search(p, name) for p in HIGH_PRECISION_PATTERNS):
        return False
    return type(module) is nn.Linear or is_experts_module(module)


class FP8ExpertsMixin:
    """FP8 forward for a routed-experts module (mixed in front of the model's own experts class).

    Same contract as ``DeepseekV3Experts.forward``: ``hidden_states [T, H]``, ``topk_indices [T, K]``,
    ``topk_weights [T, K]`` -> ``[T, H]``; tokens are sorted by expert and both expert GEMMs run as grouped FP8
    GEMMs; SiLU-gating, routing weights and the scatter-add stay in high precision."""

    fp8_backend: str | None = None

    def forward(self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor):
        num_experts = self.gate_up_proj.shape[0]
        top_k = topk_indices.shape[1]
        flat_experts = topk_indices.flatten()
        order = flat_experts.argsort(stable=True)
        token_idx = order // top_k
        routed = hidden_states[token_idx]
        offsets = torch.bincount(flat_experts, minlength=num_experts).cumsum(0).to(torch.int32)
        gate, up = fp8_grouped_linear(routed, self.gate_up_proj, offsets, backend=self.fp8_backend).chunk(2, dim=-1)
        act = getattr(self, "act_fn", None) or F.silu
        expert_out = fp8_grouped_linear(act(gate) * up, self.down_proj, offsets, backend=self.fp8_backend)
        expert_out = expert_out * topk_weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add(0, token_idx, expert_out.to(out.dtype))


_FP8_EXPERT_CLASSES: dict[type, type] = {}


def _fp8_experts_class(cls: type) -> type:
    if issubclass(cls, FP8ExpertsMixin):
        return cls
    if cls not in _FP8_EXPERT_CLASSES:
        new = type(f"FP8{cls.__name__}", (FP8ExpertsMixin, cls), {"__module__": __name__, "_fp8_base_class": cls})
        globals()[new.__name__] = new  # picklable by qualified name
        _FP8_EXPERT_CLASSES[cls] = new
    return _FP8_EXPERT_CLASSES[cls]


def enable_fp8(
    model: nn.Module,
    filter_fn: FilterFn | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Switch ``model``'s eligible layers to FP8 compute, in place (idempotent); returns ``model``.

    ``filter_fn(name, module) -> bool`` replaces :func:`default_fp8_filter` (it is only asked about ``nn.Linear``
    and experts modules). ``backend``: ``"triton"``, ``"torch"`` or ``None`` (auto per device).
    Works on wrapped models too (DDP, FSDP, ``torch.compile``): wrapper prefixes are stripped from the names.
    """
    if backend not in (None, "auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r}: use 'triton', 'torch' or None (auto)")
    filter_fn = filter_fn or default_fp8_filter
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, (FP8Linear, FP8ExpertsMixin)):
            module.fp8_backend = backend
            converted.append(name)
            continue
        if type(module) is nn.Linear or is_experts_module(module):
            if not filter_fn(name, module):
                continue
            if type(module) is nn.Linear:
                FP8Linear.from_linear(module, backend=backend)
            else:
                module.__class__ = _fp8_experts_class(type(module))
                module.fp8_backend = backend
            converted.append(name)
    model._fp8_modules = [_clean_name(n) for n in converted]
    return model


def disable_fp8(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fp8` in place."""
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.to_linear()
        elif isinstance(module, FP8ExpertsMixin):
            module.__class__ = module._fp8_base_class
            module.__dict__.pop("fp8_backend", None)
    if hasattr(model, "_fp8_modules"):
        del model._fp8_modules
    return model


def fp8_module_names(model: nn.Module) -> list[str]:
    """Names of the modules currently computing in FP8."""
    return [_clean_name(n) for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8ExpertsMixin))]


try:
    from transformers import TrainerCallback
except Exception:  # pragma: no cover - transformers is a core dependency
    TrainerCallback = object


class FP8TrainingCallback(TrainerCallback):
    """``Trainer``/TRL callback that calls :func:`enable_fp8` on the trainer's model.

    It converts at the end of ``Trainer.__init__`` and again (idempotently) at ``on_train_begin``, which covers
    trainers that build or wrap the model themselves. Parameters are untouched, so this is safe after the optimizer
    and ``accelerator.prepare`` (DDP/FSDP) exist.
    """

    def __init__(self, filter_fn: FilterFn | None = None, backend: str | None = None):
        self.filter_fn = filter_fn
        self.backend = backend

    def _convert(self, model):
        if model is not None:
            enable_fp8(model, filter_fn=self.filter_fn, backend=self.backend)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._convert(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._convert(model)
