"""R1-style reinforcement learning with TRL's `GRPOTrainer`: rule-based rewards (accuracy + format) and, with
`reward_models`, model-based rewards (`trainers/reward_model.py`), weighted by `reward_weights`.

The objective is GRPO's policy loss alone (as in DeepSeek-R1): the MTP and sequence-wise balance losses are not
added; expert balancing keeps running through `MoEBalancingCallback` (bias updates from the training forwards).
"""

from dataclasses import dataclass, field

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
from .rewards import R1_SYSTEM_PROMPT, get_reward_funcs


@dataclass
class GRPOScriptArguments(ModelArguments, DataArguments, TrainingExtrasArguments, LoraArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["gsm8k_accuracy", "format"],
        metadata={"help": "names from deepseek_v3.trainers.rewards.REWARD_FUNCS"},
    )
    reward_models: list[str] = field(
        default_factory=list,
        metadata={"help": "reward-model checkpoints (AutoModelForSequenceClassification, 1 label), used after the "
                          "rule rewards; weight them all with reward_weights"},
    )
    synthetic_rows: int = field(default=512, metadata={"help": "rows when dataset_name is synthetic:addition"})
    system_prompt: str | None = field(default=R1_SYSTEM_PROMPT)


def build_grpo_dataset(args: GRPOScriptArguments):
    """Rows: `prompt` (conversation) plus the original columns, which the reward functions receive.
    `dataset_name: synthetic:addition` is the synthetic addition task (`trainers/synthetic.py`)."""
    if args.dataset_name == "synthetic:addition":
        import datasets

        from .synthetic import addition_rows

        dataset = datasets.Dataset.from_list(addition_rows(args.synthetic_rows, seed=1))  # not the reward model's rows
    else:
        dataset = load_dataset_split(args)
    return dataset.map(lambda row: {"prompt": to_conversation(row[args.prompt_column], args.system_prompt)})


def build_grpo_trainer(script_args: GRPOScriptArguments, training_args, callbacks=None):
    from trl import GRPOTrainer

    model, tokenizer = load_model_and_tokenizer(script_args)
    if training_args.ddp_find_unused_parameters is None and model.config.num_nextn_predict_layers:
        # the GRPO loss never runs the MTP module: under DDP its parameters get no gradient in any step
        training_args.ddp_find_unused_parameters = True
    model = maybe_apply_lora(model, script_args, tokenizer, training_args.output_dir)
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    processing = [None] * len(reward_funcs)
    if script_args.reward_models:
        from .reward_model import load_reward_models

        models, tokenizers = load_reward_models(script_args.reward_models)
        reward_funcs, processing = reward_funcs + models, processing + tokenizers
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(reward_funcs):
        raise ValueError(
            f"reward_weights={weights} has {len(weights)} entries for {len(reward_funcs)} rewards "
            f"(reward_funcs={script_args.reward_funcs} then reward_models={script_args.reward_models})"
        )
    return GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        reward_processing_classes=processing,
        args=training_args,
        train_dataset=build_grpo_dataset(script_args),
        processing_class=tokenizer,
        callbacks=(callbacks or []) + training_callbacks(script_args),
    )


def main(argv: list[str] | None = None):
    from trl import GRPOConfig

    return run_training(GRPOScriptArguments, GRPOConfig, build_grpo_trainer, argv)
