"""Logit distillation (`deepseek-v3 train distill --mode logits`) on TRL's `DistillationTrainer`.

The student (our `DeepseekV3ForCausalLM`, optionally LoRA: `--use_peft true`) matches the teacher's full next-token
distribution on completions, with TRL's generalized JSD: `beta` 0 = forward KL(teacher || student), 0.5 = JSD,
1 = reverse KL. The teacher is any causal LM with the student's vocabulary (ours, bigger, or FP8: an FP8 checkpoint
loads as such, `--teacher_load_in_fp8 true` keeps its weights in e4m3 + 128x128 scales in memory).

`DeepseekV3DistillationTrainer` adds to TRL's trainer:

- **on-policy fraction** `lmbda` (GKD's name): each generation batch is, with probability `lmbda`, completions
  sampled from the student (TRL's on-policy path) and otherwise the dataset's own completions
  (`completion_column`, off-policy, e.g. reference answers or teacher traces); logged per step as
  `on_policy_fraction`, and the running count of student-generated completions as `on_policy_completions`;
- **the student's MTP loss**: the student forward also runs its MTP module on the same sequence and adds
  `mtp_loss_weight` x the MTP cross-entropy on the completion tokens (plus the sequence-wise balance loss when
  configured), so distillation keeps the MTP head trained for speculative decoding; logged as `mtp_loss`;
- **held-out KL**: `heldout_samples` rows after the training rows are kept out of training; KL(teacher || student)
  per completion token on them (teacher-forced on the reference completions, temperature 1) is logged as
  `distill/heldout_kl` when training starts and ends (and every `heldout_every` steps), and written to
  `output_dir/heldout_kl.json`.

The aux-loss-free balancing callback runs as in the other scripts (only the student's training forwards count).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .common import (
    DataArguments,
    ModelArguments,
    TrainingExtrasArguments,
    load_dataset_split,
    load_model_and_tokenizer,
    to_conversation,
    training_callbacks,
)
from .lora import LoraArguments, maybe_apply_lora


@dataclass
class LogitDistillScriptArguments(ModelArguments, DataArguments, TrainingExtrasArguments, LoraArguments):
    mode: str = field(default="logits", metadata={"help": "trace (teacher traces + SFT) or logits (this script)"})
    teacher_name_or_path: str = field(default="tiny", metadata={"help": "teacher checkpoint / hub id (same vocab)"})
    teacher_load_in_fp8: bool = field(default=False, metadata={"help": "keep the teacher's weights in FP8"})
    lmbda: float = field(default=0.5, metadata={"help": "fraction of batches generated on-policy by the student"})
    heldout_samples: int = field(default=16, metadata={"help": "rows kept out of training for the held-out KL"})
    heldout_every: int | None = field(default=None, metadata={"help": "also log the held-out KL every N steps"})


def build_datasets(args: LogitDistillScriptArguments):
    """(train, held-out): rows with `prompt` (conversation) and `completion_text` (the reference completion)."""
    dataset = load_dataset_split(args)
    if args.completion_column not in dataset.column_names:
        raise ValueError(f"completion_column={args.completion_column!r} is not a column of {args.dataset_name}: "
                         f"{dataset.column_names}")
    if len(dataset) <= args.heldout_samples:
        raise ValueError(f"{len(dataset)} rows but heldout_samples={args.heldout_samples}: raise max_samples")

    def convert(row):
        return {"prompt": to_conversation(row[args.prompt_column], args.system_prompt),
                "completion_text": row[args.completion_column]}

    dataset = dataset.map(convert, remove_columns=dataset.column_names)
    cut = len(dataset) - args.heldout_samples
    return dataset.select(range(cut)), dataset.select(range(cut, len(dataset)))


def _inner(model):
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


@torch.no_grad()
def heldout_kl(teacher, student, tokenizer, rows, max_length: int = 1024, batch_size: int = 8) -> float:
    """Mean per-token KL(teacher || student) over the reference completions of `rows` (teacher-forced)."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    device = next(student.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
        ids, masks = [], []
        for prompt, row in zip(prompts, batch):
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            c = tokenizer(row["completion_text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids.append((p + c)[:max_length])
            masks.append(([0] * len(p) + [1] * len(c))[:max_length])
        width = max(map(len, ids))
        input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in ids], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=device)
        target = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)[:, 1:].bool()
        t = teacher(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
        s = student(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
        kl = (t.exp() * (t - s)).sum(-1)
        total += kl[target].sum().item()
        count += target.sum().item()
    student.train(was_training)
    return total / max(count, 1)


def _trainer_class():
    from trl import DistillationTrainer

    from deepseek_v3.loss import mtp_depth_loss

    class DeepseekV3DistillationTrainer(DistillationTrainer):
        """TRL `DistillationTrainer` + on-policy fraction `lmbda`, the student's MTP loss, held-out KL."""

        def __init__(self, *args, lmbda: float = 1.0, heldout_dataset=None, heldout_every=None, **kwargs):
            if not 0.0 <= lmbda <= 1.0:
                raise ValueError(f"lmbda={lmbda}: the on-policy fraction must be in [0, 1]")
            super().__init__(*args, **kwargs)
            self.lmbda = lmbda
            self.heldout_rows = list(heldout_dataset) if heldout_dataset is not None else []
            self._offpolicy_completions = None
            self.on_policy_completions = 0  # completions generated by the student so far
            self._extra_loss = None
            self._rng = random.Random(self.args.seed)
            if self.heldout_rows:
                from .callbacks import HeldOutMetricCallback

                self.add_callback(HeldOutMetricCallback(self, "distill/heldout_kl", self.heldout_kl, "heldout_kl.json",
                                                        every=heldout_every))

        def heldout_kl(self) -> float:
            student = self.accelerator.unwrap_model(self.model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            return heldout_kl(teacher, student, self.processing_class, self.heldout_rows)

        # -- on-policy fraction -------------------------------------------------------------------------------
        def _generate_and_score_completions(self, inputs):
            on_policy = self._rng.random() < self.lmbda
            if not on_policy and "completion_text" not in inputs[0]:
                raise ValueError("off-policy batches (lmbda < 1) need a `completion_text` column in the dataset")
            self._offpolicy_completions = None if on_policy else [x["completion_text"] for x in inputs]
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["on_policy_fraction"].append(float(on_policy))
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self._offpolicy_completions = None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            if self._offpolicy_completions is None:
                out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
                self.on_policy_completions += len(prompt_ids)  # sampled from the student (TRL's generate)
                mode = "train" if self.model.training else "eval"
                self._metrics[mode]["on_policy_completions"].append(float(self.on_policy_completions))
                return out
            tokenizer = self.processing_class
            limit = self.args.max_completion_length
            out = []
            for text in self._offpolicy_completions:
                ids = tokenizer(text, add_special_tokens=False).input_ids[: limit - 1] + [tokenizer.eos_token_id]
                out.append(ids)
            return out

        # -- student MTP (+ balance) loss ---------------------------------------------------------------------
        def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
            inner = _inner(unwrapped_model)
            teacher = _inner(self.accelerator.unwrap_model(self.teacher_model))
            config = inner.config
            mtp = getattr(config, "num_nextn_predict_layers", 0) or 0
            weight = getattr(config, "mtp_loss_weight", 0.0) or 0.0
            if inner is teacher or not hasattr(inner, "model") or not (mtp and weight > 0) or not torch.is_grad_enabled():
                return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
            outputs = inner.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, mtp_depth=mtp)
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            labels[:, : input_ids.shape[1] - logits_to_keep] = -100  # completion tokens only
            depth_losses = [
                mtp_depth_loss(inner.loss_function, inner.lm_head(h), labels, k, config.vocab_size)
                for k, h in enumerate(outputs.mtp_hidden_states, start=1)
            ]
            mtp_loss = torch.stack(depth_losses).mean()
            extra = weight * mtp_loss
            balance = [r.balance_loss for r in (outputs.router_outputs or []) if r.balance_loss is not None]
            if balance:
                extra = extra + torch.stack(balance).sum().to(extra.dtype)
            self._extra_loss = extra
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["mtp_loss"].append(mtp_loss.detach().item())
            hidden = outputs.last_hidden_state[:, :-1, :]
            return hidden[:, -logits_to_keep:, :]

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            self._extra_loss = None
            loss, entropy_sum, n_valid = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
            if self._extra_loss is not None:
                mode = "train" if self.model.training else "eval"
                self._metrics[mode]["distill_loss"].append(loss.detach().item())
                loss = loss + self._extra_loss.to(loss.dtype)
                self._extra_loss = None
            return loss, entropy_sum, n_valid

    return DeepseekV3DistillationTrainer


def build_logit_distill_trainer(script_args: LogitDistillScriptArguments, training_args):
    student, tokenizer = load_model_and_tokenizer(script_args)
    student = maybe_apply_lora(student, script_args, tokenizer, training_args.output_dir)
    teacher_args = ModelArguments(model_name_or_path=script_args.teacher_name_or_path,
                                  model_dtype=script_args.model_dtype, attn_implementation=script_args.attn_implementation)
    teacher, _ = load_model_and_tokenizer(teacher_args)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher vocab_size={teacher.config.vocab_size} != student vocab_size="
                         f"{student.config.vocab_size}: logit distillation needs the same tokenizer")
    if script_args.teacher_load_in_fp8:
        from .fp8_base import quantize_base

        quantize_base(teacher)
    teacher.eval().requires_grad_(False)
    train, heldout = build_datasets(script_args)
    return _trainer_class()(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=training_callbacks(script_args),
        lmbda=script_args.lmbda,
        heldout_dataset=heldout if script_args.heldout_samples else None,
        heldout_every=script_args.heldout_every,
    )


def main(argv: list[str] | None = None):
    from trl import DistillationConfig

    from .common import run_training

    return run_training(LogitDistillScriptArguments, DistillationConfig, build_logit_distill_trainer, argv)
