"""Sandboxed execution of untrusted Python programs (HumanEval / MBPP completions, GRPO code rewards).

Threat model: the program is hostile (an RL policy looking for a reward hack, or a model that memorised an exploit).
It may read or write anything its process can reach, fork, loop forever, print gigabytes, kill processes, and
inspect or patch every Python object of its own interpreter. It must not (a) read anything of the host, (b) change
anything outside its own private scratch space, (c) outlive its sample or hurt the harness, or (d) make a failing
sample count as passed.

**OS layers** (full isolation, ``bubblewrap``/``bwrap``, used whenever it works on this machine):

- started as user ``nobody`` (uid/gid 65534) when the harness is root, so no host file owned by another user is
  writable and ``RLIMIT_NPROC`` is enforced;
- ``bwrap --unshare-all --cap-drop ALL --die-with-parent --new-session``: own user, mount, PID, network, IPC, UTS and
  cgroup namespaces and no capability at all. The mount namespace holds only read-only binds of ``/usr`` (+ the
  ``/bin``, ``/lib``, ``/lib64``, ``/sbin`` links) and of the Python runtime, a fresh ``/proc`` of the sandbox's own
  PID namespace, a minimal ``/dev`` and a private, size-limited tmpfs ``/tmp`` that is the working directory. No
  ``/root``, ``/home``, ``/etc``, ``/work``, host ``/proc`` or data set file is visible. The network namespace has
  only a down loopback interface. When the sandbox's PID 1 dies every process inside dies with it, so daemons and
  fork-bomb children cannot outlive the sample; nothing is written to the host's disk (the program and tests travel
  over a pipe, stdout/stderr go to unlinked temporary files), so no per-sample file outlives the sample.
- rlimits (address space, data, CPU time, processes, file size, no core dumps) and a wall-clock timeout after which
  the whole process group is ``SIGKILL``-ed.

**Verdict** (the part a program could try to forge). Two processes run inside the sandbox:

- the *judge* (trusted bootstrap) reads the tests from its stdin pipe, marks itself non-dumpable
  (``PR_SET_DUMPABLE 0``: no other process of the same uid may ``ptrace`` it, read its ``/proc/<pid>/mem`` or open its
  ``/proc/<pid>/fd/*``) and writes the verdict on a pipe that only it holds;
- the *candidate* process (forked by the judge *before* the tests are read, every inherited descriptor closed)
  executes only the solution (HumanEval: prompt + completion; MBPP: the completion). The judge runs the benchmark's
  tests in its own interpreter with each entry point replaced by a proxy: a call sends the arguments to the
  candidate and gets back the return value, encoded as plain data and rebuilt by the judge from builtin types only
  (``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``, ``set``,
  ``frozenset``, and ``collections``' ``Counter``, ``OrderedDict``, ``defaultdict``, ``deque``); any other object
  stays in the candidate and reaches the judge as an opaque handle (attributes readable / settable by value, can be
  passed back) that equals only itself and has no truth value. The comparisons (``==``, ``abs(...) < 1e-6``) therefore run on real builtins in the judge: an object
  whose ``__eq__`` always returns True cannot cross, the expected answers never exist in the candidate's process or
  file system, and there is no sentinel to read or print: ``sys.exit(0)``/``os._exit(0)``, killing the judge or
  printing anything all leave the judge without a "passed" verdict.

``run_tests(solution, tests, entry_points)`` is that split mode. ``run_code(program)`` runs one self-checking
program in a single process (the program's own asserts decide; the candidate process reports "finished" itself),
which a program that imitates the harness protocol can forge; it is kept for callers whose tests cannot be split
(tests that pass a value that cannot cross, or use a free name that is neither a function nor a module), and every
result says which mode decided it (``ExecutionResult.verdict``).

**Fallback** (no working ``bwrap``): refused by default with :class:`SandboxUnavailableError` (install bubblewrap:
``apt-get install bubblewrap``, and allow unprivileged user namespaces). With ``allow_weak=True`` (``eval
--allow-weak-sandbox``, env ``DEEPSEEK_V3_ALLOW_WEAK_SANDBOX=1``) the same judge/candidate protocol runs under
``unshare --pid --fork --kill-child --net`` when that works, with the rlimits, the timeout and Python-level guards
(sockets, writes outside the working directory, starting programs) that ``ctypes``/``posix`` can bypass; the host
file system is then readable. ``sandbox_capabilities()`` (recorded in results.json) says which layers are active.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Sequence

NOBODY_UID = 65534
NOBODY_GID = 65534
WEAK_ENV = "DEEPSEEK_V3_ALLOW_WEAK_SANDBOX"
TMPFS_BYTES = 128 * 1024 * 1024


class SandboxUnavailableError(RuntimeError):
    """Full isolation (bubblewrap) does not work here and weaker isolation was not explicitly allowed."""


# The judge. argv: <verdict fd> <memory bytes> <cpu seconds> <max processes> <max file bytes> <python guards 0/1>.
# stdin: one JSON object {"mode": "split"|"inline", "solution": str, "tests": str, "prelude": str,
# "entry_points": [str]} (inline: "solution" is the whole self-checking program).
_JUDGE = r'''
import os, sys, json, struct, resource, traceback, builtins, collections
verdict_fd, mem, cpu, nproc, fsize, guards = map(int, sys.argv[1:7])

def _limit(which, value):
    if value > 0:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

_limit(resource.RLIMIT_AS, mem)
_limit(resource.RLIMIT_DATA, mem)
_limit(resource.RLIMIT_CPU, cpu)
_limit(resource.RLIMIT_FSIZE, fsize)
_limit(resource.RLIMIT_NPROC, nproc)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the candidate (same uid) cannot ptrace us or open /proc/<pid>/fd|mem

def _send(fd, obj):
    data = json.dumps(obj).encode()
    data = struct.pack("<Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]

def _recv(fd):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("the candidate process ended")
            buf += chunk
        return buf
    (n,) = struct.unpack("<Q", exact(8))
    return json.loads(exact(n))

# ---- plain-data codec: only exact builtin types (and collections' Counter, OrderedDict, defaultdict, deque) cross,
# and the judge rebuilds them from JSON with its own classes
_MAPPINGS = {collections.Counter: "ctr", collections.OrderedDict: "od", collections.defaultdict: "dd"}
_REBUILD = {"d": dict, "ctr": lambda items: collections.Counter(dict(items)), "od": collections.OrderedDict,
            "dd": lambda items: collections.defaultdict(None, items)}
def _enc(x):
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return {"i": str(x)}
    if t is float:
        return {"f": x.hex()}
    if t is complex:
        return {"c": [x.real.hex(), x.imag.hex()]}
    if t is bytes:
        return {"b": x.hex()}
    if t is list:
        return {"l": [_enc(v) for v in x]}
    if t is tuple:
        return {"t": [_enc(v) for v in x]}
    if t is set:
        return {"s": [_enc(v) for v in x]}
    if t is frozenset:
        return {"fs": [_enc(v) for v in x]}
    if t is dict:
        return {"d": [[_enc(k), _enc(v)] for k, v in x.items()]}
    if t in _MAPPINGS:
        return {_MAPPINGS[t]: [[_enc(k), _enc(v)] for k, v in x.items()]}
    if t is collections.deque:
        return {"dq": [_enc(v) for v in x]}
    if _HANDLES is not None:  # candidate: keep the object, send a reference the judge can only pass back
        _HANDLES.append(x)
        return {"h": len(_HANDLES) - 1}
    if t is _Handle:
        return {"h": object.__getattribute__(x, "_id")}
    raise TypeError(f"value of type {t.__name__} cannot cross the sandbox boundary (only builtin data types)")

def _dec(x):
    if x is None or type(x) in (bool, str):
        return x
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed value from the candidate")
    (tag, v), = x.items()
    if tag == "i":
        return int(str(v))
    if tag == "f":
        return float.fromhex(str(v))
    if tag == "c":
        return complex(float.fromhex(str(v[0])), float.fromhex(str(v[1])))
    if tag == "b":
        return bytes.fromhex(str(v))
    if tag in ("l", "t", "s", "fs", "dq"):
        if type(v) is not list:
            raise ValueError("malformed value from the candidate")
        items = [_dec(i) for i in v]
        return {"l": list, "t": tuple, "s": set, "fs": frozenset, "dq": collections.deque}[tag](items)
    if tag == "h":
        if type(v) is not int:
            raise ValueError("malformed value from the candidate")
        return _HANDLES[v] if _HANDLES is not None else _Handle(v)
    if tag in _REBUILD:
        if type(v) is not list:
            raise ValueError("malformed value from the candidate")
        return _REBUILD[tag]([(_dec(k), _dec(val)) for k, val in v])
    raise ValueError("malformed value from the candidate")

_HANDLES = None  # set to a list in the candidate: objects of the solution's own types, sent by reference


class _Handle:
    """In the judge: an object of the solution's own type (e.g. MBPP 367's tree ``Node``), kept in the candidate.
    It can be passed back to the solution and its attributes read / set (by value); it compares equal only to
    itself and has no truth value, so it can never stand in for an expected answer."""

    __slots__ = ("_id",)

    def __init__(self, i):
        object.__setattr__(self, "_id", i)

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError("an object of the solution's own type has no truth value in the judge")

    def __getattr__(self, name):
        return _rpc({"getattr": [object.__getattribute__(self, "_id"), name]})

    def __setattr__(self, name, value):
        _rpc({"setattr": [object.__getattribute__(self, "_id"), name, _enc(value)]})

    def __call__(self, *args, **kwargs):
        return _rpc({"hcall": object.__getattribute__(self, "_id"), "args": _enc(list(args)), "kwargs": _enc(kwargs)})

    def __repr__(self):
        return f"<solution object #{object.__getattribute__(self, '_id')}>"


# ---- Python-level guards (only in the weak fallback; with bubblewrap the OS is the boundary)
_GUARDS = """
import builtins, io, os, socket, shutil
def _blocked(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")
for _n in ("socket", "create_connection", "socketpair", "fromfd", "create_server"):
    if hasattr(socket, _n):
        setattr(socket, _n, _blocked)
_workdir = os.getcwd()
_realpath = os.path.realpath
def _check(path):
    if isinstance(path, int):
        return
    full = _realpath(os.path.join(_workdir, os.fsdecode(path)))
    if not (full == _workdir or full.startswith(_workdir + os.sep) or full == os.devnull):
        raise PermissionError(f"writing outside the sandbox working directory is not allowed: {path!r}")
_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        _check(file)
    return _open(file, mode, *a, **k)
builtins.open = io.open = _guarded_open
_os_open = os.open
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _guarded_os_open(path, flags, *a, **k):
    if flags & _W:
        _check(path)
    return _os_open(path, flags, *a, **k)
os.open = _guarded_os_open
def _wrap(mod, name, n):
    f = getattr(mod, name, None)
    if f is None:
        return
    def w(*a, **k):
        for p in a[:n]:
            _check(p)
        return f(*a, **k)
    setattr(mod, name, w)
for _n in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "truncate", "chmod", "chown", "lchown",
           "utime", "mkfifo", "mknod"):
    _wrap(os, _n, 1)
