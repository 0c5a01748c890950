"""Absorbed-MLA decode attention at DeepSeek-V3's dimensions: Triton kernel vs the torch absorbed path vs expanding
the cache (what transformers' built-in DeepseekV3 does at every decode step).

One decode step of one layer's attention core, bf16, H = 128 heads, kv_lora_rank r = 512, rope dim dr = 64,
dn = dv = 128, S = 1 query per row (or --queries 2: speculative verification):

    triton    kernels/mla_decode.py: one pass over the latent cache (c_kv, k_pe), online softmax, split along T
    torch     attention.absorbed_attention_torch: two bmm over the latent + a materialized softmax
    expanded  kv_b_proj over the whole cache, then SDPA over per-head keys/values (built-in DeepseekV3's decode)

Times are medians of CUDA-event timings (triton.testing.do_bench); "GB/s" counts the latent cache bytes every
variant must read once, B * T * (r + dr) * 2, over the time: the floor is that figure at the GPU's bandwidth.

    python benchmarks/mla_decode.py                       # CUDA
    python benchmarks/mla_decode.py --batch 1 64 --context 4096 32768

``--sweep``: every launch variant of ``kernels/mla_decode.VARIANTS`` for a bf16 and an fp8 (e4m3, 1x128 scales)
latent cache at each batch x context; prints the best variant's time, GB/s and % of the chip's HBM bandwidth
(H100 SXM 3.35 TB/s, H200 4.8 TB/s, detected by name), its speed-up over the deterministic default variant, and
stores the best per shape in the kernel rule cache (``$DEEPSEEK_V3_RULE_CACHE``), which the model's decode then
uses. ``--smoke``: the same code path on CPU through the Triton interpreter at tiny dims (timings meaningless).

    python benchmarks/mla_decode.py --sweep --rules-out rules.json
    TRITON_INTERPRET=1 python benchmarks/mla_decode.py --sweep --smoke
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# HBM bandwidth by chip name (vendor datasheets), most specific names first
HBM_TBPS = (("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("H800", 3.35),
            ("A100-SXM4-80GB", 2.039), ("A100", 1.555), ("B200", 8.0))  # fmt: skip


def hbm_bandwidth(name: str) -> float | None:
    """Datasheet HBM bandwidth in bytes/s for a CUDA device name, None when unknown."""
    for key, tbps in HBM_TBPS:
        if key in name:
            return tbps * 1e12
    return None


def cache_bytes(batch: int, length: int, rank: int, rope_dim: int, fp8: bool) -> int:
    """Bytes of latent cache one decode step must read: bf16 c_kv + k_pe, or e4m3 c_kv + fp32 1x128 scales + bf16
    k_pe."""
    if fp8:
        return batch * length * (rank + 4 * -(-rank // 128) + 2 * rope_dim)
    return batch * length * (rank + rope_dim) * 2


def sweep(args) -> int:
    """Time every variant per (cache dtype, batch, context), record the best in the rule cache, print the table."""
    from deepseek_v3.kernels import mla_decode as md
    from deepseek_v3.kernels.rule_cache import time_ms

    smoke = args.smoke
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs the kernels through the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        H, r, dr, S = 4, 160, 8, args.queries
        batches, contexts, names = [1, 2], [40], list(md.VARIANTS)[:: max(1, len(md.VARIANTS) // 3)]
        chip = "cpu (Triton interpreter; timings meaningless)"
        bench = lambda fn: time_ms(fn, device, reps=1, warmup=0)  # noqa: E731
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--sweep times CUDA kernels; use --smoke (with TRITON_INTERPRET=1) on a CPU")
        import triton.testing

        device = torch.device("cuda")
        H, r, dr, S = args.heads, args.rank, args.rope_dim, args.queries
        batches, contexts, names = args.batch, args.context, args.variants or list(md.VARIANTS)
        chip = torch.cuda.get_device_name()
        def bench(fn):
            return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
    peak = hbm_bandwidth(chip) if not smoke else None
    scaling = (128 + dr) ** -0.5
    print(f"{chip}, H={H} r={r} dr={dr}, {S} quer{'y' if S == 1 else 'ies'}/row, {len(names)} variants"
          + (f", HBM {peak / 1e12:.2f} TB/s (datasheet)" if peak else ""))  # fmt: skip
    print()
    print("| cache | batch | context | best variant | us | GB/s | % of HBM | default variant | default us "
          "| best / default | rel. err |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|")
    for B in batches:  # shapes in the order given (run_on_gpu.sh puts the target shape first), both caches each
        for T in contexts:
            for cache in args.caches:
                fp8 = cache == "fp8"
                g = torch.Generator(device=device).manual_seed(B * 100003 + T)
                make = lambda *shape: torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)  # noqa: E731
                q_lat, q_pe = make(B, H, S, r) * 0.05, make(B, H, S, dr)
                c_kv, k_pe = make(B, 1, T, r), make(B, 1, T, dr)
                extra = {}
                # fp32 reference (materialized scores), on the same bf16 / e4m3 inputs
                if fp8:
                    c_kv, extra["c_kv_scale"] = md.quantize_latent_cache(c_kv)
                    ref = md.mla_decode_attention_fp8_torch(q_lat.float(), q_pe.float(), c_kv, extra["c_kv_scale"],
                                                            k_pe.float(), scaling).double()  # fmt: skip
                else:
                    ref = md.mla_decode_attention_torch(q_lat.float(), q_pe, c_kv, k_pe, scaling).double()
                default = md.default_variant(B, S, T, r).name
                timings, worst = {}, 0.0
                for name in dict.fromkeys([default, *names]):
                    try:
                        out = md.mla_decode_attention(q_lat, q_pe, c_kv, k_pe, scaling, variant=name, **extra)
                    except Exception as err:  # e.g. out of shared memory for this tile size on this chip
                        print(f"  variant {name} failed at B={B} T={T} {cache}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160]}", flush=True)  # fmt: skip
                        continue
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    if not err < 2e-2:
                        print(f"  variant {name} rejected at B={B} T={T} {cache}: relative error {err:.2e}", flush=True)
                        continue
                    worst = max(worst, err)
                    timings[name] = bench(lambda: md.mla_decode_attention(q_lat, q_pe, c_kv, k_pe, scaling,
                                                                          variant=name, **extra))  # fmt: skip
                if not timings:
                    print(f"| {cache} | {B} | {T} | none ran | | | | {default} | | | |", flush=True)
                    continue
                best = md.record_variant_choice(q_lat, c_kv, k_pe, timings, persist=not smoke)
                ms = timings[best]
                gbps = cache_bytes(B, T, r, dr, fp8) / (ms * 1e-3) / 1e9
                pct = f"{100 * gbps * 1e9 / peak:.0f}%" if peak else "n/a"
                d_ms = timings.get(default, float("nan"))
                print(f"| {cache} | {B} | {T} | {best} | {ms * 1e3:.1f} | {gbps:.0f} | {pct} | {default} "
                      f"| {d_ms * 1e3:.1f} | {d_ms / ms:.2f}x | {worst:.1e} |", flush=True)  # fmt: skip
                del q_lat, q_pe, c_kv, k_pe, ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.rules_out:
        import json

        entries = {k: v for k, v in md._rule_cache().entries().items() if "|mla_decode|" in k}
        with open(args.rules_out, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        print(f"\nrule entries written to {args.rules_out} ({len(entries)})")
    return 0


def expanded_attention(q_nope, q_pe, c_kv, k_pe, w_kv_b, scaling, dn):
    """Built-in decode: K/V = kv_b_proj(c_kv) for every cached token, then SDPA. w_kv_b [H * (dn + dv), r]."""
    batch, heads, seq, _ = q_nope.shape
    length = c_kv.shape[2]
    kv = (c_kv.squeeze(1) @ w_kv_b.t()).view(batch, length, heads, -1).transpose(1, 2)  # [B, H, T, dn + dv]
    k_nope, value = kv.split([dn, kv.shape[-1] - dn], dim=-1)
    key = torch.cat((k_nope, k_pe.expand(-1, heads, -1, -1)), dim=-1)
    query = torch.cat((q_nope, q_pe), dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)  # [B, H, S, dv]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128, help="dn = dv")
    parser.add_argument("--block-h", type=int, nargs="+", default=[16, 32, 64], help="Triton head blocks to try")
    parser.add_argument("--max-expanded-gb", type=float, default=20.0, help="skip `expanded` above this K/V size")
    parser.add_argument("--sweep", action="store_true", help="time every kernel variant, bf16 and fp8 cache")
    parser.add_argument("--smoke", action="store_true", help="with --sweep: tiny dims on CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--caches", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--variants", nargs="+", help="with --sweep: only these variant names")
    parser.add_argument("--warmup-ms", type=float, default=5.0)
    parser.add_argument("--rep-ms", type=float, default=25.0)
    parser.add_argument("--rules-out", help="with --sweep: also write the measured MLA rule entries to this JSON")
    args = parser.parse_args(argv)
    if args.sweep:
        return sweep(args)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA kernels; CPU correctness is covered by tests/test_mla_decode_kernel.py")
    import triton.testing

    from deepseek_v3.attention import absorbed_attention_torch
    from deepseek_v3.kernels.mla_decode import mla_decode_attention

    device, dtype = torch.device("cuda"), torch.bfloat16
    H, r, dr, d, S = args.heads, args.rank, args.rope_dim, args.head_dim, args.queries
    scaling = (d + dr) ** -0.5
    w_kv_b = torch.randn(H * 2 * d, r, device=device, dtype=dtype) * r**-0.5
    w_uk = w_kv_b.view(H, 2 * d, r)[:, :d]
    print(f"{torch.cuda.get_device_name()}, bf16, H={H} r={r} dr={dr} dn=dv={d}, {S} quer{'y' if S == 1 else 'ies'}/row")
    print()
    print("| batch | context | triton (us) | best BLOCK_H | torch absorbed (us) | expanded (us) | triton GB/s "
          "| vs torch | vs expanded | rel. err |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for B in args.batch:
        for T in args.context:
            g = torch.Generator(device=device).manual_seed(B * 100003 + T)
            make = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
            q_nope, q_pe = make(B, H, S, d), make(B, H, S, dr)
            c_kv, k_pe = make(B, 1, T, r), make(B, 1, T, dr)
            q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
            ref = absorbed_attention_torch(q_lat.double(), q_pe.double(), c_kv.double(), k_pe.double(), scaling, None)
            best = None
            for block_h in args.block_h:
                out = mla_decode_attention(q_lat, q_pe, c_kv, k_pe, scaling, block_h=block_h)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                assert err < 2e-2, f"triton block_h={block_h} B={B} T={T}: relative error {err:.2e}"
                ms = triton.testing.do_bench(
                    lambda: mla_decode_attention(q_lat, q_pe, c_kv, k_pe, scaling, block_h=block_h), return_mode="median"
                )  # fmt: skip
                if best is None or ms < best[0]:
                    best = (ms, block_h, err)
            t_torch = triton.testing.do_bench(
                lambda: absorbed_attention_torch(q_lat, q_pe, c_kv, k_pe, scaling, None), return_mode="median"
            )  # fmt: skip
            kv_gb = B * T * H * (3 * d) * 2 / 1e9  # expanded keys (dn + dr) + values (dv), bf16
            if kv_gb <= args.max_expanded_gb:
                t_exp = triton.testing.do_bench(
                    lambda: expanded_attention(q_nope, q_pe, c_kv, k_pe, w_kv_b, scaling, d), return_mode="median"
                )  # fmt: skip
            else:
                t_exp = float("nan")
            gbps = B * T * (r + dr) * 2 / (best[0] * 1e-3) / 1e9
            print(f"| {B} | {T} | {best[0] * 1e3:.1f} | {best[1]} | {t_torch * 1e3:.1f} | {t_exp * 1e3:.1f} | {gbps:.0f} "
                  f"| {t_torch / best[0]:.2f}x | {t_exp / best[0]:.2f}x | {best[2]:.1e} |", flush=True)  # fmt: skip
            del c_kv, k_pe
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
