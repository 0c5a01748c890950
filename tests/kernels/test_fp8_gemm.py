import pytest
import torch
from _helpers import assert_gemm_close, gemm_tol, requires_triton, rel_err

from deepseek_v3.kernels import act_dequant, act_quant, fp8_gemm, fp8_grouped_gemm, weight_dequant, weight_quant

GEMM_SHAPES = [(128, 256, 256), (33, 200, 300), (1, 64, 64), (5, 1, 130), (130, 129, 127)]


def _operands(M, N, K, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) * 0.05).to(device)
    return x, w, *act_quant(x, backend="torch"), *weight_quant(w, backend="torch")


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_torch_matches_dequantized_fp32(M, N, K, out_dtype):
    x, w, xq, xs, wq, ws = _operands(M, N, K)
    c = fp8_gemm(xq, xs, wq, ws, out_dtype, backend="torch")
    assert c.dtype == out_dtype and c.shape == (M, N)
    deq = act_dequant(xq, xs) @ weight_dequant(wq, ws, torch.float32).t()
    assert rel_err(c, deq) < (1e-5 if out_dtype == torch.float32 else 1e-2)
    assert rel_err(c, x @ w.t()) < 0.06  # e4m3 quantization error of the inputs themselves


@requires_triton
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_triton_matches_reference(M, N, K, out_dtype, device):
    x, w, xq, xs, wq, ws = _operands(M, N, K)
    args = [t.to(device) for t in (xq, xs, wq, ws)]
    c = fp8_gemm(*args, out_dtype, backend="triton").cpu()
    cr = fp8_gemm(xq, xs, wq, ws, out_dtype, backend="torch")
    # same per-128 promotion; only the accumulation inside one 128-wide dot may differ (see gemm_tol)
    assert_gemm_close(c.float(), cr.float(), device, rtol=1e-5 if out_dtype == torch.float32 else 8e-3, atol=1e-5)
    deq = act_dequant(xq, xs) @ weight_dequant(wq, ws, torch.float32).t()
    assert rel_err(c, deq) < 1e-2


@requires_triton
@pytest.mark.parametrize("M,N,K", [(100, 130, 200), (1, 64, 64)])
def test_gemm_backward_layouts(M, N, K, device):
    """Dgrad (transposed weight view, 128x128 blocks) and Wgrad (128x1 operands, 1x128 row scales on b)."""
    x, w, xq, xs, wq, ws = _operands(M, N, K, seed=1, device=device)
    dy = torch.randn(M, N).to(device)
    dq, ds = act_quant(dy, backend="torch")
    for backend in ("triton", "torch"):
        dx = fp8_gemm(dq, ds, wq.t(), ws.t(), torch.float32, backend=backend)
        assert rel_err(dx, act_dequant(dq, ds) @ weight_dequant(wq, ws, torch.float32)) < gemm_tol(device)
        dq2, ds2 = act_quant(dy, "128x1", backend=backend)
        xq2, xs2 = act_quant(x, "128x1", backend=backend)
        dw = fp8_gemm(dq2.t(), ds2.t(), xq2.t(), xs2.t(), torch.float32, backend=backend)
        ref = act_dequant(dq2, ds2, "128x1").t() @ act_dequant(xq2, xs2, "128x1")
        assert rel_err(dw, ref) < gemm_tol(device)
        assert rel_err(dw, dy.t() @ x) < 0.06


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_gemm_zero_and_huge_inputs_finite(backend, device):
    x = torch.zeros(64, 256, device=device)
    x[:, 128:] = 1e30
    w = torch.full((96, 256), 1e-30, device=device)
    w[:, :128] = 0
    xq, xs = act_quant(x, backend=backend)
    wq, ws = weight_quant(w, backend=backend)
    c = fp8_gemm(xq, xs, wq, ws, torch.float32, backend=backend)
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c, torch.full_like(c, 128.0), rtol=1e-5, atol=0)  # 1e30 * 1e-30 * 128


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_grouped_gemm(backend, device):
    torch.manual_seed(0)
    E, N, K = 4, 160, 192
    w = torch.randn(E, N, K).to(device)
    wq, ws = weight_quant(w, backend="torch")
    offs = torch.tensor([10, 10, 50, 77], dtype=torch.int32, device=device)  # expert 1 empty, 3 padding rows at the end
    x = torch.randn(80, K).to(device)
    xq, xs = act_quant(x, backend="torch")
    c = fp8_grouped_gemm(xq, xs, wq, ws, offs, torch.float32, backend=backend)
    ref = torch.zeros(80, N, device=device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        ref[start:end] = fp8_gemm(xq[start:end], xs[start:end], wq[e], ws[e], torch.float32, backend="torch")
        start = end
    assert_gemm_close(c, ref, device)
    assert (c[77:] == 0).all()
    wd = weight_dequant(wq, ws, torch.float32)
    deq = act_dequant(xq, xs)
    assert rel_err(c[10:50], deq[10:50] @ wd[2].t()) < gemm_tol(device)
    # transposed expert weights (the Dgrad layout)
    dq, ds = act_quant(torch.randn(80, N).to(device), backend="torch")
    dx = fp8_grouped_gemm(dq, ds, wq.transpose(1, 2), ws.transpose(1, 2), offs, torch.float32, backend=backend)
    assert rel_err(dx[50:77], act_dequant(dq, ds)[50:77] @ wd[3]) < gemm_tol(device)


def test_gemm_errors():
    x, w, xq, xs, wq, ws = _operands(8, 64, 64)
    with pytest.raises(TypeError, match="quantize them first"):
        fp8_gemm(x, xs, wq, ws)
    with pytest.raises(ValueError, match="inner dimensions"):
        fp8_gemm(xq[:, :32], xs, wq, ws)
    with pytest.raises(ValueError, match="b_s has shape"):
        fp8_gemm(xq, xs, wq, ws.repeat(2, 1))
    with pytest.raises(ValueError, match="offs"):
        fp8_grouped_gemm(xq, xs, wq.unsqueeze(0), ws.unsqueeze(0), torch.tensor([9]))
