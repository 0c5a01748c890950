"""Per-shape dispatch of the block-scaled FP8 GEMMs over several implementations of the *same* arithmetic.

Every candidate computes :func:`fp8_gemm`'s contract, ``c = (a * a_s) @ (b * b_s).T`` with ``a [M, K]`` e4m3,
1x128 scales ``a_s [M, ceil(K/128)]`` and ``b [N, K]`` e4m3 with either 128x128 block scales
``b_s [ceil(N/128), ceil(K/128)]`` ("block" layout: weights, Fprop / Dgrad) or 1x128 row scales
``b_s [N, ceil(K/128)]`` ("rows" layout: the re-tiled activation of Wgrad), FP32 accumulation promoted every 128
of K. The dense candidates, in default preference order:

===============  ==========================================================================================
``scaled_mm``    cuBLAS through ``torch.nn.functional.scaled_mm`` (``torch._scaled_mm`` on older torch) with
                 ``ScalingType.BlockWise1x128`` for ``a`` and ``BlockWise128x128`` / ``BlockWise1x128`` for
                 ``b``; needs CUDA with compute capability >= 9.0 (Hopper). Scale layouts as cuBLAS wants them:
                 ``a_s`` M-major, 128x128 ``b_s`` K-major with its K-block stride padded to a multiple of 4.
``torchao``      torchao's DeepSeek-style Triton GEMM
                 (``torchao.prototype.blockwise_fp8_training.kernels``), "block" layout, M and N multiples of
                 256, K of 128 (its loads of the scales are unmasked); when importable.
``triton``       our kernel (``fp8_gemm._fp8_gemm_triton``): any shape, any strides. The reference on a GPU.
``torch``        the plain-torch reference ``fp8_gemm_torch`` (always available; the reference on CPU).
===============  ==========================================================================================

Grouped (MoE experts, ``a`` rows sorted by expert, ``offs [E]`` cumulative ends): ``scaled_grouped_mm``
(``torch.nn.functional.scaled_grouped_mm`` with block-wise recipes, where the installed torch accepts them),
``triton`` (our grouped kernel), ``loop`` (one dispatched dense GEMM per expert; one host sync for ``offs``),
``torch``.

**Rule.** A call on CUDA tensors with ``backend=None/"auto"`` looks up the shape key
``(chip, torch, triton, op, layout, out dtype, bucket(M), N, bucket(K))`` (``bucket``: rounded up to a power of
two -- K too, since Wgrad's K is the token count; for grouped GEMMs the rows per expert, plus E) in the rule cache
(``rule_cache``); a choice holds for the shapes of its bucket that it supports exactly, others take the default
order:

1. a measured entry: run its choice;
2. else, with ``$DEEPSEEK_V3_AUTOTUNE=1``: time every candidate that is available, supports the shape and agrees
   with the reference, store the fastest (and the timings) in the cache file, run it;
3. else the deterministic default: the first candidate in preference order that is available, supports the shape
   and, on its first call for this key in this process, agrees with the reference (norm-wise relative error
   < ``VERIFY_RTOL``) -- so a torch build that accepts the call but reads the scales differently is caught.

A candidate that raises or disagrees is recorded (``dispatcher.failures``) and the next one runs; the reference
always works. ``fp8_gemm(..., backend="scaled_mm" | "torchao")`` runs one candidate directly (errors propagate).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._triton_utils import HAS_TRITON, triton_can_run, triton_interpret
from .fp8_quant import BLOCK_SIZE, _cdiv
from .rule_cache import RuleCache, autotune_enabled, default_cache, device_tag, m_bucket, time_ms

VERIFY_RTOL = 1e-2  # bf16 output rounding is ~2e-3 norm-wise; a misread scale layout gives O(1)


def _block_layout(b_s: torch.Tensor, N: int) -> bool:
    return b_s.shape[-2] != N or N == 1


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@dataclass
class Candidate:
    """One implementation. ``run(*args)`` has the op's signature; ``available(device)`` and ``supports(info)``
    return ``None`` when usable, else the reason (a string)."""

    name: str
    run: Callable
    available: Callable[[torch.device], str | None] = lambda device: None
    supports: Callable[[dict], str | None] = lambda info: None
    trusted: bool = False  # a reference implementation: never verified against another


@dataclass
class Dispatcher:
    """Chooses among ``candidates`` per shape key (see the module docstring)."""

    op: str
    candidates: list[Candidate]
    shape_info: Callable[..., dict]  # args -> {"key": tuple of shape fields, ...fields for supports()}
    reference: Callable[[torch.device], str]  # device -> name of the trusted candidate to verify against
    cache: RuleCache = field(default_factory=RuleCache)
    timer: Callable = time_ms
    default_order: Callable[[torch.device], list[str]] | None = None
    failures: dict = field(default_factory=dict)  # (key, name) -> reason
    _chosen: dict = field(default_factory=dict)  # key -> name verified in this process
    _available: dict = field(default_factory=dict)  # (name, device) -> reason or None, asked once per device

    def by_name(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(f"{self.op}: no candidate named {name!r} (have {[c.name for c in self.candidates]})")

    def key(self, device: torch.device, info: dict) -> str:
        return "|".join([device_tag(device), self.op, *map(str, info["key"])])

    def order(self, device: torch.device) -> list[str]:
        if self.default_order is not None:
            return self.default_order(device)
        return [c.name for c in self.candidates]

    def usable(self, name: str, device: torch.device, info: dict, key: str) -> str | None:
        """None if candidate ``name`` may run for this key, else why not."""
        if (key, name) in self.failures:
            return self.failures[(key, name)]
        cand = self.by_name(name)
        where = (name, str(device))
        if where not in self._available:
            self._available[where] = cand.available(device)
        return self._available[where] or cand.supports(info)

    def _fail(self, key: str, name: str, reason: str) -> None:
        if (key, name) not in self.failures:
            warnings.warn(f"{self.op}: candidate {name!r} not used for {key}: {reason}")
        self.failures[(key, name)] = reason

    def _try(self, name: str, args, key: str, device: torch.device, ref_out=None):
        """Run candidate ``name``; verify it against the reference unless trusted. Returns (out, ref_out) or
        (None, ref_out) after recording a failure."""
        cand = self.by_name(name)
        try:
            out = cand.run(*args)
        except Exception as err:  # unsupported by this build / chip / layout
            self._fail(key, name, f"raised {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            return None, ref_out
        if cand.trusted:
            return out, ref_out
        if ref_out is None:
            ref_out = self.by_name(self.reference(device)).run(*args)
        err = _rel_err(out, ref_out)
        if not err < VERIFY_RTOL:
            self._fail(key, name, f"disagrees with {self.reference(device)}: relative error {err:.2e}")
            return None, ref_out
        return out, ref_out

    def tune(self, *args, persist: bool = True) -> dict:
        """Time every usable candidate on ``args`` and store the fastest for their key. Returns the entry."""
        device = args[0].device
        info = self.shape_info(*args)
        key = self.key(device, info)
        ms, errors, ref_out = {}, {}, None
        for name in self.order(device):
            if device.type == "cuda" and name == "torch":
                continue  # the plain-torch reference: never the fastest on a GPU, and slow to time at large M
            reason = self.usable(name, device, info, key)
            if reason is not None:
                errors[name] = reason
                continue
            out, ref_out = self._try(name, args, key, device, ref_out)
            if out is None:
                errors[name] = self.failures[(key, name)]
                continue
            fn = self.by_name(name).run
            ms[name] = self.timer(lambda: fn(*args), device)
        if not ms:
            raise RuntimeError(f"{self.op}: no candidate ran for {key}: {errors}")
        entry = {"choice": min(ms, key=ms.get), "ms": ms, "errors": errors}
        self.cache.put(key, entry, persist=persist)
        self._chosen[key] = entry["choice"]
        return entry

    def choose(self, *args) -> str:
        """Name of the candidate that the rule picks for ``args`` (may run candidates to verify / measure)."""
        device = args[0].device
        info = self.shape_info(*args)
        key = self.key(device, info)
        # a choice made for this key (in this process, or measured) holds for every shape of the bucket that the
        # candidate supports exactly; a shape it does not support goes down the default order below
        chosen = self._chosen.get(key)
        if chosen is not None and self.usable(chosen, device, info, key) is None:
            return chosen
        entry = self.cache.get(key)
        if entry is not None and entry.get("choice") in {c.name for c in self.candidates}:
            if self.usable(entry["choice"], device, info, key) is None:
                self._chosen[key] = entry["choice"]
                return entry["choice"]
        if autotune_enabled() and device.type == "cuda":
            return self.tune(*args)["choice"]
        ref_out = None
        for name in self.order(device):
            if self.usable(name, device, info, key) is not None:
                continue
            out, ref_out = self._try(name, args, key, device, ref_out)
            if out is not None:
                if chosen is None:  # keep the bucket's choice for the shapes that it supports
                    self._chosen[key] = name
                return name
        raise RuntimeError(f"{self.op}: no usable candidate for {key}: {self._reasons(key)}")

    def _reasons(self, key):
        return {n: r for (k, n), r in self.failures.items() if k == key}

    def __call__(self, *args) -> torch.Tensor:
        name = self.choose(*args)
        try:
            return self.by_name(name).run(*args)
        except Exception as err:  # a measured choice that stopped working (e.g. another layout of the same shape)
            key = self.key(args[0].device, self.shape_info(*args))
            self._fail(key, name, f"raised {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            self._chosen.pop(key, None)
            return self(*args)

    def reset(self) -> None:
        self.failures.clear()
        self._chosen.clear()
        self._available.clear()


# ----------------------------------------------------------------------------------------------------------------
# dense candidates
# ----------------------------------------------------------------------------------------------------------------


def _is_hopper_or_newer(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "block-wise cuBLAS FP8 needs a CUDA device"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "block-wise cuBLAS FP8 needs compute capability >= 9.0"
    return None


def _scaling_types():
    """(BlockWise1x128, BlockWise128x128) as this torch spells them, or None."""
    import torch.nn.functional as F

    st = getattr(F, "ScalingType", None) or getattr(torch._C, "_ScalingType", None)
    if st is None or not hasattr(st, "BlockWise1x128"):
        return None
    return st.BlockWise1x128, st.BlockWise128x128


def cublas_scales(a_s: torch.Tensor, b_s: torch.Tensor, block_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Our scale tensors in the layouts cuBLAS's block-wise FP8 GEMM reads (``mat_b = b.T``):

    - ``a_s [M, Kb]`` -> same shape, M-major (stride ``(1, M)``);
    - 128x128 ``b_s [Nb, Kb]`` -> ``[L, Nb]`` K-major with ``L = round_up(Kb, 4)`` rows (stride ``(1, L)``; the
      padding rows are 1.0 and never read): cuBLAS needs a 16-byte stride between K-block columns;
    - 1x128 ``b_s [N, Kb]`` -> ``[N, Kb]`` N-major (stride ``(1, N)``).
    """
    sa = a_s.t().contiguous().t()
    if block_b:
        nb, kb = b_s.shape
        L = -(-kb // 4) * 4
        sb = b_s.new_ones((nb, L)).t()
        sb[:kb] = b_s.t()
    else:
        sb = b_s.t().contiguous().t()
    return sa, sb


def _scaled_mm_gemm(a, a_s, b, b_s, out_dtype):
    """cuBLAS block-wise FP8 GEMM (see :func:`cublas_scales`). Operands are made row-major first
    (``mat_a = a`` row-major, ``mat_b = b.T`` column-major), which copies the transposed views of Dgrad/Wgrad."""
    import torch.nn.functional as F

    N = b.shape[0]
    block_b = _block_layout(b_s, N)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    sa, sb = cublas_scales(a_s, b_s, block_b)
    types = _scaling_types()
    if types is not None and hasattr(F, "scaled_mm"):
        t1x128, t128x128 = types
        return F.scaled_mm(a, b.t(), sa, t1x128, sb, t128x128 if block_b else t1x128, output_dtype=out_dtype)
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _torchao_kernels():
    try:
        from torchao.prototype.blockwise_fp8_training import kernels as ao
    except Exception as err:  # not installed, or a build that does not match this torch
        return None, f"torchao blockwise_fp8_training not importable: {type(err).__name__}: {err}"
    return ao, None


def _torchao_available(device: torch.device) -> str | None:
    ao, why = _torchao_kernels()
    if ao is None:
        return why
    if not HAS_TRITON:
        return "triton is not importable"
    if device.type == "cuda":
        return None if torch.cuda.get_device_capability(device) >= (8, 9) else "FP8 dots need compute capability >= 8.9"
    return None if (device.type == "cpu" and triton_interpret()) else "needs CUDA (or TRITON_INTERPRET=1 on CPU)"


def _torchao_supports(info: dict) -> str | None:
    if not info["block"]:
        return "torchao candidate only wired for 128x128 weight scales"
    M, N, K = info["M"], info["N"], info["K"]
    if M % 256 or N % 256 or K % BLOCK_SIZE:
        return f"torchao's kernel loads scales unmasked: needs M, N % 256 == 0 and K % 128 == 0 (got {M}, {N}, {K})"
    return None


def _torchao_gemm(a, a_s, b, b_s, out_dtype):
    """torchao ``triton_fp8_gemm_1x128_128x128(a [M,K] row-major, b.T [K,N] col-major, a_s M-major, b_s.T)``.
    Under the Triton interpreter its autotuner cannot time (no GPU driver): the kernel runs with one fixed config."""
    ao, why = _torchao_kernels()
    if ao is None:
        raise RuntimeError(why)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    sa = a_s.t().contiguous().t()
    sb = b_s.t()  # [Kb, Nb], K-major (column-major)
    if not a.is_cuda:
        M, K = a.shape
        N = b.shape[0]
        c = a.new_empty((M, N), dtype=out_dtype)
        kernel = ao.triton_fp8_gemm_1x128_128x128_kernel.fn
        kernel[(_cdiv(M, 64), _cdiv(N, 64))](
            a, a.stride(0), a.stride(1), b.t(), b.t().stride(0), b.t().stride(1), c, c.stride(0), c.stride(1),
            sa, sa.stride(0), sa.stride(1), sb, sb.stride(0), sb.stride(1), M, N, K,
            out_dtype=out_dtype, BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=BLOCK_SIZE,
        )  # fmt: skip
        return c
    return ao.triton_fp8_gemm_1x128_128x128(a, b.t(), sa, sb, BLOCK_SIZE, out_dtype)


def _triton_gemm(a, a_s, b, b_s, out_dtype):
    from .fp8_gemm import _fp8_gemm_triton

    return _fp8_gemm_triton(a, a_s, b, b_s, out_dtype)


def _torch_gemm(a, a_s, b, b_s, out_dtype):
    from .fp8_gemm import fp8_gemm_torch

    return fp8_gemm_torch(a, a_s, b, b_s, out_dtype)


def _triton_available(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return "triton is not importable"
    probe = torch.empty(0, device=device)
    return None if triton_can_run(probe) else f"our Triton kernels cannot run on {device}"


def _scaled_mm_available(device: torch.device) -> str | None:
    if not hasattr(torch, "_scaled_mm"):
        return "torch has no _scaled_mm"
    return _is_hopper_or_newer(device)


def gemm_shape_info(a, a_s, b, b_s, out_dtype) -> dict:
    M, K = a.shape
    N = b.shape[0]
    block = _block_layout(b_s, N)
    layout = "block" if block else "rows"
    dt = str(out_dtype).replace("torch.", "")
    # K is bucketed too: Wgrad's K is the token count, which changes with every batch of a MoE expert
    return {"key": (layout, dt, f"M{m_bucket(M)}", f"N{N}", f"K{m_bucket(K)}"), "M": M, "N": N, "K": K, "block": block}


def dense_candidates(scaled_mm_needs_hopper: bool = True) -> list[Candidate]:
    """The dense candidates (``scaled_mm_needs_hopper=False`` lets tests call cuBLAS's path where torch refuses)."""
    return [
        Candidate("scaled_mm", _scaled_mm_gemm,
                  _scaled_mm_available if scaled_mm_needs_hopper else (lambda d: None),
                  lambda info: None if info["K"] % 16 == 0 and info["N"] % 16 == 0
                  else "cuBLAS FP8 needs N and K multiples of 16"),
        Candidate("torchao", _torchao_gemm, _torchao_available, _torchao_supports),
        Candidate("triton", _triton_gemm, _triton_available, trusted=True),
        Candidate("torch", _torch_gemm, trusted=True),
    ]  # fmt: skip


def _reference_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and _triton_available(device) is None else "torch"


# ----------------------------------------------------------------------------------------------------------------
# grouped candidates
# ----------------------------------------------------------------------------------------------------------------


def _grouped_scaled_mm(a, a_s, b, b_s, offs, out_dtype):
    """``torch.nn.functional.scaled_grouped_mm`` with block-wise recipes (``mat_b = b.transpose(1, 2)``). torch 2.13
    accepts only MX / row-wise scalings here; the candidate is kept so a torch that adds block-wise is used."""
    import torch.nn.functional as F

    types = _scaling_types()
    if types is None or not hasattr(F, "scaled_grouped_mm"):
        raise RuntimeError("torch has no scaled_grouped_mm with block-wise scaling types")
    t1x128, t128x128 = types
    N = b.shape[1]
    block_b = b_s.shape[-2] != N or N == 1
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    sa = a_s.t().contiguous().t()
    sb = b_s.transpose(1, 2)
    return F.scaled_grouped_mm(a, b.transpose(1, 2), sa, t1x128, sb, t128x128 if block_b else t1x128,
                               offs=offs.to(torch.int32), output_dtype=out_dtype)  # fmt: skip


def _grouped_loop(a, a_s, b, b_s, offs, out_dtype):
    """One dense :func:`fp8_gemm` per expert (each dispatched by the dense rule); rows past ``offs[-1]`` are 0."""
    from .fp8_gemm import fp8_gemm, grouped_gemm_per_expert

    return grouped_gemm_per_expert(fp8_gemm, a, a_s, b, b_s, offs, out_dtype)


def _grouped_triton(a, a_s, b, b_s, offs, out_dtype):
    from .fp8_gemm import _fp8_grouped_gemm_triton

    return _fp8_grouped_gemm_triton(a, a_s, b, b_s, offs, out_dtype)


def _grouped_torch(a, a_s, b, b_s, offs, out_dtype):
    from .fp8_gemm import fp8_grouped_gemm_torch

    return fp8_grouped_gemm_torch(a, a_s, b, b_s, offs, out_dtype)


def grouped_shape_info(a, a_s, b, b_s, offs, out_dtype) -> dict:
    M, K = a.shape
    E, N = b.shape[0], b.shape[1]
    block = b_s.shape[-2] != N or N == 1
    dt = str(out_dtype).replace("torch.", "")
    rows = m_bucket(max(1, M // max(E, 1)))
    return {"key": ("block" if block else "rows", dt, f"E{E}", f"Mper{rows}", f"N{N}", f"K{m_bucket(K)}"),
            "M": M, "N": N, "K": K, "E": E, "block": block}  # fmt: skip


def grouped_candidates(scaled_mm_needs_hopper: bool = True) -> list[Candidate]:
    return [
        Candidate("scaled_grouped_mm", _grouped_scaled_mm,
                  _scaled_mm_available if scaled_mm_needs_hopper else (lambda d: None)),
        Candidate("triton", _grouped_triton, _triton_available, trusted=True),
        Candidate("loop", _grouped_loop),
        Candidate("torch", _grouped_torch, trusted=True),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the process-wide dispatchers used by fp8_gemm / fp8_grouped_gemm
# ----------------------------------------------------------------------------------------------------------------

_CACHE = default_cache()
GEMM = Dispatcher("fp8_gemm", dense_candidates(), gemm_shape_info, _reference_name, _CACHE)
GROUPED_GEMM = Dispatcher("fp8_grouped_gemm", grouped_candidates(), grouped_shape_info, _reference_name, _CACHE)
DIRECT_BACKENDS = {"scaled_mm": GEMM, "torchao": GEMM}


def run_direct(name: str, *args) -> torch.Tensor:
    """Run dense candidate ``name`` directly (benchmarks); raises with the reason when it cannot run here."""
    cand = GEMM.by_name(name)
    device = args[0].device
    reason = cand.available(device) or cand.supports(gemm_shape_info(*args))
    if reason is not None:
        raise RuntimeError(f"fp8_gemm backend {name!r} cannot run here: {reason}")
    return cand.run(*args)
