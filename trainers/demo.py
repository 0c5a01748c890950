"""`deepseek-v3 demo`: the smallest end-to-end run of the whole stack.

Builds a model from a shipped config (`tiny` by default) with the byte-level tokenizer, trains it for a few steps
with `transformers.Trainer` (loss = next-token + MTP), saves it, reloads it with `AutoModelForCausalLM` (our class,
MTP layer included) and generates from a prompt. Text comes from GSM8K's training questions when `--data-dir`
holds them (the layout of the shared benchmark data), else from a small built-in corpus.
"""

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

BUILTIN_CORPUS = [
    "DeepSeek-V3 is a mixture-of-experts language model with multi-head latent attention.",
    "Each token is routed to eight of two hundred and fifty-six experts, plus one shared expert.",
    "Multi-token prediction adds a module that predicts the token after the next one.",
    "Auxiliary-loss-free balancing adjusts a per-expert bias after every training step.",
    "The key-value cache stores a compressed latent vector and a small rotary key per token.",
    "FP8 training scales activations per 1x128 tile and weights per 128x128 block.",
]


@dataclass
class DemoArguments:
    config: str = "tiny"
    output_dir: str = "outputs/demo"
    max_steps: int = 30
    learning_rate: float = 3e-3
    per_device_train_batch_size: int = 8
    seq_len: int = 64
    data_dir: str | None = None
    num_texts: int = 256
    seed: int = 0
    prompt: str = "Multi-token prediction"
    max_new_tokens: int = 24


class PackedTextDataset(torch.utils.data.Dataset):
    """Texts joined with EOS and cut into fixed-length blocks (labels = input_ids; the model shifts them)."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        num_blocks = max(1, len(ids) // seq_len)
        ids = (ids * math.ceil(num_blocks * seq_len / max(len(ids), 1)))[: num_blocks * seq_len]
        self.blocks = torch.tensor(ids).view(num_blocks, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def load_texts(args: DemoArguments) -> list[str]:
    if args.data_dir:
        path = Path(args.data_dir) / "gsm8k" / "train.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"--data-dir {args.data_dir}: expected GSM8K training data at {path}")
        with open(path) as f:
            return [json.loads(line)["question"] for _, line in zip(range(args.num_texts), f)]
    return BUILTIN_CORPUS * max(1, args.num_texts // len(BUILTIN_CORPUS))


def run_demo(args: DemoArguments) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from deepseek_v3 import DeepseekV3ForCausalLM, load_config
    from deepseek_v3.tokenizer import byte_level_tokenizer

    set_seed(args.seed)
    tokenizer = byte_level_tokenizer()
    config = load_config(args.config, dtype=torch.float32)
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"config {args.config!r} has vocab_size={config.vocab_size} < {len(tokenizer)} tokens of the byte-level "
            "tokenizer; use the `tiny` or `small` config"
        )
    model = DeepseekV3ForCausalLM(config)
    dataset = PackedTextDataset(load_texts(args), tokenizer, args.seq_len)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]

    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    tokenizer.save_pretrained(final_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(final_dir)
    inputs = reloaded_tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        generated = reloaded.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    completion = reloaded_tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    summary = {
        "model_class": type(reloaded).__name__,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "saved_to": final_dir,
        "prompt": args.prompt,
        "completion": completion,
    }
    with open(os.path.join(args.output_dir, "demo_summary.json"), "w") as f:
        json.dump({"args": asdict(args), **summary}, f, indent=2)
    return summary


def run(cli_args: argparse.Namespace) -> int:
    args = DemoArguments(**{f.name: getattr(cli_args, f.name) for f in fields(DemoArguments)})
    summary = run_demo(args)
    print(json.dumps(summary))
    finite = summary["last_loss"] is not None and math.isfinite(summary["last_loss"])
    return 0 if finite else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a tiny model a few steps, save, reload with AutoModelForCausalLM and generate"
    )
    for f in fields(DemoArguments):
        kind = {int: int, float: float}.get(f.type, str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=f.default)
    parser.set_defaults(func=run)
