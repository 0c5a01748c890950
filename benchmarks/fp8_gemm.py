"""FP8 GEMM benchmark: the dispatched block-scaled ``fp8_gemm`` vs its candidates vs torch BF16.

Shapes are DeepSeek-V3's linear layers (``K x N``: in_features x out_features)::

    python benchmarks/fp8_gemm.py                       # CUDA: TFLOP/s table at M = 4096 .. 16384 (+ --csv out.csv)
    python benchmarks/fp8_gemm.py --tune                # measure the dispatch rule first (kept in the rule cache)
    python benchmarks/fp8_gemm.py --linear              # FP8Linear forward + backward vs BF16 nn.Linear
    python benchmarks/fp8_gemm.py --m 1 128 4096 --shapes 7168x2048 2048x7168
    TRITON_INTERPRET=1 python benchmarks/fp8_gemm.py --smoke [--linear]   # no GPU: tiny shapes, same code path
    TRITON_INTERPRET=1 python benchmarks/fp8_gemm.py --check             # no GPU: correctness on scaled-down shapes

TFLOP/s = 2*M*N*K / median time (``triton.testing.do_bench``), operands pre-quantized (weights are quantized once
per step; activations by the quant kernel, which FP8Linear's figures include). Columns: torch BF16 matmul;
``dispatched`` = ``fp8_gemm(backend=None)``, i.e. what FP8Linear runs (the per-shape rule of
``kernels/fp8_dispatch``; its choice is printed); each candidate called directly: ``scaled_mm`` (cuBLAS
block-wise), ``triton`` (ours), ``torchao`` (when importable and the shape fits). "% peak" is the dispatched
figure over the chip's dense FP8 peak (H100 / H200 SXM: 1979 TFLOP/s, datasheet). A candidate that cannot run
prints ``-`` and its reason once.
"""

from __future__ import annotations

import argparse
import os
import sys

# DeepSeek-V3 (hidden 7168) linear shapes, "K x N" = in_features x out_features
SHAPES = {
    "7168x18432": "dense MLP gate/up",
    "18432x7168": "dense MLP down",
    "7168x2048": "routed expert gate/up (per half)",
    "2048x7168": "routed expert down",
    "1536x24576": "q_b_proj",
    "7168x1536": "q_a_proj",
    "16384x7168": "o_proj",
    "512x32768": "kv_b_proj",
    "7168x576": "kv_a_proj_with_mqa",
}
DEFAULT_SHAPES = ["7168x18432", "18432x7168", "7168x2048", "2048x7168", "1536x24576", "16384x7168"]
M_VALUES = [4096, 8192, 16384]
# dense (no sparsity) FP8 / BF16 tensor-core peaks in TFLOP/s by chip name, most specific first (datasheets)
PEAKS = (("GH200", 1979, 989), ("H200", 1979, 989), ("H100 PCIe", 1513, 756), ("H100 NVL", 1671, 835),
         ("H100", 1979, 989), ("H800", 1979, 989), ("L40S", 733, 362), ("B200", 4500, 2250))  # fmt: skip


def peak_tflops(name: str) -> tuple[float | None, float | None]:
    """(dense FP8, dense BF16) datasheet TFLOP/s for a CUDA device name, (None, None) when unknown."""
    for key, fp8, bf16 in PEAKS:
        if key in name:
            return fp8, bf16
    return None, None


def _parse_shape(s: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r} must look like KxN, e.g. 7168x2048") from None
    return k, n


def _env(args):
    """(device, timer(fn) -> ms, chip name, smoke shapes/M override)"""
    import torch

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the Triton kernels through the interpreter: set TRITON_INTERPRET=1")
        from deepseek_v3.kernels.rule_cache import time_ms

        device = torch.device("cpu")
        timer = lambda fn: time_ms(fn, device, reps=1, warmup=0)  # noqa: E731
        return device, timer, "cpu (Triton interpreter; timings meaningless)"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke or --check (with TRITON_INTERPRET=1)")
    from triton.testing import do_bench

    return torch.device("cuda"), (lambda fn: do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms)), \
        torch.cuda.get_device_name()  # fmt: skip


