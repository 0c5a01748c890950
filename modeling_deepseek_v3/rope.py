"""Decoupled rotary position embedding with YaRN context extension.

DeepSeek-V3 rotates only the `qk_rope_head_dim` dims of each query head and the single shared rope key.
YaRN (as in the reference `precompute_freqs_cis`) blends interpolated and original frequencies with a linear ramp
between the correction dims of `beta_fast` and `beta_slow`; the attention logits are additionally scaled by
`mscale**2` (see `softmax_scale`). The published weights use the interleaved layout: dims (2i, 2i+1) form the
complex pair rotated by frequency i.
"""

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "yarn")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_position_embeddings: int) -> float:
    """The rotary dim whose wavelength makes `num_rotations` turns over the original context length."""
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_correction_range(beta_fast, beta_slow, dim, base, max_position_embeddings) -> tuple[int, int]:
    low = math.floor(_yarn_correction_dim(beta_fast, dim, base, max_position_embeddings))
    high = math.ceil(_yarn_correction_dim(beta_slow, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def _linear_ramp(low: float, high: float, dim: int) -> torch.Tensor:
    if low == high:
        high += 0.001
    return ((torch.arange(dim, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def rope_type(config) -> str:
    params = config.rope_parameters or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"DeepseekV3: `rope_parameters.rope_type`={kind!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
        )
    return kind


def compute_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim // 2] and the cos/sin scale (YaRN `attention_factor`)."""
    params = config.rope_parameters
    dim = config.qk_rope_head_dim
    base = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope_type(config) == "default":
        return inv_freq, 1.0
    factor = float(params["factor"])
    original = int(params["original_max_position_embeddings"])
    low, high = _yarn_correction_range(params.get("beta_fast", 32), params.get("beta_slow", 1), dim, base, original)
    keep_original = 1 - _linear_ramp(low, high, dim // 2)  # 1 for high-frequency dims (extrapolate)
    inv_freq = inv_freq / factor * (1 - keep_original) + inv_freq * keep_original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:  # DeepSeek: 1.0 when both are equal, the softmax scale carries mscale**2
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)**2 under YaRN (DeepSeek's long-context fix)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = config.rope_parameters or {}
    if rope_type(config) == "yarn" and params.get("mscale_all_dim"):
        mscale = yarn_get_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
        scale = scale * mscale * mscale
    return scale


class DeepseekV3RotaryEmbedding(nn.Module):
    """Returns (cos, sin) of shape [batch, seq, qk_rope_head_dim // 2]: one angle per rotated pair."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
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
