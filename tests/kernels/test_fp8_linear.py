import pytest
import torch
import torch.nn.functional as F
from _helpers import BACKENDS, assert_gemm_close, requires_triton, rel_err

from deepseek_v3.kernels import FP8Linear, fp8_grouped_linear
from deepseek_v3.kernels.fp8_linear import FP8LinearFunction


def _pair(in_f, out_f, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    ref = torch.nn.Linear(in_f, out_f, bias=bias)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    lin.load_state_dict(ref.state_dict())
    return ref.to(device), lin.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_f,out_f", [(200, 96), (256, 128), (64, 48)])
def test_fp8_linear_forward_backward(backend, in_f, out_f, device):
    ref, lin = _pair(in_f, out_f, device=device)
    weight, bias = lin.weight, lin.bias
    FP8Linear.from_linear(lin, backend=backend)
    assert isinstance(lin, FP8Linear) and lin.weight is weight and lin.bias is bias  # same Parameter objects
    x = torch.randn(3, 37, in_f).to(device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = lin(x1)
    y.square().sum().backward()
    yr = ref(x2)
    yr.square().sum().backward()
    assert y.shape == yr.shape and y.dtype == torch.float32
    assert rel_err(y, yr) < 0.06
    assert rel_err(x1.grad, x2.grad) < 0.08
    assert rel_err(lin.weight.grad, ref.weight.grad) < 0.08
    assert rel_err(lin.bias.grad, ref.bias.grad) < 0.06
    assert lin.weight.grad.dtype == torch.float32  # FP32 master weight gets an FP32 gradient
    for g in (x1.grad, lin.weight.grad, lin.bias.grad):
        assert torch.isfinite(g).all()


@requires_triton
def test_fp8_linear_backends_agree(device):
    _, lin = _pair(200, 96, seed=3, device=device)
    FP8Linear.from_linear(lin)
    x = torch.randn(50, 200).to(device)
    # a fixed upstream gradient: each backward GEMM is compared on the same quantized dy (a loss like y.square() would
    # requantize the backends' slightly different y on CUDA, where an e4m3 rounding flip costs a whole fp8 step)
    dy = torch.randn(50, 96).to(device)
    outs = {}
    for backend in ("triton", "torch"):
        lin.fp8_backend = backend
        lin.zero_grad()
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(dy)
        outs[backend] = (y, xi.grad, lin.weight.grad.clone())
    for a, b in zip(outs["triton"], outs["torch"]):
        assert_gemm_close(a, b, device)


def test_fp8_linear_autocast_and_bf16():
    _, lin = _pair(128, 64)
    FP8Linear.from_linear(lin, backend="torch")
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    lin16 = torch.nn.Linear(128, 64).to(torch.bfloat16)
    FP8Linear.from_linear(lin16, backend="torch")
    xb = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    lin16(xb).float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and lin16.weight.grad.dtype == torch.bfloat16


def test_fp8_linear_roundtrip_and_errors():
    _, lin = _pair(64, 32)
    FP8Linear.from_linear(lin)
    assert "fp8" in repr(lin)
    lin.to_linear()
    assert type(lin) is torch.nn.Linear
    with pytest.raises(TypeError, match="plain nn.Linear"):
        FP8Linear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="features"):
        FP8LinearFunction.apply(torch.randn(2, 10), torch.randn(4, 12), None, torch.float32, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_grouped_linear_grads(backend, device):
    torch.manual_seed(0)
    E, H, N = 4, 64, 96
    w = (torch.randn(E, N, H) * 0.1).to(device)
    offs = torch.tensor([3, 3, 20, 30], dtype=torch.int32, device=device)  # one empty expert
    x = torch.randn(30, H).to(device)
    w1, x1 = w.clone().requires_grad_(), x.clone().requires_grad_()
    y = fp8_grouped_linear(x1, w1, offs, backend=backend)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    w2, x2 = w.clone().requires_grad_(), x.clone().requires_grad_()
    starts = [0] + offs.tolist()[:-1]
    yr = torch.cat([F.linear(x2[s:e], w2[i]) for i, (s, e) in enumerate(zip(starts, offs.tolist()))])
    (yr * g).sum().backward()
    assert rel_err(y, yr) < 0.06
    assert rel_err(x1.grad, x2.grad) < 0.08
    assert rel_err(w1.grad, w2.grad) < 0.08
    assert (w1.grad[1] == 0).all()  # the empty expert gets a zero gradient
