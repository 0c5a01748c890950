"""Every known attack on the code sandbox, run the way a benchmark or an RL policy would: as HumanEval completions
scored by the harness (`HumanEval.score_batch`, all attacks in one parallel batch) and through the GRPO code reward.

Each attack is a *wrong* solution of HumanEval/0 plus an exploit. For every one we assert: scored as failed,
contained (no host secret or test code in its output, no connection, no host file changed), nothing left behind
(no process, no file in /tmp or /dev/shm) and the run goes on (the canonical solution in the same batch passes).
"""

import os
import secrets
import time
from pathlib import Path

import pytest

from deepseek_v3.eval.base import get_task
from deepseek_v3.eval.sandbox import run_code, sandbox_capabilities
from deepseek_v3.trainers import rewards
from host_server import listening_server

TAG = "atk" + secrets.token_hex(4)  # process names / file names used by the attacks, to look for leftovers
WRONG = "    return None\n\n"


def _rename(tag):
    return f"import ctypes\nctypes.CDLL(None).prctl(15, ctypes.c_char_p({tag.encode()!r}), 0, 0, 0)\n"


def _attacks(secret_file: Path, port: int) -> dict[str, str]:
    """name -> completion (appended to the HumanEval/0 prompt)."""
    dump = (
        "import sys, gc, os\n"
        "seen = []\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    seen.append(repr(f.f_locals)[:5000]); f = f.f_back\n"
        "for o in gc.get_objects():\n"
        "    if callable(o) and getattr(o, '__defaults__', None): seen.append(repr(o.__defaults__)[:500])\n"
        "seen.append(repr(vars(sys.modules['__main__']))[:5000])\n"
        "print('\\n'.join(seen))\n"
    )
    return {
        # 1. read the harness's pass token from the stack / defaults, print it, exit 0 (at import and at call time)
        "sentinel_from_stack_at_import": WRONG + dump + "os._exit(0)\n",
        "sentinel_from_stack_at_call": (
            "    import sys, os\n    f = sys._getframe()\n    while f is not None:\n"
            "        print(f.f_locals, flush=True); f = f.f_back\n    os._exit(0)\n"),
        # 2. read host files (a root-only secret, /root), see host processes
        "read_host_files": WRONG + (
            "import os\nout = []\n"
            f"for p in [{str(secret_file)!r}, '/root', '/work', '/etc/shadow', '/home']:\n"
            "    try:\n"
            "        out.append(open(p).read() if os.path.isfile(p) else str(os.listdir(p)))\n"
            "    except Exception as e:\n"
            "        out.append(repr(e))\n"
            "out.append('PIDS ' + ' '.join(x for x in os.listdir('/proc') if x.isdigit()))\n"
            "print('\\n'.join(out))\n"),
        # 3. bypass Python-level guards: posix.open / io.FileIO / posix.system / _posixsubprocess
        "posix_open_writes": WRONG + (
            "import posix, io\n"
            f"for p in ['/tmp/{TAG}-posix', '/dev/shm/{TAG}-posix']:\n"
            "    fd = posix.open(p, posix.O_WRONLY | posix.O_CREAT, 0o666); posix.write(fd, b'x'); posix.close(fd)\n"
            f"io.FileIO('/tmp/{TAG}-fileio', 'w').write(b'x')\n"
            f"open('/tmp/{TAG}-open', 'w').write('x')\n"),
        "posix_system_and_fork_exec": WRONG + (
            "import posix, subprocess\n"
            f"posix.system('touch /tmp/{TAG}-system; echo hacked > /dev/shm/{TAG}-system')\n"
            f"subprocess.run(['/usr/bin/touch', '/tmp/{TAG}-subprocess'])\n"),
        "always_equal_object": (
            "    class Eq:\n        def __eq__(self, other): return True\n        def __ne__(self, other): return False\n"
            "        def __bool__(self): return True\n    return Eq()\n"),
        "bool_subclass": "    class B(int):\n        def __eq__(self, o): return True\n    return B(1)\n",
        "read_tests_and_expected_answers": WRONG + (
            "import os, glob\nout = [repr(os.listdir('.')), repr(glob.glob('/tmp/**', recursive=True))]\n"
            "for pid in [x for x in os.listdir('/proc') if x.isdigit()]:\n"
            "    for name in ('cmdline', 'environ', 'mem', 'fd/0', 'fd/3', 'fd/4', 'fd/5'):\n"
            "        try:\n"
            "            out.append(open(f'/proc/{pid}/{name}', 'rb').read(100000).decode('latin1'))\n"
            "        except Exception as e:\n"
            "            out.append(repr(e))\n"
            "print('\\n'.join(out))\nassert False\n"),
        # the earlier ones
        "infinite_loop": WRONG + "while True:\n    pass\n",
        "fork_bomb": WRONG + _rename(TAG + "b") + (
            "import os, time\nfor _ in range(2000):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(120)\n        os._exit(0)\n"
            "print('forked', _, flush=True)\ntime.sleep(120)\n"),
        "memory_bomb": WRONG + "x = bytearray(64 * 1024 ** 3)\n",
        "memory_bomb_on_tmpfs": WRONG + "for i in range(100):\n    open(f'/tmp/f{i}', 'wb').write(bytes(60 * 2**20))\n",
        "network": WRONG + (
            f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
            "print('connected')\n"),
        "kill_the_judge": WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "kill_everything": WRONG + "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
        "kill_the_harness": WRONG + f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n",
        "sys_exit_0": WRONG + "import sys\nsys.exit(0)\n",
        "os_exit_0_at_call": "    import os\n    os._exit(0)\n",
        "setsid_daemon": WRONG + _rename(TAG + "d") + (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(120)\n"
            "    os._exit(0)\ntime.sleep(0.2)\n"),
        "gigabyte_stdout": WRONG + "import sys\nblock = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(block)\n",
        "segfault": WRONG + "import ctypes\nctypes.string_at(0)\n",
    }


