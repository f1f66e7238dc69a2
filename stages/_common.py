"""Shared plumbing of the stage scripts: params loading and the one-line error convention."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import yaml

# Stages run as `python stages/<name>.py` from the repository root; make `r2gen` importable even
# when the package is not installed (it is, in the venv the Makefile builds).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2gen.config import Params  # noqa: E402
from r2gen.errors import ConfigError, R2GenError  # noqa: E402

PARAMS_FILE = "params.yaml"


def load_params(path: str = PARAMS_FILE) -> Params:
    """Read params.yaml into typed, validated config objects."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; run the stage from the repository root") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
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
        print("interrupted", file=sys.stderr)
        return 130


def usage(doc: str, argv: list[str], n: int) -> list[str]:
    """Return argv if it has exactly ``n`` arguments, else raise a usage error from the docstring."""
    if len(argv) != n:
        example = next((ln.strip() for ln in doc.splitlines() if ln.strip().startswith("python ")), "")
        raise ConfigError(f"expected {n} arguments, got {len(argv)}; usage: {example}")
    return argv
