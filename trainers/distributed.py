"""Saving the final model from a sharded training run (FSDP2 / DeepSpeed ZeRO-3 / DDP) in the published layout.

`Trainer.save_model` writes nothing loadable by `from_pretrained` when FSDP keeps a sharded state dict
(`fsdp_state_dict_type: SHARDED_STATE_DICT`, what `recipes/accelerate/fsdp2.yaml` uses so that intermediate
checkpoints are written by every rank without gathering 671B parameters on one): it only saves full weights for
`FULL_STATE_DICT`. `save_final_model` gathers the full state dict once at the end (a collective: every rank calls
it) and writes it with `save_pretrained` on the main process, so the output directory reloads in one process with
the published tensor names (per-expert weights, MTP copies of the embedding and head). DeepSpeed ZeRO-3 gathers
through `stage3_gather_16bit_weights_on_model_save` (set in `recipes/accelerate/ds_zero3.json`); DDP and single
process go through `Trainer.save_model` unchanged.
"""

from __future__ import annotations

import os

# what `accelerate launch --config_file recipes/accelerate/<engine>.yaml` asks for, by the environment it sets
REQUESTED_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def check_engine(trainer) -> None:
    """Raise if `accelerate launch` asked for FSDP or DeepSpeed but the trainer runs another engine.

    Accelerate turns an FSDP config into FSDP only on accelerator devices: with `use_cpu: true` (the CPU recipes)
    or on a machine without GPU it silently trains with plain DDP (`MULTI_CPU`), which replicates the whole model on
    every rank. The run must say so instead of pretending to shard."""
    for variable, engine in REQUESTED_ENGINES.items():
        if os.environ.get(variable, "false").lower() != "true":
            continue
        running = trainer.accelerator.distributed_type.value
        if running != engine:
            raise RuntimeError(
                f"`accelerate launch` asked for {engine} ({variable}=true) but the trainer runs {running}: Accelerate "
                f"enables {engine} only on accelerator devices (GPU, ...), not with `use_cpu: true` or on a CPU-only "
                "machine. Train with `recipes/accelerate/ddp.yaml` there, or shard with transformers' own FSDP2 "
                "(`from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`, see docs/distributed.md)."
            )


def _fsdp_keeps_sharded_state_dict(trainer) -> bool:
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    return "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)


def save_final_model(trainer, output_dir: str) -> None:
    """`trainer.save_model(output_dir)`, except that a FSDP run with a sharded state dict gathers the full weights
    and saves them in the `from_pretrained` layout. Call on every rank."""
    if not _fsdp_keeps_sharded_state_dict(trainer):
        trainer.save_model(output_dir)
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # full tensors on rank 0 (CPU), collective
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=trainer.args.should_save)
    if trainer.args.should_save and trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()


def finish_distributed() -> None:
    """End a multi-process run: wait until every rank is done (rank 0 writes the card, the LoRA outputs, ... after
    training), then destroy the process group. Without it, a rank that finishes first exits with gloo's threads
    still alive, and the C++ runtime can abort it at interpreter exit ("terminate called without an active
    exception", exit code -6) after a run that succeeded. No-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["finish_distributed", "save_final_model"]
