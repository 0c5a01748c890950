"""Training-run hygiene shared by the SFT / GRPO / distillation scripts (issue 15, defect 11): the seed is set
before the model is built, `--resume_from_checkpoint true` means the last checkpoint, a checkpoint without
optimizer state is refused, and an output_dir holding checkpoints is not silently overwritten."""

from pathlib import Path

import pytest
import torch

from deepseek_v3.trainers.common import load_model_and_tokenizer, resolve_resume, run_training
from deepseek_v3.trainers.sft import SFTScriptArguments


class _RecordingTrainer:
    def __init__(self, model, log):
        self.model, self.log = model, log

    def train(self, resume_from_checkpoint=None):
        self.log.append((next(iter(self.model.parameters())).detach().clone(), resume_from_checkpoint))

    def save_model(self, output_dir):
        pass

    def is_world_process_zero(self):  # what run_training does after training (model card, push) is not tested here
        return False


def _run(out, log, *extra):
    from trl import SFTConfig

    def build(script_args, training_args):
        return _RecordingTrainer(load_model_and_tokenizer(script_args)[0], log)

    return run_training(SFTScriptArguments, SFTConfig, build,
                        ["--model_name_or_path", "tiny", "--output_dir", str(out), "--seed", "7", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
                         *extra])


def _checkpoint(out: Path, step: int, optimizer: bool = True) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    if optimizer:
        (ckpt / "optimizer.pt").write_bytes(b"")
    return ckpt


def test_same_seed_builds_the_same_random_model(tmp_path):
    log = []
    torch.manual_seed(123)
    _run(tmp_path / "a", log)
    torch.manual_seed(456)  # whatever happened before, --seed decides
    _run(tmp_path / "b", log)
    assert torch.equal(log[0][0], log[1][0])


def test_resume_true_is_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    _checkpoint(out, 2)
    last = _checkpoint(out, 10)
    log = []
    _run(out, log, "--resume_from_checkpoint", "true")
    assert log[0][1] == str(last)
    with pytest.raises(ValueError, match="no checkpoint-\\* directory"):
        resolve_resume("True", str(tmp_path / "empty"))


def test_checkpoint_without_optimizer_state_is_refused(tmp_path):
    out = tmp_path / "run"
    ckpt = _checkpoint(out, 4, optimizer=False)
    with pytest.raises(ValueError, match="no optimizer state.*optimizer.pt"):
        resolve_resume(str(ckpt), str(out))
    with pytest.raises(ValueError, match="no optimizer state"):
        resolve_resume("true", str(out))


def test_output_dir_with_checkpoints_is_not_overwritten_silently(tmp_path):
    out = tmp_path / "run"
    _checkpoint(out, 3)
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume_from_checkpoint true.*--overwrite_output_dir"):
        _run(out, [])
    log = []
    _run(out, log, "--overwrite_output_dir", "true")
    assert log[0][1] is None
    assert resolve_resume(None, str(tmp_path / "fresh")) is None
