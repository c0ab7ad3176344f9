"""The code sandbox (nanochat/execution.py) as a specification: each hostile program is contained and reported,
and the test process is unharmed. Every test runs under bubblewrap ("bwrap", skipped where it is missing or cannot
work) and, where the rlimits alone can hold it, under the fallback without bwrap ("rlimits")."""

import gzip
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat import execution
from nanochat.common import UserError
from nanochat.execution import MAX_OUTPUT_BYTES, execute_code

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0


def bwrap_skip_reason():
    if shutil.which("bwrap") is None:
        return "bubblewrap (Debian package `bubblewrap`) not installed"
    if not execution._use_bwrap(None):
        return execution._bwrap_state["reason"]
    return None


@pytest.fixture(params=["bwrap", "rlimits"])
def use_bwrap(request):
    """use_bwrap for execute_code: True under bubblewrap, False for the rlimits-only fallback."""
    if request.param == "bwrap":
        reason = bwrap_skip_reason()
        if reason:
            pytest.skip(reason)
        return True
    return False


@pytest.fixture
def bwrap_only(use_bwrap):
    if not use_bwrap:
        pytest.skip("without bwrap there is no network or filesystem isolation (documented)")
    return True


def requires_proc():
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux) to look for leftover processes")


def unique_name():
    # a process name (/proc/PID/comm, at most 15 characters) that the program's forks inherit
    return f"sbx{random.randrange(10**9):09d}"


