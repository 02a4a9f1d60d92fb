"""Runs model-written Python against unit tests in a separate, locked-down process (the code probe).

``run_tests(code, tests, timeout)`` starts ``python -I -S -B`` in a fresh empty directory with an
empty environment. Before the code runs, the child lowers its own limits (address space, CPU
seconds, file size, open files) and installs an audit hook (PEP 578) that refuses sockets,
subprocesses, fork/exec/spawn, signals, file writes, deletions and renames, ctypes, sqlite/dbm,
and imports of the modules that reach those (socket, subprocess, ctypes, multiprocessing, ...);
shutil, os and pathlib import but their writes, deletions, timestamp and attribute changes and
process calls are refused. Each
test is an assert statement run on its own; the child writes each result, behind a random token,
to a write-only descriptor of a file that has no name (capped at 1 MiB by the file-size limit),
which the code can neither open nor read back; nothing under ``/proc`` can be opened or listed,
however the path is spelled (the caller's environment, this process's memory and descriptors);
os's and posix's calls that reach other processes or make files without an audit event (kill,
mknod, mkfifo, pidfd_open, setpriority, sched_setaffinity) and signal's pidfd_send_signal are
removed, and resource (prlimit) is refused on import;
whatever the code prints goes to /dev/null, so a print loop cannot flood the caller. A child that runs past
``timeout`` is killed with its whole process group; the tests it had passed by then still count.
The operands of a test's comparisons are rebuilt as Python's own types before they are compared
(a Counter as a dict, a namedtuple as a tuple; any other object fails), so an object whose
``__eq__`` always says True passes nothing; the tests are compiled before the code runs and the
builtins the runner uses after it are bound before, so rebinding ``builtins.exec`` changes
nothing; frames (``sys._getframe``, ``tb_frame``, ...) and the garbage collector's object lists
are out of reach, which hides the runner's token.

Limits: a guard against accidents, runaway code (infinite loops, memory bombs, print floods,
``rm -rf``) and the forgeries above, not a security boundary against a determined attacker:
CPython audit hooks cover the standard library's entry points, not every native path, and only a
comparison's direct operands are rebuilt (``abs(f(x) - 3) < 1e-9`` asks f(x)'s own ``__sub__``).
Code that formats a traceback (``traceback.format_exc``) fails: it reads frames. Linux/macOS (``resource`` limits; on other
systems only the timeout and the hook apply); POSIX only (the results descriptor is passed with
``pass_fds``).
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
import os
limits = [int(v) for v in sys.argv[1:5]]
results_fd = int(sys.argv[5])
sys.argv = [""]
try:
    import resource
    for name, value in zip(("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE"), limits):
        resource.setrlimit(getattr(resource, name), (value, value))
except (ImportError, ValueError, OSError):
    pass
import json
import posix
import _signal
# what reaches other processes or makes files with no audit event: gone from os and posix, and
# signal's pidfd_send_signal from _signal (so from signal, which copies it when imported);
# resource (prlimit on any process) out of the module cache, so importing it is refused
for module, names in ((os, ("mknod", "mkfifo", "pidfd_open", "setpriority", "sched_setaffinity",
                            "sched_setscheduler", "sched_setparam", "setns", "unshare")),
                      (posix, ("mknod", "mkfifo", "pidfd_open", "setpriority", "sched_setaffinity",
                               "sched_setscheduler", "sched_setparam", "setns", "unshare", "kill", "killpg")),
                      (_signal, ("pidfd_send_signal",))):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
for name in ("resource", "fcntl", "mmap"):
    sys.modules.pop(name, None)


def _in_proc(path, fsdecode, realpath, dirname):
    """Whether path leads into /proc, however spelled: links (/dev/fd, /dev/stdin), "//proc", ".."
    resolved. The folder is resolved apart from the whole: /dev/fd/N's folder is /proc/self/fd, while
    the whole resolves through the descriptor's link to the file it names (a deleted one, too)."""
    text = fsdecode(path)
    for real in (realpath(text), realpath(dirname(text) or ".")):
        if real == "/proc" or real.startswith("/proc/"):
            return True
    return False