def _live(tag: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "comm").read_text():
                    if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                        pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _leftover_files() -> list[str]:
    return [str(p) for d in ("/tmp", "/dev/shm") for p in Path(d).glob(f"{TAG}*")]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, data_dir):
    secret_dir = tmp_path_factory.mktemp("secret")
    secret_file = secret_dir / "key"
    secret = "TOPSECRET-" + secrets.token_hex(8)
    secret_file.write_text(secret)
    os.chmod(secret_file, 0o600)
    os.chmod(secret_dir, 0o700)
    task = get_task("humaneval", data_dir=data_dir, timeout=4.0, workers=8, progress=False)
    doc = task.docs()[0]
    with listening_server() as (port, accepted):
        attacks = _attacks(secret_file, port)
        items = [(doc, c) for c in attacks.values()] + [(doc, doc["canonical_solution"])]
        start = time.monotonic()
        results = task.score_batch(items)
    elapsed = time.monotonic() - start
    leftovers = {"processes": _live(TAG), "files": _leftover_files()}
    end = time.monotonic() + 5
    while leftovers["processes"] and time.monotonic() < end:
        time.sleep(0.1)
        leftovers["processes"] = _live(TAG)
    return {"results": dict(zip(attacks, results[:-1])), "canonical": results[-1], "secret": secret, "doc": doc,
            "accepted": accepted, "leftovers": leftovers, "elapsed": elapsed}


def test_full_isolation_is_active():
    caps = sandbox_capabilities()
    assert caps["isolation"] == "bwrap", caps  # install bubblewrap: apt-get install bubblewrap
    assert caps["network_isolated"] and caps["capabilities"].startswith("none")


@pytest.mark.parametrize("name", list(_attacks(Path("/nonexistent"), 1)))
def test_attack_is_scored_failed_and_contained(outcome, name):
    res = outcome["results"][name]
    assert res["correct"] is False and res["status"] in ("failed", "timeout"), res
    assert res["verdict"] == "split-process"
    assert outcome["secret"] not in res["stderr"]


def test_nothing_leaks_or_is_left_behind_and_the_run_goes_on(outcome):
    assert outcome["canonical"]["correct"] is True  # the batch went on after every attack
    assert outcome["leftovers"] == {"processes": [], "files": []}
    assert outcome["accepted"] == []  # no connection reached the host
    assert outcome["results"]["infinite_loop"]["status"] == "timeout"
    assert outcome["elapsed"] < 60


