"""The wheel installs everything under the single `deepseek_v3` root (no generic top-level modules)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from deepseek_v3 import DeepseekV3ForCausalLM, load_config

REPO = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("deepseek_v3_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"deepseek_v3"}, top_level
    for required in (
        "deepseek_v3/modeling_deepseek_v3.py",
        "deepseek_v3/kernels/__init__.py",
        "deepseek_v3/trainers/__init__.py",
        "deepseek_v3/eval/__init__.py",
        "deepseek_v3/hub_configs/tiny.json",
        "deepseek_v3/hub_configs/small.json",
        "deepseek_v3/hub_configs/deepseek-v3.json",
    ):
        assert required in names, required
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "deepseek-v3 = deepseek_v3.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_init_weights_covers_every_module():
    """`from_config` leaves nothing uninitialized: norms are ones, biases zero, matrices ~ N(0, 0.02)."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny"))
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith(("e_score_correction_bias", "tokens_per_expert")):
            assert not tensor.any(), name
        elif tensor.dim() >= 2:
            assert abs(tensor.std().item() - 0.02) < 0.005, (name, tensor.std().item())
    rotary = model.model.rotary_emb.inv_freq
    from deepseek_v3.rope import compute_inv_freq

    assert torch.equal(rotary, compute_inv_freq(model.config)[0])
