"""LoRA for the train scripts (`--use_peft true`), with peft's `get_peft_model` / `PeftModel.from_pretrained`.

Flags (TRL `ModelConfig` names): `use_peft`, `lora_r`, `lora_alpha`, `lora_dropout` (default 0: peft's adapters on
the fused routed experts require it), `lora_target_modules`, plus `lora_preset` and `load_in_fp8`. Presets (what gets an adapter):

- `attention`: the MLA projections `q_a_proj`, `q_b_proj` (or `q_proj` when `q_lora_rank` is null),
  `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`;
- `experts`: the routed experts through peft's `target_parameters` on the fused 3-D tensors
  (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), plus the shared experts and the dense MLPs
  (`gate_proj`, `up_proj`, `down_proj`) as ordinary LoRA modules;
- `all` (default): both.

With `load_in_fp8` every preset works: the routed experts stay e4m3 codes and their adapters attach to the
zero-storage `gate_up_proj` / `down_proj` slots of `fp8_base.FrozenFP8Experts` (same adapter keys as over BF16).

`lora_modules_to_save` (TRL's name) trains whole modules next to the adapters and saves them with it, e.g.
`lm_head` when the output distribution must change more than low-rank updates of a small model allow.

`lora_target_modules` replaces the preset's module list (leaf names such as `o_proj`; `experts` for the fused
routed experts; or `all-linear`: every `nn.Linear` of the decoder and MTP layers, plus the routed experts). The router (`mlp.gate`) never gets an adapter
and the MTP `eh_proj` only with `lora_target_eh_proj`. Targets are written to the adapter as full module names.

Non-LoRA state: the aux-loss-free balancing callback moves each router's `e_score_correction_bias` during the
run, so the routers are peft `modules_to_save` (weights frozen): the adapter file carries them and
`PeftModel.from_pretrained(base, output_dir)` restores them, i.e. base + adapter == the trained model.

Outputs: `output_dir` holds the adapter (peft format; `adapter_config.json` names the base), `output_dir/merged/`
the full checkpoint with the adapter merged (published tensor names; FP8 again when the base was FP8), and
`lora_targets.json` the wrapped modules. A base built from a shipped config name (`tiny`, `small`: random init) is
saved to `output_dir/base/` first, so the adapter has a base to load onto.

peft >= 0.22 is not required: transformers 5.24's `model.add_adapter` / `load_adapter` need it, so this module uses
`get_peft_model` and `PeftModel.from_pretrained` only (which work with peft 0.21).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

PRESETS = ("attention", "experts", "all")
ATTENTION_MODULES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")  # dense MLPs and shared experts (nn.Linear)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # fused routed experts (3-D parameters of `mlp.experts`)
ROUTER_MODULE = "mlp.gate"
NEVER_TARGETED = ("lm_head", "embed_tokens", "shared_head")
ALL_LINEAR = "all-linear"


@dataclass
class LoraArguments:
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)"})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "dropout on the LoRA input (must be 0 when the routed experts are targeted)"}
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module leaf names replacing the preset's modules, or all-linear; never the router"},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "modules trained in full and saved with the adapter (e.g. lm_head); the routers always are"},
    )
    lora_preset: str = field(default="all", metadata={"help": "attention, experts or all"})
    lora_target_eh_proj: bool = field(default=False, metadata={"help": "also adapt the MTP eh_proj"})
    load_in_fp8: bool = field(
        default=False,
        metadata={"help": "keep the frozen base weights in e4m3 + 128x128 weight_scale_inv (quantized on load, "
                          "or the FP8 checkpoint's own codes)"},
    )
    fp8_compute: str = field(default="auto", metadata={"help": "FP8 base compute: dequant, fp8 (block-wise FP8 "
                                                               "GEMM) or auto (fp8 on CUDA, dequant on CPU)"})


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def resolve_targets(model: nn.Module, args: LoraArguments) -> tuple[list[str], list[str]]:
    """(full module names for `target_modules`, parameter names for `target_parameters`) for `model`."""
    if args.lora_preset not in PRESETS:
        raise ValueError(f"lora_preset={args.lora_preset!r}: use one of {', '.join(PRESETS)}")
    wanted = args.lora_target_modules
    if isinstance(wanted, str):
        wanted = [wanted]
    routed = args.lora_preset in ("experts", "all")
    if wanted:
        if "gate" in wanted or ROUTER_MODULE in wanted:
            raise ValueError(f"lora_target_modules={wanted}: the router (mlp.gate) never gets an adapter")
        if ALL_LINEAR in wanted:
            leaves, routed = None, True
        else:  # `experts` (or `experts.gate_up_proj` / `experts.down_proj`) names the fused routed experts
            expert_names = {"experts"} | {f"experts.{p}" for p in EXPERT_PARAMETERS}
            leaves = set(wanted) - expert_names
            routed = bool(set(wanted) & expert_names)
    else:
        leaves = set()
        if args.lora_preset in ("attention", "all"):
            leaves |= set(ATTENTION_MODULES)
        if args.lora_preset in ("experts", "all"):
            leaves |= set(MLP_MODULES)
    modules = []
    for name in _linear_names(model):
        leaf = name.rsplit(".", 1)[-1]
        if any(part in NEVER_TARGETED for part in name.split(".")) or name.endswith("." + ROUTER_MODULE):
            continue
        if leaf == "eh_proj":
            if args.lora_target_eh_proj:
                modules.append(name)
            continue
        if leaves is None or leaf in leaves:
            modules.append(name)
    parameters = []
    if routed:
        for name, module in model.named_modules():
            # fused experts; over an FP8 base (`fp8_base.FrozenFP8Experts`) `gate_up_proj` / `down_proj` are the
            # zero-storage adapter-slot parameters over the e4m3 codes
            if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
                parameters += [f"{name}.{p}" for p in EXPERT_PARAMETERS]
    if wanted and leaves and not any(name.rsplit(".", 1)[-1] in leaves for name in modules):
        raise ValueError(f"lora_target_modules={wanted} matches no linear layer of {type(model).__name__}")
    if parameters and args.lora_dropout:
        raise ValueError(
            f"lora_dropout={args.lora_dropout}: peft's adapters on the fused routed experts (target_parameters) "
            "need lora_dropout=0; pass --lora_dropout 0 or --lora_preset attention"
        )
    if not modules and not parameters:
        raise ValueError(f"lora_preset={args.lora_preset!r} / lora_target_modules={wanted} selects nothing to adapt")
    return modules, parameters


def lora_config(model: nn.Module, args: LoraArguments):
    from peft import LoraConfig

    modules, parameters = resolve_targets(model, args)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        # the routers' e_score_correction_bias (moved by balancing) goes along, weights frozen
        modules_to_save=[ROUTER_MODULE] + [m for m in (args.lora_modules_to_save or []) if m != ROUTER_MODULE],
        task_type="CAUSAL_LM",
    )


def wrapped_modules(peft_model: nn.Module) -> dict[str, list[str]]:
    """What the adapter touches: `lora_modules` (LoRA on an nn.Linear), `lora_parameters` (peft
    `target_parameters`, i.e. the fused routed experts) and `saved_modules` (copied whole: the routers)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    prefix = "base_model.model."
    lora_modules, saved = [], []
    for name, module in peft_model.named_modules():
        name = name.removeprefix(prefix)
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), nn.Linear):
            lora_modules.append(name)
        elif isinstance(module, ModulesToSaveWrapper):
            saved.append(name)
    parameters = sorted(getattr(peft_model.base_model, "targeted_parameter_names", []) or [])
    return {"lora_modules": sorted(lora_modules), "lora_parameters": parameters, "saved_modules": sorted(saved)}


