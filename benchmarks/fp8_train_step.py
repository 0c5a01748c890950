"""Training-step time and loss: block-wise FP8 (``enable_fp8``) vs BF16, same model, same data, same seed.

A DeepSeek-V3-shaped model of 1.14B parameters, MTP layer included (``--preset 1b``: hidden 2048, 8 layers of
which the first is dense, MLA with q_lora 768 / kv_lora 512 / 16 heads of 128 + 64 rope, 16 routed experts of
width 1024 top-4 plus one shared expert, vocab 32768; every GEMM dimension a multiple of 128) trains ``--steps`` AdamW steps on synthetic
arithmetic progressions (learnable, so the loss moves) twice from the same initial weights:

- BF16: ``torch.autocast(bfloat16)`` with FP32 master weights;
- FP8: the same plus ``enable_fp8(model)`` (Fprop / Dgrad / Wgrad of every eligible linear and the routed experts
  in e4m3 with 1x128 / 128x128 scales; GEMMs through the per-shape dispatch of ``kernels/fp8_dispatch``).

Printed: parameters, median step time over the steps after ``--warmup`` (CUDA-synchronized), tokens/s, the
step-time ratio BF16 / FP8 (> 1: FP8 is faster), the loss at the last step and the mean of the last 5 steps for
both, and their relative difference.

    python benchmarks/fp8_train_step.py                          # CUDA, 1B preset, 20 steps
    python benchmarks/fp8_train_step.py --smoke                  # CPU, tiny preset, 3 steps: exercises the code
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import deepseek_v3
from deepseek_v3.kernels.fp8_training import enable_fp8

PRESETS = {
    "1b": dict(
        vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1, num_nextn_predict_layers=1,
    ),
    "tiny": dict(),  # hub_configs/tiny.json as is
}  # fmt: skip


def build_config(preset: str):
    base = "small" if preset == "1b" else "tiny"
    return deepseek_v3.load_config(base, **PRESETS[preset])


def progressions(n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """[n, length] arithmetic progressions mod (vocab - 3), shifted past the special ids 0-2."""
    span = vocab - 3
    start = torch.randint(0, span, (n, 1), generator=generator)
    stride = torch.randint(1, 8, (n, 1), generator=generator)
    return 3 + (start + stride * torch.arange(length)) % span


def run(config, fp8: bool, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)  # same initial weights in both runs (built directly on the device)
    with torch.device(device):
        model = deepseek_v3.DeepseekV3ForCausalLM(config).to(dtype=torch.float32)
    model.config.mtp_loss_weight = args.mtp_loss_weight
    model.train()
    if fp8:
        enable_fp8(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed + 1)
    losses, times = [], []
    for step in range(args.steps):
        tokens = progressions(args.batch, args.seq_len, config.vocab_size, generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(tokens, labels=tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()  # synchronizes
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if step % args.log_every == 0 or step == args.steps - 1:
            name = "fp8 " if fp8 else "bf16"
            print(f"  {name} step {step:3d}  loss {loss:.4f}  {times[-1] * 1e3:.0f} ms", flush=True)
    params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timed = times[args.warmup :] or times
    return {"losses": losses, "step_s": statistics.median(timed), "params": params, "peak_gib": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: 1b on CUDA, tiny on CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (compilation, tuning)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--mtp-loss-weight", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 3 steps of 2x64 (CPU check of the code)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.steps, args.warmup, args.batch, args.seq_len, args.log_every = "tiny", 3, 1, 2, 64, 1
    device = torch.device(args.device)
    preset = args.preset or ("1b" if device.type == "cuda" else "tiny")
    config = build_config(preset)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}: preset {preset}, {args.steps} steps of {args.batch}x{args.seq_len} "
          f"tokens, AdamW lr {args.lr}, bf16 autocast, fp32 master weights", flush=True)  # fmt: skip
    res = {}
    for fp8 in (False, True):
        res[fp8] = run(config, fp8, args, device)
    bf, f8 = res[False], res[True]
    tokens = args.batch * args.seq_len
    last5 = lambda r: statistics.mean(r["losses"][-5:])  # noqa: E731
    rel_last = (f8["losses"][-1] - bf["losses"][-1]) / bf["losses"][-1]
    rel_mean = (last5(f8) - last5(bf)) / last5(bf)
    print()
    print(f"{bf['params'] / 1e9:.3f}B parameters ({preset}), {where}")
    print()
    print("| run | step (ms, median after warm-up) | tokens/s | peak memory (GiB) | loss at last step "
          "| mean loss, last 5 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("bf16", bf), ("fp8", f8)):
        print(f"| {name} | {r['step_s'] * 1e3:.1f} | {tokens / r['step_s']:.0f} | {r['peak_gib']:.1f} "
              f"| {r['losses'][-1]:.4f} | {last5(r):.4f} |")  # fmt: skip
    print()
    print(f"step-time ratio bf16 / fp8: {bf['step_s'] / f8['step_s']:.3f}x (> 1: FP8 faster); loss difference "
          f"fp8 vs bf16: {100 * rel_last:+.3f}% at the last step, {100 * rel_mean:+.3f}% over the last 5 steps")
    ok = all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (bf, f8))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
