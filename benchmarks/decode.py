"""Decode speed: transformers' built-in DeepseekV3 vs ours (expanded / absorbed MLA / MTP speculative decoding).

Same config (`small` by default) and the same weights in all four:

    (a) transformers' built-in DeepseekV3ForCausalLM (re-expands the whole latent cache through kv_b_proj each step)
    (b) ours, mla_absorb="off" (same expanded computation)
    (c) ours, absorbed MLA decode (attention over the cached latent)
    (d) ours, absorbed + generate(use_mtp=True) (the MTP module drafts, the main model verifies)

The weights are the `small` model trained briefly on a synthetic corpus (arithmetic progressions) so that the MTP
head drafts well; they are cached in --weights-dir and reused. For each context length the prompt is one such
sequence per row (--batch rows, default 1); prefill is timed separately from decoding; decoding is greedy for --new-tokens tokens.

    python benchmarks/decode.py                      # small, contexts 256 1024 4096, 1 thread
    python benchmarks/decode.py --contexts 256 --new-tokens 16 --train-steps 20   # quick look
"""

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as HFDeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM as HFDeepseekV3ForCausalLM

import deepseek_v3
from deepseek_v3.speculative import cache_bytes_per_token_per_layer

FIRST_TOKEN = 3  # ids below are bos / eos / pad


def progressions(n: int, length: int, span: int, generator: torch.Generator) -> torch.Tensor:
    """[n, length] arithmetic progressions mod `span` (random start, stride 1..3), shifted past the special ids."""
    start = torch.randint(0, span, (n, 1), generator=generator)
    stride = torch.randint(1, 4, (n, 1), generator=generator)
    return FIRST_TOKEN + (start + stride * torch.arange(length)) % span


def synchronize(device: torch.device) -> None:
    """Wait for queued device work before reading a host clock (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, steps: int, batch: int, seq_len: int, lr: float, span: int, seed: int, log_every: int = 10):
    """Main + MTP loss (MTP weight 1) on progressions, AdamW with a 10-step warm-up; returns the model in eval mode."""
    device = next(model.parameters()).device
    model.config.mtp_loss_weight = 1.0
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    start = time.perf_counter()
    for step in range(steps):
        tokens = progressions(batch, seq_len, span, generator).to(device)
        out = model(tokens, labels=tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % log_every == 0 or step == steps - 1:
            print(f"  [{batch}x{seq_len}] step {step:4d}  main loss {out.main_loss.item():.3f}"
                  f"  mtp loss {out.mtp_loss.item():.3f}  ({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
    model.config.mtp_loss_weight = 0.3
    return model.eval()


def load_or_train(args) -> Path:
    """Phases STEPSxBATCHxLEN, e.g. short sequences first (learn the task fast), then longer ones (attend sharply
    over long contexts). Each phase's result is cached (`<weights-dir>-phase<i>`, the last one `<weights-dir>`)."""
    phases = [tuple(int(v) for v in phase.split("x")) for phase in args.phases]
    dirs = [Path(f"{args.weights_dir}-phase{i}") for i in range(len(phases) - 1)] + [Path(args.weights_dir)]
    done = [i for i, d in enumerate(dirs) if (d / "config.json").exists()]
    if done and done[-1] == len(dirs) - 1:
        return dirs[-1]
    if done:
        model = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(dirs[done[-1]], dtype=torch.float32)
    else:
        torch.manual_seed(args.seed)
        model = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config(args.config, torch_dtype="float32")).float()
    model.to(args.device)  # trained in fp32 on --device
    for i in range((done[-1] + 1) if done else 0, len(phases)):
        steps, batch, length = phases[i]
        print(f"training {args.config}, phase {i}: {steps} steps of {batch}x{length}", flush=True)
        train(model, steps, batch, length, args.lr / (1 + i), args.span, args.seed + i)
        model.save_pretrained(dirs[i])
    return dirs[-1]


@torch.no_grad()
def time_plain_decode(model, prompt: torch.Tensor, new_tokens: int, **forward_kwargs) -> dict:
    """Prefill, then `new_tokens` greedy steps of one token with a DynamicCache."""
    cache = DynamicCache(config=model.config)
    synchronize(prompt.device)
    start = time.perf_counter()
    out = model(prompt, cache=cache, use_cache=True, **forward_kwargs)
    token = out.logits[:, -1:].argmax(-1)
    synchronize(prompt.device)
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True, **forward_kwargs)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    synchronize(prompt.device)
    decode = time.perf_counter() - start
    return {
        "prefill_s": prefill,
        "decode_tok_s": prompt.shape[0] * new_tokens / decode,
        "bytes": cache_bytes_per_token_per_layer(cache)[0],
        "tokens": torch.cat(tokens, 1),
    }


