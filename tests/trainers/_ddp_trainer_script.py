"""Run by `torchrun --nproc_per_node 2` from test_callback.py: MoEBalancingCallback under Trainer + DDP (gloo, CPU).

Each rank sees different data (the distributed sampler); writes its final biases and per-step global loads."""

import os
import sys

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from _moe_helpers import skew_router, tiny_model, token_dataset  # noqa: E402

from deepseek_v3.trainers.balancing import find_routers  # noqa: E402
from deepseek_v3.trainers.callbacks import MoEBalancingCallback  # noqa: E402


class Recording(MoEBalancingCallback):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.local_loads, self.global_loads = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from deepseek_v3.trainers.balancing import collect_expert_load

        self.local_loads.append(collect_expert_load(model))
        super().on_step_end(args, state, control, model=model, **kwargs)
        self.global_loads.append(self.balancer.last_load.clone())


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model(seed=0)
    skew_router(model)
    callback = Recording(gamma=0.02, plots=False)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, logging_steps=1,
        report_to="none", use_cpu=True, ddp_backend="gloo", save_strategy="no", disable_tqdm=True, seed=0,
        gradient_accumulation_steps=2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(64), callbacks=[callback])
    trainer.train()
    rank = int(os.environ["RANK"])
    biases = torch.stack([info.router.e_score_correction_bias for info in find_routers(model)])
    torch.save(
        {"biases": biases, "local": callback.local_loads, "global": callback.global_loads,
         "wrapped": type(trainer.model_wrapped).__name__},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