def guard(event, args, _isinstance=isinstance, _any=any, deny_events=("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
          "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.remove", "os.unlink", "os.rmdir", "os.rename",
          "os.replace", "os.truncate", "os.chmod", "os.chown", "os.link", "os.symlink", "os.mkdir", "os.putenv",
          "os.unsetenv", "os.chdir", "os.utime", "os.setxattr", "os.removexattr", "os.chflags", "shutil.", "ctypes.", "sys.settrace", "sys.setprofile", "sys._current_frames",
          "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "pty.", "webbrowser.", "urllib.", "ftplib.", "smtplib.", "http.", "telnetlib.",
          "poplib.", "imaplib.", "nntplib.", "sqlite3.", "dbm."),
          deny_modules=frozenset({"socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess", "ctypes",
          "_ctypes", "multiprocessing", "_multiprocessing", "pty", "http", "ftplib", "smtplib",
          "webbrowser", "mmap", "fcntl", "resource", "sqlite3", "_sqlite3", "dbm", "_dbm", "_gdbm",
          "_posixshmem"}),
          _str=str, _bytes=bytes, _fsdecode=os.fsdecode, _realpath=os.path.realpath, _dirname=os.path.dirname):
    if event == "open":
        path, mode, flags = args
        if (_isinstance(mode, str) and _any(c in mode for c in "wax+")) or (flags or 0) & 0o3103:
            raise PermissionError("the code sandbox allows no file writes")
        if _isinstance(path, (_str, _bytes)) and _in_proc(path, _fsdecode, _realpath, _dirname):
            raise PermissionError("the code sandbox does not allow reading /proc")  # other processes' memory, environ
    elif event in ("os.listdir", "os.scandir") and _isinstance(args[0], (_str, _bytes)) and \
            _in_proc(args[0], _fsdecode, _realpath, _dirname):
        raise PermissionError("the code sandbox does not allow listing /proc")
    elif event == "import" and args[0].split(".")[0] in deny_modules:
        raise ImportError(f"the code sandbox does not allow importing {args[0]}")
    elif event == "sys._getframe":  # ValueError: what namedtuple and typing catch when there is no frame
        raise ValueError("the code sandbox does not allow reading frames")
    elif event == "object.__getattr__" and args[1] in ("tb_frame", "gi_frame", "cr_frame", "ag_frame"):
        raise PermissionError("the code sandbox does not allow reading frames")
    elif event.startswith(deny_events):
        raise PermissionError(f"the code sandbox does not allow {event}")


import ast


def make_plain(_type=type, _isinstance=isinstance, _dict=dict, _list=list, _tuple=tuple, _set=set,
               _frozenset=frozenset, _int=int, _float=float, _complex=complex, _str=str, _bytes=bytes, _bool=bool):
    """plain(value): the value as Python's own types, or AssertionError. Subclasses of built-in
    types (Counter, defaultdict, OrderedDict, a namedtuple, an int subclass) are rebuilt as their
    base type through the base's own methods, so an overridden __eq__ or __iter__ is never asked;
    any other object fails the test. The builtins it uses are bound here, before the code runs."""
    exact = (_bool, _int, _float, _complex, _str, _bytes, _type(None))

    def plain(value):
        kind = _type(value)
        if any(kind is k for k in exact):
            return value
        if _isinstance(value, _dict):
            return {plain(k): plain(v) for k, v in _dict.items(value)}
        if _isinstance(value, _list):
            return [plain(v) for v in _list.__iter__(value)]
        if _isinstance(value, _tuple):
            return _tuple(plain(v) for v in _tuple.__iter__(value))
        if _isinstance(value, _frozenset):
            return _frozenset(plain(v) for v in _frozenset.__iter__(value))
        if _isinstance(value, _set):
            return {plain(v) for v in _set.__iter__(value)}
        for base, zero in ((_int, 0), (_float, 0.0), (_complex, 0j), (_str, ""), (_bytes, b"")):
            if _isinstance(value, base):
                return base.__add__(value, zero)  # the base's own value, as an exact base object
        raise AssertionError("a test compares a value that is not of a built-in type")

    return plain


