"""Multi-head Latent Attention (MLA).

Queries go through a low-rank bottleneck (q_a_proj -> RMSNorm -> q_b_proj); keys and values are compressed into one
latent vector c_kv per token (kv_a_proj_with_mqa -> RMSNorm), plus a single rope key k_pe shared by all heads.
Only (c_kv, k_pe) -- kv_lora_rank + qk_rope_head_dim values per token and layer -- are cached. kv_b_proj
expands c_kv into per-head no-rope keys and values.

Shapes: B batch, S query length, T cached length, H heads, r kv_lora_rank, dn qk_nope_head_dim,
dr qk_rope_head_dim, dv v_head_dim.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .layers import DeepseekV3RMSNorm
from .rope import apply_rotary_emb, softmax_scale


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v with q,k [B, H, S|T, dn+dr] and v [B, H, T, dv]; returns [B, S, H, dv]."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeepseekV3Attention(nn.Module):
    """MLA with decoupled RoPE; attention runs through transformers' attention interface (eager, sdpa, ...)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1  # keys/values are expanded per head: no GQA sharing
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.scaling = softmax_scale(config)

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = DeepseekV3RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = DeepseekV3RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias)

    def project_query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, hidden] -> [B, H, S, dn + dr]."""
        batch, seq = hidden_states.shape[:2]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        return q.view(batch, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)

    def compress_kv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, hidden] -> normalized latent c_kv [B, 1, S, r] and (un-rotated) rope key k_pe [B, 1, S, dr]."""
        batch, seq = hidden_states.shape[:2]
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        return c_kv.view(batch, 1, seq, self.kv_lora_rank), k_pe.view(batch, 1, seq, self.qk_rope_head_dim)

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent [B, 1, T, r] + rope key [B, 1, T, dr] -> keys [B, H, T, dn + dr], values [B, H, T, dv]."""
        batch, _, length, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq = hidden_states.shape[:2]
        cos, sin = position_embeddings
        interleave = self.config.rope_interleave

        q = self.project_query(hidden_states)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin, interleave)
        c_kv, k_pe = self.compress_kv(hidden_states)
        k_pe = apply_rotary_emb(k_pe, cos, sin, interleave)

        if past_key_values is not None:  # the cache holds the latent and the rotated rope key only
            c_kv, k_pe = past_key_values.update(c_kv, k_pe, self.layer_idx)

        query = torch.cat((q_nope, q_pe), dim=-1)
        key, value = self.expand_kv(c_kv, k_pe)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, seq, self.num_heads * self.v_head_dim)
        return self.o_proj(attn_output), attn_weights
