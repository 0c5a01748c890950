"""Run by `torchrun --nproc_per_node 2` from test_distill_traces.py: `train distill --mode trace` under DDP (gloo,
CPU). Each rank records the world size it saw and the trace records it trained on."""

import hashlib
import json
import os
import sys

import torch


def main(data: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    from deepseek_v3.trainers import distill

    seen = {}
    original = distill.build_student_dataset

    def recording(args, traces_file):
        with open(traces_file, "rb") as f:
            seen["sha256"] = hashlib.sha256(f.read()).hexdigest()
        dataset = original(args, traces_file)
        seen["rows"] = len(dataset)
        return dataset

    distill.build_student_dataset = recording
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "distill_r1.yaml")
    distill.main(["--config", recipe, "--teacher_name_or_path", "tiny", "--model_name_or_path", "tiny", "--dataset_name", data,
                  "--max_samples", "4", "--num_samples_per_prompt", "1", "--max_new_tokens", "16",
                  "--filter_reward", "none", "--max_steps", "1", "--per_device_train_batch_size", "1",
                  "--max_length", "512", "--bf16", "false", "--output_dir", os.path.join(out_dir, "run"), "--use_cpu", "true",
                  "--ddp_backend", "gloo", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"])
    rank = torch.distributed.get_rank()
    record = {"world_size": torch.distributed.get_world_size(), "env_world_size": int(os.environ["WORLD_SIZE"]), **seen}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