for _n in ("rename", "replace", "link", "symlink"):
    _wrap(os, _n, 2)
for _n in ("rmtree", "move", "copyfile", "copy", "copy2", "copytree"):
    _wrap(shutil, _n, 1 if _n == "rmtree" else 2)
def _no_exec(*a, **k):
    raise PermissionError("starting other programs is disabled in the sandbox")
for _n in ("system", "popen", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
           "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
           "posix_spawnp", "fork", "forkpty"):
    if _n not in ("fork", "forkpty") and hasattr(os, _n):
        setattr(os, _n, _no_exec)
import subprocess
subprocess.Popen = _no_exec
"""

def _candidate(to_cand, from_cand):
    """Runs in the forked candidate process: execute the solution, then answer calls until EOF."""
    ins = _recv(to_cand)
    ns = {"__name__": "__main__", "__builtins__": builtins}
    if ins.get("guards"):
        exec(compile(_GUARDS, "<sandbox-guards>", "exec"), {})
    try:
        exec(compile(ins["solution"], "<program>", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    if ins["mode"] == "inline":
        _send(from_cand, {"finished": True})  # self-reported: see the module docstring
        os._exit(0)
    global _HANDLES
    _HANDLES = []
    _send(from_cand, {"ready": True})
    while True:
        try:
            req = _recv(to_cand)
        except EOFError:
            os._exit(0)
        try:
            if "getattr" in req:
                value = getattr(_HANDLES[req["getattr"][0]], req["getattr"][1])
            elif "setattr" in req:
                target, name, raw = req["setattr"]
                value = setattr(_HANDLES[target], name, _dec(raw))
            else:
                func = ns[req["call"]] if "call" in req else _HANDLES[req["hcall"]]
                value = func(*_dec(req["args"]), **_dec(req["kwargs"]))
            out = {"ok": _enc(value)}
        except BaseException as err:  # the judge re-raises it inside the test
            out = {"raise": [type(err).__name__, str(err)[:2000]]}
        sys.stdout.flush()
        _send(from_cand, out)

os.environ.pop("PYTHONSTARTUP", None)
to_r, to_w = os.pipe()
back_r, back_w = os.pipe()
pid = os.fork()
if pid == 0:
    # candidate: nothing of the judge's channels stays open (stdin holds the tests, verdict_fd the verdict)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd in range(3, 1024):
        if fd not in (to_r, back_w):
            try:
                os.close(fd)
            except OSError:
                pass
    try:
        _candidate(to_r, back_w)
    finally:
        os._exit(1)
os.close(to_r)
os.close(back_w)
job = json.loads(sys.stdin.buffer.read())
os.close(0)

def _verdict(status, reason=""):
    os.write(verdict_fd, json.dumps({"verdict": status, "reason": reason[-2000:]}).encode())
    os.close(verdict_fd)

class _Unsupported(Exception):
    pass

def _rpc(payload):
    _send(to_w, payload)
    reply = _recv(back_r)
    if "raise" in reply:
        kind, msg = str(reply["raise"][0]), str(reply["raise"][1])
        cls = getattr(builtins, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            cls = RuntimeError
        raise cls(msg)
    return _dec(reply["ok"])

def _proxy(name):
    def call(*args, **kwargs):
        try:
            payload = {"call": name, "args": _enc(list(args)), "kwargs": _enc(kwargs)}
        except TypeError as err:
            raise _Unsupported(f"argument of {name}(): {err}") from None
        return _rpc(payload)
    call.__name__ = call.__qualname__ = name
    return call

try:
    _send(to_w, {"mode": job["mode"], "solution": job["solution"], "guards": bool(guards)})
    first = _recv(back_r)
    if job["mode"] == "inline":
        _, status = os.waitpid(pid, 0)
        ok = first.get("finished") is True and os.waitstatus_to_exitcode(status) == 0
        _verdict("passed" if ok else "failed", "" if ok else "the program did not finish")
    else:
        assert first.get("ready") is True
        test_ns = {"__name__": "__main__", "__builtins__": builtins}
        if job.get("prelude"):
            exec(compile(job["prelude"], "<prelude>", "exec"), test_ns)
        for name in job["entry_points"]:
            test_ns[name] = _proxy(name)
        exec(compile(job["tests"], "<tests>", "exec"), test_ns)
        _verdict("passed")
except _Unsupported as err:
    _verdict("unsupported", str(err))
except EOFError:
    _verdict("failed", "the candidate process ended early")
except BaseException:
    traceback.print_exc()
    _verdict("failed", traceback.format_exc())
'''


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run.

    ``status``: ``passed`` (the judge saw the tests finish), ``failed`` (exception, failed assert, early exit, the
    candidate died), ``timeout`` (wall clock exceeded, everything killed) or ``error`` (the sandbox could not start).
    ``verdict``: ``split-process`` (tests judged outside the candidate's process) or ``in-process`` (a
    self-checking program; see the module docstring); ``isolation``: ``bwrap`` or ``weak``.
    """

    status: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    timed_out: bool = False
    verdict: str = "in-process"
    isolation: str = "bwrap"
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def _harness_python() -> str:
    """The real interpreter of the harness (venvs are symlinks)."""
    return os.path.realpath(sys.executable)


