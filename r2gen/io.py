"""Atomic file output: write to a temporary sibling, fsync, then rename over the target.

A reader (DVC, a later stage, a resumed run) therefore sees either the old complete file or the new
complete file, never a half-written one, even if the process is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from r2gen.errors import R2GenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise R2GenError(
            f"cannot create output directory {directory}: {exc.strerror}; "
            "check the path and its permissions"
        ) from None
    if not os.access(directory, os.W_OK):
        raise R2GenError(
            f"output directory {directory} is not writable; fix its permissions or choose another path"
        )


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    _check_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise R2GenError(f"could not write {path}: {exc.strerror or exc}; check free disk space and permissions") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (keys kept in insertion order, NaN refused)."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place when the block succeeds.

    An existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    _check_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
