"""Per-shape choice of a kernel implementation, measured once on the device and cached as JSON.

Used by the FP8 GEMM dispatch (``fp8_dispatch``) and the MLA decode variant rule (``mla_decode``). A *rule* maps a
shape key to the name of the implementation to run:

    key  = "<device name>|torch <version>|triton <version>|<op>|<shape fields>"   (e.g. M rounded up to a bucket)
    rule = {key: {"choice": name, "ms": {name: median ms, ...}, "errors": {name: "message"}}}

Where the rule has no entry for a key a *deterministic default* is used (a fixed preference order, no timing), so
two runs on the same machine pick the same implementation unless somebody measured. Measurements come from an
explicit tuning run (the benchmark scripts, ``tune(...)``) or, with ``$DEEPSEEK_V3_AUTOTUNE=1``, from the first
call that meets an unseen key. The file is ``$DEEPSEEK_V3_RULE_CACHE`` (a path) if set, else
``~/.cache/deepseek_v3/kernel_rules.json``; it is read lazily and written atomically after each new measurement.
Below it, read-only, lies the rule shipped with the package (``kernels/measured_rules.json``, entries measured on
the GPUs named in their keys; absent until such a measurement is committed): a local measurement wins.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
from pathlib import Path

import torch

CACHE_ENV = "DEEPSEEK_V3_RULE_CACHE"
SHIPPED_RULES = Path(__file__).with_name("measured_rules.json")
AUTOTUNE_ENV = "DEEPSEEK_V3_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def cache_path() -> Path:
    value = os.environ.get(CACHE_ENV)
    if value:
        return Path(value)
    return Path.home() / ".cache" / "deepseek_v3" / "kernel_rules.json"


def device_tag(device: torch.device) -> str:
    """``"<device name>|torch <v>|triton <v>"``: a rule measured under other versions or chips is not reused."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return _device_tag(device.type, index)


@functools.cache
def _device_tag(kind: str, index: int | None) -> str:  # queried once per device: it is on every GEMM's path
    if kind == "cuda":
        name = torch.cuda.get_device_name(index)
    else:
        name = kind
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return f"{name}|torch {torch.__version__}|triton {tv}"


def m_bucket(m: int) -> int:
    """Rows rounded up to a power of two (1, 2, 4, ..., 16384, then multiples of 16384): GEMM speed changes with the
    number of row tiles, so shapes inside one bucket share a rule."""
    m = max(int(m), 1)
    if m > 16384:
        return -(-m // 16384) * 16384
    return 1 << (m - 1).bit_length()


class RuleCache:
    """A JSON-backed ``key -> entry`` map (thread-safe; one instance per file and process)."""

    def __init__(self, path: Path | str | None = None, shipped: Path | str | None = SHIPPED_RULES):
        self._path = Path(path) if path is not None else None
        self._shipped_path = Path(shipped) if shipped is not None else None
        self._entries: dict[str, dict] | None = None
        self._shipped: dict[str, dict] | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_path()

    @staticmethod
    def _read(path: Path) -> dict[str, dict]:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:  # a corrupt file must not break the model: start empty
            import warnings

            warnings.warn(f"ignoring unreadable kernel rule cache {path}: {err!r}")
            return {}

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = self._read(self.path)
        return self._entries

    def get(self, key: str) -> dict | None:
        with self._lock:
            entry = self._load().get(key)
            if entry is None and self._shipped_path is not None:
                if self._shipped is None:
                    self._shipped = self._read(self._shipped_path)
                entry = self._shipped.get(key)
            return entry

    def put(self, key: str, entry: dict, persist: bool = True) -> None:
        with self._lock:
            self._load()[key] = entry
            if persist:
                self._write()

    def entries(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._load())

    def _write(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(path), **self._entries}  # keep what other processes measured meanwhile
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as err:  # read-only home etc.: keep the rule in memory only
            import warnings

            warnings.warn(f"could not write kernel rule cache {path}: {err!r}")

    def clear(self) -> None:
        with self._lock:
            self._entries = {}


_DEFAULT: RuleCache | None = None


def default_cache() -> RuleCache:
    """The process-wide cache (``$DEEPSEEK_V3_RULE_CACHE`` or the default path) shared by all ops."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = RuleCache()
    return _DEFAULT


def time_ms(fn, device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events on a GPU, ``perf_counter`` elsewhere."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]
