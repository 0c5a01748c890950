"""The README's smoke run: tiny model from hub_configs, a few Trainer steps, save, reload, generate."""

import json
import math

import pytest
from safetensors import safe_open

from data_files import require_file

from deepseek_v3.cli import main as cli_main


def test_demo_cli_end_to_end(tmp_path, data_dir, capsys):
    require_file(data_dir / "gsm8k" / "train.jsonl")
    code = cli_main(
        [
            "demo",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "12",
            "--seq-len",
            "32",
            "--per-device-train-batch-size",
            "4",
            "--data-dir",
            str(data_dir),
            "--num-texts",
            "64",
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model_class"] == "DeepseekV3ForCausalLM"
    assert math.isfinite(summary["last_loss"]) and summary["last_loss"] < summary["first_loss"]
    assert isinstance(summary["completion"], str)
    with safe_open(str(tmp_path / "final" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.3.eh_proj.weight" in names and "model.layers.3.shared_head.head.weight" in names


def test_demo_rejects_missing_data(tmp_path):
    from deepseek_v3.trainers.demo import DemoArguments, load_texts

    with pytest.raises(FileNotFoundError, match="gsm8k"):
        load_texts(DemoArguments(data_dir=str(tmp_path)))
