"""Block-wise FP8 (DeepSeek-V3 recipe): Triton kernels with plain-torch references, FP8 layers, training switch and
checkpoint conversion. Triton is optional: every op falls back to its torch reference (see ``_triton_utils``).

- ``fp8_quant``:      act_quant (1x128 / 128x1), weight_quant / weight_dequant (128x128)
- ``fp8_gemm``:       fp8_gemm (block-scaled, FP32 accumulation), fp8_grouped_gemm (MoE experts)
- ``fp8_dispatch``:   per-shape choice among cuBLAS block-wise scaled_mm, torchao, our Triton kernel, the reference
- ``rule_cache``:     the JSON rule cache (measured per chip / torch / shape) shared by the dispatch and MLA decode
- ``fp8_linear``:     FP8Linear + autograd Functions (Fprop / Dgrad / Wgrad in FP8)
- ``fp8_training``:   enable_fp8(model) / FP8TrainingCallback -- the training switch
- ``fp8_checkpoint``: FP8 <-> BF16 checkpoint conversion and FP8-checkpoint loading
"""

from .fp8_gemm import fp8_gemm, fp8_gemm_torch, fp8_grouped_gemm, fp8_grouped_gemm_torch
from .fp8_linear import FP8Linear, fp8_grouped_linear, fp8_linear
from .fp8_quant import (
    BLOCK_SIZE,
    FP8_DTYPE,
    FP8_MAX,
    act_dequant,
    act_quant,
    act_quant_torch,
    weight_dequant,
    weight_dequant_torch,
    weight_quant,
    weight_quant_torch,
)

_LAZY = {
    "enable_fp8": "fp8_training",
    "disable_fp8": "fp8_training",
    "default_fp8_filter": "fp8_training",
    "FP8TrainingCallback": "fp8_training",
    "convert_checkpoint": "fp8_checkpoint",
    "save_pretrained_fp8": "fp8_checkpoint",
    "use_deepseek_fp8_gemm": "fp8_checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BLOCK_SIZE", "FP8_DTYPE", "FP8_MAX", "FP8Linear", "act_dequant", "act_quant", "act_quant_torch",
    "fp8_gemm", "fp8_gemm_torch", "fp8_grouped_gemm", "fp8_grouped_gemm_torch", "fp8_grouped_linear", "fp8_linear",
    "weight_dequant", "weight_dequant_torch", "weight_quant", "weight_quant_torch", *_LAZY,
]  # fmt: skip
