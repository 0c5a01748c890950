"""One transformer block: x + MLA(norm(x)), then x + FFN(norm(x)) with a dense MLP or DeepSeekMoE."""

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ._compat import resolve_cache
from .attention import DeepseekV3Attention
from .layers import DeepseekV3MLP, DeepseekV3RMSNorm
from .moe import DeepseekV3MoE, RouterOutput


class DeepseekV3Block(GradientCheckpointingLayer):
    """The block shared by the main decoder layers and the MTP modules (which add their input projection)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DeepseekV3Attention(config, layer_idx)
        moe_rule_idx = min(layer_idx, config.num_hidden_layers - 1)  # MTP blocks follow the last layer's rule
        self.mlp = DeepseekV3MoE(config) if config.is_moe_layer(moe_rule_idx) else DeepseekV3MLP(config)
        self.input_layernorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, DeepseekV3MoE)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        """[B, S, D] -> ([B, S, D], routing decisions of this layer or None for a dense layer).
        `cache` (or `past_key_values`): the layer's attention cache."""
        cache = resolve_cache(cache, kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        routing = None
        if self.is_moe:
            hidden_states, routing = self.mlp(hidden_states)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, routing


class DeepseekV3DecoderLayer(DeepseekV3Block):
    """A layer of the main stack (`model.layers.{i}`, i < num_hidden_layers): its outputs are the model's
    `hidden_states` when those are requested."""
