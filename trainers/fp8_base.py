"""A frozen FP8 base model for LoRA: every quantizable base weight kept as e4m3 + 128x128 `weight_scale_inv`.

`quantize_base(model)` converts, in place, the linear layers the published FP8 format quantizes (attention
projections, dense MLPs, shared experts; not embeddings, `lm_head`, the router `mlp.gate`, MTP `eh_proj` /
`shared_head`, norms: the same rule as `deepseek_v3.kernels.fp8_checkpoint`) into
`deepseek_v3.kernels.fp8_frozen.FrozenFP8Linear`, and the fused routed experts into `FrozenFP8Experts` (gate and
up halves quantized on their own block grids, as the per-expert checkpoint tensors are). The weights are frozen;
adapters (peft LoRA on the linear layers) and the inputs get gradients.

`load_fp8_codes(model, checkpoint_dir)` then replaces the codes and scales with the exact tensors of an FP8
checkpoint (what `from_pretrained` dequantized on a CPU load), so a published FP8 base stays bit-for-bit as
published. `dequantize_base(model)` turns everything back into ordinary high-precision modules (used before merging
adapters; the merged model is re-quantized with `save_pretrained_fp8`).

LoRA on the routed experts over an FP8 base goes through peft's `target_parameters` as over a BF16 base: the codes
live under `gate_up_proj_fp8` / `down_proj_fp8`, and `gate_up_proj` / `down_proj` are zero-storage adapter slots
(stride-0 zero parameters of the full shape) that peft's `ParamWrapper` parametrizes to the low-rank delta; the
forward adds `x @ delta.T` to the frozen FP8 product (see `FrozenFP8Experts`). The adapter has the keys and shapes of
one trained over the BF16 experts and loads onto an FP8 or a high-precision base. Casting a converted model
(`.float()`, `.to(torch.bfloat16)`, ...) changes the compute dtype only: the e4m3 codes and FP32 scales keep their
dtype (`deepseek_v3.kernels.fp8_frozen.apply_keeping_fp8`).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepseek_v3.kernels.fp8_checkpoint import NOT_QUANTIZED, SCALE_SUFFIX, _read_index
from deepseek_v3.kernels.fp8_frozen import FrozenFP8Linear, apply_keeping_fp8, dequant_row_splits, frozen_fp8_grouped_linear, quant_row_splits
from deepseek_v3.kernels.fp8_quant import FP8_DTYPE
from deepseek_v3.moe import DeepseekV3Experts, _grouped_linear


def _quantized_on_disk(module_name: str) -> bool:
    name = module_name + ".weight"
    return not any(re.search(p, name) for p in NOT_QUANTIZED)


def _adapter_slot(like: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor of `shape` / `dtype` that owns one element of storage (stride 0): what adapters add onto."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=like.device).expand(*shape), requires_grad=False)


class FrozenFP8Experts(DeepseekV3Experts):
    """Routed experts whose fused weights are frozen e4m3 codes: `gate_up_proj_fp8 [E, 2I, D]` with
    `gate_up_proj_scale_inv` (gate rows' block grid, then up rows'), `down_proj_fp8 [E, D, I]` with
    `down_proj_scale_inv`. Same forward contract as `DeepseekV3Experts`; the codes never get a gradient.

    `gate_up_proj` / `down_proj` (the names of the BF16 module's parameters) are adapter slots: zero tensors of the
    full shape and the compute dtype that own no memory (stride-0 frozen parameters: peft matches
    `target_parameters` against parameters). The effective weight is
    `dequant(codes, scale_inv) + slot`. peft's `target_parameters` wraps the slots like the BF16 parameters
    (`ParamWrapper` parametrizes `gate_up_proj` to `slot + B @ A` for the duration of a forward), so an adapter
    trained here has the same keys and shapes as one trained over the BF16 experts and loads onto either base.
    The forward runs the frozen part through `frozen_fp8_grouped_linear` (dequantized per call, only the codes
    saved for backward) and, while an adapter is active, adds `x @ delta.T` (the delta is what autograd keeps)."""

    def _apply(self, fn, recurse=True):
        frozen = tuple(f"{name}{suffix}" for name in ("gate_up_proj", "down_proj") for suffix in ("_fp8", SCALE_SUFFIX, ""))
        apply_keeping_fp8(self, fn, recurse, frozen, super()._apply)  # codes stay e4m3, scales FP32
        self._reset_slots()  # the zero slots take the compute dtype
        return self

    def _reset_slots(self) -> None:
        for name in ("gate_up_proj", "down_proj"):
            if name in self._parameters:  # not while peft's parametrization holds it
                codes = getattr(self, name + "_fp8")
                self._parameters[name] = _adapter_slot(codes, codes.shape, self.compute_dtype)

    def _adapter_delta(self, name: str) -> torch.Tensor | None:
        if not parametrize.is_parametrized(self, name):
            return None  # the slot is zero: no adapter active
        return getattr(self, name)

    def forward(self, hidden_states, topk_indices, topk_weights):
        top_k = topk_indices.shape[1]
        flat_experts = topk_indices.flatten()
        order = flat_experts.argsort(stable=True)
        token_idx = order // top_k
        routed = hidden_states[token_idx]
        offsets = torch.bincount(flat_experts, minlength=self.num_experts).cumsum(0).to(torch.int32)
        splits = (self.intermediate_size, self.intermediate_size)
        gate_up = frozen_fp8_grouped_linear(routed, self.gate_up_proj_fp8, self.gate_up_proj_scale_inv, offsets, splits)
        delta = self._adapter_delta("gate_up_proj")
        if delta is not None:
            gate_up = gate_up + _grouped_linear(routed, delta.to(routed.dtype), offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = self.act_fn(gate) * up
        expert_out = frozen_fp8_grouped_linear(hidden, self.down_proj_fp8, self.down_proj_scale_inv, offsets)
        delta = self._adapter_delta("down_proj")
        if delta is not None:
            expert_out = expert_out + _grouped_linear(hidden, delta.to(hidden.dtype), offsets)
        expert_out = expert_out * topk_weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add(0, token_idx, expert_out.to(out.dtype))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, frozen e4m3 128x128, adapter slots gate_up_proj/down_proj"


def _freeze_experts_fp8(experts: DeepseekV3Experts) -> None:
    I = experts.intermediate_size
    for name, splits in (("gate_up_proj", (I, I)), ("down_proj", None)):
        w = getattr(experts, name).detach()
        q, s = quant_row_splits(w, splits or (w.shape[1],))
        delattr(experts, name)
        experts.register_parameter(name + "_fp8", nn.Parameter(q, requires_grad=False))
        experts.register_buffer(name + SCALE_SUFFIX, s)
        experts.register_parameter(name, _adapter_slot(q, q.shape, w.dtype))
    experts.compute_dtype = w.dtype
    experts.__class__ = FrozenFP8Experts


def _thaw_experts(experts: FrozenFP8Experts) -> None:
    """Back to `DeepseekV3Experts` with `dequant(codes)` as the frozen parameters (under any peft wrapper: the
    wrapper finds plain parameters to merge into)."""
    I, dtype = experts.intermediate_size, experts.compute_dtype
    for name, splits in (("gate_up_proj", (I, I)), ("down_proj", None)):
        if parametrize.is_parametrized(experts, name):
            raise RuntimeError(f"{name} of {type(experts).__name__} is parametrized (inside a forward?): dequantize "
                               "outside of the adapter's forward")
        q = getattr(experts, name + "_fp8")
        w = dequant_row_splits(q, getattr(experts, name + SCALE_SUFFIX), splits or (q.shape[1],), dtype)
        for suffix in ("_fp8", SCALE_SUFFIX, ""):
            delattr(experts, name + suffix)
        experts.register_parameter(name, nn.Parameter(w, requires_grad=False))
    experts.__class__ = DeepseekV3Experts


def quantize_base(model: nn.Module, mode: str | None = None) -> list[str]:
    """Convert the quantizable base weights of `model` to frozen FP8 in place (call before adding adapters).
    `mode`: `FrozenFP8Linear`'s compute mode (`"dequant"`, `"fp8"`, None = auto). Returns the converted names."""
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear and _quantized_on_disk(name):
                setattr(parent, child_name, FrozenFP8Linear.from_linear(child, mode=mode))
                converted.append(name)
            elif type(child) is DeepseekV3Experts:
                _freeze_experts_fp8(child)
                converted.append(name)
    if not converted:
        raise ValueError(f"{type(model).__name__} has no linear layer or experts module to keep in FP8")
    return converted


def dequantize_base(model: nn.Module) -> int:
    """Undo :func:`quantize_base` in place (weights dequantized to each layer's compute dtype, still frozen).
    Works through adapter wrappers (peft's LoRA layers keep the converted layer as `base_layer`)."""
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FrozenFP8Linear):
                linear = child.dequantized()
                linear.weight.requires_grad_(False)
                setattr(parent, child_name, linear)
                count += 1
            elif isinstance(child, FrozenFP8Experts):
                _thaw_experts(child)
                count += 1
    return count