def save_base_if_untracked(model, tokenizer, output_dir: str) -> None:
    """A model built from a shipped config name has no checkpoint: save it to `output_dir/base` and point the model
    there, so the adapter's `base_model_name_or_path` can be loaded."""
    if model.name_or_path:  # a checkpoint directory or a hub id
        return
    base_dir = os.path.join(output_dir, "base")
    model.save_pretrained(base_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(base_dir)
    model.name_or_path = base_dir
    model.config._name_or_path = base_dir


def apply_lora(model, args: LoraArguments, tokenizer=None, output_dir: str | None = None):
    """Freeze `model`, optionally keep its base weights in FP8, add the adapters; returns the peft model."""
    from peft import get_peft_model

    from deepseek_v3.checkpoint import opt_out_of_peft_moe_retargeting

    opt_out_of_peft_moe_retargeting()
    if output_dir is not None:
        save_base_if_untracked(model, tokenizer, output_dir)
    if args.load_in_fp8:
        from .fp8_base import load_fp8_codes, quantize_base

        quantize_base(model, mode=None if args.fp8_compute == "auto" else args.fp8_compute)
        qc = getattr(model.config, "quantization_config", None)
        if qc and os.path.isdir(model.name_or_path or ""):
            load_fp8_codes(model, model.name_or_path)  # the published codes, not a re-quantization
    peft_model = get_peft_model(model, lora_config(model, args))
    for name, param in peft_model.named_parameters():
        if ".mlp.gate.modules_to_save." in name:
            param.requires_grad_(False)  # router weights stay frozen; only their balancing bias moves
    peft_model._lora_targets = wrapped_modules(peft_model)
    return peft_model


def maybe_apply_lora(model, args, tokenizer=None, output_dir: str | None = None):
    """`apply_lora` when `args.use_peft`, else `model` unchanged (`--load_in_fp8` needs `--use_peft`)."""
    if not getattr(args, "use_peft", False):
        if getattr(args, "load_in_fp8", False):
            raise ValueError("load_in_fp8=True keeps a frozen FP8 base for adapters: pass --use_peft true as well")
        return model
    return apply_lora(model, args, tokenizer=tokenizer, output_dir=output_dir)


def save_lora_outputs(peft_model, output_dir: str, tokenizer=None, fp8: bool = False) -> str:
    """After `trainer.save_model(output_dir)` (the adapter): write `lora_targets.json` and the merged checkpoint
    `output_dir/merged` (FP8 again when `fp8`). Merging modifies `peft_model` in place; returns the merged dir."""
    from .fp8_base import dequantize_base

    targets = getattr(peft_model, "_lora_targets", None) or wrapped_modules(peft_model)
    with open(os.path.join(output_dir, "lora_targets.json"), "w") as f:
        json.dump(targets, f, indent=2)
    merged_dir = os.path.join(output_dir, "merged")
    if fp8:
        dequantize_base(peft_model)
    merged = peft_model.merge_and_unload()
    for module in merged.modules():
        if hasattr(module, "tokens_per_expert"):
            module.tokens_per_expert.zero_()
    if fp8:
        from deepseek_v3.kernels.fp8_checkpoint import save_pretrained_fp8

        save_pretrained_fp8(merged, merged_dir)
    else:
        merged.save_pretrained(merged_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(merged_dir)
    return merged_dir


__all__ = [
    "LoraArguments",
    "PRESETS",
    "resolve_targets",
    "lora_config",
    "apply_lora",
    "maybe_apply_lora",
    "wrapped_modules",
    "save_lora_outputs",
]
