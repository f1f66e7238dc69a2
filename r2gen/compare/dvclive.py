"""dvclive's TSV histories: one reader for the single-run report (files) and the multi-seed one (git).

A history file is tab-separated with a header, ``[timestamp] step <name>``: the step column and the
value in the last column (``float`` reads dvclive's ``nan``/``inf`` too). Paths come from
:mod:`r2gen.layout`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from r2gen import layout
from r2gen.errors import R2GenError


def parse_tsv(text: str, source: str | Path, fix: str) -> list[tuple[int, float]]:
    """The (step, value) rows of a dvclive history, in file order.

    Raises:
        R2GenError: no step column or a value that is not a number (``fix`` says what to do).
    """
    rows = [r for r in csv.reader(text.splitlines(), delimiter="\t") if r]
    try:
        col = rows[0].index("step")
        return [(int(r[col]), float(r[-1])) for r in rows[1:]]
    except (IndexError, ValueError):
        raise R2GenError(f"{source} is not a dvclive history (step and value columns); {fix}") from None


# ---------------------------------------------------------------------------------------- one run (files)
@dataclass(frozen=True)
class Series:
    """One dvclive metric history: values at dvclive steps."""

    steps: tuple[int, ...]
    values: tuple[float, ...]


def read_series(path: Path, required: bool) -> Series:
    """The history at ``path``; a missing file is an error when ``required``, else an empty series."""
    if not path.exists():
        if required:
            raise R2GenError(f"{path} not found; run `dvc repro` to produce the training history")
        return Series((), ())
    rows = parse_tsv(path.read_text(encoding="utf-8"), path, "run `dvc repro`")
    return Series(tuple(s for s, _ in rows), tuple(v for _, v in rows))


# ---------------------------------------------------------------------------------------- experiments (git)
@dataclass(frozen=True)
class History:
    """A validation metric at the dvclive steps it was logged (step = optimizer steps done − 1)."""

    steps: tuple[int, ...]
    values: tuple[float, ...]
    seconds: dict[int, float] = field(default_factory=dict)  # step -> training seconds so far (logged)
    samples: dict[int, float] = field(default_factory=dict)  # step -> training samples so far (logged)


def parse_history(text: str, source: str) -> dict[int, float]:
    """A dvclive history of an experiment: step -> value (a repeated step: the last row)."""
    return dict(parse_tsv(text, source, "rerun the experiment"))


def load_history(read: Callable[[str], str | None], live_dir: str, metric: str) -> History | None:
    """The ``metric`` history under ``live_dir`` (with logged seconds and samples when present).

    ``read(path)`` returns a file's text or None when the file does not exist (a path in the
    workspace, or in an experiment's commit).
    """
    path = layout.epoch_history(live_dir, metric).as_posix()
    text = read(path)
    if text is None:
        return None
    values = parse_history(text, path)
    extra = {}
    for name in ("train_seconds", "samples"):
        extra_path = layout.epoch_history(live_dir, name).as_posix()
        extra_text = read(extra_path)
        extra[name] = parse_history(extra_text, extra_path) if extra_text is not None else {}
    steps = tuple(sorted(values))
    return History(steps, tuple(values[s] for s in steps), extra["train_seconds"], extra["samples"])
