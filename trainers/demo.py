"""`deepseek-v3 demo`: the whole R1-style pipeline, end to end, on a model small enough for a laptop CPU.

Phases (each one's figures go to `summary.json`; a table is printed at the end):

0. **task**: seeded two-step arithmetic word problems with `\\boxed{}` answers (`arithmetic_task.py`), a training
   split and a held-out split whose number/operation combinations never occur in training.
1. **pretrain**: next-token + MTP training on the plain problem texts (no chat template), aux-loss-free balancing
   on (`DeepseekV3SFTTrainer`, i.e. the model's own loss: main + `mtp_loss_weight` x MTP).
2. **sft**: supervised fine-tuning on the chain-of-thought solutions in the chat format (TRL `SFTTrainer` through
   `deepseek_v3.trainers.sft.build_sft_trainer`, loss on the completion only).
3. **grpo**: a short R1-style GRPO phase (TRL `GRPOTrainer` through `deepseek_v3.trainers.grpo.build_grpo_trainer`)
   with the R1 rule rewards: math-verify accuracy and the `<think>` format.
4. **eval** after every phase (and before training) on the held-out split through the evaluation harness
   (`deepseek_v3.eval.runner.evaluate_task`): greedy accuracy and pass@1 over sampled completions (R1's protocol),
   plus a handful of real GSM8K / MATH-500 problems from `--data-dir` when given.
5. **reload + decode**: the final checkpoint is reloaded with `AutoModelForCausalLM`; its logits must equal the
   trained model's; then greedy decoding with `use_mtp=True` (MTP self-speculative decoding) against plain decoding:
   acceptance rate, tokens per target forward, decode tokens/s.

Writes `summary.json`, PNG plots (`plots/`), the model (`final/`, with its model card `README.md`) and exits
non-zero when a phase fails or the reloaded model's logits differ from the trained model's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

PHASES = ("init", "pretrain", "sft", "grpo")
LOGITS_TOLERANCE = 1e-4


@dataclass
class DemoArguments:
    """Everything `deepseek-v3 demo` can be told (each field is a `--flag`)."""

    output_dir: str = "outputs/demo"
    data_dir: str | None = None
    quick: bool = False
    seed: int = 0
    # torch intra-op threads. 2: 1.5x faster than 1 on an idle 2-core machine, which the 10-minute budget needs with
    # the GRPO phase below; pass 1 when other work shares a small CPU (2 threads are then 1.8x slower than 1: OpenMP
    # barriers; docs/demo.md). The figures depend on it (float summation order). 0: torch's default
    threads: int = 2
    # model size: the `tiny` config's architecture (MLA, DeepSeekMoE with sigmoid group-limited routing, 1 MTP
    # module), widened to fit the task and the time budget
    config: str = "tiny"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 384
    moe_intermediate_size: int = 96
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    q_lora_rank: int = 64
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # task
    num_train: int = 4000
    num_heldout: int = 256  # one problem is 0.4 points
    # share of training solutions that write each step's result down; the rest give the whole sum in one go (a
    # mix gave GRPO no better style to select: the tiny model computes both about equally well; docs/demo.md)
    worked_fraction: float = 1.0
    # phases
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    sft_steps: int = 200  # 60 left SFT far from converged (docs/demo.md)
    sft_lr: float = 1e-3
    # GRPO's held-out effect grows with its amount of RL data: 1,280 completions (40 x 32) were neutral over four
    # seeds, 10,240 (80 x 128) raised pass@1 on every seed tried (docs/demo.md)
    grpo_steps: int = 80
    # GRPO lowered held-out accuracy at lr >= 3e-5 in every setting tried, and a pure-noise reward at 3e-5 halved
    # it: the updates' noise outweighs the reward's signal at this scale. 1e-5 with warm-up and cosine decay, rollouts
    # at the evaluation temperature, is the gentlest setting found (docs/demo.md)
    grpo_lr: float = 1e-5
    grpo_temperature: float = 0.6  # rollout temperature (the policy trained is softmax(logits / T))
    batch_size: int = 32  # pretrain and SFT
    grpo_batch_size: int = 128  # completions per GRPO step (grpo_batch_size / num_generations prompts)
    num_generations: int = 4
    balancing_gamma: float = 0.01  # pretrain and SFT
    grpo_balancing_gamma: float = 0.0  # RL phase: router biases kept (bias drift moved routing under the policy)
    decoding: str = "mtp"  # GRPO rollouts and evaluation: "mtp" (self-speculative, exact) or "plain"
    # evaluation
    eval_samples: int = 4
    eval_temperature: float = 0.6
    real_samples: int = 3
    decode_prompts: int = 8
    max_new_tokens: int = 48

    def apply_quick(self) -> None:
        """`--quick`: every phase runs, a few steps each (under 2 minutes; for tests)."""
        self.num_train, self.num_heldout = 256, 16
        self.pretrain_steps, self.sft_steps, self.grpo_steps = 30, 10, 3
        self.batch_size, self.grpo_batch_size, self.num_generations = 16, 16, 4
        self.eval_samples, self.real_samples, self.decode_prompts = 2, 1, 4


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def model_config(args: DemoArguments):
    from deepseek_v3 import load_config

    return load_config(
        args.config, dtype=torch.float32, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        intermediate_size=args.intermediate_size, moe_intermediate_size=args.moe_intermediate_size,
        n_routed_experts=args.n_routed_experts, num_experts_per_tok=args.num_experts_per_tok,
        q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim,
    )


def kv_cache_generation_consistent(model, tokenizer) -> bool:
    """Whether greedy `generate` gives the same tokens with and without the KV cache (a transformers version whose
    cache API the model does not follow yet would make cached decoding see no context)."""
    ids = tokenizer("Ann has 7 apples.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    return torch.equal(cached, plain)


def check_reloaded_logits(trained, reloaded, batch: dict, tolerance: float = LOGITS_TOLERANCE) -> float:
    """Max |logit difference| between the trained model and its reloaded copy on `batch`; raises RuntimeError above
    `tolerance` (the save / reload round trip lost or changed weights)."""
    with torch.no_grad():
        a = trained(**batch, use_cache=False).logits
        b = reloaded(**batch, use_cache=False).logits
    diff = float((a - b).abs().max())
    if not diff <= tolerance:
        raise RuntimeError(f"the reloaded model's logits differ from the trained model's by {diff:.3g} "
                           f"(> {tolerance}): save_pretrained / from_pretrained lost or changed weights")
    return diff


def sign_test_p(gained: int, lost: int) -> float:
    """Exact two-sided sign test on paired outcomes: the chance, if a phase changed nothing but noise (each changed
    problem equally likely to go either way), of a split at least as uneven as `gained` / `lost`."""
    n, k = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def style_breakdown(rows: list[dict]) -> dict:
    """Share of worked completions among evaluated `rows` and the accuracy of each reasoning style."""
    from .arithmetic_task import reasoning_style

    by_style = {"worked": [], "terse": []}
    for row in rows:
        by_style[reasoning_style(row["completion"])].append(bool(row["correct"]))
    return {"worked_share": len(by_style["worked"]) / max(1, len(rows)),
            **{f"accuracy_{style}": (sum(v) / len(v) if v else None) for style, v in by_style.items()}}


def log_series(log_history: list[dict], key: str, step_offset: int = 0) -> list[list[float]]:
    """[[global step, value], ...] of one logged metric."""
    return [[entry["step"] + step_offset, float(entry[key])] for entry in log_history
            if key in entry and "step" in entry and isinstance(entry[key], (int, float)) and math.isfinite(entry[key])]


def last_value(series: list[list[float]]) -> float | None:
    return series[-1][1] if series else None


def balancing_callback(trainer):
    from .callbacks import MoEBalancingCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, MoEBalancingCallback):
            return callback
    raise RuntimeError("the trainer has no MoEBalancingCallback")


class Demo:
    """Runs the phases in order; `self.summary` collects every figure."""

    def __init__(self, args: DemoArguments):
        self.args = args
        self.out = Path(args.output_dir)
        self.plots_dir = self.out / "plots"
        self.summary: dict = {"args": asdict(args), "phases": {}, "accuracy": {}, "status": "running"}
        self.step_offset = 0
        self.maxvio_history: list[dict] = []
        self.layer_labels: list[str] = []
        self.use_cache = True

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every phase in order; the process's torch thread count is set for the run and restored afterwards."""
        previous_threads = torch.get_num_threads()
        if self.args.threads > 0:
            torch.set_num_threads(self.args.threads)
        try:
            return self._run_phases()
        finally:
            torch.set_num_threads(previous_threads)

    def _run_phases(self) -> dict:
        from transformers import set_seed

        set_seed(self.args.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self.plots_dir.mkdir(exist_ok=True)
        start = time.monotonic()
        self.phase_task()
        self.phase_init()
        self.evaluate("init")
        self.phase_pretrain()
        self.evaluate("pretrain")
        self.phase_sft()
        self.evaluate("sft")
        self.phase_grpo()
        self.evaluate("grpo")
        self.phase_reload_and_decode()
        self.real_benchmarks()
        self.write_plots()
        self.summary["wall_seconds"] = round(time.monotonic() - start, 1)
        acc = self.summary["accuracy"]
        self.summary["accuracy_rose"] = {
            metric: bool(acc["init"][metric] < acc["sft"][metric] < acc["grpo"][metric])
            for metric in ("pass@1_sampled", "greedy")
        }
        self.summary["status"] = "ok"
        self.write_summary()
        self.write_cards()
        return self.summary

    def write_summary(self) -> None:
        with open(self.out / "summary.json", "w") as f:
            json.dump(self.summary, f, indent=2)

    # ---------------------------------------------------------------------------------------------------------
    def phase_task(self) -> None:
        from .arithmetic_task import make_splits, pretraining_text, write_jsonl

        a = self.args
        self.train, self.heldout = make_splits(a.num_train, a.num_heldout, seed=a.seed,
                                               worked_fraction=a.worked_fraction)
        self.train_file = write_jsonl(self.train, self.out / "data" / "train.jsonl")
        write_jsonl(self.heldout, self.out / "data" / "heldout.jsonl")
        self.pretrain_texts = [pretraining_text(p) for p in self.train]
        self.summary["task"] = {
            "kind": "two-step arithmetic word problems, \\boxed{} answers",
            "num_train": len(self.train), "num_heldout": len(self.heldout),
            "worked_fraction": sum(p["style"] == "worked" for p in self.train) / len(self.train),
            "example_question": self.train[0]["question"], "example_solution": self.train[0]["solution"],
        }

    def phase_init(self) -> None:
        from deepseek_v3 import DeepseekV3ForCausalLM
        from deepseek_v3.info import parameter_report
        from deepseek_v3.tokenizer import byte_level_tokenizer

        config = model_config(self.args)
        self.tokenizer = byte_level_tokenizer()
        model = DeepseekV3ForCausalLM(config).eval()
        self.use_cache = kv_cache_generation_consistent(model, self.tokenizer)
        if not self.use_cache:
            print("warning: cached and uncached greedy decoding differ with this transformers version; the demo "
                  "decodes plainly without the KV cache (MTP speculative decoding keeps its own, correct cache)", file=sys.stderr)
        self.summary["kv_cache_generation_consistent"] = self.use_cache
        self.init_dir = str(self.out / "init")
        model.save_pretrained(self.init_dir)
        self.tokenizer.save_pretrained(self.init_dir)
        report = parameter_report(config)
        self.summary["model"] = {
            "config": {k: getattr(config, k) for k in (
                "hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank",
                "num_nextn_predict_layers", "vocab_size", "mtp_loss_weight")},
            "total_params_with_mtp": report["total_params_with_mtp"],
            "main_params": report["main_params"],
            "activated_params_per_token": report["activated_params_per_token"],
            "mtp_params_unique": report["mtp_params_unique"],
        }

    # ---------------------------------------------------------------------------------------------------------
    def _record_training(self, name: str, trainer, seconds: float, keys: dict[str, str]) -> dict:
        history = trainer.state.log_history
        series = {label: log_series(history, key, self.step_offset) for label, key in keys.items()}
        callback = balancing_callback(trainer)
        for entry in callback.balancer.history:
            self.maxvio_history.append({**entry, "step": entry["step"] + self.step_offset})
        self.layer_labels = callback.balancer.layer_labels
        maxvio = log_series(history, "moe/maxvio_step", self.step_offset)
        phase = {
            "steps": trainer.state.global_step,
            "seconds": round(seconds, 1),
            "curves": series,
            "final": {label: last_value(s) for label, s in series.items()},
            "maxvio": {"first": maxvio[0][1] if maxvio else None, "last": last_value(maxvio)},
            "balancing_gamma": callback.config.gamma,
            "plots": sorted(str(p) for p in Path(trainer.args.output_dir).glob("moe_*.png")),
        }
        self.step_offset += trainer.state.global_step
        self.summary["phases"][name] = phase
        self.write_summary()
        return phase

    def _common_training_args(self, output_dir: str, steps: int, lr: float) -> dict:
        return dict(
            output_dir=output_dir, max_steps=steps, learning_rate=lr, lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 20), save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), seed=self.args.seed, disable_tqdm=False,
            per_device_train_batch_size=self.args.batch_size,
            bf16=False,  # fp32 end to end: CPU autocast is slower here, and the reload check compares fp32 logits
        )

    def phase_pretrain(self) -> None:
        import datasets
        from transformers import AutoModelForCausalLM
        from trl import SFTConfig

        from .common import TrainingExtrasArguments, training_callbacks
        from .sft import _sft_trainer_class

        a = self.args
        self.pretrain_dir = str(self.out / "pretrain")
        model = AutoModelForCausalLM.from_pretrained(self.init_dir, dtype=torch.float32)
        config = SFTConfig(**self._common_training_args(self.pretrain_dir, a.pretrain_steps, a.pretrain_lr),
                           max_length=128, dataset_text_field="text", packing=False)
        trainer = _sft_trainer_class()(
            model=model, args=config, processing_class=self.tokenizer,
            train_dataset=datasets.Dataset.from_list([{"text": t} for t in self.pretrain_texts]),
            callbacks=training_callbacks(TrainingExtrasArguments(balancing_gamma=a.balancing_gamma)),
        )
        t0 = time.monotonic()
        trainer.train()
        trainer.save_model(self.pretrain_dir)
        self.tokenizer.save_pretrained(self.pretrain_dir)
        self._record_training("pretrain", trainer, time.monotonic() - t0,
                              {"loss": "loss", "main_loss": "main_loss", "mtp_loss": "mtp_loss"})

    def phase_sft(self) -> None:
        from trl import SFTConfig

        from .sft import SFTScriptArguments, build_sft_trainer

        a = self.args
        self.sft_dir = str(self.out / "sft")
        script_args = SFTScriptArguments(
            model_name_or_path=self.pretrain_dir, dataset_name=self.train_file, prompt_column="question",
            completion_column="solution", system_prompt=None, balancing_gamma=a.balancing_gamma,
        )
        config = SFTConfig(**self._common_training_args(self.sft_dir, a.sft_steps, a.sft_lr), max_length=192)
        trainer = build_sft_trainer(script_args, config)
        t0 = time.monotonic()
        trainer.train()
        trainer.save_model(self.sft_dir)
        self._record_training("sft", trainer, time.monotonic() - t0,
                              {"loss": "loss", "main_loss": "main_loss", "mtp_loss": "mtp_loss",
                               "mean_token_accuracy": "mean_token_accuracy"})

    def phase_grpo(self) -> None:
        from trl import GRPOConfig

        from .grpo import GRPOScriptArguments, build_grpo_trainer

        a = self.args
        self.final_dir = str(self.out / "final")
        script_args = GRPOScriptArguments(
            model_name_or_path=self.sft_dir, dataset_name=self.train_file, prompt_column="question",
            reward_funcs=["math_accuracy", "format"], system_prompt=None, balancing_gamma=a.grpo_balancing_gamma,
        )
        common = self._common_training_args(self.final_dir, a.grpo_steps, a.grpo_lr)
        common.update(logging_steps=1, per_device_train_batch_size=a.grpo_batch_size)
        config = GRPOConfig(
            **common, num_generations=a.num_generations, max_completion_length=a.max_new_tokens, beta=0.0,
            temperature=a.grpo_temperature, generation_kwargs=self.generation_overrides(),
        )
        self.grpo_trainer = trainer = build_grpo_trainer(script_args, config)
        t0 = time.monotonic()
        trainer.train()
        trainer.save_model(self.final_dir)
        self._record_training("grpo", trainer, time.monotonic() - t0, {
            "reward": "reward", "accuracy_reward": "rewards/math_accuracy_reward/mean",
            "format_reward": "rewards/format_reward/mean", "completion_length": "completions/mean_length",
        })

    # ---------------------------------------------------------------------------------------------------------
    def generation_overrides(self) -> dict | None:
        """Generation settings of the GRPO rollouts and the evaluations: MTP self-speculative decoding (greedy output
        equals plain greedy decoding, sampling keeps the model's distribution: Leviathan et al.'s rule), or plain
        decoding -- without the KV cache when this transformers version's cache path is inconsistent."""
        if self.args.decoding == "mtp":
            return {"use_mtp": True}
        if self.args.decoding != "plain":
            raise ValueError(f"decoding={self.args.decoding!r} must be 'mtp' or 'plain'")
        return None if self.use_cache else {"use_cache": False}

    def _backend(self, model_dir: str, mtp: bool = True):
        from deepseek_v3.eval.backends import HFBackend

        backend = HFBackend(model_dir, dtype="float32", batch_size=32, seed=self.args.seed)
        overrides = self.generation_overrides() if mtp else (None if self.use_cache else {"use_cache": False})
        for key, value in (overrides or {}).items():
            setattr(backend.model.generation_config, key, value)
        return backend

    def evaluate(self, phase: str) -> None:
        """Held-out accuracy of the phase's checkpoint: greedy and pass@1 over `eval_samples` sampled completions."""
        from deepseek_v3.eval.data import read_jsonl
        from deepseek_v3.eval.runner import evaluate_task

        from .arithmetic_task import ArithmeticTask

        a = self.args
        model_dir = {"init": self.init_dir, "pretrain": getattr(self, "pretrain_dir", None),
                     "sft": getattr(self, "sft_dir", None), "grpo": getattr(self, "final_dir", None)}[phase]
        backend = self._backend(model_dir)
        torch.manual_seed(a.seed)
        task = ArithmeticTask(self.heldout)
        eval_dir = self.out / "eval" / phase
        greedy = evaluate_task(task, backend, output_dir=eval_dir / "greedy", max_new_tokens=a.max_new_tokens,
                               batch_size=64)
        sampled = evaluate_task(task, backend, output_dir=eval_dir / "sampled", num_samples=a.eval_samples,
                                max_new_tokens=a.max_new_tokens, temperature=a.eval_temperature, top_p=0.95,
                                batch_size=64)
        rows, sampled_rows = (read_jsonl(eval_dir / kind / task.name / "samples.jsonl")
                              for kind in ("greedy", "sampled"))
        example = rows[0]
        solved = sorted(r["task_id"] for r in rows if r["correct"])
        styles = {"greedy": style_breakdown(rows), "sampled": style_breakdown(sampled_rows)}
        self.summary["accuracy"][phase] = {
            "greedy": greedy["metrics"]["accuracy"],
            "pass@1_sampled": sampled["metrics"]["accuracy"],
            "num_problems": greedy["num_docs"],
            "samples_per_problem": a.eval_samples,
            "temperature": a.eval_temperature,
            "styles": styles,
            "example": {"question": example["prompt"][-1]["content"], "completion": example["completion"]},
            "solved_greedy": solved,
        }
        previous = PHASES[PHASES.index(phase) - 1] if phase != "init" else None
        if previous in self.summary["accuracy"]:
            # paired on the same problems: how many the phase newly solved and how many it lost (greedy)
            before = set(self.summary["accuracy"][previous]["solved_greedy"])
            gained, lost = len(set(solved) - before), len(before - set(solved))
            self.summary["accuracy"][phase]["vs_previous_greedy"] = {
                "phase": previous, "gained": gained, "lost": lost, "sign_test_p": sign_test_p(gained, lost)}
        print(f"[{phase}] held-out accuracy: greedy {greedy['metrics']['accuracy']:.3f}, "
              f"pass@1 (T={a.eval_temperature}, {a.eval_samples} samples) {sampled['metrics']['accuracy']:.3f}; "
              f"worked reasoning in {styles['sampled']['worked_share']:.0%} of sampled completions")
        self.write_summary()

    def real_benchmarks(self) -> None:
        """A few real GSM8K / MATH-500 problems through the same harness and scorers (the model is far too small
        to solve them; this shows the pipeline from a trained checkpoint to benchmark numbers)."""
        if not self.args.data_dir or self.args.real_samples <= 0:
            return
        from deepseek_v3.eval.base import get_task
        from deepseek_v3.eval.runner import evaluate_task

        backend = self._backend(self.final_dir, mtp=False)  # the benchmarks' stop strings need plain generate
        results = {}
        for name in ("gsm8k", "math500"):
            task = get_task(name, chat=True, data_dir=self.args.data_dir)
            out = evaluate_task(task, backend, output_dir=self.out / "eval" / "real", limit=self.args.real_samples,
                                max_new_tokens=self.args.max_new_tokens, batch_size=8)
            results[name] = {"accuracy": out["metrics"]["accuracy"], "num_problems": out["num_docs"]}
        self.summary["real_benchmarks"] = results
        self.write_summary()

    # ---------------------------------------------------------------------------------------------------------
    def phase_reload_and_decode(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # the trained model without accelerate's mixed-precision forward wrapper, if any
        trained = self.grpo_trainer.accelerator.unwrap_model(self.grpo_trainer.model, keep_fp32_wrapper=False).eval()
        reloaded = AutoModelForCausalLM.from_pretrained(self.final_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.final_dir)
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["question"]}], tokenize=False,
                                                 add_generation_prompt=True)
                   for p in self.heldout[: self.args.decode_prompts]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        decode = {"model_class": type(reloaded).__name__}
        self.summary["reload"] = decode
        try:
            decode["reloaded_max_abs_logit_diff"] = check_reloaded_logits(trained, reloaded, batch)
        finally:
            self.write_summary()

        def timed(**kwargs):
            outputs, new_tokens, seconds = [], 0, 0.0
            for prompt in prompts:  # one prompt at a time: the latency setting speculative decoding targets
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = reloaded.generate(ids, max_new_tokens=self.args.max_new_tokens, do_sample=False, **kwargs)
                seconds += time.perf_counter() - t0
                outputs.append(out[0, ids.shape[1]:].tolist())
                new_tokens += out.shape[1] - ids.shape[1]
                if kwargs.get("use_mtp"):
                    stats = reloaded.speculative_stats
                    totals["drafted"] += stats.drafted
                    totals["accepted"] += stats.accepted
                    totals["emitted"] += stats.emitted
                    totals["row_forwards"] += stats.row_forwards
            return outputs, new_tokens, seconds

        totals = {"drafted": 0, "accepted": 0, "emitted": 0, "row_forwards": 0}
        timed(use_mtp=False, use_cache=self.use_cache)  # warm-up
        plain, plain_tokens, plain_s = timed(use_mtp=False, use_cache=self.use_cache)
        totals = {k: 0 for k in totals}
        mtp, mtp_tokens, mtp_s = timed(use_mtp=True)
        reference = plain if self.use_cache else timed(use_mtp=False, use_cache=False)[0]
        decode.update({
            "prompts": len(prompts),
            "plain_decoding": "greedy, KV cache" if self.use_cache else "greedy, no KV cache",
            "mtp_acceptance_rate": totals["accepted"] / max(1, totals["drafted"]),
            "mtp_tokens_per_target_forward": totals["emitted"] / max(1, totals["row_forwards"]),
            "plain_tokens_per_second": plain_tokens / plain_s,
            "mtp_tokens_per_second": mtp_tokens / mtp_s,
            "mtp_speedup": (mtp_tokens / mtp_s) / (plain_tokens / plain_s),
            "mtp_output_equals_greedy": mtp == reference,
            "completion_example": tokenizer.decode(mtp[0], skip_special_tokens=True),
        })
        self.write_summary()

    # ---------------------------------------------------------------------------------------------------------
    def write_plots(self) -> None:
        from .plots import accuracy_figure, loss_curves_figure, plot_maxvio_curve, reward_curve_figure, save_figure

        phases = self.summary["phases"]
        paths = [
            save_figure(loss_curves_figure({k: phases[k]["curves"] for k in ("pretrain", "sft")}),
                        self.plots_dir / "loss_curves.png"),
            save_figure(reward_curve_figure(phases["grpo"]["curves"]), self.plots_dir / "reward_curve.png"),
            save_figure(accuracy_figure(self.summary["accuracy"]), self.plots_dir / "accuracy.png"),
        ]
        if self.maxvio_history:
            paths.append(plot_maxvio_curve(self.maxvio_history, self.layer_labels, self.plots_dir / "maxvio.png",
                                           title="MaxVio per MoE layer (pretrain, SFT, GRPO)"))
        heatmap = self.out / "pretrain" / "moe_expert_load.png"
        if heatmap.exists():
            paths.append(shutil.copy(heatmap, self.plots_dir / "expert_load_pretrain.png"))
        self.summary["plots"] = [str(p) for p in paths]

    CARD_PHASES = {  # phase: (label in the card's figures, pipeline, tags)
        "pretrain": ("pretrain", "pre-training (next-token + MTP) demo", ["trl", "demo"]),
        "sft": ("SFT", "pre-training + SFT demo", ["trl", "demo", "sft"]),
        "grpo": ("GRPO", "pre-training + SFT + GRPO demo", ["trl", "demo", "grpo"]),
    }

    def write_cards(self) -> None:
        """A model card in every phase's checkpoint (`pretrain/`, `sft/`, `final/`): the figures of the phases up to
        it and its own held-out evaluation, all from `summary.json`."""
        from .model_card import write_model_card

        s = self.summary
        phases, acc = s["phases"], s["accuracy"]
        dirs = {"pretrain": self.pretrain_dir, "sft": self.sft_dir, "grpo": self.final_dir}
        training: dict = {}
        gamma = 0.0  # balancing was on in a checkpoint if any phase up to it ran it
        for phase, (label, pipeline, tags) in self.CARD_PHASES.items():
            info = phases[phase]
            training[f"{label}: optimizer steps"] = info["steps"]
            if phase == "grpo":
                training["GRPO: final reward"] = info["final"]["reward"]
            else:
                training[f"{label}: final main loss"] = info["final"]["main_loss"]
                training[f"{label}: final MTP loss"] = info["final"]["mtp_loss"]
            training[f"{label}: final MaxVio"] = info["maxvio"]["last"]
            training[f"{label}: balancing gamma"] = info["balancing_gamma"]
            gamma = max(gamma, info["balancing_gamma"])
            figures = dict(training)
            evals = {"arithmetic": {"accuracy": acc[phase]["greedy"], "pass@1_sampled": acc[phase]["pass@1_sampled"],
                                    "num_docs": acc[phase]["num_problems"]}}
            if phase == "grpo":
                decode = s["reload"]
                figures["MTP acceptance rate (greedy)"] = decode["mtp_acceptance_rate"]
                figures["MTP tokens per target forward"] = decode["mtp_tokens_per_target_forward"]
                for name, r in s.get("real_benchmarks", {}).items():
                    evals[name] = {"accuracy": r["accuracy"], "num_docs": r["num_problems"]}
            write_model_card(
                dirs[phase], base_model=None, recipe={"command": "deepseek-v3 demo", "phase": phase, **asdict(self.args)},
                training=figures, balancing_gamma=gamma, eval_results=evals, datasets=None,
                pipeline=pipeline, tags=tags,
                name=f"deepseek-v3-demo-{phase}",
            )


