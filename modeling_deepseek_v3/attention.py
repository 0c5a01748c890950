"""Multi-head Latent Attention (MLA).

Queries go through a low-rank bottleneck (q_a_proj -> RMSNorm -> q_b_proj); keys and values are compressed into one
latent vector c_kv per token (kv_a_proj_with_mqa -> RMSNorm), plus a single rope key k_pe shared by all heads.
Only (c_kv, k_pe) -- kv_lora_rank + qk_rope_head_dim values per token and layer -- are cached. kv_b_proj
expands c_kv into per-head no-rope keys and values.

Two equivalent ways to attend (selected per call, see `DeepseekV3Attention.use_absorption`):
- expanded (prefill, training): keys/values = kv_b_proj(c_kv) for every cached token, then standard attention.
- absorbed (decode: short query over a cache): kv_b_proj's key half W_UK [H, dn, r] is folded into the query
  (q_lat = q_nope W_UK, [B, H, S, r]) and its value half W_UV [H, dv, r] is applied after attention, so attention
  runs directly over the cached latent: score = (q_lat . c_kv + q_pe . k_pe) * scale, o = (softmax . c_kv) W_UV^T.
  A step costs O(T * H * (2r + dr)) instead of O(T * r * H * (dn + dv)) for re-expanding the cache.

Shapes: B batch, S query length, T cached length, H heads, r kv_lora_rank, dn qk_nope_head_dim,
dr qk_rope_head_dim, dv v_head_dim.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ._compat import resolve_cache
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


ABSORB_MODES = ("auto", "on", "off")
DECODE_BACKENDS = ("auto", "torch", "triton")


def attention_bias(attention_mask: torch.Tensor | None, batch: int, query_len: int, kv_len: int, device, dtype):
    """The layer's mask as an additive float bias [B, 1, S, T] (0 = attend, very negative = masked), or None.

    `attention_mask` is what `create_causal_mask` produced: a 4D float bias (eager), a 4D bool mask (sdpa: True =
    attend) or None, where transformers relies on sdpa's `is_causal` semantics: no mask for a single query, else
    causal aligned top-left (the mask is only skipped when the S queries are the first S keys: no cache, or the
    prefill of an empty static cache whose T > S slots are still empty)."""
    if attention_mask is None:
        if query_len == 1:
            return None
        causal = torch.ones(query_len, kv_len, dtype=torch.bool, device=device).tril()
        attention_mask = causal[None, None]
    attention_mask = attention_mask[..., :kv_len]
    if attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=device)
        # the most negative finite value, as transformers' eager masks: a fully masked row (a left-padding query)
        # gets a finite (unused) output instead of NaN, which would otherwise leak through its cached latent
        return bias.masked_fill(~attention_mask, torch.finfo(dtype).min)
    return attention_mask.to(dtype)


def absorbed_attention_torch(
    q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, scaling: float, bias
) -> torch.Tensor:
    """Attention over the latent cache. q_lat [B, H, S, r], q_pe [B, H, S, dr], c_kv [B, 1, T, r],
    k_pe [B, 1, T, dr], bias [B, 1, S, T] or None -> latent output [B, H, S, r].

    Heads and queries are flattened into one row dimension so each product is a single bmm against the shared
    (head-independent) latent: nothing is expanded per head."""
    batch, heads, seq, rank = q_lat.shape
    c = c_kv.squeeze(1)  # [B, T, r]
    scores = torch.bmm(q_lat.reshape(batch, heads * seq, rank), c.transpose(1, 2))  # [B, H*S, T]
    scores = scores.baddbmm_(q_pe.reshape(batch, heads * seq, -1), k_pe.squeeze(1).transpose(1, 2))
    scores = scores.view(batch, heads, seq, -1).float() * scaling
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).to(c.dtype)
    return torch.bmm(probs.view(batch, heads * seq, -1), c).view(batch, heads, seq, rank)


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
            # eps 1e-6 whatever `rms_norm_eps` says, as DeepSeek's reference and transformers' built-in class
            self.q_a_layernorm = DeepseekV3RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = DeepseekV3RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias)
        # Kernel for the absorbed decode attention: "auto" = Triton on CUDA, torch elsewhere (see kernels/mla_decode.py).
        self.decode_backend = "auto"

    def use_absorption(self, query_len: int, past_len: int | None, mode: str | bool | None = None) -> bool:
        """Whether this call takes the absorbed path. `mode` (kwarg `mla_absorb`, else `config.mla_absorb`):
        "on"/True forces it, "off"/False forbids it, "auto" absorbs at inference when a cache already holds tokens
        (`past_len` None: unknown while compiling, where only the query length decides) and the query is short
        enough that attending over the latent is cheaper than re-expanding the cache:
        S * T * H * (2r + dr) < T * H * r * (dn + dv) + S * T * H * (dn + dr + dv), i.e. S * (2r - dn - dv) < r * (dn + dv)."""
        if mode is None:
            mode = getattr(self.config, "mla_absorb", "auto")
        if mode is True or mode == "on":
            return True
        if mode is False or mode == "off":
            return False
        if mode != "auto":
            raise ValueError(f"mla_absorb={mode!r}: use one of {ABSORB_MODES} (or a bool)")
        if self.training or past_len == 0 or self.kv_b_proj.weight.element_size() < 2:  # fp8-stored weight: expand
            return False
        r = self.kv_lora_rank
        return query_len * (2 * r - self.qk_nope_head_dim - self.v_head_dim) < r * (self.qk_nope_head_dim + self.v_head_dim)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight [H * (dn + dv), r] split into W_UK [H, dn, r] and W_UV [H, dv, r] (views, no copy).

        Under tensor parallelism kv_b_proj's rows are split by head (colwise): this rank's shard holds its H/tp heads."""
        weight = self.kv_b_proj.weight
        if weight.element_size() < 2:
            raise ValueError("absorbed MLA needs kv_b_proj's weight in a 16/32-bit float dtype, not stored as FP8")
        if hasattr(weight, "to_local"):  # a DTensor (tensor parallel): this rank's heads
            weight = weight.to_local()
        w = weight.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def absorbed_attention(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """q_nope [B, H, S, dn], q_pe [B, H, S, dr] (rotated), cache c_kv [B, 1, T, r], k_pe [B, 1, T, dr]
        -> attention output [B, S, H * dv], computed without expanding the cache."""
        batch, _, seq, _ = q_nope.shape
        length = c_kv.shape[2]
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)  # [B, H, S, r]
        bias = attention_bias(attention_mask, batch, seq, length, q_nope.device, torch.float32)
        backend = self.decode_backend
        if backend not in DECODE_BACKENDS:
            raise ValueError(f"decode_backend={backend!r}: use one of {DECODE_BACKENDS}")
        if backend == "triton" or (backend == "auto" and q_nope.is_cuda):
            from .kernels._triton_utils import HAS_TRITON
            from .kernels.mla_decode import mla_decode_attention

            if backend == "triton" or HAS_TRITON:
                o_lat = mla_decode_attention(q_lat, q_pe, c_kv, k_pe, self.scaling, bias)
            else:
                o_lat = absorbed_attention_torch(q_lat, q_pe, c_kv, k_pe, self.scaling, bias)
        else:
            o_lat = absorbed_attention_torch(q_lat, q_pe, c_kv, k_pe, self.scaling, bias)  # [B, H, S, r]
        out = torch.einsum("bhsr,hvr->bshv", o_lat, w_uv)  # [B, S, H, dv]
        return out.reshape(batch, seq, -1)  # [B, S, H * dv], this rank's heads under tensor parallelism

    def project_query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, hidden] -> [B, H, S, dn + dr] (H = this rank's heads under tensor parallelism)."""
        batch, seq = hidden_states.shape[:2]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        return q.view(batch, seq, -1, self.qk_head_dim).transpose(1, 2)

    def compress_kv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, hidden] -> normalized latent c_kv [B, 1, S, r] and (un-rotated) rope key k_pe [B, 1, S, dr]."""
        batch, seq = hidden_states.shape[:2]
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        return c_kv.view(batch, 1, seq, self.kv_lora_rank), k_pe.view(batch, 1, seq, self.qk_rope_head_dim)

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent [B, 1, T, r] + rope key [B, 1, T, dr] -> keys [B, H, T, dn + dr], values [B, H, T, dv].

        H is read from kv_b_proj's output: under tensor parallelism (colwise kv_b_proj) each rank expands its heads."""
        batch, _, length, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(batch, length, -1, self.qk_nope_head_dim + self.v_head_dim)
        kv = kv.transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, kv.shape[1], -1, -1)), dim=-1)
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, S, hidden] -> (output [B, S, hidden], attention probabilities [B, H, S, T] or None).

        `cache` (`past_key_values` is accepted too) receives this layer's latent and rope key. The probabilities come
        back when the attention implementation returns them (eager) and `output_attentions=True`: such calls take
        the expanded path, whose probabilities are the ones over the cached positions the absorbed path would use."""
        cache = resolve_cache(cache, kwargs)
        batch, seq = hidden_states.shape[:2]
        cos, sin = position_embeddings
        interleave = self.config.rope_interleave

        q = self.project_query(hidden_states)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin, interleave)
        c_kv, k_pe = self.compress_kv(hidden_states)
        k_pe = apply_rotary_emb(k_pe, cos, sin, interleave)

        absorb_mode = kwargs.pop("mla_absorb", None)
        if kwargs.get("output_attentions"):
            absorb_mode = "off"
        past_len = 0
        if cache is not None:  # the cache holds the latent and the rotated rope key only
            if torch.compiler.is_compiling():
                past_len = None  # a static cache's fill level is data, not a Python int, inside a graph
            elif self.layer_idx < len(cache.layers):
                past_len = cache.layers[self.layer_idx].get_seq_length()
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)

        if self.use_absorption(seq, past_len, absorb_mode):
            return self.o_proj(self.absorbed_attention(q_nope, q_pe, c_kv, k_pe, attention_mask)), None

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
        attn_output = attn_output.reshape(batch, seq, -1)  # this rank's heads under tensor parallelism
        return self.o_proj(attn_output), (attn_weights if kwargs.get("output_attentions") else None)
