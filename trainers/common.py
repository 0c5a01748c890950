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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "train into an output_dir that already holds checkpoints (they are overwritten) instead "
                          "of refusing; use --resume_from_checkpoint to continue them"},
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


OPTIMIZER_STATE_FILES = ("optimizer.pt", "optimizer.bin")  # Trainer's names; FSDP / DeepSpeed keep directories


def _has_optimizer_state(checkpoint: str) -> bool:
    names = os.listdir(checkpoint)
    return any(n in OPTIMIZER_STATE_FILES or n.startswith(("optimizer_", "global_step")) for n in names)


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str, overwrite_output_dir: bool = False) -> str | None:
    """The checkpoint to resume from, with Trainer's conventions made explicit and the silent failure modes refused.

    - ``true`` / ``last`` (any case) = the last ``checkpoint-*`` in ``output_dir`` (Trainer's convention for
      ``True``); an error when there is none;
    - a checkpoint without optimizer state (``optimizer.pt``) is refused: Trainer would resume the step count and
      schedule with a fresh optimizer (Adam moments reset) without a word;
    - without resuming, an ``output_dir`` that already holds checkpoints is refused unless ``overwrite_output_dir``
      (they would be overwritten one by one).
    """
    from transformers.trainer_utils import get_last_checkpoint

    value = resume_from_checkpoint
    if isinstance(value, str) and value.strip().lower() in ("", "false", "none", "no"):
        value = None
    if value is None:
        if os.path.isdir(output_dir) and not overwrite_output_dir and get_last_checkpoint(output_dir) is not None:
            raise ValueError(
                f"output_dir {output_dir} already holds checkpoints ({os.path.basename(get_last_checkpoint(output_dir))}"
                "...); pass --resume_from_checkpoint true to continue the last one, --overwrite_output_dir true to "
                "start over in it, or choose another --output_dir")
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "last", "yes")):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint-* directory in output_dir {output_dir}; "
                             "give a checkpoint path or train without resuming")
        value = last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value}: not a directory (use a checkpoint-* path or 'true' for "
                         f"the last checkpoint in {output_dir})")
    if not _has_optimizer_state(value):
        raise ValueError(
            f"checkpoint {value} has no optimizer state ({' / '.join(OPTIMIZER_STATE_FILES)}): resuming would restart "
            "Adam from zero at the saved step. Resume from a checkpoint saved with its optimizer, or start a new run "
            "from its weights with --model_name_or_path " + str(value))
    return value


def run_training(script_arguments_class, training_config_class, build_trainer, argv: list[str] | None = None):
    """Parse `--config recipe.yaml` + flags into (script args, TRL config), build the trainer, train (resuming
    from `resume_from_checkpoint` when set, see `resolve_resume`) and save the final model to `output_dir`.

    The seed (`--seed`) is set before the model is built, so a randomly initialised model (`tiny`) is the same in
    two runs with the same seed."""
    from transformers import set_seed
    from trl import TrlParser

    parser = TrlParser((script_arguments_class, training_config_class))
    script_args, training_args = parser.parse_args_and_config(args=argv)
    # `push_to_hub: true` pushes the finished run once, card included, through `deepseek_v3.hub.push_folder` (not
    # the Trainer's own per-checkpoint pushes with TRL's generic card).
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and (training_args.hub_model_id or "").count("/") != 1:
        raise ValueError(f"push_to_hub: true needs hub_model_id: ORG/NAME (got {training_args.hub_model_id!r})")
    from .distributed import check_engine, save_final_model
    from .model_card import card_from_trainer

    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir,
                            getattr(script_args, "overwrite_output_dir", False))
    set_seed(training_args.seed)
    trainer = build_trainer(script_args, training_args)
    check_engine(trainer)
    pipeline = f"{training_config_class.__name__.removesuffix('Config')} training run"
    trainer.create_model_card = lambda *args, **kwargs: card_from_trainer(trainer, script_args, argv, pipeline)
    trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, training_args.output_dir)  # full weights also from FSDP's sharded state dict
    if getattr(script_args, "use_peft", False) and trainer.is_world_process_zero():
        from .lora import save_lora_outputs  # adapter saved above; now lora_targets.json + merged/

        model = trainer.accelerator.unwrap_model(trainer.model)
        save_lora_outputs(model, training_args.output_dir, trainer.processing_class, fp8=script_args.load_in_fp8)
    if trainer.is_world_process_zero():
        card_from_trainer(trainer, script_args, argv, pipeline)
        if push_to_hub:
            from deepseek_v3.hub import push_folder

            push_folder(training_args.output_dir, training_args.hub_model_id, private=training_args.hub_private_repo,
                        revision=training_args.hub_revision, token=training_args.hub_token)
    return trainer