def _prefix_dirs(python: str) -> list[str]:
    """Directories outside /usr that ``python`` needs (its installation prefix, e.g. a pyenv build under /root)."""
    if python != _harness_python():
        return []  # a system interpreter: everything is under /usr
    dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    return sorted(p for p in dirs if not (p == "/usr" or p.startswith("/usr/")))


@dataclass(frozen=True)
class _Setup:
    """How the full sandbox starts here: the interpreter inside it and whether bwrap itself runs as ``nobody``."""

    python: str
    as_nobody: bool
    problem: str | None = None  # why full isolation is unavailable (None: it works)
    note: str = ""


def _bwrap_command(setup: _Setup) -> list[str]:
    cmd = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--uid", str(NOBODY_UID), "--gid",
           str(NOBODY_GID), "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--hostname", "sandbox",
           "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for path in _prefix_dirs(setup.python):
        cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return cmd


def _user_kwargs(setup: _Setup) -> dict:
    return {"user": NOBODY_UID, "group": NOBODY_GID, "extra_groups": []} if setup.as_nobody else {}


def _probe(setup: _Setup) -> str | None:
    try:
        proc = subprocess.run([*_bwrap_command(setup), setup.python, "-I", "-c", "import os; print(os.getuid())"],
                              capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, cwd="/",
                              **_user_kwargs(setup))
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap could not start: {err}"
    if proc.returncode != 0 or proc.stdout.strip() != str(NOBODY_UID).encode():
        return f"bwrap failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-300:]}"
    return None


