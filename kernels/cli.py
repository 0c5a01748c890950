"""``deepseek-v3 convert``: FP8 (block-wise e4m3) <-> BF16 conversion of sharded safetensors checkpoints.

    deepseek-v3 convert fp8-to-bf16 SRC DST [--dtype bf16|fp16|fp32]
    deepseek-v3 convert bf16-to-fp8 SRC DST

One shard is held in memory at a time; the index (``model.safetensors.index.json``) and ``config.json``
(``quantization_config`` added / removed) are rewritten and every other file is copied. The result is written to a
temporary directory next to DST and moved into place when complete: a failure leaves no partial DST. With
``--overwrite`` the weight files of DST that the new checkpoint does not list (e.g. an old ``model.safetensors``)
are removed. A truncated / corrupt shard, a malformed index, a float8 tensor without its scale or a DST that is a
file give an error naming the file.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between FP8 (block-wise e4m3) and BF16",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("direction", choices=["fp8-to-bf16", "bf16-to-fp8"])
    parser.add_argument("src", help="source checkpoint directory (safetensors, sharded or single file)")
    parser.add_argument("dst", help="destination directory (must be new or empty unless --overwrite)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="output dtype for fp8-to-bf16")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty DST")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .fp8_checkpoint import convert_checkpoint

    try:
        dst = convert_checkpoint(
            args.src,
            args.dst,
            args.direction,
            dtype=getattr(torch, DTYPES[args.dtype]),
            backend=args.backend,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError) as err:
        print(f"deepseek-v3 convert: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0
