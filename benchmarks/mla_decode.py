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
"""

from __future__ import annotations

import argparse

import torch


def expanded_attention(q_nope, q_pe, c_kv, k_pe, w_kv_b, scaling, dn):
    """Built-in decode: K/V = kv_b_proj(c_kv) for every cached token, then SDPA. w_kv_b [H * (dn + dv), r]."""
    batch, heads, seq, _ = q_nope.shape
    length = c_kv.shape[2]
    kv = (c_kv.squeeze(1) @ w_kv_b.t()).view(batch, length, heads, -1).transpose(1, 2)  # [B, H, T, dn + dv]
    k_nope, value = kv.split([dn, kv.shape[-1] - dn], dim=-1)
    key = torch.cat((k_nope, k_pe.expand(-1, heads, -1, -1)), dim=-1)
    query = torch.cat((q_nope, q_pe), dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)  # [B, H, S, dv]


def main():
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
    args = parser.parse_args()
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
    main()