@torch.no_grad()
def time_speculative_decode(model, prompt: torch.Tensor, new_tokens: int, draft_tokens: int = 1) -> dict:
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens + 1, eos_token_id=None, pad_token_id=2)
    sequences = model.generate(prompt, generation_config=config, use_mtp=True, mtp_draft_tokens=draft_tokens)
    stats = model.speculative_stats
    decoder = model.speculative_decoder
    return {
        "prefill_s": stats.prefill_seconds,
        "decode_tok_s": prompt.shape[0] * new_tokens / stats.decode_seconds,
        "bytes": cache_bytes_per_token_per_layer(decoder.cache)[0],
        "tokens": sequences[:, prompt.shape[1] :],
        "acceptance": stats.acceptance_rate,
        "tokens_per_forward": stats.mean_accepted_tokens,
        "by_position": stats.acceptance_by_position,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (different progressions)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant and context; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared host)")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2],
                        help="MTP speculation variants (d): tokens drafted per verification (2+: chained drafts)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the four models at decode time (training is always fp32)")  # fmt: skip
    parser.add_argument("--weights-dir", default=None,
                        help="trained weights cache (default: benchmarks/.cache/<config>-progressions-<recipe>)")  # fmt: skip
    parser.add_argument("--phases", nargs="+", default=["100x4x96", "60x1x512", "25x1x2048"],
                        help="training phases STEPSxBATCHxSEQLEN (main + MTP loss on progressions)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--span", type=int, default=64, help="progressions use token ids 3 .. 3 + span - 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip (a) and (b): only absorbed decode (c) and MTP (d), compared with (c)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.weights_dir is None:
        recipe = f"{'_'.join(args.phases)}-lr{args.lr}-span{args.span}-seed{args.seed}"  # one cache per training recipe
        args.weights_dir = os.path.join("benchmarks", ".cache", f"{args.config}-progressions-{recipe}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    weights = load_or_train(args)
    ours = deepseek_v3.DeepseekV3ForCausalLM.from_pretrained(weights, dtype=torch.float32).to(device).eval()
    hf_config = HFDeepseekV3Config.from_pretrained(weights)
    builtin = HFDeepseekV3ForCausalLM.from_pretrained(weights, config=hf_config, dtype=torch.float32).to(device).eval()
    span = args.span

    # same weights (checked in fp32, before any cast): the built-in model reproduces our logits
    check = progressions(1, 64, span, torch.Generator().manual_seed(123)).to(device)
    with torch.no_grad():
        diff = (ours(check).logits - builtin(check).logits).abs().max().item()
    print(f"max |logits(ours) - logits(built-in)| on a 64-token prompt (fp32): {diff:.2e}")
    assert diff < 1e-3, "the built-in model did not load the same weights"
    ours.to(dtype)  # our router keeps its correction bias in fp32 (the built-in casts it along)
    builtin.to(dtype)

    variants = {
        "(a) transformers built-in": lambda p: time_plain_decode(builtin, p, args.new_tokens),
        "(b) ours, expanded": lambda p: time_plain_decode(ours, p, args.new_tokens, mla_absorb="off"),
        "(c) ours, absorbed": lambda p: time_plain_decode(ours, p, args.new_tokens),  # "auto": absorbed decode
    }
    if args.no_baselines:
        del variants["(a) transformers built-in"], variants["(b) ours, expanded"]
    base_name = next(iter(variants))
    for k in args.draft_tokens:
        variants[f"(d) ours, absorbed + MTP, k={k}"] = lambda p, k=k: time_speculative_decode(ours, p, args.new_tokens, k)
    warm = progressions(1, 32, span, torch.Generator().manual_seed(7)).to(device)
    for run in variants.values():
        run(warm)

    rows = []
    for context in args.contexts:
        prompt = progressions(args.batch, context, span, torch.Generator().manual_seed(context)).to(device)
        # best of --repeats (the host is shared: noise only slows runs down); the variants take turns within each
        # repeat, so a slow spell of the host hits all of them rather than one
        runs = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                runs[name].append(run(prompt))
        results = {}
        for name, name_runs in runs.items():
            best = max(name_runs, key=lambda r: r["decode_tok_s"])
            best["prefill_s"] = min(r["prefill_s"] for r in name_runs)
            results[name] = best
        base = results[base_name]
        reference_tokens = base["tokens"][:, : args.new_tokens + 1]
        for name, r in results.items():
            same = torch.equal(r["tokens"][:, : args.new_tokens + 1], reference_tokens)
            rows.append((context, name, r, r["decode_tok_s"] / base["decode_tok_s"], same))
            extra = (f"  acceptance {r['acceptance']:.3f} (by draft position "
                     f"{', '.join(f'{a:.2f}' for a in r['by_position'])}), {r['tokens_per_forward']:.2f} tok/forward"
                     if "acceptance" in r else "")  # fmt: skip
            print(f"ctx {context:5d} {name:28s} prefill {r['prefill_s']:7.2f}s  decode {r['decode_tok_s']:8.2f} tok/s"
                  f"  x{rows[-1][3]:5.2f}  cache {r['bytes']} B/tok/layer  same tokens as {base_name[:3]}: {same}{extra}",
                  flush=True)  # fmt: skip

    print()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"config `{args.config}`, {args.dtype}, {where}, batch {args.batch}, {args.new_tokens} greedy "
          f"decode tokens per row (tok/s counts all rows),"
          f" best of {args.repeats} runs")  # fmt: skip
    print()
    vs_base = f" vs {base_name[:3]} |" if base_name[:3] != "(c)" else ""  # no duplicate column with --no-baselines
    print(f"| context | variant | prefill (s) | decode tok/s |{vs_base} vs (c) | cache B/token/layer | acceptance "
          "| tok/forward |")  # fmt: skip
    print("|---:|---|---:|---:|" + ("---:|" if vs_base else "") + "---:|---:|---:|---:|")
    absorbed = {context: r["decode_tok_s"] for context, name, r, _, _ in rows if name.startswith("(c)")}
    for context, name, r, ratio, same in rows:
        acc = f"{r['acceptance']:.3f}" if "acceptance" in r else ""
        tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else ""
        vs_c = r["decode_tok_s"] / absorbed[context]
        ratio_col = f" {ratio:.2f}x |" if vs_base else ""
        print(f"| {context} | {name} | {r['prefill_s']:.2f} | {r['decode_tok_s']:.2f} |{ratio_col} {vs_c:.2f}x "
              f"| {r['bytes']} | {acc} | {tpf} |")  # fmt: skip


if __name__ == "__main__":
    main()
