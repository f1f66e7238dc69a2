"""Shared plumbing of the stage scripts: params loading and the one-line error convention."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

# Stages run as `python stages/<name>.py` from the repository root; make `r2gen` importable even
# when the package is not installed (it is, in the venv the Makefile builds).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2gen.config import Params  # noqa: E402
from r2gen.errors import ConfigError, R2GenError  # noqa: E402
from r2gen.io import read_yaml  # noqa: E402

PARAMS_FILE = "params.yaml"


def load_params(path: str = PARAMS_FILE) -> Params:
    """Read params.yaml into typed, validated config objects (see r2gen.io.read_yaml for what is refused)."""
    raw = read_yaml(path, what="params file", error=ConfigError,
                    fix="run the stage from the repository root (where params.yaml is)")
    return Params.from_dict(raw, source=path)


def run(main: Callable[[list[str]], int | None]) -> int:
    """Call ``main(argv)``; a user error prints one line and returns 2 (R2GEN_VERBOSE=1: traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = sys.argv[1:]
    verbose = "--verbose" in argv or os.environ.get("R2GEN_VERBOSE") == "1"
    argv = [a for a in argv if a != "--verbose"]
    try:
        return main(argv) or 0
    except R2GenError as exc:
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised unless it only happened while a Ctrl-C unwound
        if not _during_interrupt(exc):
            raise
        if verbose:
            traceback.print_exc()
        print(INTERRUPTED, file=sys.stderr)
        return 130


# Every output is written to a temporary sibling and renamed into place (r2gen.io), so an interrupt
# leaves the previous file or none, never half of one; train resumes from its last epoch checkpoint.
INTERRUPTED = ("error: interrupted (Ctrl-C or SIGTERM); no output was left half-written; rerun the stage "
               "(train resumes from its last complete epoch checkpoint)")


def _during_interrupt(exc: BaseException) -> bool:
    """True when a KeyboardInterrupt is in ``exc``'s context chain (a cleanup that failed while it unwound)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__context__
    return False


def usage(doc: str, argv: list[str], n: int) -> list[str]:
    """Return argv if it has exactly ``n`` arguments, else raise a usage error from the docstring."""
    if len(argv) != n:
        example = next((ln.strip() for ln in doc.splitlines() if ln.strip().startswith("python ")), "")
        raise ConfigError(f"expected {n} arguments, got {len(argv)}; usage: {example}")
    return argv