class Plain(ast.NodeTransformer):
    """Each operand of a comparison (not an identity test: 'is True' keeps its object) goes through
    plain() first."""

    def visit_Compare(self, node):
        self.generic_visit(node)
        if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            return node
        wrap = lambda e: ast.Call(ast.Name("__cf_plain", ast.Load()), [e], [])
        return ast.copy_location(ast.Compare(wrap(node.left), node.ops, [wrap(c) for c in node.comparators]), node)


def strict(test, i):
    try:
        return compile(ast.fix_missing_locations(Plain().visit(ast.parse(test))), f"<test {i}>", "exec")
    except (SyntaxError, ValueError):
        return None


def main(_exec=exec, _compile=compile, _int=int, _enumerate=enumerate, _base=BaseException):
    # every builtin used after the completion runs is bound here first (it may rebind builtins or
    # this module's names), and the tests are compiled and rewritten before it runs
    job = json.loads(sys.stdin.read())
    token, code, tests = job["token"], job["code"], job["tests"]
    del job
    compiled = [strict(test, i) for i, test in enumerate(tests)]
    check = make_plain()
    # a write-only descriptor of a file outside the working directory (capped by RLIMIT_FSIZE): the
    # code can neither open it by name nor read the token back from it
    results = os.fdopen(results_fd, "w")
    write, flush = results.write, results.flush
    sys.stdout = sys.stderr = open(os.devnull, "w")
    sys.addaudithook(guard)
    namespace = {"__name__": "__sandbox__"}
    try:
        _exec(_compile(code, "<completion>", "exec"), namespace)
        loaded = True
    except _base:
        loaded = False
    for i, test in _enumerate(compiled):
        ok = False
        if loaded and test is not None:
            try:
                _exec(test, {**namespace, "__cf_plain": check})
                ok = True
            except _base:
                ok = False
        write(f"{token} {i} {_int(ok)}\n")
        flush()


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
    with tempfile.TemporaryDirectory(prefix="cf-sandbox-") as workdir, _ResultsFile(workdir) as results:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _CHILD, *map(str, limits),
                                 str(results.write_fd)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=workdir, env={"HOME": workdir, "TMPDIR": workdir}, start_new_session=True,
                                pass_fds=(results.write_fd,))
        results.close_write()  # (the child has its copy)
        timed_out = False
        try:
            proc.communicate(json.dumps({"token": token, "code": code, "tests": list(tests)}).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)  # the child on a timeout, and anything it left behind
            proc.wait()
        text = results.read().decode("utf-8", "replace")
    passed = set()
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == token and parts[2] == "1" and parts[1].isdigit():
            passed.add(int(parts[1]))
    return TestRun(len(passed & set(range(len(tests)))), len(tests), timed_out)


class _ResultsFile:
    """A file that has no name by the time the child runs: the child gets a write-only descriptor
    (it can neither open the file nor read it back), this process reads what it wrote (1 MiB at
    most). Each descriptor is closed once."""

    def __init__(self, folder: str):
        path = os.path.join(folder, f".results-{secrets.token_hex(8)}")
        self.write_fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.read_fd = os.open(path, os.O_RDONLY)
        os.unlink(path)

    def __enter__(self):
        return self

    def close_write(self) -> None:
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None

    def read(self) -> bytes:
        chunks, size = [], 0
        while size < 2 ** 20 and (chunk := os.read(self.read_fd, 2 ** 20 - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    def __exit__(self, *exc) -> None:
        self.close_write()
        os.close(self.read_fd)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        pass
    if proc.poll() is None:
        proc.kill()