@functools.lru_cache(maxsize=None)
def _setup() -> _Setup:
    """The strongest working configuration, probed once.

    As root, bwrap is started as ``nobody``: a sandbox whose uid maps to host root is exempt from ``RLIMIT_NPROC``
    (the kernel never limits root's processes), so a fork bomb would only be stopped by the timeout. ``nobody``
    cannot reach an interpreter under ``/root`` (pyenv), so the system ``/usr/bin/python3`` is used then (the
    benchmarks need only the standard library); mapping to root is the last resort and is recorded.
    """
    if shutil.which("bwrap") is None:
        return _Setup(_harness_python(), False, "bwrap is not installed (apt-get install bubblewrap)")
    harness = _harness_python()
    if os.geteuid() != 0:
        candidates = [_Setup(harness, False)]
    else:
        system = shutil.which("python3", path="/usr/bin:/bin")
        candidates = [_Setup(harness, True)]
        if system and os.path.realpath(system) != harness:
            candidates.append(_Setup(os.path.realpath(system), True,
                                     note="system interpreter: the harness's Python is not readable by nobody"))
        candidates.append(_Setup(harness, False, note="bwrap runs as root: RLIMIT_NPROC is not enforced"))
    problems = []
    for cand in candidates:
        problem = _probe(cand)
        if problem is None:
            return cand
        problems.append(problem)
    return _Setup(harness, False, problems[-1] + " (are unprivileged user namespaces disabled?)")


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...]:
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    base = (exe, "--pid", "--fork", "--kill-child", "--net")
    candidates = [base] if os.geteuid() == 0 else [(exe, "--user", "--map-root-user", *base[1:]), base]
    for prefix in candidates:
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


