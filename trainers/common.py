"""Model, tokenizer and dataset loading shared by the SFT, GRPO and distillation scripts.

`model_name_or_path` is either a shipped config name (`tiny`, `small`: a randomly initialised model with the
byte-level tokenizer, for tests and demos) or a checkpoint directory / hub id (`deepseek-ai/DeepSeek-V3`,
loaded with `AutoModelForCausalLM`, i.e. our class). `dataset_name` is a hub dataset id (loaded with
`datasets.load_dataset`) or a local `.json`/`.jsonl`/`.csv`/`.parquet` file.
"""

import os
from dataclasses import dataclass, field

import torch

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="tiny", metadata={"help": "shipped config name (tiny, small) or checkpoint path / hub id"}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "defaults to model_name_or_path"})
    model_dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or auto"})
    attn_implementation: str = field(default="sdpa")
    mtp_loss_weight: float | None = field(default=None, metadata={"help": "override the config's MTP loss weight"})


@dataclass
class DataArguments:
    dataset_name: str = field(default="openai/gsm8k", metadata={"help": "hub dataset id or local data file"})
    dataset_config: str | None = field(default="main")
    dataset_split: str = field(default="train")
    prompt_column: str = field(default="question")
    completion_column: str = field(default="answer")
    system_prompt: str | None = field(default=None)
    max_samples: int | None = field(default=None)


@dataclass
class TrainingExtrasArguments:
    balancing_gamma: float = field(
        default=0.001,
        metadata={"help": "aux-loss-free balancing step (0 = keep the router biases fixed, e.g. for light fine-tunes)"},
    )
    balancing_update: str = field(default="sign", metadata={"help": "sign or proportional"})
    freeze_router: bool = field(default=False, metadata={"help": "do not train the MoE gate weights"})
    fp8: bool = field(
        default=False,
        metadata={"help": "DeepSeek-V3 block-wise FP8 matmuls (1x128 activations, 128x128 weights), FP32 masters"},
    )


def training_callbacks(args: TrainingExtrasArguments) -> list:
    """The MoE balancing callback (bias updates, expert-load metrics and plots) and, with `fp8`, the FP8 switch."""
    from .balancing import BalancingConfig
    from .callbacks import MoEBalancingCallback

    config = BalancingConfig(gamma=args.balancing_gamma, update=args.balancing_update, freeze_router=args.freeze_router)
    callbacks = [MoEBalancingCallback(config)]
    if args.fp8:
        from deepseek_v3.kernels.fp8_training import FP8TrainingCallback

        callbacks.append(FP8TrainingCallback())
    return callbacks


def load_model_and_tokenizer(args: ModelArguments):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deepseek_v3  # registers our classes with the Auto classes
    from deepseek_v3.tokenizer import byte_level_tokenizer

    overrides = {} if args.mtp_loss_weight is None else {"mtp_loss_weight": args.mtp_loss_weight}
    if args.model_name_or_path in deepseek_v3.available_configs():
        config = deepseek_v3.load_config(args.model_name_or_path, **overrides)
        model = deepseek_v3.DeepseekV3ForCausalLM(config)
        if args.model_dtype != "auto":
            model = model.to(getattr(torch, args.model_dtype))
        tokenizer = byte_level_tokenizer()
    else:
        dtype = args.model_dtype if args.model_dtype == "auto" else getattr(torch, args.model_dtype)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, dtype=dtype, attn_implementation=args.attn_implementation, **overrides
        )
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or args.model_name_or_path)
    model.config._attn_implementation = args.attn_implementation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_dataset_split(args: DataArguments):
    import datasets

    extension = os.path.splitext(args.dataset_name)[1]
    if os.path.exists(args.dataset_name):
        if extension not in LOCAL_FORMATS:
            raise ValueError(
                f"dataset_name={args.dataset_name!r}: local files must be one of {sorted(LOCAL_FORMATS)}"
            )
        dataset = datasets.load_dataset(LOCAL_FORMATS[extension], data_files=args.dataset_name, split="train")
    else:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config, split=args.dataset_split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    for column in (args.prompt_column,):
        if column not in dataset.column_names:
            raise ValueError(f"prompt_column={column!r} is not a column of {args.dataset_name}: {dataset.column_names}")
    return dataset


def to_conversation(prompt: str, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def run_training(script_arguments_class, training_config_class, build_trainer, argv: list[str] | None = None):
    """Parse `--config recipe.yaml` + flags into (script args, TRL config), build the trainer, train (resuming
    from `resume_from_checkpoint` when set) and save the final model to `output_dir`."""
    from trl import TrlParser

    parser = TrlParser((script_arguments_class, training_config_class))
    script_args, training_args = parser.parse_args_and_config(args=argv)
    trainer = build_trainer(script_args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if getattr(script_args, "use_peft", False) and trainer.is_world_process_zero():
        from .lora import save_lora_outputs  # adapter saved above; now lora_targets.json + merged/

        model = trainer.accelerator.unwrap_model(trainer.model)
        save_lora_outputs(model, training_args.output_dir, trainer.processing_class, fp8=script_args.load_in_fp8)
    return trainer

