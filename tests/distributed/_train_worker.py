"""Training worker for the engine-equality tests (test_engines.py).

Run plainly (one process: the reference) or under `accelerate launch --config_file recipes/accelerate/<engine>.yaml`
(2 CPU processes, gloo). Trains the tiny model with the SFT trainer of `deepseek-v3 train sft` (the model's own loss:
main + MTP + optional sequence-wise balance loss; the balancing callback updates the router biases), plain SGD, fp32,
then writes, on every rank, `rank{r}.pt` (world size, engine, router biases, logged losses) and, on rank 0, the full
trained weights `weights.pt`; `--save` also saves the final model through `save_final_model`, as the CLI does.

    python _train_worker.py INIT OUT --batch 4 [--grad-accum 1] [--steps 3] [--equal-lengths] [--save]
        [--distributed fsdp|tp|tp_ep] [--expect-world 2]

INIT is a saved tiny model (test_engines.py saves one with a skewed router and seq_aux_loss_alpha > 0, so the
balancing and the balance loss both act); `--distributed` loads it sharded by transformers
(`from_pretrained(..., distributed_config=DistributedConfig(...))`: FSDP2, tensor parallel, TP + expert parallel),
which `Trainer` trains without wrapping it again.
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "trainers"))

from _moe_helpers import VOCAB  # noqa: E402

DISTRIBUTED_CONFIGS = {"fsdp": {"fsdp_size": 2}, "tp": {"tp_size": 2}, "tp_ep": {"tp_size": 2, "ep_size": 2}}

NUM_SAMPLES = 16
SEQ_LEN = 32


def dataset(equal_lengths: bool):
    """16 sequences; the prompt (masked) and completion lengths vary per sample unless `equal_lengths`."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(7)
    rows = []
    for i in range(NUM_SAMPLES):
        length = SEQ_LEN if equal_lengths else 20 + int(torch.randint(0, 13, (1,), generator=gen))
        prompt = 8 if equal_lengths else 4 + int(torch.randint(0, 10, (1,), generator=gen))
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (length - prompt)})
    return Dataset.from_list(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("init")
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True, help="per-device batch size")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--distributed", choices=sorted(DISTRIBUTED_CONFIGS))
    parser.add_argument("--equal-lengths", action="store_true")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--expect-world", type=int, default=1)
    cli = parser.parse_args()

    torch.set_num_threads(1)
    from trl import SFTConfig

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deepseek_v3  # noqa: F401  (registers the classes)
    from deepseek_v3.trainers.balancing import find_routers
    from deepseek_v3.trainers.callbacks import MoEBalancingCallback
    from deepseek_v3.trainers.distributed import save_final_model
    from deepseek_v3.trainers.sft import _sft_trainer_class

    kwargs = {}
    if cli.distributed:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(**DISTRIBUTED_CONFIGS[cli.distributed])
    model = AutoModelForCausalLM.from_pretrained(cli.init, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(cli.init)
    args = SFTConfig(
        output_dir=cli.out,
        per_device_train_batch_size=cli.batch,
        gradient_accumulation_steps=cli.grad_accum,
        max_steps=cli.steps,
        optim="sgd",
        learning_rate=0.05,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        bf16=False,  # SFTConfig defaults to bf16 autocast, also on CPU: these runs compare fp32 weights
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,  # gloo processes (Accelerate: MULTI_CPU)
        seed=0,
        disable_tqdm=True,
        max_length=None,
        dataset_num_proc=None,
    )
    callback = MoEBalancingCallback(gamma=0.01, plots=False)
    trainer = _sft_trainer_class()(
        model=model, args=args, train_dataset=dataset(cli.equal_lengths), processing_class=tokenizer,
        callbacks=[callback],
    )
    world = trainer.accelerator.num_processes
    if world != cli.expect_world:
        raise SystemExit(f"expected {cli.expect_world} processes, the run has {world}")
    trainer.train()
    rank = trainer.accelerator.process_index
    if cli.distributed:  # DTensor parameters: gather them (a collective, every rank)
        from transformers.distributed.utils import gather_full_state_dict

        state_dict = gather_full_state_dict(trainer.model)
    else:  # full weights (ZeRO-3 gathers them from the DeepSpeed engine)
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if cli.save:
        save_final_model(trainer, os.path.join(cli.out, "final"))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    biases = torch.stack([info.router.e_score_correction_bias.detach().cpu() for info in find_routers(unwrapped)])
    logs = [{k: v for k, v in entry.items() if k in ("loss", "main_loss", "mtp_loss", "aux_loss")}
            for entry in trainer.state.log_history if "loss" in entry]
    engine = trainer.accelerator.distributed_type.value
    if trainer.is_fsdp_enabled:
        engine += f"-v{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    if cli.distributed:
        engine += f"+transformers-{cli.distributed}"
    torch.save({"world": world, "engine": engine, "wrapped": type(trainer.model_wrapped).__name__,
                "biases": biases, "logs": logs}, os.path.join(cli.out, f"rank{rank}.pt"))
    if rank == 0:
        torch.save({k: v.detach().float().cpu().clone() for k, v in state_dict.items()},
                   os.path.join(cli.out, "weights.pt"))
        with open(os.path.join(cli.out, "logs.json"), "w") as f:
            json.dump(logs, f)


if __name__ == "__main__":
    main()