def fp8_base_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the frozen base weights: `fp8` (codes + scales) and `other` (everything else that is not an
    adapter: embeddings, head, norms, router, ...)."""
    fp8 = other = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:
            continue
        # the experts' adapter slots are stride-0 views of one element: count the memory they own
        size = min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())
        if tensor.dtype == FP8_DTYPE or name.endswith(SCALE_SUFFIX):
            fp8 += size
        else:
            other += size
    return {"fp8": fp8, "other": other, "total": fp8 + other}


def load_fp8_codes(model: nn.Module, checkpoint_dir: str) -> int:
    """Copy the e4m3 codes and scales of an FP8 checkpoint (published tensor names, per-expert layout) into a
    model converted by :func:`quantize_base`. Returns the number of tensors copied."""
    from pathlib import Path

    from safetensors import safe_open

    src = Path(checkpoint_dir)
    weight_map, _ = _read_index(src)
    modules = dict(model.named_modules())
    expert_re = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    copied = 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(src / shard, framework="pt") as f:
            for key in f.keys():
                if key.endswith(SCALE_SUFFIX) or not key.endswith(".weight"):
                    continue
                tensor = f.get_slice(key)
                if tensor.get_dtype() not in ("F8_E4M3", "float8_e4m3fn"):
                    continue
                q = f.get_tensor(key)
                s = _get_scale(src, weight_map, key + SCALE_SUFFIX)
                match = expert_re.match(key)
                if match:
                    experts = modules.get(match.group(1))
                    if not isinstance(experts, FrozenFP8Experts):
                        raise KeyError(f"{key}: {match.group(1)} is not a FrozenFP8Experts module (run quantize_base first)")
                    e, proj, I = int(match.group(2)), match.group(3), experts.intermediate_size
                    nb = -(-I // 128)
                    with torch.no_grad():
                        if proj == "down_proj":
                            experts.down_proj_fp8[e].copy_(q)
                            experts.down_proj_scale_inv[e].copy_(s)
                        else:
                            rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                            blocks = slice(0, nb) if proj == "gate_proj" else slice(nb, 2 * nb)
                            experts.gate_up_proj_fp8[e, rows].copy_(q)
                            experts.gate_up_proj_scale_inv[e, blocks].copy_(s)
                else:
                    module = modules.get(key.removesuffix(".weight"))
                    if not isinstance(module, FrozenFP8Linear):
                        raise KeyError(f"{key} is FP8 in {src} but the model's module is not a FrozenFP8Linear")
                    with torch.no_grad():
                        module.weight.copy_(q)
                        module.weight_scale_inv.copy_(s)
                copied += 1
    return copied


def _get_scale(src, weight_map: dict, name: str) -> torch.Tensor:
    from safetensors import safe_open

    if name not in weight_map:
        raise KeyError(f"{name} is missing from the checkpoint in {src}")
    with safe_open(src / weight_map[name], framework="pt") as f:
        return f.get_tensor(name).float()


__all__ = ["FrozenFP8Experts", "quantize_base", "dequantize_base", "load_fp8_codes", "fp8_base_bytes"]
