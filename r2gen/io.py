"""Atomic file output: write to a temporary sibling, fsync, then rename over the target.

A reader (DVC, a later stage, a resumed run) therefore sees either the old complete file or the new
complete file, never a half-written one, even if the process is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
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


# ---------------------------------------------------------------------------------------- input files
def regular_file(path: Path, what: str, error: type[R2GenError], *, missing: str, unreadable: str, folder: str,
                 other: str) -> os.stat_result:
    """``os.stat(path)``, refusing with a one-line ``error`` what cannot be read as a file.

    A missing path (next step ``missing``), a stat failure (``unreadable``), a folder (``is a folder, `` +
    ``folder``) and a FIFO, socket or device (never opened: reading one could block or never end;
    next step ``other``).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}; {missing}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}; {unreadable}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a folder, {folder}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a FIFO, socket or device); {other}")
    return st


# ---------------------------------------------------------------------------------------- YAML input
MAX_YAML_BYTES = 1 << 20  # params.yaml and metrics_gate.yaml are a few KB; anything near 1 MB is not ours
_SHOWN = 80  # characters of a value quoted in an error line


def shorten(value: object, limit: int = _SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line never carries a huge value."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_yaml(path: str | os.PathLike, *, what: str = "params file", fix: str = "fix it",
              mapping: bool = True, error: type[R2GenError] = R2GenError) -> Any:
    """Parse a small YAML file that a user edits (params.yaml, metrics_gate.yaml), refusing what is not one.

    Refused with a one-line ``error`` naming ``path``, the problem and ``fix``: a missing path, a folder,
    a FIFO or device (never opened: it could block or never end), more than ``MAX_YAML_BYTES``, bytes that
    are not UTF-8 (UTF-16 named as such), NUL bytes, invalid YAML, aliases (``*name``: the expansion of a
    few lines can be exponential), duplicate keys (YAML keeps the last one silently), nesting deeper than
    Python's recursion limit, and, with ``mapping``, a document that is not a non-empty mapping (an
    empty file or one of only comments, ``false`` or ``[]`` would otherwise mean "all defaults").
    Booleans are only ``true``/``false`` (``yes``/``on`` stay strings, as in YAML 1.2 and DVC's parser),
    and ``1e-4`` is a number, as in YAML 1.2.
    """
    import yaml

    path = Path(path)
    st = regular_file(path, what, error, missing=fix, unreadable=fix, folder="not a YAML file; pass the file",
                      other="pass a YAML file")
    if st.st_size > MAX_YAML_BYTES:
        raise error(f"{what} {path} is {st.st_size:,} bytes, more than the {MAX_YAML_BYTES:,} a YAML config "
                    "may have; is it the right file?")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}; check its permissions") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or _utf16_without_bom(data[:64]):
        raise error(f"{what} {path} is UTF-16 encoded; save it as UTF-8")
    if b"\0" in data:
        raise error(f"{what} {path} holds NUL bytes: it is a binary file, not YAML; pass the YAML file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        doc = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise error(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise error(f"{what} {path} is not valid YAML ({problem}{where}); fix the syntax") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more digits than Python converts
        raise error(f"{what} {path} holds a value that cannot be read ({str(exc)[:100]}); fix it") from None
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be a config file; is it the right file?") from None
    if mapping and (not isinstance(doc, dict) or not doc):
        found = "nothing (empty, or only comments)" if doc is None else f"a {type(doc).__name__}: {shorten(doc)}"
        raise error(f"{what} {path} holds {found}, not a mapping of settings; restore it "
                    "(git checkout -- the file) or write its sections")
    return doc


def _utf16_without_bom(head: bytes) -> bool:
    """ASCII text in UTF-16: every other byte is NUL."""
    return len(head) >= 4 and (not any(head[0::2]) or not any(head[1::2])) and any(head)


def _strict_loader() -> type:
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _Refused(f"line {event.start_mark.line + 1} uses the YAML alias *{event.anchor}; aliases "
                               "are not allowed in a config file (they can expand without bound): write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):  # type: ignore[override]
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    raise _Refused(f"line {key_node.start_mark.line + 1} has a key that is a list or mapping; "
                                   "keys must be plain names") from None
                if duplicate:
                    raise _Refused(f"key {shorten(key)} appears twice (line {key_node.start_mark.line + 1}); "
                                   "YAML would keep the last one silently: delete one")
            return super().construct_mapping(node, deep)

    # YAML 1.1 booleans (yes/no/on/off/y/n) are a classic trap (`country: no`); DVC reads YAML 1.2.
    resolvers = {ch: [(tag, rx) for tag, rx in entries if tag != "tag:yaml.org,2002:bool"]
                 for ch, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _Loader.yaml_implicit_resolvers = resolvers
    _Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
    _Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))
    return _Loader


class _Refused(ValueError):
    """Something YAML allows that a config file may not hold (an alias, a duplicate key)."""


_LOADERS: list[type] = []


def _loader() -> type:
    """The strict loader class, built on first use (PyYAML is imported only by readers of YAML)."""
    if not _LOADERS:
        _LOADERS.append(_strict_loader())
    return _LOADERS[0]
