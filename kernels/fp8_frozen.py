"""Frozen FP8 weights for parameter-efficient fine-tuning (LoRA over an FP8 base).

The base weight is stored exactly as DeepSeek-V3 publishes it -- ``float8_e4m3fn`` codes plus an FP32
``weight_scale_inv`` per 128x128 block (``w ~= q * scale_inv``) -- and never receives a gradient; the input does
(so adapters in earlier layers learn). Two ways to compute ``y = x @ W.T``, chosen by ``mode``:

- ``"dequant"``: dequantize the block (``weight_dequant``) to the activation dtype on the fly and run a dense
  matmul; the dequantized copy lives only for the duration of the op (the backward dequantizes again). Fastest on
  CPU, where no FP8 matrix unit exists.
- ``"fp8"``: the block-wise FP8 GEMM of ``fp8_gemm`` (1x128 activation tiles, 128x128 weight blocks) for Fprop,
  and for Dgrad ``fp8_gemm(q(dy), q(W).T)`` (the transposed weight reuses the same blocks and scales).
- ``None`` / ``"auto"``: ``"fp8"`` on CUDA tensors, ``"dequant"`` otherwise.

Only the FP8 codes and scales are saved for the backward pass, never a high-precision weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8_gemm import fp8_gemm
from .fp8_quant import FP8_DTYPE, act_quant, weight_dequant, weight_quant

MODES = ("dequant", "fp8")


def resolve_mode(x: torch.Tensor, mode: str | None) -> str:
    if mode in (None, "auto"):
        return "fp8" if x.is_cuda else "dequant"
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use 'dequant', 'fp8' or None (auto)")
    return mode


def _matmul(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor, mode: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``x2 [M, K] @ dequant(q, s) [N, K].T`` -> [M, N] in ``out_dtype``."""
    if mode == "fp8":
        xq, xs = act_quant(x2, "1x128")
        return fp8_gemm(xq, xs, q, s, out_dtype=out_dtype)
    return F.linear(x2.to(out_dtype), weight_dequant(q, s, out_dtype))


