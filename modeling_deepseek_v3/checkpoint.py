"""Checkpoint layout: the published per-expert tensors <-> our fused expert parameters.

On disk (published DeepSeek-V3 and transformers' built-in class): `mlp.experts.{e}.gate_proj.weight` [I, D],
`up_proj.weight` [I, D], `down_proj.weight` [D, I]. In memory: `mlp.experts.gate_up_proj` [E, 2I, D] and
`mlp.experts.down_proj` [E, D, I]. transformers applies these converters on load and reverts them on save.
Registering them under our model_type also marks them as user-registered, which transformers requires before it
applies a conversion to a model class defined outside the library.
"""

from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter


def expert_conversions() -> list[WeightConverter]:
    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


def opt_out_of_peft_moe_retargeting() -> None:
    """Stop peft from treating `deepseek_v3` like `qwen2_moe` when it builds or loads a LoRA adapter.

    transformers lists `deepseek_v3 -> qwen2_moe` in `conversion_mapping._MODEL_TO_CONVERSION_PATTERN` (our own
    mapping, registered below, replaces it for loading); peft (0.21) copies that table and, for every LoRA config
    of such a model, rewrites any `target_modules` entry ending in `gate_proj` / `up_proj` / `down_proj` into the
    fused routed-expert parameters, so the shared experts and the dense MLP could never get adapters. Our adapters
    name their targets explicitly (routed experts through `target_parameters`), so the rewrite is dropped for
    `deepseek_v3`: in transformers' table (read when peft is imported) and in peft's copy if peft is loaded."""
    import sys

    from transformers import conversion_mapping

    conversion_mapping._MODEL_TO_CONVERSION_PATTERN.pop("deepseek_v3", None)
    peft_conversion = sys.modules.get("peft.utils.transformers_weight_conversion")
    if peft_conversion is not None:
        peft_conversion._MODEL_TO_CONVERSION_PATTERN.pop("deepseek_v3", None)


def register_conversions() -> None:
    register_checkpoint_conversion_mapping("deepseek_v3", expert_conversions(), overwrite=True)
    opt_out_of_peft_moe_retargeting()
