"""Chip detection and byte / peak bookkeeping of the GPU benchmarks (what their % columns divide by)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name,tbps",
    [("NVIDIA H200", 4.8), ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9),
     ("NVIDIA GH200 480GB", 4.0), ("Tesla T4", None)],
)  # fmt: skip
def test_hbm_bandwidth_by_chip_name(name, tbps):
    got = _load("mla_decode").hbm_bandwidth(name)
    assert got == (None if tbps is None else tbps * 1e12)


def test_latent_cache_bytes():
    mla = _load("mla_decode")
    assert mla.cache_bytes(64, 16384, 512, 64, fp8=False) == 64 * 16384 * 1152
    assert mla.cache_bytes(64, 16384, 512, 64, fp8=True) == 64 * 16384 * (512 + 16 + 128)


@pytest.mark.parametrize(
    "name,fp8",
    [("NVIDIA H200", 1979), ("NVIDIA H100 80GB HBM3", 1979), ("NVIDIA H100 PCIe", 1513), ("NVIDIA A10G", None)],
)
def test_fp8_peak_by_chip_name(name, fp8):
    assert _load("fp8_gemm").peak_tflops(name)[0] == fp8
