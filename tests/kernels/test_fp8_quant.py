import pytest
import torch

from deepseek_v3.kernels import act_dequant, act_quant, weight_dequant, weight_quant
from deepseek_v3.kernels.fp8_quant import FP8_MAX

from _helpers import requires_triton

SHAPES = [(128, 256), (100, 200), (3, 17), (257, 130), (1, 1)]


def _bits(q):
    return q.view(torch.uint8)


def _e4m3_bound(x, s_full):
    """|dequant(quant(x)) - x| <= 2^-4 |x| (3 mantissa bits, RNE) or half the subnormal step 2^-10 * scale."""
    return torch.maximum(x.abs() * 2.0**-4, s_full * 2.0**-10) * (1 + 1e-6)


@requires_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["1x128", "128x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_bit_identical(shape, layout, dtype, device):
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3).to(dtype).to(device)
    q, s = act_quant(x, layout, backend="triton")
    qr, sr = act_quant(x, layout, backend="torch")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert torch.equal(_bits(q), _bits(qr))
    assert torch.equal(s, sr)
    M, K = shape
    assert s.shape == ((M, (K + 127) // 128) if layout == "1x128" else ((M + 127) // 128, K))


@requires_triton
@pytest.mark.parametrize("shape", SHAPES + [(2, 130, 250)])
def test_weight_quant_dequant_bit_identical(shape, device):
    torch.manual_seed(1)
    w = (torch.randn(*shape) * 0.02).to(device)
    q, s = weight_quant(w, backend="triton")
    qr, sr = weight_quant(w, backend="torch")
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)
    assert s.shape == (*shape[:-2], (shape[-2] + 127) // 128, (shape[-1] + 127) // 128)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(weight_dequant(q, s, dtype, backend="triton"), weight_dequant(qr, sr, dtype, backend="torch"))


@pytest.mark.parametrize("shape", [(256, 384), (130, 257), (7, 5)])
def test_weight_roundtrip_within_e4m3_bounds(shape):
    torch.manual_seed(2)
    w = torch.randn(*shape) * torch.logspace(-3, 1, shape[1])  # wide dynamic range inside blocks
    q, s = weight_quant(w, backend="torch")
    wd = weight_dequant(q, s, torch.float32, backend="torch")
    s_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert ((wd - w).abs() <= _e4m3_bound(w, s_full)).all()
    # each block's max maps to +-448 exactly
    assert q.float().abs().max() == FP8_MAX


@pytest.mark.parametrize("layout", ["1x128", "128x1"])
def test_act_roundtrip_within_e4m3_bounds(layout):
    torch.manual_seed(3)
    x = torch.randn(200, 300) * 10
    q, s = act_quant(x, layout, backend="torch")
    xd = act_dequant(q, s, layout)
    s_full = s.repeat_interleave(128, -1)[:, :300] if layout == "1x128" else s.repeat_interleave(128, 0)[:200]
    assert ((xd - x).abs() <= _e4m3_bound(x, s_full)).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_zero_and_huge_tiles_are_finite(backend, device):
    x = torch.zeros(130, 260, device=device)
    x[:, 128:256] = 3.0e38  # near fp32 max
    x[5, 200] = -3.0e38
    x[:, 256:] = 1e-25  # tiny
    q, s = act_quant(x, backend=backend)
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    assert (q[:, :128].float() == 0).all()
    assert torch.isfinite(act_dequant(q, s)).all()
    qw, sw = weight_quant(x, backend=backend)
    assert torch.isfinite(qw.float()).all() and torch.isfinite(sw).all()
    wd = weight_dequant(qw, sw, torch.float32, backend=backend)
    assert torch.isfinite(wd).all() and (wd[:, :128] == 0).all()
    xb = torch.full((4, 128), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16, device=device)
    qb, sb = act_quant(xb, backend=backend)
    assert torch.isfinite(act_dequant(qb, sb)).all()


def test_leading_dims_and_errors():
    x = torch.randn(2, 3, 200)
    q, s = act_quant(x)
    assert q.shape == x.shape and s.shape == (2, 3, 2)
    with pytest.raises(ValueError, match="layout"):
        act_quant(x.view(6, 200), layout="128x128")
    with pytest.raises(ValueError, match="block_size=64"):
        weight_quant(torch.randn(4, 4), block_size=64)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        act_quant(q)
    qw, sw = weight_quant(torch.randn(300, 100))
    with pytest.raises(ValueError, match=r"needs \(3, 1\)"):
        weight_dequant(qw, sw[:2])
    with pytest.raises(ValueError, match="backend"):
        act_quant(x, backend="cuda")


def test_backend_resolution(monkeypatch):
    from deepseek_v3.kernels._triton_utils import BACKEND_ENV, resolve_backend

    x = torch.zeros(2, 2)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(x) == "torch" and resolve_backend(x, "auto") == "torch"  # CPU tensors: torch reference
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend(x) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        resolve_backend(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='torch'"):
        resolve_backend(x, "triton")


@requires_triton
def test_rounding_ties_and_subnormals_bit_identical(device):
    """Every e4m3 value and every midpoint between neighbours (ties-to-even), in a tile whose scale is exactly 1."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    pos = torch.unique(grid[torch.isfinite(grid) & (grid >= 0)])  # 0 .. 448, subnormals included
    mids = (pos[1:] + pos[:-1]) / 2
    vals = torch.cat([pos, mids, -pos, -mids, mids + 1e-7 * mids, mids - 1e-7 * mids])
    vals = torch.cat([vals, vals.new_zeros((-vals.numel()) % 128)]).view(-1, 128)
    vals[:, 0] = 448.0  # amax = 448 -> scale exactly 1
    vals = vals.to(device)
    q, s = act_quant(vals, backend="triton")
    qr, sr = act_quant(vals, backend="torch")
    assert (s == 1).all() and torch.equal(sr, s)
    assert torch.equal(_bits(q), _bits(qr))
    assert torch.equal(q[:, 1:].float().cpu().flatten()[: pos.numel() - 1], pos[1:])  # representable values are exact
