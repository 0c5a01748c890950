"""R1-style reinforcement learning with TRL's `GRPOTrainer` and rule-based rewards (accuracy + format).

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
    system_prompt: str | None = field(default=R1_SYSTEM_PROMPT)


def build_grpo_dataset(args: GRPOScriptArguments):
    """Rows: `prompt` (conversation) plus the original columns, which the reward functions receive."""
    dataset = load_dataset_split(args)
    return dataset.map(lambda row: {"prompt": to_conversation(row[args.prompt_column], args.system_prompt)})


def build_grpo_trainer(script_args: GRPOScriptArguments, training_args, callbacks=None):
    from trl import GRPOTrainer

    model, tokenizer = load_model_and_tokenizer(script_args)
    model = maybe_apply_lora(model, script_args, tokenizer, training_args.output_dir)
    return GRPOTrainer(
        model=model,
        reward_funcs=get_reward_funcs(script_args.reward_funcs),
        args=training_args,
        train_dataset=build_grpo_dataset(script_args),
        processing_class=tokenizer,
        callbacks=(callbacks or []) + training_callbacks(script_args),
    )


def main(argv: list[str] | None = None):
    from trl import GRPOConfig

    return run_training(GRPOScriptArguments, GRPOConfig, build_grpo_trainer, argv)