# ----------------------------------------------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def format_summary(summary: dict) -> str:
    """The printed table: one row per phase, then the decoding figures."""
    rows = [("phase", "steps", "time s", "final loss", "main / MTP loss", "reward", "MaxVio", "acc greedy",
             "pass@1 sampled")]
    acc = summary["accuracy"]
    for phase in PHASES:
        info = summary["phases"].get(phase, {})
        final = info.get("final", {})
        losses = f"{_fmt(final.get('main_loss'))} / {_fmt(final.get('mtp_loss'))}" if "main_loss" in final else "-"
        rows.append((phase if phase != "init" else "init (before)", _fmt(info.get("steps")), _fmt(info.get("seconds"), ".1f"),
                     _fmt(final.get("loss")), losses, _fmt(final.get("reward")),
                     _fmt(info.get("maxvio", {}).get("last")), _fmt(acc.get(phase, {}).get("greedy")),
                     _fmt(acc.get(phase, {}).get("pass@1_sampled"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    m = summary["model"]
    lines.insert(0, f"model: {m['total_params_with_mtp'] / 1e6:.2f}M parameters ({m['activated_params_per_token'] / 1e6:.2f}M "
                    f"activated per token, {m['mtp_params_unique'] / 1e6:.2f}M MTP), "
                    f"{m['config']['n_routed_experts']} routed experts (top-{m['config']['num_experts_per_tok']})")
    d = summary.get("reload", {})
    if "mtp_acceptance_rate" in d:
        lines += [
            "",
            f"reloaded with AutoModelForCausalLM ({d['model_class']}): max |logit diff| {d['reloaded_max_abs_logit_diff']:.2e}",
            f"MTP self-speculative decoding: acceptance {d['mtp_acceptance_rate']:.3f}, "
            f"{d['mtp_tokens_per_target_forward']:.2f} tokens per target forward, "
            f"{d['mtp_tokens_per_second']:.1f} vs {d['plain_tokens_per_second']:.1f} tokens/s plain "
            f"({d['mtp_speedup']:.2f}x; plain = {d['plain_decoding']}); output equals greedy: {d['mtp_output_equals_greedy']}",
        ]
    for name, r in summary.get("real_benchmarks", {}).items():
        lines.append(f"{name}: accuracy {r['accuracy']:.3f} on {r['num_problems']} real problems")
    if "accuracy_rose" in summary:
        a = summary["accuracy"]
        lines.append("held-out pass@1 before -> after SFT -> after GRPO: "
                     f"{a['init']['pass@1_sampled']:.3f} -> {a['sft']['pass@1_sampled']:.3f} -> "
                     f"{a['grpo']['pass@1_sampled']:.3f} (rose: {summary['accuracy_rose']['pass@1_sampled']}); greedy: "
                     f"{a['init']['greedy']:.3f} -> {a['sft']['greedy']:.3f} -> {a['grpo']['greedy']:.3f}")
        change = a["grpo"].get("vs_previous_greedy")
        if change:
            lines.append(f"greedy, paired on the {a['grpo']['num_problems']} held-out problems: GRPO newly solved "
                         f"{change['gained']} and lost {change['lost']} of SFT's (one problem = "
                         f"{1 / a['grpo']['num_problems']:.3f}; two-sided sign test p = {change['sign_test_p']:.2g})")
    if "wall_seconds" in summary:
        lines.append(f"wall time {summary['wall_seconds']:.0f} s; summary.json, plots/ and final/ in "
                     f"{summary['args']['output_dir']}")
    return "\n".join(lines)


def run(cli_args: argparse.Namespace) -> int:
    args = DemoArguments(**{f.name: getattr(cli_args, f.name) for f in fields(DemoArguments)})
    if args.quick:
        args.apply_quick()
    demo = Demo(args)
    try:
        summary = demo.run()
    except Exception:  # a failed phase: keep what was measured, say where it failed, exit non-zero
        traceback.print_exc()
        demo.summary["status"] = "failed"
        demo.summary["error"] = traceback.format_exc(limit=3)
        demo.write_summary()
        print(f"demo failed; partial figures in {demo.out / 'summary.json'}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="the R1-style pipeline on a small model: pretrain + MTP, SFT, GRPO, eval, MTP decoding",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(DemoArguments):
        flag = f"--{f.name.replace('_', '-')}"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action="store_true",
                                help="every phase, a few steps each (under 2 minutes)" if f.name == "quick" else None)
            continue
        kind = {"int": int, "float": float}.get(f.type, str) if isinstance(f.type, str) else {int: int, float: float}.get(f.type, str)
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"default: {f.default}")
    parser.set_defaults(func=run)