def weak_allowed(flag: bool = False) -> bool:
    return flag or os.environ.get(WEAK_ENV, "") not in ("", "0")


def sandbox_capabilities(allow_weak: bool = False) -> dict:
    """Which containment layers are active on this machine (recorded in results.json)."""
    setup = _setup()
    problem = setup.problem
    if problem is None:
        return {
            "isolation": "bwrap",
            "python": setup.python,
            "bwrap_user": "nobody" if setup.as_nobody else f"uid {os.geteuid()}",
            "nproc_enforced": setup.as_nobody or os.geteuid() != 0,
            "note": setup.note,
            "namespaces": ["user", "mount", "pid", "net", "ipc", "uts", "cgroup"],
            "capabilities": "none (--cap-drop ALL)",
            "filesystem": "read-only /usr, /bin, /lib*, " + ", ".join(_prefix_dirs(setup.python) or ["(python under /usr)"])
                          + f"; private tmpfs /tmp ({TMPFS_BYTES >> 20} MiB, working dir); own /proc, minimal /dev",
            "network_isolated": True,
            "user": f"uid {NOBODY_UID} in its own user namespace (host uid "
                    f"{NOBODY_UID if setup.as_nobody else os.geteuid()}, no capabilities)",
            "rlimits": ["AS", "DATA", "CPU", "NPROC", "FSIZE", "CORE"],
            "verdict": "split-process judge (run_tests); in-process for run_code",
            "python_guards": [],
            "weak_fallback_allowed": weak_allowed(allow_weak),
        }
    prefix = _unshare_prefix()
    return {
        "isolation": "weak",
        "bwrap_problem": problem,
        "namespaces": " ".join(prefix[1:]) if prefix else None,
        "capabilities": "unchanged",
        "filesystem": "host file system readable",
        "network_isolated": bool(prefix),
        "user": f"uid {os.geteuid()}",
        "rlimits": ["AS", "DATA", "CPU", "NPROC", "FSIZE", "CORE"],
        "verdict": "split-process judge (run_tests); in-process for run_code",
        "python_guards": ["socket", "fs-writes-outside-workdir", "exec"],
        "weak_fallback_allowed": weak_allowed(allow_weak),
    }


