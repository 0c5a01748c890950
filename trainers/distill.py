"""R1-style distillation (`--mode trace`, the default): a teacher writes reasoning traces, a rule reward keeps the correct ones (rejection
sampling, as for DeepSeek-R1's 800k SFT samples), and the student is fine-tuned on them with `DeepseekV3SFTTrainer` (next-token + MTP loss).

Traces are appended to `traces_file` (jsonl) as soon as each batch is generated, so an interrupted run resumes
where it stopped. Under DDP only the main process generates and writes them; the other ranks wait at a barrier
and train on the same file (a path all ranks can read).

`--mode logits` runs logit distillation on TRL's `DistillationTrainer` instead (`trainers/distill_logits.py`).
"""

import json
import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

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
class DistillScriptArguments(ModelArguments, DataArguments, TrainingExtrasArguments, LoraArguments):
    mode: str = field(default="trace", metadata={"help": "trace (teacher traces + SFT) or logits (TRL DistillationTrainer)"})
    teacher_name_or_path: str = field(default="tiny", metadata={"help": "checkpoint / hub id of the teacher"})
    num_samples_per_prompt: int = 1
    max_new_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.95
    generation_batch_size: int = 8
    filter_reward: str | None = field(
        default="gsm8k_accuracy", metadata={"help": "reward that must be 1.0 to keep a trace ('none' keeps all)"}
    )
    traces_file: str | None = field(default=None, metadata={"help": "default: <output_dir>/traces.jsonl"})
    system_prompt: str | None = field(default=R1_SYSTEM_PROMPT)
    generation_seed: int = 0


def _done_prompts(path: str) -> set[int]:
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    done.add(json.loads(line)["prompt_index"])
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by an interruption
    return done


@torch.no_grad()
def generate_traces(args: DistillScriptArguments, traces_file: str) -> str:
    teacher_args = ModelArguments(
        model_name_or_path=args.teacher_name_or_path, model_dtype=args.model_dtype, attn_implementation="sdpa"
    )
    teacher, tokenizer = load_model_and_tokenizer(teacher_args)
    teacher.eval()
    tokenizer.padding_side = "left"
    dataset = load_dataset_split(args)
    keep_all = args.filter_reward is None or args.filter_reward.lower() in ("", "none")
    reward = None if keep_all else get_reward_funcs([args.filter_reward])[0]
    done = _done_prompts(traces_file)
    todo = [i for i in range(len(dataset)) if i not in done]
    torch.manual_seed(args.generation_seed)
    os.makedirs(os.path.dirname(os.path.abspath(traces_file)), exist_ok=True)
    with open(traces_file, "a") as out:
        for start in tqdm(range(0, len(todo), args.generation_batch_size), desc="teacher traces"):
            indices = todo[start : start + args.generation_batch_size]
            rows = [dataset[i] for i in indices]
            prompts = [
                tokenizer.apply_chat_template(
                    to_conversation(r[args.prompt_column], args.system_prompt), tokenize=False, add_generation_prompt=True
                )
                for r in rows
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(teacher.device)
            generated = teacher.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else None,
                top_p=args.top_p if args.temperature > 0 else None,
                num_return_sequences=args.num_samples_per_prompt,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for j, text in enumerate(texts):
                row = rows[j // args.num_samples_per_prompt]
                kept_reward = None
                if reward is not None:
                    columns = {k: [v] for k, v in row.items()}
                    kept_reward = reward([text], **columns)[0]
                record = {
                    "prompt_index": indices[j // args.num_samples_per_prompt],
                    "prompt": row[args.prompt_column],
                    "completion": text,
                    "reward": kept_reward,
                    "kept": kept_reward is None or kept_reward >= 1.0,
                }
                out.write(json.dumps(record) + "\n")
            out.flush()
    return traces_file


def build_student_dataset(args: DistillScriptArguments, traces_file: str):
    import datasets

    with open(traces_file) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r["kept"]]
    if not kept:
        raise ValueError(
            f"no teacher trace in {traces_file} passed filter_reward={args.filter_reward!r} "
            f"({len(records)} generated); use a stronger teacher, more samples, or filter_reward=None"
        )
    return datasets.Dataset.from_list(
        [
            {
                "prompt": to_conversation(r["prompt"], args.system_prompt),
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in kept
        ]
    )


def build_distill_trainer(script_args: DistillScriptArguments, training_args):
    """Generate (or finish generating) the teacher traces, then build the student's SFT trainer on the kept ones."""
    from .sft import _sft_trainer_class

    from accelerate import PartialState

    traces_file = script_args.traces_file or os.path.join(training_args.output_dir, "traces.jsonl")
    state = PartialState()  # under DDP: the main process writes the traces once, the others wait, then read them
    if state.is_main_process:
        generate_traces(script_args, traces_file)
    state.wait_for_everyone()
    student, tokenizer = load_model_and_tokenizer(script_args)
    student = maybe_apply_lora(student, script_args, tokenizer, training_args.output_dir)
    return _sft_trainer_class()(
        model=student,
        args=training_args,
        train_dataset=build_student_dataset(script_args, traces_file),
        processing_class=tokenizer,
        callbacks=training_callbacks(script_args),
    )


def requested_mode(argv: list[str] | None) -> str:
    """`--mode` from the command line, else from the `--config` recipe, else `trace`."""
    import sys

    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    mode, config = None, None
    for i, arg in enumerate(argv):
        if arg.startswith("--mode="):
            mode = arg.split("=", 1)[1]
        elif arg == "--mode" and i + 1 < len(argv):
            mode = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
    if mode is None and config is not None:
        with open(config) as f:
            mode = (yaml.safe_load(f) or {}).get("mode")
    mode = mode or "trace"
    if mode not in ("trace", "logits"):
        raise ValueError(f"mode={mode!r}: use trace (teacher traces + SFT) or logits (logit distillation)")
    return mode


def main(argv: list[str] | None = None):
    from trl import SFTConfig

    if requested_mode(argv) == "logits":
        from .distill_logits import main as logits_main

        return logits_main(argv)

    return run_training(DistillScriptArguments, SFTConfig, build_distill_trainer, argv)
