"""Reward models: train one with TRL's `RewardTrainer` (`deepseek-v3 train reward`), use it as a GRPO reward.

Training: `DeepseekV3ForSequenceClassification` (`num_labels=1`; from a shipped config name or a causal-LM
checkpoint, whose MTP layers are dropped) on preference rows `prompt` / `chosen` / `rejected` (Bradley-Terry loss).
`dataset_name: synthetic:addition` builds the pairs from the synthetic addition task (`trainers/synthetic.py`:
right vs wrong sum); any local or hub preference dataset with those columns works too. With the synthetic task,
`heldout_pairs` pairs on problems outside the training rows measure the pairwise accuracy (chosen scored above
rejected), logged as `heldout_accuracy` when training starts and ends and written to `output_dir/heldout_accuracy.json`.

With near-miss negatives (`negatives: near`, off by 1..10: mostly the last digit differs) a randomly initialised
tiny model stays at chance (so does a tiny Llama); `recipes/reward_tiny.yaml` uses `negatives: any` and starts from
the tiny model after SFT on the addition task (`recipes/sft_addition_tiny.yaml`), as reward models usually start from
the SFT model (held-out accuracy in docs/finetuning.md).

In GRPO (`trainers/grpo.py`): `reward_models: [path, ...]` loads each with `AutoModelForSequenceClassification`
(ours or any other architecture, with its own tokenizer) and passes it to `GRPOTrainer` after the rule rewards;
`reward_weights` (TRL's) weights every reward, rules first, in that order. TRL logs each one per step as
`rewards/<name>/mean` (a model's name is its directory name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .common import DataArguments, ModelArguments, load_dataset_split

SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class RewardScriptArguments(ModelArguments, DataArguments):
    dataset_name: str = field(default="synthetic:addition", metadata={"help": "synthetic:addition or a dataset "
                                                                               "with prompt/chosen/rejected"})
    synthetic_rows: int = field(default=512, metadata={"help": "rows of the synthetic task"})
    seed_data: int = field(default=0, metadata={"help": "seed of the synthetic task"})
    negatives: str = field(default="any", metadata={"help": "synthetic rejected sums: any (uniform wrong sum) or "
                                                             "near (off by 1..10)"})
    heldout_pairs: int = field(default=256, metadata={"help": "synthetic pairs on unseen problems for the held-out "
                                                              "pairwise accuracy (0 = none)"})


def build_preference_datasets(args: RewardScriptArguments):
    """(train, held-out or None); the held-out pairs exist for the synthetic task (problems not in training)."""
    import datasets

    from .synthetic import addition_rows, heldout_addition_rows, preference_pairs

    if args.dataset_name == SYNTHETIC_PREFIX + "addition":
        rows = addition_rows(args.synthetic_rows, seed=args.seed_data)
        train = preference_pairs(rows, seed=args.seed_data, system_prompt=args.system_prompt, negatives=args.negatives)
        heldout = None
        if args.heldout_pairs:
            unseen = heldout_addition_rows(args.heldout_pairs, exclude=rows, seed=args.seed_data + 1)
            heldout = preference_pairs(unseen, seed=args.seed_data + 1, system_prompt=args.system_prompt,
                                       negatives=args.negatives)
        return datasets.Dataset.from_list(train), heldout
    if args.dataset_name.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"dataset_name={args.dataset_name!r}: the synthetic task is {SYNTHETIC_PREFIX}addition")
    dataset = load_dataset_split(args)
    missing = {"chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{args.dataset_name} lacks the preference columns {sorted(missing)}: {dataset.column_names}")
    return dataset, None


def _as_text(tokenizer, prompt, completion) -> str:
    if isinstance(completion, list):  # conversational, as TRL's RewardTrainer tokenizes it
        return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    text = prompt + completion
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


@torch.no_grad()
def reward_scores(model, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """The model's score of each text (right-padded, as TRL's collator pads)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], add_special_tokens=False, padding=True,
                          padding_side="right", return_tensors="pt").to(device)
        scores.append(model(**batch).logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(scores)


def pairwise_accuracy(model, tokenizer, pairs: list[dict]) -> float:
    """Fraction of `pairs` (prompt / chosen / rejected) whose chosen completion scores above the rejected one."""
    chosen = reward_scores(model, tokenizer, [_as_text(tokenizer, p["prompt"], p["chosen"]) for p in pairs])
    rejected = reward_scores(model, tokenizer, [_as_text(tokenizer, p["prompt"], p["rejected"]) for p in pairs])
    return (chosen > rejected).float().mean().item()


def load_reward_model_and_tokenizer(args: ModelArguments):
    """`DeepseekV3ForSequenceClassification` (1 label) from a shipped config name (random init) or a checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import deepseek_v3
    from deepseek_v3.tokenizer import byte_level_tokenizer

    dtype = torch.float32 if args.model_dtype == "auto" else getattr(torch, args.model_dtype)
    if args.model_name_or_path in deepseek_v3.available_configs():
        config = deepseek_v3.load_config(args.model_name_or_path, num_labels=1)
        model = deepseek_v3.DeepseekV3ForSequenceClassification(config).to(dtype)
        tokenizer = byte_level_tokenizer()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=1, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_reward_models(paths: list[str]) -> tuple[list, list]:
    """(models, tokenizers) for GRPO's `reward_funcs` / `reward_processing_classes`, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import deepseek_v3  # noqa: F401  (registers our classes)

    models, tokenizers = [], []
    for path in paths:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
        if model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has num_labels={model.config.num_labels}; a reward model has 1")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        models.append(model)
        tokenizers.append(tokenizer)
    return models, tokenizers


def build_reward_trainer(script_args: RewardScriptArguments, training_args):
    from trl import RewardTrainer

    model, tokenizer = load_reward_model_and_tokenizer(script_args)
    train, heldout = build_preference_datasets(script_args)
    trainer = RewardTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    if heldout:
        from .callbacks import HeldOutMetricCallback

        def accuracy() -> float:
            return pairwise_accuracy(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, heldout)

        trainer.add_callback(HeldOutMetricCallback(trainer, "heldout_accuracy", accuracy, "heldout_accuracy.json",
                                                   record={"pairs": len(heldout)}))
    return trainer


def main(argv: list[str] | None = None):
    from trl import RewardConfig

    from .common import run_training

    trainer = run_training(RewardScriptArguments, RewardConfig, build_reward_trainer, argv)
    trainer.processing_class.save_pretrained(trainer.args.output_dir)
    return trainer
