"""
Runs untrusted Python (model-written programs, HumanEval tests) and reports what happened: `execute_code`.

Each program runs in a fresh interpreter inside bubblewrap (`bwrap`, Debian package `bubblewrap`): its own PID,
network, IPC and UTS namespaces, a read-only view of only the directories Python needs (not /etc, /home, /root or
the repository), and a small private tmpfs as its working dir. A trusted guard in that interpreter reads the program
from stdin, sets rlimits (address space, CPU time, file size, open files, processes), drops root to a throwaway uid,
and only then runs the program. The caller enforces the wall-clock timeout and caps the captured output; killing
bwrap tears down the PID namespace, so nothing the program started outlives the call.

Without bwrap (macOS, or a container that forbids namespaces) the same guard runs with the rlimits alone, and a
one-time warning says that network and filesystem isolation are off; escaped processes are then hunted by process
group and by their throwaway uid or an environment marker. Nothing here tries to make Python itself safe (nulling
os.kill and friends is undone by any program that wants to): the boundary is the operating system's.
"""

import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from nanochat.common import UserError, logger

MAX_OUTPUT_BYTES = 1 << 20  # per stream: a flood of output is cut here and the program killed
MAX_DISK_BYTES = 64 << 20  # size of the private tmpfs (with bwrap) and the largest file a program may write
MAX_OPEN_FILES = 64
MAX_PROCESSES = 16  # threads count too; bounds a fork bomb (and its memory: at most this many x the memory limit)
SANDBOX_UID_RANGE = (1 << 30, 1 << 31)  # throwaway uids for root callers: unused by real accounts, so counting them
# for RLIMIT_NPROC and killing them is exact


@dataclass
class ExecutionResult:
    success: bool  # exited with status 0 within all limits
    stdout: str
    stderr: str
    error: str | None = None  # last line of the traceback, or what limit was hit
    timeout: bool = False
    memory_exceeded: bool = False


# Runs inside the sandboxed interpreter before the program: reads it whole (so a program of any size fits), closes
# stdin, applies the limits, drops root, runs it as __main__. argv: memory cpu_seconds file_bytes files processes uid
# caller_pid (>= 0 without bwrap on Linux: die with the caller, as bwrap's --die-with-parent does).
GUARD = """
import os, resource, sys
program = sys.stdin.buffer.read()
null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
memory, cpu, fsize, nofile, nproc, uid, caller = (int(a) for a in sys.argv[1:8])
limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
          (resource.RLIMIT_CORE, 0)]
if sys.platform != "darwin":  # macOS rejects RLIMIT_AS
    limits.append((resource.RLIMIT_AS, memory))
if nproc >= 0:
    limits.append((resource.RLIMIT_NPROC, nproc))
for which, value in limits:
    resource.setrlimit(which, (value, value))
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
if caller >= 0:  # set after setuid, which clears it
    import ctypes
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != caller:
        os._exit(137)
    del ctypes
del os, resource, null, memory, cpu, fsize, nofile, nproc, uid, caller, limits
sys.argv = ["program.py"]
exec(compile(program, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

_bwrap_lock = threading.Lock()
_bwrap_state = {}  # ok, missing, reason, command: found out by the first call that may use bwrap; warned: once


def _interpreter(unprivileged=False):
    """The real interpreter behind a venv (run with -I -S it sees only the standard library). When it must run
    as a throwaway uid without bwrap but is unreadable to others (pyenv under /root), the system python3 instead;
    None when there is none."""
    for path in [sys.executable] + ([shutil.which("python3", path="/usr/bin:/bin")] if unprivileged else []):
        path = path and os.path.realpath(path)
        if path and (not unprivileged or _reachable_by_others(path)):
            return path
    return None


def _bwrap_command(bwrap):
    command = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if os.geteuid() == 0:
        # bwrap run by root keeps root's capabilities inside; keep only what the guard needs to drop to its uid
        command += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user", "--disable-userns"]  # rlimits then count processes per sandbox
    bound = []
    for path in ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache"]:
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            command += ["--ro-bind", path, path]
            bound.append(path)
    interpreter_dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    for path in sorted(interpreter_dirs | {os.path.dirname(_interpreter())}):  # prefix first: covers its bin/
        if not any(path == b or path.startswith(b + "/") for b in bound):
            # bwrap would copy the modes of the host's parent dirs (/root is 0700): open them to the throwaway uid
            parents = [os.path.dirname(path)]
            while parents[-1] != "/":
                parents.append(os.path.dirname(parents[-1]))
            for parent in reversed(parents[:-1]):
                command += ["--perms", "0755", "--dir", parent]
            command += ["--ro-bind", path, path]
            bound.append(path)
    command += ["--proc", "/proc", "--dev", "/dev",
                "--size", str(MAX_DISK_BYTES), "--perms", "1777", "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return command


def _use_bwrap(use_bwrap):
    """Decides bwrap or not for this call; checks once per process that bwrap really works here."""
    if use_bwrap is False:
        return False
    with _bwrap_lock:
        if not _bwrap_state:
            bwrap = shutil.which("bwrap")
            if bwrap is None:
                _bwrap_state.update(ok=False, missing=True,
                                    reason="bubblewrap (Debian package `bubblewrap`) is not installed")
            else:
                _bwrap_state.update(ok=True, missing=False, command=_bwrap_command(bwrap))
                # imports after the guard drops root prove the standard library is reachable in there
                try:
                    probe = _run("import json\nprint(json.dumps(6 * 7))", 10.0, 256 << 20, True)
                    problem = None if probe.stdout == "42\n" else probe.error or "no output"
                except OSError as e:
                    problem = str(e)
                if problem:
                    _bwrap_state.update(ok=False, reason=f"bwrap does not work here ({problem})")
        if not _bwrap_state["ok"] and use_bwrap is None and not _bwrap_state.get("warned"):
            _bwrap_state["warned"] = True
            logger.warning(f"code sandbox: {_bwrap_state['reason']}; programs run with rlimits only, "
                           f"WITHOUT network or filesystem isolation")
    if use_bwrap is True and not _bwrap_state["ok"]:
        fix = "install it with `apt-get install bubblewrap`" if _bwrap_state["missing"] else \
            "allow user namespaces or run where bwrap works"
        raise UserError(f"use_bwrap=True but {_bwrap_state['reason']}; {fix}, or pass use_bwrap=None to fall back "
                        f"to rlimits only")
    return _bwrap_state["ok"]


def _reachable_by_others(path):
    """Whether any uid can reach the interpreter and its standard library beside it (pyenv under /root: no)."""
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def _sweep(marker, uid):
    """Without bwrap: SIGKILL every live process carrying the run's environment marker or its throwaway uid, until
    none is left (a fork bomb refills between scans). Linux only; a process that re-execs with a clean environment
    under the caller's own uid escapes it."""
    if not os.path.isdir("/proc/self"):
        return
    needle = marker.encode()
    for _ in range(100):
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue  # already dead, waiting for its parent
                if uid >= 0:  # a throwaway uid cannot be left, so it is the exact mark
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        found.append(int(name))
                else:
                    with open(f"/proc/{name}/environ", "rb") as f:
                        if needle in f.read():
                            found.append(int(name))
            except OSError:  # gone, or not ours to read
                pass
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _count_own_tasks():
    """Processes and threads of this uid: without bwrap RLIMIT_NPROC counts all of them, not only the program's."""
    total, uid = 0, os.getuid()
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid:
                total += len(os.listdir(f"/proc/{name}/task"))
        except OSError:
            pass
    return total


def _run(code, timeout, maximum_memory_bytes, bwrap):
    marker = secrets.token_hex(8)
    root = os.geteuid() == 0
    uid = secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0]) + SANDBOX_UID_RANGE[0] if root else -1
    nproc = MAX_PROCESSES
    workdir = None
    interpreter = _interpreter()
    if bwrap:
        prefix, cwd = _bwrap_state["command"], None
        home = "/tmp"
    else:
        prefix = []
        cwd = home = workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
        if root and _interpreter(unprivileged=True):
            interpreter = _interpreter(unprivileged=True)
            os.chown(workdir, uid, uid)
        else:
            # the program runs as the caller, so RLIMIT_NPROC counts the caller's tasks too (and never binds root)
            uid = -1
            nproc = -1 if root or not os.path.isdir("/proc/self") else _count_own_tasks() + MAX_PROCESSES
    cpu_seconds = math.ceil(timeout) + 1
    command = prefix + [interpreter, "-I", "-S", "-B", "-X", "utf8", "-c", GUARD, str(maximum_memory_bytes),
                        str(cpu_seconds), str(MAX_DISK_BYTES), str(MAX_OPEN_FILES), str(nproc), str(uid),
                        str(os.getpid() if not bwrap and sys.platform == "linux" else -1)]
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "NANOCHAT_SANDBOX": marker}

    def kill_escapees():  # without bwrap: the program's process group, then whatever left it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        _sweep(marker, uid)

    try:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True)
        on_exit = None if bwrap else kill_escapees
        try:
            out, err, limit_hit = _communicate(proc, code.encode(), time.monotonic() + timeout, on_exit)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # with bwrap, its death takes the whole PID namespace along
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
            if on_exit:
                on_exit()
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return _result(proc.returncode, out, err, limit_hit, timeout, bwrap)


def _communicate(proc, program, deadline, on_exit):
    """Feeds the program to stdin and reads stdout/stderr as they come, until both close, the deadline passes or
    a stream goes over MAX_OUTPUT_BYTES; calls on_exit (if any) once the program has exited, so that processes it
    left behind release the pipes. Returns (stdout bytes, stderr bytes, the limit hit or None)."""
    selector = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin, selectors.EVENT_WRITE)
    selector.register(proc.stdout, selectors.EVENT_READ)
    selector.register(proc.stderr, selectors.EVENT_READ)
    chunks = {proc.stdout: [], proc.stderr: []}
    sizes = {proc.stdout: 0, proc.stderr: 0}
    limit_hit, exited_at = None, None
    while len(selector.get_map()) > 0:
        now = time.monotonic()
        if now >= deadline:
            limit_hit = "timeout"
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
            if on_exit:
                on_exit()
        if exited_at is not None and now - exited_at > 1.0:
            break  # the program is gone; an escaped process without bwrap still holds the pipe open
        for key, _ in selector.select(min(deadline - now, 0.1)):
            stream = key.fileobj
            if stream is proc.stdin:
                try:
                    written = os.write(stream.fileno(), program[:1 << 16])
                    program = program[written:]
                except BrokenPipeError:
                    program = b""
                if not program:
                    selector.unregister(stream)
                    stream.close()
                continue
            data = os.read(stream.fileno(), 1 << 16)
            if not data:
                selector.unregister(stream)
                continue
            chunks[stream].append(data)
            sizes[stream] += len(data)
            if sizes[stream] > MAX_OUTPUT_BYTES:
                limit_hit = "stdout" if stream is proc.stdout else "stderr"
                break
        if limit_hit:
            break
    selector.close()
    if limit_hit is None:  # both pipes closed: a program may close them and keep running
        try:
            proc.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            limit_hit = "timeout"
    out, err = (b"".join(chunks[s])[:MAX_OUTPUT_BYTES] for s in (proc.stdout, proc.stderr))
    return out, err, limit_hit


def _result(returncode, out, err, limit_hit, timeout, bwrap):
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    last_line = lines[-1].strip() if lines else None
    result = ExecutionResult(success=False, stdout=stdout, stderr=stderr, error=last_line)
    # bwrap reports a program killed by signal N as status 128 + N
    killed_by = -returncode if returncode < 0 else returncode - 128 if bwrap and returncode > 128 else None
    if killed_by not in signal.valid_signals():
        killed_by = None
    if limit_hit == "timeout" or killed_by == signal.SIGXCPU:
        result.timeout = True
        result.error = f"timeout: the program ran longer than {timeout} s"
    elif limit_hit:
        result.error = f"output limit: the program wrote more than {MAX_OUTPUT_BYTES} bytes to {limit_hit}"
    elif last_line and (last_line.startswith("MemoryError") or "Cannot allocate memory" in last_line):
        result.memory_exceeded = True
    elif killed_by == signal.SIGKILL:  # not by us: the kernel's out-of-memory killer
        result.memory_exceeded = True
        result.error = "killed by SIGKILL (out of memory?)"
    elif killed_by is not None:
        result.error = f"killed by signal {signal.Signals(killed_by).name}"
    elif returncode == 0:
        result.success, result.error = True, None
    elif last_line is None:
        result.error = f"exit status {returncode}"
    return result


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, use_bwrap=None):
    """Runs `code` (a Python program as a string) in a fresh sandboxed interpreter and returns an ExecutionResult.

    timeout: wall-clock seconds, interpreter start included; everything the program started is killed after it.
    maximum_memory_bytes: address-space limit of each process of the program.
    use_bwrap: None = bubblewrap when it works here, else rlimits only with a one-time warning; True = require it
    (UserError when missing or broken); False = rlimits only.
    Thread-safe: several calls may run at once."""
    if not isinstance(code, str):
        raise UserError(f"code must be a str (a Python program), got {type(code).__name__}")
    if not timeout > 0:
        raise UserError(f"timeout must be > 0 seconds, got {timeout!r}")
    if not maximum_memory_bytes >= 16 << 20:
        raise UserError(f"maximum_memory_bytes must be at least 16 MiB (the interpreter alone needs that), "
                        f"got {maximum_memory_bytes!r}")
    if use_bwrap not in (None, True, False):
        raise UserError(f"use_bwrap must be None (auto), True or False, got {use_bwrap!r}")
    return _run(code, timeout, maximum_memory_bytes, _use_bwrap(use_bwrap))