def _tail(f, limit: int) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _execute(job: dict, timeout: float, *, memory_mb: int, cpu_seconds: int | None, max_processes: int,
             max_file_mb: int, output_limit: int, allow_weak: bool) -> ExecutionResult:
    if timeout is None or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if cpu_seconds is None:
        cpu_seconds = int(timeout) + 1
    setup = _setup()
    problem = setup.problem
    if problem is not None and not weak_allowed(allow_weak):
        raise SandboxUnavailableError(
            f"refusing to run untrusted code without full isolation: {problem}. Fix: install bubblewrap "
            f"(apt-get install bubblewrap) and allow user namespaces, or accept the weaker sandbox explicitly with "
            f"--allow-weak-sandbox / {WEAK_ENV}=1")
    weak = problem is not None
    verdict_r, verdict_w = os.pipe()
    workdir = tempfile.mkdtemp(prefix="dsv3-sandbox-") if weak else None
    args = [setup.python, "-I", "-c", _JUDGE, str(verdict_w), str(memory_mb * 1024 * 1024), str(cpu_seconds),
            str(max_processes), str(max_file_mb * 1024 * 1024), "1" if weak else "0"]
    cmd = [*(_unshare_prefix() if weak else _bwrap_command(setup)), *args]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HOME": workdir or "/tmp", "TMPDIR": workdir or "/tmp"}
    start = time.monotonic()
    mode = "split-process" if job["mode"] == "split" else "in-process"
    isolation = "weak" if weak else "bwrap"
    try:
        with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out_f, stderr=err_f, cwd=workdir or "/",
                                        env=env, start_new_session=True, close_fds=True,
                                        pass_fds=[verdict_w], **({} if weak else _user_kwargs(setup)))
            except OSError as err:
                return ExecutionResult("error", None, stderr=f"could not start sandbox: {err}", verdict=mode,
                                       isolation=isolation)
            finally:
                os.close(verdict_w)
            timed_out = False
            try:
                try:
                    proc.stdin.write(json.dumps(job).encode())
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # bwrap (and with it the sandbox's PID 1 and everything inside)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                    pass
            os.set_blocking(verdict_r, False)
            try:
                raw = os.read(verdict_r, 1 << 16)
            except BlockingIOError:
                raw = b""
            duration = time.monotonic() - start
            stdout = _tail(out_f, output_limit)
            stderr = _tail(err_f, output_limit)
    finally:
        os.close(verdict_r)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        verdict = json.loads(raw) if raw else {}
    except ValueError:
        verdict = {}
    if timed_out:
        status = "timeout"
    elif verdict.get("verdict") == "passed" and proc.returncode == 0:
        status = "passed"
    elif verdict.get("verdict") == "unsupported":
        status = "unsupported"
    else:
        status = "failed"
    return ExecutionResult(status, proc.returncode, stdout, stderr, duration, timed_out, verdict=mode,
                           isolation=isolation, reason=str(verdict.get("reason", ""))[-1000:])


