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


def register_conversions() -> None:
    register_checkpoint_conversion_mapping("deepseek_v3", expert_conversions(), overwrite=True)