class FrozenFP8LinearFunction(torch.autograd.Function):
    """``y = x @ dequant(q, s).T (+ bias)`` with gradients for ``x`` only (``q``, ``s``, ``bias`` are frozen)."""

    @staticmethod
    def forward(ctx, x, q, s, bias, mode, out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _matmul(x2, q, s, mode, out_dtype)
            if bias is not None:
                y = (y.float() + bias.float()).to(out_dtype)
        ctx.save_for_backward(q, s)
        ctx.mode, ctx.x_dtype, ctx.x_shape = mode, x.dtype, x.shape
        return y.view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        q, s = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dy2 = dy.reshape(-1, dy.shape[-1])
            with torch.autocast(device_type=dy.device.type, enabled=False):
                if ctx.mode == "fp8":
                    dq, ds = act_quant(dy2, "1x128")
                    dx = fp8_gemm(dq, ds, q.t(), s.t(), out_dtype=ctx.x_dtype)
                else:
                    dx = dy2.to(ctx.x_dtype) @ weight_dequant(q, s, ctx.x_dtype)
            dx = dx.view(ctx.x_shape)
        return dx, None, None, None, None, None


def frozen_fp8_linear(x, q, s, bias=None, mode: str | None = None) -> torch.Tensor:
    """Functional form of :class:`FrozenFP8Linear`; output in the activation (or autocast) dtype."""
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return FrozenFP8LinearFunction.apply(x, q, s, bias, resolve_mode(x, mode), out_dtype)


def apply_keeping_fp8(module: nn.Module, fn, recurse: bool, frozen: tuple[str, ...], apply) -> nn.Module:
    """`module._apply(fn)` (`apply`: the parent class's `_apply`) in which the tensors named in `frozen` (the e4m3
    codes, their FP32 `*_scale_inv`, zero adapter slots) follow `fn` to its device but never change dtype:
    `model.to(torch.bfloat16)`, `.half()` or `.float()` would otherwise silently turn the codes into
    high-precision copies (the memory saving gone) and round the scales. Stride-0 tensors (adapter slots) are
    rebuilt on the new device instead of copied, so a move never materialises them. A floating cast sets
    `compute_dtype` (the activation dtype adapters and outputs take)."""
    # the raw tensors only: `getattr` on a name an adapter parametrizes would compute the adapted weight
    keep = {id(t) for name in frozen if (t := module._parameters.get(name, module._buffers.get(name))) is not None}

    def move_only(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in keep:
            return fn(t)
        device = fn(torch.empty(0, device=t.device)).device
        if t.dim() and all(stride == 0 for stride in t.stride()):
            return torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)
        return t.to(device)

    apply(move_only, recurse)
    probes = [fn(torch.zeros((), dtype=d)) for d in (torch.float16, torch.bfloat16)]
    if probes[0].dtype == probes[1].dtype:  # `fn` casts every floating tensor to one dtype
        module.compute_dtype = probes[0].dtype
    return module


class FrozenFP8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is e4m3 + ``weight_scale_inv`` (128x128 blocks).

    ``weight`` is a ``float8_e4m3fn`` Parameter with ``requires_grad=False`` and ``weight_scale_inv`` an FP32
    buffer, i.e. the published checkpoint tensors under their published names. ``compute_dtype`` is the
    activation dtype the layer was built for (adapters wrapping it, e.g. peft's LoRA, take that dtype). It stays an
    ``nn.Linear`` subclass so adapter libraries recognise it; build it with :meth:`from_linear` (quantize on load)
    or :meth:`from_fp8` (codes and scales straight from an FP8 checkpoint).
    """

    fp8_mode: str | None = None

    def __init__(self, *args, **kwargs):
        raise TypeError("build a FrozenFP8Linear with FrozenFP8Linear.from_linear(linear) or .from_fp8(q, scale_inv)")

    @classmethod
    def from_fp8(cls, q: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, mode: str | None = None) -> "FrozenFP8Linear":
        if q.dtype != FP8_DTYPE or q.dim() != 2:
            raise ValueError(f"expected a 2-D {FP8_DTYPE} weight, got {q.dtype} {tuple(q.shape)}")
        module = nn.Module.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = q.shape[1], q.shape[0]
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("weight_scale_inv", scale_inv.float())
        module.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        module.compute_dtype = compute_dtype
        module.fp8_mode = mode
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str | None = None) -> "FrozenFP8Linear":
        """Quantize ``linear.weight`` to 128x128-block e4m3 (the checkpoint format) and freeze it."""
        q, s = weight_quant(linear.weight.detach())
        return cls.from_fp8(q, s, linear.bias, compute_dtype=linear.weight.dtype, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, mode=self.fp8_mode)

    def _apply(self, fn, recurse=True):
        return apply_keeping_fp8(self, fn, recurse, ("weight", "weight_scale_inv"), super()._apply)

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``dequant(weight)`` in ``dtype`` (default ``compute_dtype``)."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight_dequant(self.weight, self.weight_scale_inv, dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"frozen e4m3 128x128, mode={self.fp8_mode or 'auto'}")


def dequant_row_splits(q: torch.Tensor, s: torch.Tensor, splits: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``q [..., N, K]`` whose rows are ``len(splits)`` separately quantized chunks (e.g. the gate and up
    halves of fused experts, each with its own 128x128 block grid, as the per-expert checkpoint tensors have):
    ``s`` holds the chunks' block rows one after the other."""
    if len(splits) == 1:
        return weight_dequant(q, s, dtype)
    parts, row, block_row = [], 0, 0
    for n in splits:
        nb = -(-n // 128)
        parts.append(weight_dequant(q[..., row : row + n, :], s[..., block_row : block_row + nb, :], dtype))
        row, block_row = row + n, block_row + nb
    return torch.cat(parts, dim=-2)


def quant_row_splits(w: torch.Tensor, splits: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`dequant_row_splits`: quantize each row chunk of ``w [..., N, K]`` on its own block grid."""
    if sum(splits) != w.shape[-2]:
        raise ValueError(f"row splits {splits} do not add up to the {w.shape[-2]} rows of the weight")
    qs, ss, row = [], [], 0
    for n in splits:
        q, s = weight_quant(w[..., row : row + n, :].contiguous())
        qs.append(q)
        ss.append(s)
        row += n
    return torch.cat(qs, dim=-2), torch.cat(ss, dim=-2)


class FrozenFP8GroupedLinearFunction(torch.autograd.Function):
    """``out[rows of expert e] = x[rows of expert e] @ dequant(q[e], s[e]).T`` (rows sorted by expert, ``offs`` the
    cumulative ends as in ``torch._grouped_mm``); gradient for ``x`` only. Dequantize-on-the-fly per call (the
    dequantized weights are freed after the op and rebuilt in the backward)."""

    @staticmethod
    def forward(ctx, x, q, s, offs, splits, out_dtype):
        w = dequant_row_splits(q, s, splits, out_dtype)
        y = torch._grouped_mm(x.to(out_dtype), w.transpose(1, 2), offs=offs)
        ctx.save_for_backward(q, s, offs)
        ctx.x_dtype, ctx.splits = x.dtype, splits
        return y

    @staticmethod
    def backward(ctx, dy):
        q, s, offs = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            w = dequant_row_splits(q, s, ctx.splits, ctx.x_dtype)
            dx = torch._grouped_mm(dy.contiguous().to(ctx.x_dtype), w, offs=offs)
        return dx, None, None, None, None, None


def frozen_fp8_grouped_linear(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor, splits: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Grouped linear over frozen FP8 expert weights ``q [E, N, K]`` (e4m3) with scales ``s`` (see
    :func:`dequant_row_splits` for ``splits``; default one chunk of N rows)."""
    if q.dim() != 3 or x.dim() != 2 or x.shape[1] != q.shape[2]:
        raise ValueError(f"expected x [T, K] and q [E, N, K]; got x {tuple(x.shape)}, q {tuple(q.shape)}")
    return FrozenFP8GroupedLinearFunction.apply(x, q, s, offs, tuple(splits or (q.shape[1],)), x.dtype)


__all__ = [
    "FrozenFP8Linear",
    "FrozenFP8LinearFunction",
    "FrozenFP8GroupedLinearFunction",
    "frozen_fp8_linear",
    "frozen_fp8_grouped_linear",
    "dequant_row_splits",
    "quant_row_splits",
    "resolve_mode",
]
