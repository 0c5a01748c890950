"""Model cards (front matter, figures, eval table), `deepseek-v3 push` (upload listing; no network here, the
upload call is patched to record its arguments), and loading a hub id from a real huggingface_hub cache layout
offline (`from_pretrained("org/name")`, the tokenizer, `deepseek-v3 eval run --model org/name`)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_files import require_file

from deepseek_v3.cli import main as cli_main
from deepseek_v3.hub import check_pushable, push_folder, upload_listing
from deepseek_v3.info import parameter_report
from deepseek_v3.trainers.model_card import add_eval_results, read_front_matter, write_model_card


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from deepseek_v3 import DeepseekV3ForCausalLM, load_config
    from deepseek_v3.tokenizer import byte_level_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-run"
    DeepseekV3ForCausalLM(load_config("tiny")).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


def test_card_front_matter_figures_and_eval_update(tiny_checkpoint):
    training = {"final main_loss": 1.25, "final mtp_loss": 1.5, "final moe/maxvio_step": 0.125}
    write_model_card(tiny_checkpoint, base_model="org/base-model", recipe="model_name_or_path: tiny\nmax_steps: 3\n",
                     overrides=["--learning_rate", "0.01"], training=training, balancing_gamma=0.001,
                     eval_results={"gsm8k": {"accuracy": 0.25, "num_docs": 4, "num_samples": 4}},
                     datasets=["openai/gsm8k"], pipeline="SFT training run", tags=["trl", "sft"])
    front, body = read_front_matter(tiny_checkpoint / "README.md")
    assert front["library_name"] == "transformers" and front["base_model"] == "org/base-model"
    assert front["pipeline_tag"] == "text-generation" and front["license"] == "apache-2.0"
    assert {"deepseek_v3", "trl", "sft"} <= set(front["tags"]) and front["datasets"] == ["openai/gsm8k"]
    [entry] = front["model-index"][0]["results"]
    assert entry["dataset"]["type"] == "openai/gsm8k" and entry["metrics"][0]["value"] == 0.25
    report = parameter_report(load_tiny_config())
    for key in ("total_params_with_mtp", "activated_params_per_token", "mtp_params_unique"):
        assert f"{report[key]:,}" in body
    assert "| final main_loss | 1.25 |" in body and "balancing: **on**" in body and "max_steps: 3" in body
    assert "--learning_rate 0.01" in body and "import deepseek_v3" in body and "fine-tuned version of [None]" not in body
    # `deepseek-v3 eval run --update-card`: new tasks are added, re-run tasks replaced, the rest kept
    add_eval_results(tiny_checkpoint, {"gsm8k": {"accuracy": 0.5, "num_docs": 4}, "math500": {"accuracy": 0.0}})
    add_eval_results(tiny_checkpoint, {"math500": {"accuracy": 0.125, "num_docs": 8}})
    front, body = read_front_matter(tiny_checkpoint / "README.md")
    values = {e["dataset"]["type"]: e["metrics"][0]["value"] for e in front["model-index"][0]["results"]}
    assert values == {"openai/gsm8k": 0.5, "HuggingFaceH4/MATH-500": 0.125}
    assert body.count("## Evaluation") == 1 and "| math500 | accuracy | 0.125 | 8 |" in body


def load_tiny_config():
    from deepseek_v3 import load_config

    return load_config("tiny")


def test_push_listing_excludes_checkpoints_and_optimizer_states(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in set(os.listdir(tiny_checkpoint)) - {"README.md"}:
        (out / name).write_bytes((tiny_checkpoint / name).read_bytes())
    for name in ("checkpoint-5/model.safetensors", "checkpoint-5/optimizer.pt", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", ".git/HEAD", "moe_maxvio.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    with pytest.raises(ValueError, match="README.md"):
        check_pushable(out)
    write_model_card(out, base_model=None)
    listing = upload_listing(out)
    assert "README.md" in listing and "model.safetensors" in listing and "moe_maxvio.png" in listing
    assert "tokenizer.json" in listing and "config.json" in listing
    assert not [f for f in listing if f.startswith(("checkpoint-", ".git")) or "optimizer" in f or "rng_state" in f
                or f == "scheduler.pt"]
    assert cli_main(["push", str(out), "--repo-id", "org/name", "--dry-run"]) == 0
    assert "org/name" in capsys.readouterr().out

    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)) or "commit")
    assert push_folder(out, "org/name", private=True, revision="v1") == "commit"
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[1][2]["branch"] == "v1"
    upload = calls[2][1]
    assert upload["repo_id"] == "org/name" and upload["revision"] == "v1" and upload["folder_path"] == str(out)
    assert upload_listing(out, upload["ignore_patterns"]) == listing  # what upload_folder will filter to
    with pytest.raises(ValueError, match="ORG/NAME"):
        push_folder(out, "just-a-name")


OFFLINE_SCRIPT = r"""
import json, sys
import deepseek_v3
from transformers import AutoModelForCausalLM, AutoTokenizer
from deepseek_v3.cli import main

model = AutoModelForCausalLM.from_pretrained("org/tiny-demo")
tokenizer = AutoTokenizer.from_pretrained("org/tiny-demo")
assert type(model).__name__ == "DeepseekV3ForCausalLM", type(model)
assert tokenizer("12")["input_ids"][-2:] == [ord("1") + 5, ord("2") + 5]
code = main(["eval", "run", "--model", "org/tiny-demo", "--tasks", "gsm8k", "--limit", "1", "--max-new-tokens", "2",
             "--output-dir", sys.argv[1], "--data-dir", sys.argv[2], "--no-progress", "--dtype", "float32"])
assert code == 0, code
"""


def _write_hub_cache(hub_dir: Path, repo_id: str, files: Path, commit: str) -> None:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/..., refs/main."""
    repo = hub_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))


def test_hub_id_loads_offline_from_the_cache(tiny_checkpoint, tmp_path, data_dir):
    require_file(data_dir / "gsm8k" / "test.jsonl")
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf_home = tmp_path / "hf_home"
    _write_hub_cache(hf_home / "hub", "org/tiny-demo", tiny_checkpoint, commit)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "eval"), str(data_dir)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model_revision"] == {"source": "hub", "repo_id": "org/tiny-demo", "revision": "main",
                                         "commit_hash": commit}
    assert results["results"]["gsm8k"]["num_docs"] == 1


def test_eval_run_update_card(tiny_checkpoint, tmp_path, data_dir):
    require_file(data_dir / "gsm8k" / "test.jsonl")
    model = tmp_path / "model"
    model.mkdir()
    for name in set(os.listdir(tiny_checkpoint)) - {"README.md"}:
        (model / name).write_bytes((tiny_checkpoint / name).read_bytes())
    args = ["eval", "run", "--model", str(model), "--tasks", "gsm8k", "--limit", "2", "--max-new-tokens", "2",
            "--output-dir", str(tmp_path / "eval"), "--data-dir", str(data_dir), "--no-progress", "--update-card"]
    assert cli_main(args) == 2  # no card to update yet: says so
    write_model_card(model, base_model=None)
    assert cli_main(args) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model_revision"] == {"source": "local", "path": str(model.resolve())}
    front, body = read_front_matter(model / "README.md")
    [entry] = front["model-index"][0]["results"]
    assert entry["metrics"][0]["value"] == round(results["results"]["gsm8k"]["accuracy"], 6)
    assert "| gsm8k | accuracy |" in body