_DEFAULTS = dict(memory_mb=2048, cpu_seconds=None, max_processes=64, max_file_mb=64, output_limit=20_000,
                 allow_weak=False)


def run_tests(solution: str, tests: str, entry_points: Sequence[str], timeout: float = 10.0, *, prelude: str = "",
              fallback_inline: str | None = None, **kwargs) -> ExecutionResult:
    """Judge ``solution`` with ``tests`` run outside the candidate's process (see the module docstring).

    Args:
        solution: code defining the entry points (HumanEval: prompt + completion).
        tests: trusted test code; it runs in the judge with each name of ``entry_points`` bound to a proxy that
            calls the candidate's function (arguments and results cross as plain builtin data).
        entry_points: names the tests call.
        prelude: trusted code run in the judge before the tests (HumanEval: the prompt, for its helper functions).
        fallback_inline: when the tests pass a value that cannot cross (a function, an instance of a test class),
            run this self-checking program in-process instead (recorded as ``verdict="in-process"``); without it,
            such a sample fails.
        kwargs: ``memory_mb``, ``cpu_seconds``, ``max_processes``, ``max_file_mb``, ``output_limit``, ``allow_weak``.
    """
    opts = {**_DEFAULTS, **kwargs}
    res = _execute({"mode": "split", "solution": solution, "tests": tests, "prelude": prelude,
                    "entry_points": list(entry_points)}, timeout, **opts)
    if res.status == "unsupported":
        if fallback_inline is not None:
            return run_code(fallback_inline, timeout, **opts)
        res.status = "failed"
    return res


def run_code(program: str, timeout: float = 10.0, **kwargs) -> ExecutionResult:
    """Run one self-checking ``program`` (solution + asserts) in the sandbox; it passes if it runs to the end.

    The verdict is in-process (see the module docstring): prefer :func:`run_tests` for untrusted code whose tests
    can be separated. ``kwargs`` as for :func:`run_tests`.
    """
    opts = {**_DEFAULTS, **kwargs}
    return _execute({"mode": "inline", "solution": program, "tests": "", "prelude": "", "entry_points": []},
                    timeout, **opts)


def _pool_map(fn, jobs: Sequence, workers: int | None, progress: bool, desc: str) -> list:
    from tqdm.auto import tqdm

    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) * 2))
    results: list = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        bar = tqdm(total=len(jobs), desc=desc, disable=not progress or len(jobs) == 0, leave=False)
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
        bar.close()
    return results


def run_many(programs: Sequence, timeout: float = 10.0, *, workers: int | None = None, progress: bool = True,
             desc: str = "executing", **kwargs) -> list[ExecutionResult]:
    """Run many jobs with a thread pool; results keep input order. A job is a program string (:func:`run_code`)
    or a dict of :func:`run_tests` arguments (``solution``, ``tests``, ``entry_points``, ...)."""
    def one(job):
        if isinstance(job, str):
            return run_code(job, timeout, **kwargs)
        return run_tests(timeout=timeout, **job, **kwargs)

    return _pool_map(one, programs, workers, progress, desc)


__all__ = ["ExecutionResult", "SandboxUnavailableError", "run_code", "run_tests", "run_many", "sandbox_capabilities"]
