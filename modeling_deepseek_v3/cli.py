"""`deepseek-v3` console script.

Each part of the package contributes its own subcommands through a ``register(subparsers)`` function, imported
lazily so that ``deepseek-v3 info`` does not pay for importing the eval harness or Triton:

- ``info``     -- parameter / memory / KV-cache accounting of a config (``deepseek_v3.info``)
- ``eval``     -- benchmark harness (``deepseek_v3.eval.cli``)
- ``convert``  -- FP8 <-> BF16 checkpoint conversion (``deepseek_v3.kernels.cli``)
- ``train``    -- TRL SFT / GRPO / R1 distillation from YAML recipes (``deepseek_v3.trainers.cli``)
- ``demo``     -- the R1-style pipeline end to end on a small model (``deepseek_v3.trainers.demo``)
- ``push``     -- upload a training output directory to the Hugging Face Hub (``deepseek_v3.hub``)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> (subcommand name, one-line help). Each module exposes `register(subparsers)`.
SUBCOMMAND_MODULES = {
    "deepseek_v3.info": ("info", "parameter counts, weight memory and KV-cache size of a config"),
    "deepseek_v3.eval.cli": ("eval", "run or score benchmarks (MMLU, MATH-500, GSM8K, HumanEval, ...)"),
    "deepseek_v3.kernels.cli": ("convert", "convert checkpoints between FP8 (block-wise e4m3) and BF16"),
    "deepseek_v3.trainers.demo": ("demo", "pretrain + MTP, SFT, GRPO, eval and MTP decoding of a small model"),
    "deepseek_v3.trainers.cli": ("train", "SFT / GRPO / distillation with TRL, from YAML recipes"),
    "deepseek_v3.hub": ("push", "upload a training output directory to the Hugging Face Hub"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-v3", description="DeepSeek-V3 for Hugging Face transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name, (command, help_text) in SUBCOMMAND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # an optional part (e.g. eval extras) is not installed
            stub = subparsers.add_parser(command, help=f"{help_text} (unavailable: {err})")
            stub.set_defaults(func=lambda args, err=err: _unavailable(err))
            continue
        if not hasattr(module, "register"):
            continue
        module.register(subparsers)
    return parser


def _unavailable(err: Exception) -> int:
    print(f"This subcommand needs an optional dependency: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
