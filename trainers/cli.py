"""`deepseek-v3 train {sft,grpo,distill,reward} --config recipes/<recipe>.yaml [--key value ...]`.

Arguments are TRL's (`SFTConfig`, `GRPOConfig`) plus the script's dataclass fields; a YAML recipe passed with
`--config` supplies defaults that command-line flags override (TRL's `TrlParser`).
"""

import argparse
import importlib

SCRIPTS = {
    "sft": ("deepseek_v3.trainers.sft", "supervised fine-tuning (TRL SFTTrainer)"),
    "grpo": ("deepseek_v3.trainers.grpo", "R1-style GRPO with rule rewards (TRL GRPOTrainer)"),
    "reward": ("deepseek_v3.trainers.reward_model", "reward model on preference pairs (TRL RewardTrainer)"),
    "distill": ("deepseek_v3.trainers.distill", "--mode trace: teacher traces + rejection sampling + SFT; --mode logits: TRL DistillationTrainer"),
}


def run(args: argparse.Namespace) -> int:
    from .distributed import finish_distributed

    module = importlib.import_module(SCRIPTS[args.script][0])
    module.main(args.script_args)
    finish_distributed()  # every rank leaves together, with the process group torn down
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="SFT / GRPO / distillation with TRL, from YAML recipes")
    parser.add_argument("script", choices=sorted(SCRIPTS), help="; ".join(f"{k}: {v[1]}" for k, v in SCRIPTS.items()))
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="--config RECIPE.yaml and overrides")
    parser.set_defaults(func=run)