def test_attack_output_holds_no_host_data_or_tests(data_dir):
    """What the attacks print (samples.jsonl would keep it) holds no host secret, no test code, few processes."""
    import json

    secret_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"{TAG}-secret"
    secret_dir.mkdir(mode=0o700)
    try:
        key = secret_dir / "key"
        key.write_text("TOPSECRET-" + TAG)
        os.chmod(key, 0o600)
        task = get_task("humaneval", data_dir=data_dir, timeout=4.0, progress=False)
        doc = task.docs()[0]
        attacks = _attacks(key, 1)
        from deepseek_v3.eval.sandbox import run_tests

        job = task.job(doc, attacks["read_host_files"])
        out = run_tests(job["solution"], job["tests"], job["entry_points"], 4.0, prelude=job["prelude"]).stdout
        assert "TOPSECRET" not in out and "No such file" in out
        pids = out.split("PIDS ")[1].split()
        assert len(pids) <= 4, pids  # the sandbox's own PID namespace: bwrap's init, the judge, the candidate
        job = task.job(doc, attacks["read_tests_and_expected_answers"])
        res = run_tests(job["solution"], job["tests"], job["entry_points"], 4.0, prelude=job["prelude"])
        assert res.status in ("failed", "timeout")  # reading bwrap's eventfd blocks until the timeout
        for line in doc["test"].splitlines():
            if "assert" in line:
                assert line.strip() not in res.stdout, line  # the tests never exist where the candidate can look
        job = task.job(doc, attacks["sentinel_from_stack_at_import"])
        res = run_tests(job["solution"], job["tests"], job["entry_points"], 4.0, prelude=job["prelude"])
        assert res.status == "failed" and "assert candidate" not in res.stdout
        assert json.dumps(res.to_dict())  # recordable
    finally:
        for p in secret_dir.iterdir():
            p.unlink()
        secret_dir.rmdir()


def test_no_per_sample_file_touches_the_host_disk(monkeypatch):
    """With bubblewrap, program and tests travel over a pipe and the output goes to unlinked files: no directory or
    named file is created on the host for a sample, so none can outlive it."""
    import tempfile

    def forbidden(*args, **kwargs):
        raise AssertionError("a per-sample directory / named file was created on the host")

    monkeypatch.setattr(tempfile, "mkdtemp", forbidden)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", forbidden)
    assert run_code("open('/tmp/x', 'w').write('y')\nassert open('/tmp/x').read() == 'y'\n").passed


def test_fork_bomb_is_stopped_by_the_process_limit():
    res = run_code(_rename(TAG + "p") + "import os, time\nn = 0\nfor _ in range(2000):\n    try:\n"
                   "        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n"
                   "        time.sleep(60)\n        os._exit(0)\n    n += 1\nprint('forked', n, flush=True)\n"
                   "time.sleep(60)\n", timeout=3.0, max_processes=32)
    assert res.status == "timeout"
    assert int(res.stdout.split()[-1]) < 40, res.stdout
    end = time.monotonic() + 5
    while _live(TAG + "p") and time.monotonic() < end:
        time.sleep(0.1)
    assert _live(TAG + "p") == []


def test_grpo_code_reward_gives_nothing_for_exploits(data_dir):
    from deepseek_v3.eval.data import read_jsonl

    task = read_jsonl(data_dir / "humaneval" / "HumanEval.jsonl.gz")[0]
    head = task["prompt"]
    attacks = _attacks(Path("/nonexistent"), 1)
    names = ["sentinel_from_stack_at_import", "sentinel_from_stack_at_call", "always_equal_object", "sys_exit_0"]
    completions = [f"```python\n{head}{attacks[n]}\n```" for n in names]
    completions.append(f"```python\n{head}{task['canonical_solution']}\n```")
    scores = rewards.code_reward(completions, test=[task["test"]] * len(completions),
                                 entry_point=[task["entry_point"]] * len(completions), timeout=4.0)
    assert scores == [0.0] * len(names) + [1.0]