def bench_gemm(args) -> int:
    import torch

    from deepseek_v3.kernels import act_quant, fp8_gemm, weight_quant
    from deepseek_v3.kernels import fp8_dispatch as fd

    device, timer, chip = _env(args)
    shapes, ms_values = args.shapes, args.m
    if args.smoke:
        shapes, ms_values = [(256, 256), (384, 128)], [256]
    if args.smoke:  # one interpreted run per candidate when tuning
        from deepseek_v3.kernels.rule_cache import time_ms

        fd.GEMM.timer = lambda fn, dev: time_ms(fn, dev, reps=1, warmup=0)
    fp8_peak, _ = peak_tflops(chip)
    print(f"device: {chip}  torch {torch.__version__}  dense FP8 peak "
          f"{f'{fp8_peak} TFLOP/s (datasheet)' if fp8_peak else 'unknown'}")  # fmt: skip
    if args.tune:
        print("dispatch rule: measured per shape now (--tune), stored in the rule cache")
    print()
    print("| K x N (layer) | M | torch bf16 | dispatched (choice) | % FP8 peak | vs bf16 | scaled_mm | triton (ours) "
          "| torchao | rel. err vs fp32 |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rows, reasons = [], {}
    for k, n in shapes:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        wq, ws = weight_quant(w)
        for m in ms_values:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            xq, xs = act_quant(x)
            args_ = (xq, xs, wq, ws, torch.bfloat16)
            flops = 2 * m * n * k
            tf = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
            t_bf16 = tf(timer(lambda: x @ w.t()))
            if args.tune:
                fd.GEMM.tune(*args_, persist=not args.smoke)
            # on CUDA the public op (what FP8Linear calls); on CPU (smoke) the dispatcher itself, which the public
            # op only uses for CUDA tensors
            dispatched = (lambda: fp8_gemm(*args_)) if device.type == "cuda" else (lambda: fd.GEMM(*args_))
            choice = fd.GEMM.choose(*args_)
            t_disp = tf(timer(dispatched))
            direct = {}
            for name in ("scaled_mm", "triton", "torchao"):
                cand = fd.GEMM.by_name(name)
                why = cand.available(device) or cand.supports(fd.gemm_shape_info(*args_))
                if why is None:
                    try:
                        out = cand.run(*args_)
                        ref = fd.GEMM.by_name(fd._reference_name(device)).run(*args_)
                        err = fd._rel_err(out, ref)
                        if not err < fd.VERIFY_RTOL:
                            why = f"disagrees with the reference: relative error {err:.2e}"
                    except Exception as e:
                        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if why is None:
                    direct[name] = tf(timer(lambda: cand.run(*args_)))
                else:
                    direct[name] = float("nan")
                    reasons.setdefault(name, why)
            ref = x.float() @ w.float().t()
            err = ((fp8_gemm(*args_[:4], torch.float32) - ref).norm() / ref.norm()).item()
            pct = f"{100 * t_disp / fp8_peak:.0f}%" if fp8_peak else "n/a"
            fmt = lambda v: "-" if v != v else f"{v:.1f}"  # noqa: E731
            row = (f"{k}x{n}", m, t_bf16, t_disp, choice, direct["scaled_mm"], direct["triton"], direct["torchao"], err)
            rows.append(row)
            print(f"| {k}x{n} ({SHAPES.get(f'{k}x{n}', '')}) | {m} | {t_bf16:.1f} | {t_disp:.1f} ({choice}) | {pct} "
                  f"| {t_disp / t_bf16:.2f}x | {fmt(direct['scaled_mm'])} | {fmt(direct['triton'])} "
                  f"| {fmt(direct['torchao'])} | {err:.1e} |", flush=True)  # fmt: skip
    for name, why in reasons.items():
        print(f"- {name}: not timed ({why})")
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("shape,M,bf16_tflops,dispatched_tflops,choice,scaled_mm_tflops,triton_tflops,torchao_tflops,"
                    "rel_err\n")
            for r in rows:
                f.write(",".join(str(v) for v in r) + "\n")
    return 0


def bench_linear(args) -> int:
    """FP8Linear (dispatched GEMMs, quantization included) forward + backward vs BF16 nn.Linear, per shape."""
    import torch

    from deepseek_v3.kernels import FP8Linear

    device, timer, chip = _env(args)
    shapes, m = args.shapes, args.linear_m
    if args.smoke:
        shapes, m = [(256, 256)], 256
    print(f"device: {chip}  torch {torch.__version__}: FP8Linear vs BF16 nn.Linear, forward + backward, M = {m}")
    print()
    print("| K x N (layer) | M | bf16 fwd+bwd (ms) | FP8Linear fwd+bwd (ms) | speed-up | bf16 fwd (ms) "
          "| FP8 fwd (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, n in shapes:
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.float32)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        dev = device.type

        def step(fp8: bool, backward: bool = True):
            lin.__class__ = FP8Linear if fp8 else torch.nn.Linear
            with torch.autocast(dev, dtype=torch.bfloat16):
                y = lin(x)
            if backward:
                y.backward(dy)
                lin.weight.grad = None
                x.grad = None

        res = {}
        for fp8 in (False, True):
            res[fp8] = (timer(lambda: step(fp8)), timer(lambda: step(fp8, backward=False)))
        lin.__class__ = torch.nn.Linear
        print(f"| {k}x{n} ({SHAPES.get(f'{k}x{n}', '')}) | {m} | {res[False][0]:.3f} | {res[True][0]:.3f} "
              f"| {res[False][0] / res[True][0]:.2f}x | {res[False][1]:.3f} | {res[True][1]:.3f} |",
              flush=True)  # fmt: skip
    return 0


def check_cpu(args) -> int:
    """No GPU: run every shape scaled down (K, N / 16, M <= 64) through the Triton interpreter and compare
    with the torch reference and the dequantized FP32 matmul."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: re-run with TRITON_INTERPRET=1 to check the Triton kernels on CPU", file=sys.stderr)
        return 2
    import torch

    from deepseek_v3.kernels import act_dequant, act_quant, fp8_gemm, weight_dequant, weight_quant

    worst = 0.0
    print(f"{'shape KxN (scaled /16)':>24} {'M':>4} | triton-vs-torch max|diff|  vs dequant-fp32 rel.err")
    for k, n in args.shapes:
        k, n = max(1, k // 16), max(1, n // 16)
        w = torch.randn(n, k) * 0.02
        wq, ws = weight_quant(w, backend="triton")
        for m in [v for v in args.m if v <= 64] or [1]:
            x = torch.randn(m, k)
            xq, xs = act_quant(x, backend="triton")
            c = fp8_gemm(xq, xs, wq, ws, torch.float32, backend="triton")
            cr = fp8_gemm(xq, xs, wq, ws, torch.float32, backend="torch")
            deq = act_dequant(xq, xs) @ weight_dequant(wq, ws, torch.float32).t()
            err = ((c - deq).norm() / deq.norm()).item()
            worst = max(worst, err)
            print(f"{f'{k}x{n}':>24} {m:>4} | {(c - cr).abs().max().item():.3e}                {err:.2e}")
    print(f"worst relative error vs dequantized FP32 matmul: {worst:.2e} (bound 1e-2)")
    return 0 if worst < 1e-2 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=[_parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--m", nargs="+", type=int, default=M_VALUES)
    parser.add_argument("--csv", help="also write the GEMM table to this CSV file")
    parser.add_argument("--tune", action="store_true", help="measure the dispatch rule for each shape first")
    parser.add_argument("--linear", action="store_true", help="FP8Linear fwd+bwd vs BF16 instead of the GEMM table")
    parser.add_argument("--linear-m", type=int, default=8192, help="tokens for --linear")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter: exercise the code")
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--check", action="store_true", help="CPU correctness check through the Triton interpreter")
    args = parser.parse_args(argv)
    import torch

    if args.check or (not torch.cuda.is_available() and not args.smoke):
        if args.shapes == [_parse_shape(s) for s in DEFAULT_SHAPES]:
            args.shapes = [_parse_shape(s) for s in SHAPES]
        if args.m == M_VALUES:
            args.m = [1, 16, 64]
        return check_cpu(args)
    return bench_linear(args) if args.linear else bench_gemm(args)


if __name__ == "__main__":
    sys.exit(main())
