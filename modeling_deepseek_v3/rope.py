"""Decoupled rotary position embedding with YaRN context extension.

DeepSeek-V3 rotates only the `qk_rope_head_dim` dims of each query head and the single shared rope key.
YaRN (as in the reference `precompute_freqs_cis`) blends interpolated and original frequencies with a linear ramp
between the correction dims of `beta_fast` and `beta_slow`; the attention logits are additionally scaled by
`mscale**2` (see `softmax_scale`). The published weights use the interleaved layout: dims (2i, 2i+1) form the
complex pair rotated by frequency i.

Other rope types (linear, dynamic, longrope, llama3, ...) come from transformers' `ROPE_INIT_FUNCTIONS`, as in
transformers' built-in class; YaRN itself is transformers' implementation too (equal to DeepSeek's reference, tested).
"""

import math

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def supported_rope_types() -> tuple[str, ...]:
    """"default" plus every type transformers' `ROPE_INIT_FUNCTIONS` implements on the installed release."""
    return ("default", *ROPE_INIT_FUNCTIONS)


def rope_type(config) -> str:
    params = config.rope_parameters or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in supported_rope_types():
        raise ValueError(
            f"DeepseekV3Config: `rope_parameters.rope_type`={kind!r} is not supported; use one of "
            f"{supported_rope_types()} (DeepSeek-V3 uses 'yarn')"
        )
    return kind


def compute_default_inv_freq(config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
    """Plain RoPE over the `qk_rope_head_dim` rotated dims: theta^(-2i/dr), no cos/sin scale."""
    dim = config.qk_rope_head_dim
    base = float(config.rope_parameters.get("rope_theta", 10000.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)), 1.0


def compute_inv_freq(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim // 2] and the cos/sin scale (`attention_factor`).

    Every rope type but "default" is transformers' own init function (`config.head_dim` is the rotated dim
    `qk_rope_head_dim`): for "yarn" that is DeepSeek's `precompute_freqs_cis` (correction range from beta_fast /
    beta_slow over the original context, linear ramp between interpolated and original frequencies; attention_factor
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) = 1 for the published configs)."""
    kind = rope_type(config)
    if kind == "default":
        return compute_default_inv_freq(config, device)
    return ROPE_INIT_FUNCTIONS[kind](config, device, seq_len=seq_len)


def softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)**2 under a scaled RoPE with `mscale_all_dim`
    (DeepSeek's long-context fix; the same rule as transformers' built-in class)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = config.rope_parameters or {}
    if rope_type(config) != "default" and params.get("mscale_all_dim"):
        mscale = yarn_get_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
        scale = scale * mscale * mscale
    return scale


class DeepseekV3RotaryEmbedding(nn.Module):
    """Returns (cos, sin) of shape [batch, seq, qk_rope_head_dim // 2]: one angle per rotated pair.

    Dynamic types ("dynamic", "longrope") recompute their frequencies per call through transformers'
    `dynamic_rope_update`, which reads the attributes set here."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = rope_type(config)
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate `x` [batch, heads, seq, rope_dim] by angles cos/sin [batch, seq, rope_dim // 2] (fp32 math).

    interleave=True: pairs are (x[2i], x[2i+1]) and the output keeps that layout (the reference's complex view).
    interleave=False: pairs are (x[i], x[i + rope_dim/2]) (the `rotate_half` layout).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
