"""Sandboxed execution of untrusted Python programs (HumanEval / MBPP completions, GRPO code rewards).

Each program runs in its own process with these layers of containment (outermost first):

1. **Namespaces** (when ``unshare`` works on this machine, probed once with ``unshare --net true``): the child is
   started as ``unshare --pid --fork --kill-child --net python -I bootstrap``. The new *network* namespace has only a
   down loopback interface, so no connection can be made. The new *PID* namespace makes the program PID 1 of its
   own namespace: when it dies (or is killed), the kernel kills every process it forked, so a fork bomb or a
   daemonized grandchild cannot outlive the sample, and the program cannot see (or signal) any process of the host.
   Without root, ``unshare --user --map-root-user`` is tried first so that unprivileged users get the same.
   Fallback when no namespace can be created: a new session/process group only (documented below).
2. **Privileges**: when the harness runs as root, the bootstrap drops to ``nobody`` (uid/gid 65534) after setting the
   limits, so ``RLIMIT_NPROC`` is enforced (root ignores it), files owned by other users cannot be modified and no
   process of another user (the harness, the trainer) can be signalled.
3. **Resource limits** (``resource.setrlimit`` in the child): address space (memory bomb -> ``MemoryError``), CPU time
   (busy loop -> ``SIGXCPU``), number of processes (fork bomb -> ``BlockingIOError``), size of written files, no core
   dumps.
4. **Wall-clock timeout** in the parent: on expiry the whole process group is ``SIGKILL``-ed (and with the PID
   namespace, everything inside it dies with its PID 1).
5. **Python-level guards** (defence in depth, like human-eval's ``reliability_guard``; these are *not* a security
   boundary, ``ctypes`` can bypass them): ``socket`` creation raises, and file-system writes (``open`` for writing,
   ``os.remove``, ``os.rename``, ``shutil.rmtree`` ...) outside the fresh temporary working directory raise
   ``PermissionError``; starting other programs (``os.system``, ``subprocess``, ``os.exec*``) raises, because an
   external program would bypass the file-system guard in world-writable directories such as ``/tmp``.

A program *passes* only if it exits with status 0 **and** the bootstrap printed a random per-run sentinel after the
program finished normally. ``sys.exit(0)`` / ``os._exit(0)`` before the asserts therefore count as failures.

Fallback without namespaces (no ``unshare``, or it is not permitted, e.g. in some containers): the program runs in a
new session; a timeout kills the process group; ``RLIMIT_NPROC`` bounds forks (only when not root, or after dropping to
``nobody``); the socket guard is the only network protection. Check ``sandbox_capabilities()`` to see what is active.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

NOBODY_UID = 65534
NOBODY_GID = 65534

# The bootstrap runs inside the child (python -I -S) before the untrusted program. Arguments are passed as
# argv: <program path> <memory bytes> <cpu seconds> <max processes> <max file bytes> <drop privileges 0/1>
# and the sentinel is read from stdin (so it is not visible in /proc/<pid>/cmdline).
_BOOTSTRAP = r'''
import os, sys, resource, signal
prog_path, mem, cpu, nproc, fsize, drop = sys.argv[1], *map(int, sys.argv[2:7])
sentinel = sys.stdin.readline().strip()
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
os.close(devnull)
workdir = os.path.dirname(os.path.abspath(prog_path))
os.chdir(workdir)

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

import builtins, io, socket, shutil as _shutil

if drop and os.geteuid() == 0:
    # Become `nobody` so that RLIMIT_NPROC is enforced (the kernel exempts uid 0) and nothing owned by other users can
    # be modified or signalled. Keep only CAP_DAC_READ_SEARCH (read-only access to every file) because the Python
    # installation may live under a directory `nobody` cannot traverse (e.g. /root/.pyenv).
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
    os.setgroups([])
    os.setgid(%(gid)d)
    os.setuid(%(uid)d)

    class _CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class _CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _caps = (_CapData * 2)()
    _caps[0].effective = _caps[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH
    libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), _caps)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot give privileges back
    # Changing credentials clears the parent-death signal that `unshare --kill-child` set: set it again so that the
    # program dies with the harness-side `unshare` process.
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    del libc, ctypes, _caps

def _blocked(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")

socket.socket = _blocked
socket.create_connection = _blocked
socket.socketpair = _blocked
socket.fromfd = _blocked
if hasattr(socket, "create_server"):
    socket.create_server = _blocked

_realpath = os.path.realpath

def _inside(path):
    try:
        if isinstance(path, int):
            return True
        path = os.fsdecode(path)
        full = _realpath(os.path.join(workdir, path))
        return full == workdir or full.startswith(workdir + os.sep) or full == os.devnull
    except Exception:
        return False

def _check(path):
    if not _inside(path):
        raise PermissionError(f"writing outside the sandbox working directory is not allowed: {path!r}")

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _check(file)
    return _open(file, mode, *args, **kwargs)
builtins.open = _guarded_open
io.open = _guarded_open

_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS:
        _check(path)
    return _os_open(path, flags, *args, **kwargs)
os.open = _guarded_os_open

def _wrap_paths(module, name, npaths):
    func = getattr(module, name, None)
    if func is None:
        return
    def wrapper(*args, **kwargs):
        for p in args[:npaths]:
            _check(p)
        return func(*args, **kwargs)
    setattr(module, name, wrapper)

for _name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "truncate", "chmod", "chown",
              "lchown", "utime", "mkfifo", "mknod"):
    _wrap_paths(os, _name, 1)
for _name in ("rename", "replace", "link", "symlink"):
    _wrap_paths(os, _name, 2)
for _name in ("rmtree", "move", "copyfile", "copy", "copy2", "copytree"):
    _wrap_paths(_shutil, _name, 1 if _name == "rmtree" else 2)

def _no_exec(*args, **kwargs):
    raise PermissionError("starting other programs is disabled in the sandbox")

for _name in ("system", "popen", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
              "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
              "posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
        setattr(os, _name, _no_exec)
import subprocess as _subprocess
_subprocess.Popen = _no_exec

with _open(prog_path, "r", encoding="utf-8") as f:
    source = f.read()
code = compile(source, "<program>", "exec")
namespace = {"__name__": "__main__", "__builtins__": builtins}
del f, source


def _run(code, namespace, token=sentinel):
    # the token is only in this frame, not in the module globals the program can import as __main__
    exec(code, namespace)
    sys.stdout.flush()
    os.write(1, ("\n" + token + "\n").encode())


del sentinel
_run(code, namespace)
'''


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run.

    ``status`` is one of ``passed`` (exit 0 and the sentinel printed after the program finished), ``failed``
    (exception, failed assert, non-zero exit or early ``sys.exit``), ``timeout`` (wall clock exceeded, process
    group killed) or ``error`` (the sandbox itself could not start the program).
    """

    status: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    timed_out: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def _can_run(cmd: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(cmd), capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` prefix that works on this machine, or ``()`` when none does."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    base = (exe, "--pid", "--fork", "--kill-child", "--net")
    candidates = [base] if os.geteuid() == 0 else [(exe, "--user", "--map-root-user", *base[1:]), base]
    for prefix in candidates:
        if _can_run([*prefix, "true"]):
            return prefix
    return ()


def sandbox_capabilities() -> dict:
    """Which containment layers are active on this machine (recorded in results.json)."""
    prefix = _namespace_prefix()
    return {
        "namespaces": " ".join(prefix[1:]) if prefix else None,
        "network_isolated": bool(prefix),
        "drop_to_nobody": os.geteuid() == 0,
        "rlimits": ["AS", "DATA", "CPU", "NPROC", "FSIZE", "CORE"],
        "python_guards": ["socket", "fs-writes-outside-workdir"],
    }


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_code(
    program: str,
    timeout: float = 10.0,
    *,
    memory_mb: int = 2048,
    cpu_seconds: int | None = None,
    max_processes: int = 64,
    max_file_mb: int = 64,
    isolate_network: bool = True,
    drop_privileges: bool = True,
    output_limit: int = 20_000,
    python: str = sys.executable,
) -> ExecutionResult:
    """Run ``program`` (Python source) in a fresh sandbox and report whether it ran to the end.

    Args:
        program: the full program, e.g. solution + tests (``check(candidate)``). It passes if it runs to the end.
        timeout: wall-clock seconds before the whole process group is killed.
        memory_mb: address-space limit (``RLIMIT_AS``) in MiB.
        cpu_seconds: CPU-time limit; defaults to ``ceil(timeout) + 1``.
        max_processes: ``RLIMIT_NPROC`` (enforced for non-root users, i.e. after dropping to ``nobody``). Note that it
            counts all processes of that user, so concurrent sandboxes share it.
        max_file_mb: largest file the program may write (``RLIMIT_FSIZE``; also bounds captured stdout/stderr).
        isolate_network: run in new network + PID namespaces when ``unshare`` works here.
        drop_privileges: when running as root, switch to ``nobody`` inside the child.
        output_limit: characters of stdout/stderr kept in the result (the tail).
        python: interpreter used for the program.
    """
    if cpu_seconds is None:
        cpu_seconds = int(timeout) + 1
    workdir = tempfile.mkdtemp(prefix="dsv3-sandbox-")
    drop = drop_privileges and os.geteuid() == 0
    start = time.monotonic()
    try:
        prog_path = os.path.join(workdir, "program.py")
        with open(prog_path, "w", encoding="utf-8") as f:
            f.write(program)
        boot_path = os.path.join(workdir, ".bootstrap.py")
        with open(boot_path, "w", encoding="utf-8") as f:
            f.write(_BOOTSTRAP % {"uid": NOBODY_UID, "gid": NOBODY_GID})
        out_path = os.path.join(workdir, ".stdout")
        err_path = os.path.join(workdir, ".stderr")
        if drop:
            os.chown(workdir, NOBODY_UID, NOBODY_GID)
            for p in (prog_path,):
                os.chown(p, NOBODY_UID, NOBODY_GID)
            os.chmod(boot_path, 0o444)
        sentinel = "__SANDBOX_DONE_" + secrets.token_hex(16) + "__"
        prefix = _namespace_prefix() if isolate_network else ()
        cmd = [
            *prefix,
            python,
            "-I",  # isolated mode: no user site, no PYTHON* env vars, no cwd on sys.path
            boot_path,
            prog_path,
            str(memory_mb * 1024 * 1024),
            str(cpu_seconds),
            str(max_processes),
            str(max_file_mb * 1024 * 1024),
            "1" if drop else "0",
        ]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HOME": workdir, "TMPDIR": workdir}
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=out_f, stderr=err_f, cwd=workdir, env=env,
                    start_new_session=True, close_fds=True,
                )
            except OSError as err:
                return ExecutionResult("error", None, stderr=f"could not start sandbox: {err}")
            timed_out = False
            try:
                try:
                    proc.stdin.write((sentinel + "\n").encode())
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill whatever is left in the group (daemonized children, the namespace's PID 1 ...).
                _kill_group(proc.pid)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                    pass
        duration = time.monotonic() - start
        stdout = _tail(out_path, output_limit + len(sentinel) + 2)
        stderr = _tail(err_path, output_limit)
        finished = sentinel in stdout
        stdout = stdout.replace("\n" + sentinel + "\n", "")[-output_limit:]
        if timed_out:
            status = "timeout"
        elif proc.returncode == 0 and finished:
            status = "passed"
        else:
            status = "failed"
        return ExecutionResult(status, proc.returncode, stdout, stderr, duration, timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(
    programs: Sequence[str],
    timeout: float = 10.0,
    *,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "executing",
    **kwargs,
) -> list[ExecutionResult]:
    """Run many programs with a thread pool (each run is its own sandboxed process); results keep input order."""
    from tqdm.auto import tqdm

    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) * 2))
    results: list[ExecutionResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_code, p, timeout, **kwargs): i for i, p in enumerate(programs)}
        bar = tqdm(total=len(programs), desc=desc, disable=not progress or len(programs) == 0, leave=False)
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
        bar.close()
    return results  # type: ignore[return-value]


__all__ = ["ExecutionResult", "run_code", "run_many", "sandbox_capabilities"]
