"""FP8 <-> BF16 checkpoints in the published DeepSeek-V3 format.

On disk a quantized weight ``<name>.weight`` is ``float8_e4m3fn`` with a companion ``<name>.weight_scale_inv``
(FP32, one value per 128x128 block, ``w ~= q * scale_inv``), and ``config.json`` carries::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "modules_to_not_convert": [...]}

Which tensors are quantized (the tensor-name mirror of ``fp8_training.default_fp8_filter``): every 2-D
``*.weight`` of the decoder/MTP linear layers -- attention projections, dense MLPs, shared and routed experts
(per-expert names on disk) -- and not the embeddings, ``lm_head``, MTP ``eh_proj`` / ``shared_head.head``, the
MoE router ``mlp.gate``, norms or biases.

:func:`convert_checkpoint` rewrites a sharded safetensors checkpoint one shard at a time (a scale stored in another
shard is read alone, not with its whole shard), keeps the shard file names, rewrites the index and the config and
copies every other file (tokenizer, generation config, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .fp8_quant import BLOCK_SIZE, FP8_DTYPE, weight_dequant, weight_quant

SCALE_SUFFIX = "_scale_inv"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# tensor-name patterns that are never quantized
NOT_QUANTIZED = (
    r"(^|\.)embed_tokens\.",
    r"(^|\.)lm_head\.",
    r"(^|\.)shared_head\.",
    r"(^|\.)eh_proj\.",
    r"(^|\.)mlp\.gate\.",
    r"norm\.",
)
MODULES_TO_NOT_CONVERT = ["lm_head", "embed_tokens", "eh_proj", "shared_head", "mlp.gate"]


def fp8_quantization_config(modules_to_not_convert: list[str] | None = None) -> dict:
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK_SIZE, BLOCK_SIZE],
        "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert),
    }


def check_quantization_config(qc: dict | None) -> None:
    """Raise a clear error unless ``qc`` describes DeepSeek-V3's block-wise e4m3 format."""
    if not qc:
        raise ValueError("the checkpoint's config has no quantization_config; it is not an FP8 checkpoint")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r}; only 'fp8' is supported")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt={qc.get('fmt')!r}; only 'e4m3' is supported")
    if list(qc.get("weight_block_size") or []) != [BLOCK_SIZE, BLOCK_SIZE]:
        raise ValueError(
            f"quantization_config.weight_block_size={qc.get('weight_block_size')!r}; only [128, 128] is supported"
        )


def default_quantize_filter(name: str, tensor: torch.Tensor) -> bool:
    """True for the on-disk tensors that the FP8 format stores quantized."""
    if not name.endswith(".weight") or tensor.dim() != 2 or not tensor.is_floating_point():
        return False
    if tensor.dtype == FP8_DTYPE:
        return False
    return not any(re.search(p, name) for p in NOT_QUANTIZED)


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    filter_fn: Callable[[str, torch.Tensor], bool] = default_quantize_filter,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """BF16/FP32 state dict (on-disk names) -> FP8 weights + ``weight_scale_inv``; other tensors pass through."""
    out = {}
    for name, t in state_dict.items():
        if filter_fn(name, t):
            q, s = weight_quant(t, backend=backend)
            out[name] = q
            out[name + SCALE_SUFFIX] = s
        else:
            out[name] = t
    return out


def dequantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    get_scale: Callable[[str], torch.Tensor | None] | None = None,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """FP8 weights + ``weight_scale_inv`` -> ``dtype`` weights (scale tensors dropped).

    ``get_scale(name)`` fetches a scale that is not in ``state_dict`` (another shard)."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == FP8_DTYPE:
            scale = state_dict.get(name + SCALE_SUFFIX)
            if scale is None and get_scale is not None:
                scale = get_scale(name + SCALE_SUFFIX)
            if scale is None:
                raise KeyError(f"{name} is float8 but {name}{SCALE_SUFFIX} is missing from the checkpoint; it is "
                               "incomplete: re-download it or re-create it with `deepseek-v3 convert bf16-to-fp8`")
            out[name] = weight_dequant(t, scale.float(), dtype, backend=backend)
        else:
            out[name] = t
    return out


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent (the message names the file and the fix)."""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's header, checking that the
    file is complete (a truncated or random file raises :class:`CheckpointError` naming it)."""
    fix = "the file is truncated or not a safetensors file; re-download or re-save the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: only {size} bytes, no safetensors header; {fix}")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit in the file ({size} bytes); {fix}")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err}); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header; {fix}")
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: tensors need {8 + n + end} bytes but the file has {size}; {fix}")
    return header


def _read_index(src: Path) -> tuple[dict[str, str], dict]:
    index_file = src / INDEX_NAME
    if index_file.exists():
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index_file} is not valid JSON ({err}); fix or re-download the index") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file} has no 'weight_map' object of tensor name -> shard file name; fix "
                                  "or re-download the index")
        missing = sorted({v for v in weight_map.values() if not (src / v).is_file()})
        if missing:
            raise CheckpointError(f"{index_file} lists shard(s) {missing[:3]} that are not in {src}")
        metadata = index.get("metadata", {})
        return dict(weight_map), metadata if isinstance(metadata, dict) else {}
    if (src / SINGLE_NAME).exists():
        return {k: SINGLE_NAME for k in read_safetensors_header(src / SINGLE_NAME)}, {}
    raise FileNotFoundError(f"{src} holds neither {INDEX_NAME} nor {SINGLE_NAME}; is it a safetensors checkpoint?")


def check_fp8_scales(directory: str | Path) -> None:
    """Raise :class:`CheckpointError` when a float8 tensor of the checkpoint in ``directory`` has no
    ``weight_scale_inv`` companion (loading it would silently use raw e4m3 values as weights), or a shard is
    truncated. Reads only the safetensors headers."""
    directory = Path(directory)
    weight_map, _ = _read_index(directory)
    missing: dict[str, list[str]] = {}
    for shard in sorted(set(weight_map.values())):
        for name, info in read_safetensors_header(directory / shard).items():
            if info.get("dtype") in ("F8_E4M3", "F8_E5M2") and name + SCALE_SUFFIX not in weight_map:
                missing.setdefault(shard, []).append(name)
    if missing:
        shard, names = next(iter(missing.items()))
        total = sum(len(v) for v in missing.values())
        raise CheckpointError(
            f"{directory / shard}: float8 tensor {names[0]!r} has no {names[0] + SCALE_SUFFIX!r} ({total} float8 "
            f"tensor(s) without a scale in {sorted(missing)}); the checkpoint is incomplete: re-download it or "
            "re-create it with `deepseek-v3 convert bf16-to-fp8`")


def check_fp8_checkpoint_before_load(pretrained_model_name_or_path) -> None:
    """For ``from_pretrained``: when the argument is a local FP8 checkpoint (``quantization_config.quant_method ==
    "fp8"``), refuse it if a float8 tensor has no scale (see :func:`check_fp8_scales`); anything else is left to
    transformers. transformers dequantizes on CPU only the weights it has scales for, so without this check a missing
    non-expert scale (q_a_proj, kv_b_proj, o_proj, dense MLP, shared experts) loads raw e4m3 values as weights."""
    path = Path(str(pretrained_model_name_or_path))
    config_file = path / "config.json"
    if not config_file.is_file():
        return
    try:
        qc = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    if isinstance(qc, dict) and qc.get("quant_method") == "fp8":
        check_fp8_scales(path)


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} could not be read ({err}); the file is corrupt: re-download it") from None


def _place(tmp: Path, dst: Path, new_files: set[str]) -> None:
    """Move the finished conversion ``tmp`` to ``dst``: a rename when ``dst`` is new or empty; otherwise the new
    files replace the old ones one by one and every weight file / index that the new checkpoint does not have is
    removed (so from_pretrained cannot pick up a stale ``model.safetensors`` or shard)."""
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
        return
    for f in sorted(tmp.iterdir()):
        os.replace(f, dst / f.name)
    for f in dst.iterdir():
        if f.is_file() and f.name not in new_files and (f.name.endswith(WEIGHT_SUFFIXES) or f.name in WEIGHT_INDEXES):
            f.unlink()
    tmp.rmdir()


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    direction: str,
    dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert a safetensors checkpoint directory ``src`` -> ``dst``.

    ``direction``: ``"fp8-to-bf16"`` (dequantize; ``dtype`` chooses bf16/fp16/fp32) or ``"bf16-to-fp8"``
    (quantize). One shard is held in memory at a time. Everything is written to a temporary directory next to
    ``dst`` and moved into place at the end, so a failure (truncated shard, missing scale, full disk) leaves no
    partial destination; with ``overwrite`` every weight file of ``dst`` that the new index does not list is
    removed."""
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if direction not in ("fp8-to-bf16", "bf16-to-fp8"):
        raise ValueError(f"direction={direction!r}: use 'fp8-to-bf16' or 'bf16-to-fp8'")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint directory {src} does not exist")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} is a file, not a directory; choose a directory path for DST")
    if src.resolve() == dst.resolve():
        raise ValueError("SRC and DST must be different directories")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another DST or pass overwrite=True (--overwrite)")
    weight_map, metadata = _read_index(src)
    config = None
    if (src / "config.json").exists():
        try:
            config = json.loads((src / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{src / 'config.json'} is not valid JSON ({err})") from None
    if direction == "fp8-to-bf16":
        if config is not None and config.get("quantization_config"):
            check_quantization_config(config["quantization_config"])
        check_fp8_scales(src)
    elif config is not None and config.get("quantization_config"):
        raise ValueError(f"{src}/config.json already has a quantization_config; it is already quantized")
    shards = sorted(set(weight_map.values()))
    for shard in shards:  # fail on a truncated shard before writing anything
        read_safetensors_header(src / shard)

    def get_scale(name: str) -> torch.Tensor | None:
        shard = weight_map.get(name)
        if shard is None:
            return None
        with safe_open(src / shard, framework="pt") as f:
            return f.get_tensor(name)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        new_map: dict[str, str] = {}
        total_size = 0
        for shard in tqdm(shards, desc=f"convert {direction}", unit="shard", disable=not progress):
            tensors = _load_shard(src / shard)
            if direction == "fp8-to-bf16":
                tensors = dequantize_state_dict(tensors, dtype, get_scale=get_scale, backend=backend)
            else:
                tensors = quantize_state_dict(tensors, backend=backend)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
            for k, v in tensors.items():
                new_map[k] = shard
                total_size += v.numel() * v.element_size()
            del tensors

        if (src / INDEX_NAME).exists():
            index = {"metadata": {**metadata, "total_size": total_size}, "weight_map": dict(sorted(new_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if config is not None:
            if direction == "fp8-to-bf16":
                config.pop("quantization_config", None)
                config["dtype"] = str(dtype).removeprefix("torch.")
                config.pop("torch_dtype", None)
            else:
                config["quantization_config"] = fp8_quantization_config()
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in src.iterdir():
            if f.is_file() and f.name not in shards and f.name not in (INDEX_NAME, "config.json"):
                if f.name.endswith(WEIGHT_SUFFIXES) or f.name in WEIGHT_INDEXES:
                    continue  # a weight file the index does not list (stale): not part of the checkpoint
                shutil.copy2(f, tmp / f.name)
        _place(tmp, dst, {f.name for f in tmp.iterdir()})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def save_pretrained_fp8(model, save_directory: str | Path, backend: str | None = None, **save_kwargs) -> Path:
    """``model.save_pretrained`` in the FP8 format (``*.weight`` e4m3 + ``*.weight_scale_inv``, quantization_config).

    The model is first saved normally (so transformers' own reverse conversions run, e.g. fused experts ->
    per-expert tensors) into a temporary directory next to ``save_directory``, then quantized shard by shard."""
    import tempfile

    save_directory = Path(save_directory)
    save_directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_directory.parent, prefix=".bf16-") as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        return convert_checkpoint(tmp, save_directory, "bf16-to-fp8", backend=backend, progress=False, overwrite=True)


def use_deepseek_fp8_gemm(model, backend: str | None = None):
    """Route transformers' FineGrainedFP8 ``FP8Linear`` modules (what ``from_pretrained`` builds on CUDA for an FP8
    checkpoint: e4m3 ``weight`` + ``weight_scale_inv`` parameters) through this package's ``act_quant`` +
    ``fp8_gemm`` kernels. In place; returns ``model``. Weights stay in FP8."""
    from transformers.integrations.finegrained_fp8 import FP8Linear as HFFP8Linear

    cls = __getattr__("_DeepseekFP8InferenceLinear")
    for module in model.modules():
        if type(module) is HFFP8Linear:
            if module.block_size is not None and list(module.block_size) != [BLOCK_SIZE, BLOCK_SIZE]:
                raise ValueError(f"weight_block_size={module.block_size}; our kernels need [128, 128]")
            module.__class__ = cls
            module.fp8_backend = backend
    return model


def _make_inference_linear():
    from transformers.integrations.finegrained_fp8 import FP8Linear as HFFP8Linear

    from .fp8_gemm import fp8_gemm
    from .fp8_quant import act_quant

    class DeepseekFP8InferenceLinear(HFFP8Linear):
        """transformers' FP8Linear (same parameters / state dict) computing with our block-scaled kernels."""

        fp8_backend = None

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if self.weight.element_size() > 1:
                return torch.nn.functional.linear(input, self.weight, self.bias)
            out_dtype = input.dtype if input.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
            xq, xs = act_quant(input.reshape(-1, input.shape[-1]), backend=self.fp8_backend)
            y = fp8_gemm(xq, xs, self.weight, self.weight_scale_inv.float(), out_dtype, backend=self.fp8_backend)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.view(*input.shape[:-1], self.weight.shape[0])

    return DeepseekFP8InferenceLinear


def __getattr__(name):
    if name == "_DeepseekFP8InferenceLinear":
        cls = globals().get(name) or _make_inference_linear()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
