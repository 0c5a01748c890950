"""Fine-tuning memory: full fine-tune vs LoRA over a BF16 base vs LoRA over an FP8 base.

Measured (`--config small` by default): each mode runs in its own process (so peak RSS is that mode's alone):
BF16 model, AdamW, `--steps` optimizer steps on random tokens (`--batch` x `--seq-len`, main + MTP loss); prints
peak RSS (CUDA: max allocated), trainable parameters and the mean step time (first step excluded).

Computed (`deepseek-v3`, 671B, built on the meta device, nothing allocated): bytes of model states per device with
ZeRO-3 / FSDP2 (parameters, gradients and optimizer states sharded over N GPUs of 80 GB; activations, temporary
buffers and the all-gathered layer excluded):

- full: BF16 weights (2 B) + BF16 grads (2 B) + FP32 master (4 B) + AdamW m, v (8 B) = 16 B per parameter;
- LoRA, BF16 base: 2 B per frozen parameter + 16 B per adapter parameter;
- LoRA, FP8 base: 1 B per quantized weight + 4 B per 128x128 block scale, 2 B for the rest (embeddings, head,
  router, norms, MTP eh_proj), + 16 B per adapter parameter.

LoRA targets (both LoRA rows, so they compare the base alone): the MLA projections, the shared experts and the dense
MLPs (`--lora-r`, default 16); the routed experts keep no adapter (peft cannot adapt them over an FP8 base).

    python benchmarks/finetune_memory.py                       # small measured + 671B computed
    python benchmarks/finetune_memory.py --steps 3 --seq-len 128  # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import torch

MODES = ("full", "lora-bf16", "lora-fp8")
LORA_MODULES = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"]
GPU_COUNTS = (8, 16, 32, 64)
GPU_BYTES = 80e9


def lora_args(r: int, fp8: bool):
    from deepseek_v3.trainers.lora import LoraArguments

    return LoraArguments(use_peft=True, lora_r=r, lora_alpha=2 * r, lora_target_modules=LORA_MODULES,
                         lora_preset="attention", load_in_fp8=fp8)


def measure(mode: str, config_name: str, steps: int, batch: int, seq_len: int, r: int) -> dict:
    """One mode, in this process: returns peak memory, trainable parameters, mean step time."""
    import deepseek_v3
    from deepseek_v3.trainers.lora import apply_lora

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config(config_name)).to(torch.bfloat16)
    if mode != "full":
        model = apply_lora(model, lora_args(r, fp8=mode == "lora-fp8"))
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    base_bytes = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
                     if "lora_" not in n)
    vocab = model.config.vocab_size
    times = []
    for _ in range(steps):
        x = torch.randint(3, vocab, (batch, seq_len), device=device)
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "device": device.type, "peak_bytes": peak, "trainable": sum(p.numel() for p in trainable),
            "base_weight_bytes": base_bytes, "step_s": sum(times[1:]) / max(1, len(times) - 1),
            "last_loss": loss.item()}


def computed_671b(r: int) -> dict[str, dict]:
    """Bytes of model states for the 671B config (meta device) per mode: {mode: {"total": B, "per_gpu": {N: B}}}."""
    import deepseek_v3
    from deepseek_v3.kernels.fp8_checkpoint import NOT_QUANTIZED
    from deepseek_v3.trainers.lora import resolve_targets

    import re

    config = deepseek_v3.load_config("deepseek-v3")
    with torch.device("meta"):
        model = deepseek_v3.DeepseekV3ForCausalLM(config)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    quantized = scales = 0
    for name, p in params.items():
        is_expert = name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")
        on_disk = name if is_expert else name
        if (p.dim() == 2 and name.endswith(".weight") and not any(re.search(pat, on_disk) for pat in NOT_QUANTIZED)) or is_expert:
            quantized += p.numel()
            rows, cols = p.shape[-2], p.shape[-1]
            experts = p.shape[0] if p.dim() == 3 else 1
            if name.endswith("gate_up_proj"):  # gate and up quantized separately on disk
                scales += experts * 2 * math.ceil(rows / 2 / 128) * math.ceil(cols / 128)
            else:
                scales += experts * math.ceil(rows / 128) * math.ceil(cols / 128)
    modules, _ = resolve_targets(model, lora_args(r, fp8=False))
    named = dict(model.named_modules())
    adapter = sum(r * (named[m].in_features + named[m].out_features) for m in modules)
    other = total - quantized
    states = {
        "full": 16 * total,
        "lora-bf16": 2 * total + 16 * adapter,
        "lora-fp8": quantized + 4 * scales + 2 * other + 16 * adapter,
    }
    return {"total_params": total, "quantized_params": quantized, "adapter_params": adapter,
            "modes": {m: {"total": b, "per_gpu": {n: b / n for n in GPU_COUNTS}} for m, b in states.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)  # child process: measure one mode
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only, args.config, args.steps, args.batch, args.seq_len, args.lora_r)))
        return 0

    import transformers

    import peft

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"# command: python benchmarks/finetune_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    measured = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--only", mode, "--config", args.config, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--lora-r", str(args.lora_r)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        measured.append(json.loads(out))
    print(f"\n## measured: `{args.config}`, BF16, batch {args.batch} x {args.seq_len}, {args.steps} AdamW steps, "
          f"LoRA r={args.lora_r}\n")
    print("| mode | peak memory (" + measured[0]["device"] + ") | base weights | trainable params | step time |")
    print("|---|---|---|---|---|")
    for m in measured:
        print(f"| {m['mode']} | {m['peak_bytes'] / 2**20:.0f} MiB | {m['base_weight_bytes'] / 2**20:.1f} MiB | "
              f"{m['trainable']:,} | {m['step_s']:.2f} s |")
    computed = computed_671b(args.lora_r)
    print(f"\n## computed: DeepSeek-V3 671B (+MTP), {computed['total_params'] / 1e9:.1f}B parameters "
          f"({computed['quantized_params'] / 1e9:.1f}B FP8-quantizable), LoRA r={args.lora_r}: "
          f"{computed['adapter_params'] / 1e6:.0f}M adapter parameters; model states per GPU, ZeRO-3 / FSDP2\n")
    print("| mode | total | " + " | ".join(f"{n} GPUs" for n in GPU_COUNTS) + " |")
    print("|---|---|" + "---|" * len(GPU_COUNTS))
    for mode, row in computed["modes"].items():
        cells = [f"{b / 1e9:.0f} GB" + ("" if b <= GPU_BYTES else " (> 80 GB)") for b in row["per_gpu"].values()]
        print(f"| {mode} | {row['total'] / 1e12:.2f} TB | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": measured, "computed_671b": computed}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
