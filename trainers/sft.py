"""Supervised fine-tuning with TRL's `SFTTrainer` (prompt/completion pairs, loss on the completion only).

`DeepseekV3SFTTrainer` trains on the model's own loss -- next-token + `mtp_loss_weight` x MTP loss + the
sequence-wise balance loss -- so SFT keeps the MTP module trained for self-speculative decoding. (TRL 1.16's
`SFTTrainer` computes its loss with a fused LM head that calls the backbone directly, which would silently drop
both extra terms.) Expert balancing runs through `MoEBalancingCallback` (`balancing_gamma`).
"""

from dataclasses import dataclass

import torch

from .common import (
    DataArguments,
    ModelArguments,
    TrainingExtrasArguments,
    load_dataset_split,
    load_model_and_tokenizer,
    to_conversation,
    run_training,
    training_callbacks,
)
from .lora import LoraArguments, maybe_apply_lora

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


@dataclass
class SFTScriptArguments(ModelArguments, DataArguments, TrainingExtrasArguments, LoraArguments):
    pass


def _sft_trainer_class():
    from trl import SFTTrainer

    class DeepseekV3SFTTrainer(SFTTrainer):
        """`SFTTrainer` whose loss is `DeepseekV3ForCausalLM`'s own (main + MTP + balance loss); logs `main_loss`,
        `mtp_loss`, `aux_loss`, `mean_token_accuracy` and `num_tokens`."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            model_inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
            outputs = model(**model_inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks
            with torch.no_grad():
                labels = inputs["labels"][:, 1:]
                mask = labels != -100
                predicted = outputs.logits[:, :-1].argmax(dim=-1)
                correct = self.accelerator.gather_for_metrics(((predicted == labels) & mask).sum()).sum()
                valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
                self._metrics[mode]["mean_token_accuracy"].append((correct / valid.clamp(min=1)).item())
                for name in ("main_loss", "mtp_loss", "aux_loss"):
                    value = getattr(outputs, name)
                    if value is not None:
                        self._metrics[mode][name].append(self._true_loss_value(name, value, num_items_in_batch))
                if mode == "train" and "attention_mask" in inputs:
                    self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

        def _true_loss_value(self, name: str, value: torch.Tensor, num_items_in_batch) -> float:
            """The value of a loss term for the whole optimizer step, from this micro-batch's share on each rank.

            With `num_items_in_batch` the main and MTP losses are sums over this micro-batch's targets divided by the
            targets of the whole step (all micro-batches and, with `average_tokens_across_devices`, all ranks): the
            step's loss is their sum over ranks and micro-batches, so the per-micro-batch value logged (and averaged
            over the micro-batches by the logger) is the sum over ranks times the accumulation steps. The balance
            loss (`aux_loss`) is a per-micro-batch mean: averaged over ranks."""
            gathered = self.accelerator.gather_for_metrics(value.detach().reshape(1))
            if name == "aux_loss" or num_items_in_batch is None:
                return gathered.mean().item()
            over_ranks = gathered.sum() if self.args.average_tokens_across_devices else gathered.mean()
            return (over_ranks * self.current_gradient_accumulation_steps).item()

    return DeepseekV3SFTTrainer


def build_sft_dataset(args: DataArguments):
    dataset = load_dataset_split(args)
    if args.completion_column not in dataset.column_names:
        raise ValueError(
            f"completion_column={args.completion_column!r} is not a column of {args.dataset_name}: "
            f"{dataset.column_names}"
        )

    def convert(row):
        return {
            "prompt": to_conversation(row[args.prompt_column], args.system_prompt),
            "completion": [{"role": "assistant", "content": row[args.completion_column]}],
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def build_sft_trainer(script_args: SFTScriptArguments, training_args, callbacks=None):
    model, tokenizer = load_model_and_tokenizer(script_args)
    model = maybe_apply_lora(model, script_args, tokenizer, training_args.output_dir)
    return _sft_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=build_sft_dataset(script_args),
        processing_class=tokenizer,
        callbacks=(callbacks or []) + training_callbacks(script_args),
    )


def main(argv: list[str] | None = None):
    from trl import SFTConfig

    return run_training(SFTScriptArguments, SFTConfig, build_sft_trainer, argv)
