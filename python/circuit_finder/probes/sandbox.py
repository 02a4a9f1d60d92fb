"""Runs model-written Python against unit tests in a separate, locked-down process (the code probe).

``run_tests(code, tests, timeout)`` starts ``python -I -S -B`` in a fresh empty directory with an
empty environment. Before the code runs, the child lowers its own limits (address space, CPU
seconds, file size, open files) and installs an audit hook (PEP 578) that refuses sockets,
subprocesses, fork/exec/spawn, signals, file writes, deletions and renames, ctypes, sqlite/dbm,
and imports of the modules that reach those (socket, subprocess, ctypes, multiprocessing, ...);
shutil, os and pathlib import but their writes, deletions and process calls are refused. Each
test is an assert statement run on its own; the child writes each result, behind a random token,
to a file it opened before the hook (capped at 1 MiB by the file-size limit); whatever the code
prints goes to /dev/null, so a print loop cannot flood the caller. A child that runs past
``timeout`` is killed with its whole process group; the tests it had passed by then still count.
Every operand of a test's comparisons must be built of Python's own types (an object whose
``__eq__`` always says True passes nothing), and frames (``sys._getframe``, ``tb_frame``,
``gi_frame``, ...) and the garbage collector's object lists are out of reach, so the code cannot
find the runner's token to forge results.

Limits: a guard against accidents, runaway code (infinite loops, memory bombs, print floods,
``rm -rf``) and the easy forgeries, not a security boundary against a determined attacker: CPython
audit hooks cover the standard library's entry points, not every native path. Linux/macOS (``resource`` limits; on other
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
from pathlib import Path

__all__ = ["TestRun", "run_tests"]

_CHILD = r'''
import sys
import os
limits = [int(v) for v in sys.argv[1:5]]
sys.argv = [""]
try:
    import resource
    for name, value in zip(("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE"), limits):
        resource.setrlimit(getattr(resource, name), (value, value))
except (ImportError, ValueError, OSError):
    pass
import json


def guard(event, args, deny_events=("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
          "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.remove", "os.unlink", "os.rmdir", "os.rename",
          "os.replace", "os.truncate", "os.chmod", "os.chown", "os.link", "os.symlink", "os.mkdir", "os.putenv",
          "os.unsetenv", "os.chdir", "shutil.", "ctypes.", "sys.settrace", "sys.setprofile", "sys._current_frames",
          "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "pty.", "webbrowser.", "urllib.", "ftplib.", "smtplib.", "http.", "telnetlib.",
          "poplib.", "imaplib.", "nntplib.", "sqlite3.", "dbm."),
          deny_modules=frozenset({"socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess", "ctypes",
          "_ctypes", "multiprocessing", "_multiprocessing", "pty", "urllib", "http", "ftplib", "smtplib",
          "webbrowser", "mmap", "fcntl", "resource", "sqlite3", "_sqlite3", "dbm", "_dbm", "_gdbm"})):
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & 0o3103:
            raise PermissionError("the code sandbox allows no file writes")
    elif event == "import" and args[0].split(".")[0] in deny_modules:
        raise ImportError(f"the code sandbox does not allow importing {args[0]}")
    elif event == "sys._getframe":  # ValueError: what namedtuple and typing catch when there is no frame
        raise ValueError("the code sandbox does not allow reading frames")
    elif event == "object.__getattr__" and args[1] in ("tb_frame", "gi_frame", "cr_frame", "ag_frame"):
        raise PermissionError("the code sandbox does not allow reading frames")
    elif event.startswith(deny_events):
        raise PermissionError(f"the code sandbox does not allow {event}")


import ast


def plain(value, _type=type, _kinds=(int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set,
                                      frozenset)):
    """The value, when it is built of Python's own types only; else AssertionError (an object
    whose __eq__ says True to everything passes no test)."""
    kind = _type(value)
    if not any(kind is k for k in _kinds):
        raise AssertionError("a test compares a value that is not of a built-in type")
    if kind is dict:
        for k, v in value.items():
            plain(k), plain(v)
    elif kind in (list, tuple, set, frozenset):
        for v in value:
            plain(v)
    return value


class Plain(ast.NodeTransformer):
    """Each operand of a comparison in a test goes through plain() first."""

    def visit_Compare(self, node):
        self.generic_visit(node)
        wrap = lambda e: ast.Call(ast.Name("__cf_plain", ast.Load()), [e], [])
        return ast.copy_location(ast.Compare(wrap(node.left), node.ops, [wrap(c) for c in node.comparators]), node)


def strict(test, i):
    tree = ast.fix_missing_locations(Plain().visit(ast.parse(test)))
    return compile(tree, f"<test {i}>", "exec")


def main():
    job = json.loads(sys.stdin.read())
    token, code, tests = job["token"], job["code"], job["tests"]
    del job
    results = open("results.txt", "w")  # capped by RLIMIT_FSIZE; the code's own output goes nowhere
    sys.stdout = sys.stderr = open(os.devnull, "w")
    sys.addaudithook(guard)
    namespace = {"__name__": "__sandbox__"}
    try:
        exec(compile(code, "<completion>", "exec"), namespace)
        loaded = True
    except BaseException:
        loaded = False
    for i, test in enumerate(tests):
        ok = False
        if loaded:
            try:
                exec(strict(test, i), {**namespace, "__cf_plain": plain})
                ok = True
            except BaseException:
                ok = False
        results.write(f"{token} {i} {int(ok)}\n")
        results.flush()


main()
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
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=workdir, env={"HOME": workdir, "TMPDIR": workdir}, start_new_session=True)
        timed_out = False
        try:
            proc.communicate(json.dumps({"token": token, "code": code, "tests": list(tests)}).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)  # the child on a timeout, and anything it left behind
            proc.wait()
        out = Path(workdir, "results.txt")
        text = out.read_bytes()[: 2 ** 20].decode("utf-8", "replace") if out.is_file() else ""
    passed = set()
    for line in text.splitlines():
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
