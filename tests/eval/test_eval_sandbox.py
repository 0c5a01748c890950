"""Attacks on the sandboxed executor: each is recorded as a failure (or blocked), the harness keeps going and nothing
outside the sandbox's temporary directory changes. Nothing the sandbox started is left running afterwards."""

import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from deepseek_v3.eval.sandbox import run_code, run_many, sandbox_capabilities
from host_server import listening_server


def _live_processes_named(tag: str) -> list[int]:
    """Processes (not zombies) whose name contains ``tag``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "comm").read_text():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state not in ("Z", "X"):
                        pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _wait_until_gone(tag: str, seconds: float = 5.0) -> list[int]:
    end = time.monotonic() + seconds
    while (left := _live_processes_named(tag)) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def _name_self(tag: str) -> str:
    """Program lines that rename the current process (visible in /proc/<pid>/comm) so leftovers can be found."""
    return (f"import ctypes\nctypes.CDLL(None).prctl(15, ctypes.c_char_p({tag.encode()!r}), 0, 0, 0)\n")


def test_good_program_passes_and_bad_ones_fail():
    assert run_code("x = 1\nassert x == 1\nprint('hi')").status == "passed"
    assert run_code("print('hi')").stdout.strip() == "hi"
    res = run_code("assert 1 == 2")
    assert res.status == "failed" and "AssertionError" in res.stderr
    assert run_code("raise SystemExit(3)").status == "failed"
    assert run_code("def f(:\n  pass").status == "failed"


def test_exit_before_asserts_is_a_failure():
    for early_exit in ("import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit(0)", "quit()"):
        res = run_code(f"{early_exit}\nassert False, 'never reached'\n")
        assert res.status == "failed" and res.returncode == 0, (early_exit, res)


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    res = run_code("while True:\n    pass\n", timeout=1.5)
    assert res.status == "timeout" and res.timed_out and not res.passed
    assert time.monotonic() - start < 10
    res = run_code("import time\ntime.sleep(60)\n", timeout=1.0)  # blocked, not spinning: wall clock still applies
    assert res.status == "timeout"


def test_fork_bomb_is_contained_and_nothing_survives():
    tag = "bomb" + secrets.token_hex(5)
    # Bounded but large: 2000 sleeping children (a real bomb is exponential). The process limit stops it early
    # (RLIMIT_NPROC, enforced because the sandbox drops to `nobody`); the wall clock and the PID namespace kill the rest.
    program = _name_self(tag) + (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(2000):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(120)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print('forked', n, flush=True)\n"
        "time.sleep(120)\n"
    )
    res = run_code(program, timeout=3.0, max_processes=32)
    assert res.status == "timeout"
    if os.geteuid() == 0 or sandbox_capabilities()["network_isolated"]:
        assert "forked" in res.stdout and int(res.stdout.split()[-1]) < 2000  # the process limit stopped the loop
    assert _wait_until_gone(tag) == [], "fork-bomb children survived the sandbox"


def test_daemonized_grandchild_is_killed_with_the_sample():
    tag = "daemon" + secrets.token_hex(4)
    program = _name_self(tag) + (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
    )
    res = run_code(program, timeout=5.0)
    assert res.status == "passed"  # the program itself finished normally
    assert _wait_until_gone(tag) == []


def test_memory_bomb_fails_without_hurting_the_host():
    res = run_code("x = bytearray(64 * 1024 ** 3)\n", timeout=5.0, memory_mb=512)
    assert res.status == "failed" and "MemoryError" in res.stderr
    res = run_code("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))\n", timeout=5.0, memory_mb=512)
    assert res.status == "failed" and "MemoryError" in res.stderr


def test_writes_never_reach_the_host(tmp_path):
    """The host file system is not visible (writes to it fail); /tmp and /dev/shm are the sandbox's own (writes there
    succeed but vanish with the sample)."""
    victim = tmp_path / "keep.txt"
    victim.write_text("original")
    os.chmod(tmp_path, 0o777)  # even a world-writable directory is protected
    target = tmp_path / "pwned.txt"
    tmp_target = Path("/tmp") / f"dsv3-eval-pwned-{secrets.token_hex(4)}"
    shm_target = Path("/dev/shm") / tmp_target.name
    must_fail = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.rename({str(victim)!r}, {str(target)!r})",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import subprocess; subprocess.run(['touch', {str(target)!r}], check=True)",
    ]
    for attack in must_fail:
        res = run_code(attack + "\nprint('done')\n")
        assert res.status == "failed", (attack, res)
    contained = [
        f"open({str(tmp_target)!r}, 'w').write('x')",
        f"import os; os.system('touch {tmp_target} {shm_target}')",
        f"import os; fd = os.open({str(tmp_target)!r}, os.O_WRONLY | os.O_CREAT); os.write(fd, b'x')",
        "open('../escape.txt', 'w').write('x')",
    ]
    for attack in contained:
        run_code(attack + "\nprint('done')\n")
    inside = run_code("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")
    assert inside.status == "passed", inside.stderr
    assert victim.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert not tmp_target.exists() and not shm_target.exists() and not Path("/tmp/escape.txt").exists()


def test_network_is_blocked():
    with listening_server() as (port, accepted):
        programs = [
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            # bypass the Python guard with the C module: the network namespace still has no route to the host
            f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n",
            "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n",
        ]
        results = [run_code(p + "print('connected')\n", timeout=5) for p in programs]
    for res in results:
        assert res.status == "failed" and "connected" not in res.stdout, res
    if sandbox_capabilities()["network_isolated"]:
        assert accepted == []
    else:  # documented fallback: only the socket guard, which _socket bypasses
        assert len(accepted) <= 1


def test_killing_the_parent_does_not_hurt_the_harness():
    me = os.getpid()
    for attack in (f"import os, signal\nos.kill({me}, signal.SIGKILL)\n",
                   "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
                   f"import os, signal\nos.killpg(os.getpgid({me}), signal.SIGKILL)\n",
                   "import os, signal\nos.kill(-1, signal.SIGKILL)\n"):
        res = run_code(attack + "time_to_fail = 1\nassert False\n", timeout=3)
        assert res.status in ("failed", "timeout"), (attack, res)
    assert os.getpid() == me  # still here


def test_pool_keeps_going_through_all_attacks():
    programs = [
        "while True: pass",
        "x = bytearray(64 * 1024 ** 3)",
        "import sys; sys.exit(0)\nassert False",
        "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)",
        "import os; os._exit(1)",
        "assert sum(range(10)) == 45",
    ] * 2
    results = run_many(programs, timeout=2.0, workers=4, progress=False)
    assert [r.passed for r in results] == [False] * 5 + [True] + [False] * 5 + [True]
    assert results[0].status == "timeout"


def test_weaker_isolation_is_refused_unless_allowed(monkeypatch):
    from deepseek_v3.eval import sandbox

    monkeypatch.setattr(sandbox, "_setup", lambda: sandbox._Setup(sys.executable, False, "bwrap is not installed"))
    monkeypatch.delenv(sandbox.WEAK_ENV, raising=False)
    with pytest.raises(sandbox.SandboxUnavailableError, match="apt-get install bubblewrap.*--allow-weak-sandbox"):
        run_code("assert True")
    caps = sandbox.sandbox_capabilities()
    assert caps["isolation"] == "weak" and caps["bwrap_problem"] == "bwrap is not installed"
    res = run_code("assert 1 + 1 == 2", allow_weak=True)
    assert res.passed and res.isolation == "weak"
    monkeypatch.setenv(sandbox.WEAK_ENV, "1")
    split = sandbox.run_tests("def f(x):\n    return x * 2\n", "assert f(3) == 6\n", ["f"])
    assert split.passed and split.verdict == "split-process"
    guarded = run_code("import socket\nsocket.socket()\n")  # the Python guards are on in the weak mode
    assert guarded.status == "failed" and "network access is disabled" in guarded.stderr


def test_solution_objects_cross_by_reference_and_never_pass_for_answers():
    from deepseek_v3.eval.sandbox import run_tests

    solution = ("class Box:\n    def __init__(self, v):\n        self.v = v\n    def __eq__(self, other):\n"
                "        return True\n    def __bool__(self):\n        return True\n\n"
                "def get(box):\n    return box.v\n\ndef make():\n    return Box(0)\n")
    good = run_tests(solution, "b = Box(3)\nb.v = 4\nassert get(b) == 4 and b.v == 4\nassert make() is not None\n",
                     ["Box", "get", "make"])
    assert good.passed and good.verdict == "split-process", good.stderr
    for test in ("assert make() == 1\n", "assert make()\n", "assert make() == make()\n", "assert not make() != 5\n"):
        res = run_tests(solution, test, ["Box", "get", "make"])
        assert res.status == "failed", (test, res)
