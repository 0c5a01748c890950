"""Supervised fine-tuning with TRL's `SFTTrainer` (prompt/completion pairs, loss on the completion only).

The model's loss includes the MTP term (`mtp_loss_weight`), so SFT also keeps the MTP module trained for
self-speculative decoding.
"""

from dataclasses import dataclass

from .common import DataArguments, ModelArguments, load_dataset_split, load_model_and_tokenizer, to_conversation


@dataclass
class SFTScriptArguments(ModelArguments, DataArguments):
    pass


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
    from trl import SFTTrainer

    model, tokenizer = load_model_and_tokenizer(script_args)
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=build_sft_dataset(script_args),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def main(argv: list[str] | None = None):
    from trl import SFTConfig, TrlParser

    script_args, training_args = TrlParser((SFTScriptArguments, SFTConfig)).parse_args_and_config(args=argv)
    trainer = build_sft_trainer(script_args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer
