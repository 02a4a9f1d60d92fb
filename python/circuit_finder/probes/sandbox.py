"""Runs model-written Python against unit tests in a separate, locked-down process (the code probe).

``run_tests(code, tests, timeout)`` starts ``python -I -S -B`` in a fresh empty directory with an
empty environment. Before the code runs, the child lowers its own limits (address space, CPU
seconds, file size, open files) and installs an audit hook (PEP 578) that refuses sockets,
subprocesses, fork/exec/spawn, signals, file writes, deletions and renames, ctypes, and imports of
the modules that reach those (socket, subprocess, ctypes, multiprocessing, ...); shutil, os
and pathlib import but their writes, deletions and process calls are refused. Each test is an
assert statement run on its own; the child reports each result on stdout behind a random token
that is not in the code's namespace. A child that runs past ``timeout`` is killed with its whole process group;
the tests it had passed by then still count.

Limits: a guard against accidents and runaway code (infinite loops, memory bombs, ``rm -rf``), not
a security boundary against a determined attacker: CPython audit hooks cover the standard
library's entry points, not every native path. Linux/macOS (``resource`` limits; on other
systems only the timeout and the hook apply).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

__all__ = ["TestRun", "run_tests"]

_CHILD = r'''
import sys
limits = [int(v) for v in sys.argv[1:5]]
sys.argv = [""]
try:
    import resource
    for name, value in zip(("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE"), limits):
        resource.setrlimit(getattr(resource, name), (value, value))
except (ImportError, ValueError, OSError):
    pass
import json
job = json.loads(sys.stdin.read())
token = job.pop("token")
report = sys.stdout.write
flush = sys.stdout.flush
DENY_EVENTS = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "os.remove", "os.unlink", "os.rmdir", "os.rename",
               "os.replace", "os.truncate", "os.chmod", "os.chown", "os.link", "os.symlink", "os.mkdir",
               "os.putenv", "os.unsetenv", "os.chdir", "shutil.", "ctypes.",
               "sys.settrace", "sys.setprofile", "sys._current_frames", "pty.", "webbrowser.", "urllib.",
               "ftplib.", "smtplib.", "http.", "telnetlib.", "poplib.", "imaplib.", "nntplib.")
DENY_MODULES = {"socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess", "ctypes", "_ctypes",
                "multiprocessing", "_multiprocessing", "pty", "urllib", "http", "ftplib", "smtplib", "webbrowser",
                "mmap", "fcntl", "resource"}
def guard(event, args):
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & 0o3103:
            raise PermissionError("the code sandbox allows no file writes")
    elif event == "import" and args[0].split(".")[0] in DENY_MODULES:
        raise ImportError(f"the code sandbox does not allow importing {args[0]}")
    elif event.startswith(DENY_EVENTS):
        raise PermissionError(f"the code sandbox does not allow {event}")
sys.addaudithook(guard)
namespace = {"__name__": "__sandbox__"}
try:
    exec(compile(job["code"], "<completion>", "exec"), namespace)
    loaded = True
except BaseException:
    loaded = False
for i, test in enumerate(job["tests"]):
    ok = False
    if loaded:
        try:
            exec(compile(test, f"<test {i}>", "exec"), dict(namespace))
            ok = True
        except BaseException:
            ok = False
    report(f"{token} {i} {int(ok)}\n")
    flush()
'''


@dataclass(frozen=True)
class TestRun:
    """Outcome of one sandboxed run: tests passed of total, and whether the child was killed."""

    passed: int
    total: int
    timed_out: bool

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_tests(code: str, tests: list[str], timeout: float = 5.0, memory_mb: int = 512) -> TestRun:
    """Runs ``code`` then each assert in ``tests`` in a sandboxed child (see the module docstring)."""
    token = secrets.token_hex(16)
    limits = [memory_mb * 2 ** 20, int(timeout) + 1, 2 ** 20, 64]
    with tempfile.TemporaryDirectory(prefix="cf-sandbox-") as workdir:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _CHILD, *map(str, limits)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                cwd=workdir, env={"HOME": workdir, "TMPDIR": workdir}, start_new_session=True)
        timed_out = False
        try:
            out, _ = proc.communicate(json.dumps({"token": token, "code": code, "tests": list(tests)}).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, _ = proc.communicate()
        finally:
            _kill_group(proc)  # children it may have left behind
    passed = set()
    for line in out.decode("utf-8", "replace").splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == token and parts[2] == "1" and parts[1].isdigit():
            passed.add(int(parts[1]))
    return TestRun(len(passed & set(range(len(tests)))), len(tests), timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        pass
    if proc.poll() is None:
        proc.kill()