def processes_named(name):
    """Live processes with this name (a zombie is dead, only not yet collected by its new parent)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and Path(f"/proc/{pid}/comm").read_text().strip() == name:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(pid))
        except OSError:
            pass
    return found


def assert_none_left(name, seconds=3.0):
    deadline = time.monotonic() + seconds
    while processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_named(name) == [], f"processes named {name} still running"


SET_NAME = "import ctypes\nctypes.CDLL(None).prctl(15, b'{name}', 0, 0, 0)  # PR_SET_NAME, inherited by forks\n"


# -----------------------------------------------------------------------------
# Ordinary programs


def test_happy_path_captures_stdout_and_stderr(use_bwrap):
    result = execute_code("import sys\nprint('hello', 6 * 7)\nprint('note', file=sys.stderr)", use_bwrap=use_bwrap)
    assert result.success and result.stdout == "hello 42\n" and result.stderr == "note\n"
    assert result.error is None and not result.timeout and not result.memory_exceeded


def test_exception_reports_the_last_traceback_line(use_bwrap):
    result = execute_code("def f(x):\n    return x / 0\nf(1)", use_bwrap=use_bwrap)
    assert not result.success
    assert result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.stderr


def test_exit_status_without_traceback_is_reported(use_bwrap):
    result = execute_code("import sys\nsys.exit(3)", use_bwrap=use_bwrap)
    assert not result.success and result.error == "exit status 3"


def test_program_may_write_in_its_own_working_dir(use_bwrap):
    code = "open('scratch.txt', 'w').write('kept')\nprint(open('scratch.txt').read())"
    result = execute_code(code, use_bwrap=use_bwrap)
    assert result.success and result.stdout == "kept\n"


def test_stdin_is_disabled(use_bwrap):
    result = execute_code("import sys\nprint(repr(sys.stdin.read()))\ninput()", use_bwrap=use_bwrap)
    assert result.stdout == "''\n"
    assert result.error == "EOFError: EOF when reading a line"


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="timeout"):
        execute_code("pass", timeout=0)
    with pytest.raises(UserError, match="maximum_memory_bytes"):
        execute_code("pass", maximum_memory_bytes=1000)
    with pytest.raises(UserError, match="use_bwrap"):
        execute_code("pass", use_bwrap="yes")


def test_missing_bwrap_falls_back_with_one_warning_or_raises_when_required(monkeypatch, caplog):
    monkeypatch.setattr(execution, "_bwrap_state", {})
    monkeypatch.setattr(execution.shutil, "which", lambda name, path=None: None)
    with pytest.raises(UserError, match="bubblewrap"):
        execute_code("pass", use_bwrap=True)
    monkeypatch.setattr(execution, "_bwrap_state", {})
    with caplog.at_level("WARNING", logger="nanochat"):
        assert execute_code("print(1)").stdout == "1\n"
        assert execute_code("print(2)").stdout == "2\n"
    warnings = [r for r in caplog.records if "WITHOUT network or filesystem isolation" in r.getMessage()]
    assert len(warnings) == 1 and "`bubblewrap`" in warnings[0].getMessage()


def test_broken_bwrap_is_detected_once_and_falls_back(monkeypatch, tmp_path, caplog):
    fake = tmp_path / "bwrap"  # what bwrap says where the container forbids namespaces
    fake.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_which = shutil.which
    monkeypatch.setattr(execution, "_bwrap_state", {})
    monkeypatch.setattr(execution.shutil, "which", lambda name, path=None: str(fake) if name == "bwrap" else
                        real_which(name, path=path))
    with caplog.at_level("WARNING", logger="nanochat"):
        assert execute_code("print(1)").stdout == "1\n"
    assert "bwrap does not work here (bwrap: Creating new namespace failed" in caplog.text
    with pytest.raises(UserError, match="does not work here"):
        execute_code("pass", use_bwrap=True)


# -----------------------------------------------------------------------------
# Runaway programs: contained, reported, the test process unharmed


def test_infinite_loop_times_out(use_bwrap):
    start = time.monotonic()
    result = execute_code("while True:\n    pass", timeout=1.0, use_bwrap=use_bwrap)
    assert result.timeout and not result.success
    assert result.error.startswith("timeout")
    assert time.monotonic() - start < 4.0


@pytest.mark.parametrize("then", ["loops", "exits"])
def test_closing_its_output_does_not_end_the_run(use_bwrap, then):
    code = "import os, time\nprint('bye', flush=True)\nos.close(1)\nos.close(2)\ntime.sleep(0.3)\n"
    code += "while True:\n    pass\n" if then == "loops" else ""
    result = execute_code(code, timeout=2.0, use_bwrap=use_bwrap)
    assert result.stdout == "bye\n"
    assert (result.timeout, result.success) == ((True, False) if then == "loops" else (False, True))


@pytest.mark.parametrize("bomb", ["plain", "persistent"])
def test_fork_bomb_is_contained(use_bwrap, bomb):
    requires_proc()
    name = unique_name()
    fork = "    os.fork()\n" if bomb == "plain" else "    try:\n        os.fork()\n    except OSError:\n        pass\n"
    code = SET_NAME.format(name=name) + "import os\nwhile True:\n" + fork
    start = time.monotonic()
    result = execute_code(code, timeout=2.0, use_bwrap=use_bwrap)
    assert not result.success
    if bomb == "plain":  # the process limit makes fork fail, and the unhandled error ends every copy (on a
        # loaded machine the copies may not all reach the limit before the timeout: then the timeout ends them)
        # (the copies' tracebacks interleave on stderr, so the error is looked for in all of it)
        assert "Resource temporarily unavailable" in result.stderr or "Traceback" in result.stderr or result.timeout
    else:
        assert result.timeout
    assert time.monotonic() - start < 20.0
    assert_none_left(name)


def test_memory_hog_is_reported(use_bwrap):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"
    result = execute_code(code, maximum_memory_bytes=128 * 1024 * 1024, use_bwrap=use_bwrap)
    assert result.memory_exceeded and not result.success
    assert result.error == "MemoryError"


def test_flood_of_output_is_capped(use_bwrap):
    result = execute_code("while True:\n    print('x' * 999)", timeout=10.0, use_bwrap=use_bwrap)
    assert not result.success and not result.timeout  # stopped at the cap, not at the timeout
    assert result.error.startswith("output limit")
    assert len(result.stdout) == MAX_OUTPUT_BYTES


@pytest.mark.parametrize("how", ["parent", "everyone"])
def test_killing_the_parent_or_everyone_does_not_kill_the_test(use_bwrap, how):
    if not use_bwrap and not ROOT:
        pytest.skip("without bwrap or root the program runs as the caller's uid and may signal its processes")
    target = "os.getppid()" if how == "parent" else "-1"
    result = execute_code(f"import os\nos.kill({target}, 9)\nprint('after')", use_bwrap=use_bwrap)
    assert os.getpid() > 0  # still here
    assert not result.success or result.stdout == "after\n"  # kill(-1) may succeed on the program's own processes


@pytest.mark.parametrize("main", ["exits", "hangs"])
def test_setsid_grandchild_does_not_outlive_the_call(use_bwrap, main):
    requires_proc()
    name = unique_name()
    code = SET_NAME.format(name=name) + (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        while True:  # heartbeat\n"
        "            open('heartbeat', 'w').write(str(time.time()))\n"
        "            time.sleep(0.05)\n"
        "    os._exit(0)\n"
        "for _ in range(150):  # up to 3 s on a loaded machine\n"
        "    if os.path.exists('heartbeat'):\n"
        "        break\n"
        "    time.sleep(0.02)\n"
        "print('beating' if os.path.exists('heartbeat') else 'no heartbeat', flush=True)\n"
    ) + ("time.sleep(60)\n" if main == "hangs" else "")
    result = execute_code(code, timeout=4.0, use_bwrap=use_bwrap)
    assert result.stdout == "beating\n"
    assert result.timeout == (main == "hangs")
    assert_none_left(name)


def test_program_dies_with_a_killed_caller(use_bwrap, tmp_path):
    requires_proc()
    name = unique_name()
    program = SET_NAME.format(name=name) + "import time\ntime.sleep(60)"
    caller_code = (f"from nanochat.execution import execute_code\n"
                   f"execute_code({program!r}, timeout=60, use_bwrap={use_bwrap})")
    # a killed caller cannot remove its temp dir (without bwrap): keep it in the test's own
    caller = subprocess.Popen([sys.executable, "-c", caller_code], cwd=REPO_ROOT,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while not processes_named(name) and time.monotonic() < deadline and caller.poll() is None:
            time.sleep(0.1)
        assert processes_named(name), "the program never started"
    finally:
        caller.kill()
        caller.wait()
    assert_none_left(name)


# -----------------------------------------------------------------------------
# Isolation: files, environment, network


def test_cannot_delete_or_overwrite_files_outside_its_dir(bwrap_only, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    code = (f"import os\n"
            f"for attempt in (lambda: os.remove({str(victim)!r}), lambda: open({str(victim)!r}, 'w').write('x')):\n"
            f"    try:\n"
            f"        attempt()\n"
            f"        print('done')\n"
            f"    except OSError as e:\n"
            f"        print(type(e).__name__)\n")
    result = execute_code(code, use_bwrap=bwrap_only)
    assert result.success and "done" not in result.stdout
    assert victim.read_text() == "precious"


def test_cannot_write_into_the_repository_or_see_it(bwrap_only):
    marker = REPO_ROOT / f"sandbox_was_here_{random.randrange(10**9)}"
    code = (f"import os\nprint(os.path.exists({str(REPO_ROOT / 'nanochat')!r}))\n"
            f"open({str(marker)!r}, 'w').write('x')")
    result = execute_code(code, use_bwrap=bwrap_only)
    assert result.stdout == "False\n"
    assert not result.success and result.error.startswith(("FileNotFoundError", "PermissionError", "OSError"))
    assert not marker.exists()


def test_environment_secrets_are_not_visible(use_bwrap, monkeypatch):
    secret = f"hunter{random.randrange(10**9)}"
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", secret)
    code = ("import os\nprint(dict(os.environ))\n"
            "for pid in os.listdir('/proc') if os.path.isdir('/proc') else []:\n"
            "    try:\n"
            "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
            "    except OSError:\n"
            "        pass\n")
    result = execute_code(code, use_bwrap=use_bwrap)
    assert result.success
    assert "'PATH': '/usr/bin:/bin'" in result.stdout
    if use_bwrap or ROOT:  # else the program runs as the caller and may read the caller's /proc/PID/environ
        assert secret not in result.stdout
    else:
        assert secret not in result.stdout.splitlines()[0]


def test_cannot_connect_to_a_local_socket(bwrap_only):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        code = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
                f"print('connected')")
        result = execute_code(code, use_bwrap=bwrap_only)
        assert not result.success and "connected" not in result.stdout
        assert result.error.startswith(("OSError", "ConnectionRefusedError", "TimeoutError"))
        with pytest.raises(BlockingIOError):
            server.accept()


# -----------------------------------------------------------------------------
# Real programs: HumanEval


def humaneval_programs(shared_data, completion):
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164
    return {p["task_id"]: p["prompt"] + completion(p) + "\n" + p["test"] + f"\ncheck({p['entry_point']})"
            for p in problems}


def run_all(programs, use_bwrap):
    # two at a time, as an evaluation would on this 2-core machine; execute_code itself runs one program
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda code: execute_code(code, use_bwrap=use_bwrap), programs.values())
        return dict(zip(programs, results))


def test_all_humaneval_canonical_solutions_pass(use_bwrap, shared_data):
    results = run_all(humaneval_programs(shared_data, lambda p: p["canonical_solution"]), use_bwrap)
    failures = {task: r.error for task, r in results.items() if not r.success}
    assert failures == {}


def test_humaneval_empty_completions_fail(use_bwrap, shared_data):
    results = run_all(humaneval_programs(shared_data, lambda p: ""), use_bwrap)
    passing = [task for task, r in results.items() if r.success]
    assert passing == []
