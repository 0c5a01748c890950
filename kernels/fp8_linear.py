"""FP8 linear layers with DeepSeek-V3's training recipe, as ``torch.autograd.Function``s.

For ``y = x @ W.T`` (``x [M, K]`` tokens, ``W [N, K]`` master weight, FP32 or BF16):

- Fprop: ``y = fp8_gemm(q(x) 1x128, q(W) 128x128)``; ``y`` in the activation dtype (or the autocast dtype);
- Dgrad: ``dx = fp8_gemm(q(dy) 1x128, q(W).T 128x128)`` -- the transposed weight reuses the same FP8 blocks;
- Wgrad: ``dW = fp8_gemm(q(dy).T 128x1, q(x).T 128x1)`` in FP32 -- both operands re-tiled along the token
  dimension, which is the GEMM's reduction dimension. As in the paper, the layer caches its input in FP8 (1x128)
  for the backward pass and re-tiles it to 128x1 there (dequantize, re-quantize).

The master weight is never replaced: ``dW`` is returned in the weight's own dtype, so the optimizer, DDP/FSDP hooks
and gradient accumulation see an ordinary parameter gradient. The bias (if any) is added in high precision.

``backend`` (``"triton"``, ``"torch"`` or ``None``/``"auto"``) is resolved per call: Triton on CUDA tensors, the
torch reference otherwise -- both have the same numerics.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .fp8_gemm import fp8_gemm, fp8_grouped_gemm
from .fp8_quant import act_dequant, act_quant, weight_quant


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _wgrad(dy2: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, backend) -> torch.Tensor:
    """FP32 ``dy2.T @ x`` with both operands in 128x1 tiles. ``xq/xs``: cached 1x128 FP8 input."""
    dq, ds = act_quant(dy2, layout="128x1", backend=backend)
    x_hp = act_dequant(xq, xs, "1x128", torch.float32)
    xq2, xs2 = act_quant(x_hp, layout="128x1", backend=backend)
    return fp8_gemm(dq.t(), ds.t(), xq2.t(), xs2.t(), out_dtype=torch.float32, backend=backend)


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, backend):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"input has {x.shape[-1]} features but the weight {tuple(weight.shape)} expects {weight.shape[1]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xq, xs = act_quant(x2, "1x128", backend=backend)
            wq, ws = weight_quant(weight.detach(), backend=backend)
            y = fp8_gemm(xq, xs, wq, ws, out_dtype=out_dtype, backend=backend)
            if bias is not None:
                y = (y.float() + bias.float()).to(out_dtype)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.x_dtype, ctx.w_dtype, ctx.backend = x.dtype, weight.dtype, backend
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        backend = ctx.backend
        dx = dw = db = None
        with torch.autocast(device_type=dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.needs_input_grad[0]:
                dq, ds = act_quant(dy2, "1x128", backend=backend)
                dx = fp8_gemm(dq, ds, wq.t(), ws.t(), out_dtype=ctx.x_dtype, backend=backend).view(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dw = _wgrad(dy2, xq, xs, backend).to(ctx.w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None


def fp8_linear(x, weight, bias=None, backend: str | None = None) -> torch.Tensor:
    """Functional FP8 ``F.linear`` (see module docstring)."""
    return FP8LinearFunction.apply(x, weight, bias, _out_dtype(x), backend)


class FP8GroupedLinearFunction(torch.autograd.Function):
    """``out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ weight[e].T`` for MoE experts (tokens sorted by expert).

    Fprop and Dgrad run the grouped FP8 GEMM; Wgrad runs one FP8 GEMM per expert with 128x1 tiles taken within
    that expert's tokens (tiles never mix two experts)."""

    @staticmethod
    def forward(ctx, x, weight, offs, out_dtype, backend):
        with torch.autocast(device_type=x.device.type, enabled=False):
            xq, xs = act_quant(x, "1x128", backend=backend)
            wq, ws = weight_quant(weight.detach(), backend=backend)
            y = fp8_grouped_gemm(xq, xs, wq, ws, offs, out_dtype=out_dtype, backend=backend)
        ctx.save_for_backward(xq, xs, wq, ws, offs)
        ctx.x_dtype, ctx.w_dtype, ctx.backend = x.dtype, weight.dtype, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws, offs = ctx.saved_tensors
        backend = ctx.backend
        dx = dw = None
        with torch.autocast(device_type=dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dq, ds = act_quant(dy, "1x128", backend=backend)
                dx = fp8_grouped_gemm(
                    dq, ds, wq.transpose(1, 2), ws.transpose(1, 2), offs, out_dtype=ctx.x_dtype, backend=backend
                )
            if ctx.needs_input_grad[1]:
                E, N, K = wq.shape
                dw = torch.zeros((E, N, K), dtype=torch.float32, device=dy.device)
                start = 0
                for e, end in enumerate(offs.tolist()):
                    if end > start:
                        dw[e] = _wgrad(dy[start:end], xq[start:end], xs[start:end], backend)
                    start = end
                dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_grouped_linear(x, weight, offs, backend: str | None = None) -> torch.Tensor:
    """Grouped FP8 linear: ``x [T, K]`` sorted by expert, ``weight [E, N, K]``, ``offs [E]`` cumulative ends."""
    if weight.dim() != 3 or x.dim() != 2 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"fp8_grouped_linear expects x [T, K] and weight [E, N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    return FP8GroupedLinearFunction.apply(x, weight, offs, _out_dtype(x), backend)


class FP8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose matmuls run in block-scaled FP8.

    Same parameters and state-dict as ``nn.Linear`` (master weight kept in its own dtype). Existing ``nn.Linear``
    modules are converted *in place* (``FP8Linear.from_linear``), keeping the very same ``weight``/``bias``
    Parameter objects, so conversion is safe before or after the optimizer / DDP / FSDP wrappers are created.
    """

    fp8_backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, backend=self.fp8_backend)

    @classmethod
    def from_linear(cls, module: nn.Linear, backend: str | None = None) -> "FP8Linear":
        if type(module) is not nn.Linear and not isinstance(module, FP8Linear):
            raise TypeError(f"FP8Linear.from_linear expects a plain nn.Linear, got {type(module).__name__}")
        module.__class__ = cls
        module.fp8_backend = backend
        return module

    def to_linear(self) -> nn.Linear:
        """Undo :meth:`from_linear` in place."""
        self.__class__ = nn.Linear
        self.__dict__.pop("fp8_backend", None)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3 block128, backend={self.fp8_backend or 'auto'}"
