"""Multi-Token Prediction (MTP) modules.

Module k (k = 1..D, stored as `model.layers.{num_hidden_layers + k - 1}` with the published tensor names) predicts
token t+k+1 at position t, keeping the causal chain:

    h^k_t = Block_k( eh_proj([ enorm(Emb(token_{t+k})) ; hnorm(h^{k-1}_t) ]) )
    logits^k_t = Head( shared_head.norm(h^k_t) )

h^0 is the main model's final (normed) hidden state, as the serving engines that consume the published MTP weights
use it. The embedding and the output head are the main model's (shared, not copied): the published checkpoints
also store `embed_tokens.weight` and `shared_head.head.weight` inside the MTP layer; those are copies of the shared
tensors, written back on save (see `DeepseekV3ForCausalLM.save_pretrained`).
"""

import torch
from torch import nn

from ._compat import resolve_cache
from .decoder_layer import DeepseekV3Block
from .layers import DeepseekV3RMSNorm


class DeepseekV3MTPSharedHead(nn.Module):
    """`shared_head`: the final norm of an MTP module; its `head` is the main model's lm_head (not registered)."""

    def __init__(self, config):
        super().__init__()
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states)


class DeepseekV3MultiTokenPredictionLayer(DeepseekV3Block):
    """A full decoder block preceded by the (embedding, previous hidden) projection of MTP. Not a
    `DeepseekV3DecoderLayer`: its outputs are not the main stack's hidden states / attentions."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = DeepseekV3MTPSharedHead(config)

    def forward(
        self,
        previous_hidden_states: torch.Tensor,
        next_token_embeds: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ):
        """previous_hidden_states h^{k-1} [B, S, D], next_token_embeds Emb(token_{t+k}) [B, S, D]
        -> (shared_head.norm(h^k) [B, S, D], ready for the output head and for depth k+1; routing of the block).

        The final norm runs inside this forward so that everything the module owns is used while its parameters
        are gathered (FSDP shards each layer separately). `cache` (or `past_key_values`): the block's attention cache
        (speculative decoding); attention probabilities of MTP blocks are never returned."""
        cache = resolve_cache(cache, kwargs)
        kwargs.pop("output_attentions", None)
        combined = self.eh_proj(torch.cat((self.enorm(next_token_embeds), self.hnorm(previous_hidden_states)), dim=-1))
        hidden_states, routing = super().forward(
            combined,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        return self.shared_head(hidden_states), routing
