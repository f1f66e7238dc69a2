"""The multi-seed report's input: the finished experiments in ``dvc exp show --json``.

Every experiment of a grid such as ``dvc exp run --queue -S seed=1,2,3 -S
train.common.batch_mode=equal,max`` trains all precisions with one seed, so its
``metrics/train/<p>.json`` and ``metrics/eval/<p>.json`` (paths from :mod:`r2gen.layout`) hold one
replicate of every precision. Those metrics stay the dicts DVC gives (an older experiment may lack
a key); every key read from them is named through its record (:meth:`r2gen.records.Record.key`),
so renaming a field breaks this module at import, not a report column silently.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from r2gen import layout
from r2gen.compare import labels
from r2gen.config import PRECISIONS
from r2gen.errors import R2GenError
from r2gen.records import EvalSummary, TrainSummary

BACKEND = TrainSummary.key("backend")
SPEED_COMPARABLE = TrainSummary.key("speed_comparable")
BATCH_SIZE = TrainSummary.key("batch_size")
GLOBAL_BATCH_SIZE = TrainSummary.key("global_batch_size")
STEPS = TrainSummary.key("steps")
SAMPLES_PER_S = TrainSummary.key("samples_per_s")
TRAIN_SECONDS = TrainSummary.key("train_seconds")


def speed_comparable(train: dict) -> bool:
    """False for an emulated run and one recorded as not a speed measurement (a training summary dict)."""
    return labels.speed_comparable(train.get(BACKEND), train.get(SPEED_COMPARABLE))


@dataclass(frozen=True)
class Experiment:
    """One finished experiment: one seed of every precision."""

    name: str
    rev: str
    baseline: str  # the commit the experiment was run from
    params: dict[str, Any]  # params.yaml, flattened to dotted keys
    train: dict[str, dict]  # precision -> metrics/train/<p>.json
    eval: dict[str, dict]  # precision -> metrics/eval/<p>.json

    @property
    def seed(self) -> Any:
        return self.params.get("seed")

    def speed_comparable(self, p: str) -> bool:
        return speed_comparable(self.train[p])


def parse_exp_show(rows: Any, precisions: Sequence[str] = PRECISIONS) -> tuple[list[Experiment], list[str]]:
    """The finished experiments in ``dvc exp show --json`` output, and why any others were left out.

    The workspace and the baseline commits are not experiments of the grid and are skipped; so are
    queued, running and failed experiments, and those missing a precision's metrics (each with a
    note). The output is a list of baselines, each with ``experiments``: ranges whose first rev is
    the experiment's commit (``dvc/repo/experiments/serialize.py``: ExpState, ExpRange).

    Raises:
        R2GenError: the input is not ``dvc exp show --json`` output.
    """
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("rev"), str) for r in rows):
        raise R2GenError("input is not the output of `dvc exp show --json` (a list of revisions); "
                         "run `dvc exp show --json > exps.json` and pass that file")
    experiments, skipped, seen = [], [], set()
    for base in rows:
        ranges = base.get("experiments") or []
        if not isinstance(ranges, list):
            skipped.append(f"{base['rev'][:7]}: 'experiments' is a {type(ranges).__name__}, not a list")
            continue
        for exp_range in ranges:
            problem, name, head = _entry(exp_range)
            if problem:
                skipped.append(f"{name}: {problem}")
                continue
            if head["rev"] in seen:
                continue
            experiment, missing = _experiment(name, head["rev"], base["rev"], head["data"], precisions)
            if missing:
                skipped.append(f"{name}: missing {', '.join(missing)}")
                continue
            seen.add(head["rev"])
            experiments.append(experiment)
    return experiments, skipped


def _entry(exp_range: Any) -> tuple[str | None, str, dict]:
    """(why the range is left out or None, its name, its head revision) for one entry of ``experiments``.

    Every field read is checked for its type: a hand-edited or foreign file leaves the entry out with
    the reason, never a traceback.
    """
    if not isinstance(exp_range, dict):
        return f"not an experiment entry (a {type(exp_range).__name__})", "?", {}
    revs = exp_range.get("revs") or [{}]
    head = revs[0] if isinstance(revs, list) else None
    if not isinstance(head, dict):
        return "'revs' is not a list of revisions", _name(exp_range.get("name")), {}
    name = _name(exp_range.get("name")) if exp_range.get("name") else _name(head.get("name") or head.get("rev"), 7)
    executor = exp_range.get("executor") or {}
    state = executor.get("state", "success") if isinstance(executor, dict) else "unknown executor"
    if state != "success":  # run in the workspace: no executor
        return _name(state), name, head
    if not isinstance(head.get("rev"), str):
        return "no revision", name, head
    data, error = head.get("data"), head.get("error")
    if error or not data:
        msg = error.get("msg") if isinstance(error, dict) else error
        return _name(msg or "no data", 200), name, head
    if not isinstance(data, dict):
        return f"'data' is a {type(data).__name__}, not a mapping", name, head
    return None, name, head


def _name(value: Any, limit: int = 80) -> str:
    """A printable, bounded name or message from the input (any type, any length, no control characters)."""
    text = value if isinstance(value, str) else "?" if value is None else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _experiment(name: str, rev: str, baseline: str, data: dict,
                precisions: Sequence[str]) -> tuple[Experiment | None, list[str]]:
    """The experiment of one ``dvc exp show`` entry, or None and the files it lacks."""
    train_files = {p: layout.train_summary(p).as_posix() for p in precisions}
    eval_files = {p: layout.eval_summary(p).as_posix() for p in precisions}
    params = _file(data.get("params", {}), layout.PARAMS)
    train = {p: _file(data.get("metrics", {}), path) for p, path in train_files.items()}
    evals = {p: _file(data.get("metrics", {}), path) for p, path in eval_files.items()}
    missing = ([layout.PARAMS] if params is None else []) + \
        [train_files[p] for p, d in train.items() if d is None] + [eval_files[p] for p, d in evals.items() if d is None]
    if missing:
        return None, missing
    bad = [f"{train_files[p]} ({why})" for p, d in train.items() if (why := _mistyped(d, TrainSummary))] + \
          [f"{eval_files[p]} ({why})" for p, d in evals.items() if (why := _mistyped(d, EvalSummary))]
    params = flatten(params)
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        bad.append(f"{layout.PARAMS} (seed is {_name(seed, 40)}, not an integer)")
    if bad:
        return None, [f"a valid {b}" for b in bad]
    return Experiment(name, rev, baseline, params, train, evals), []


def _mistyped(data: dict, record: type) -> str | None:
    """Why a metrics dict from ``dvc exp show`` does not fit ``record``'s field types, or None.

    Keys may be missing (an older experiment); a present one must have its record's type, numbers
    finite: a report of those numbers is built from them.
    """
    hints = _hints(record)
    for key, value in data.items():
        if key in hints and not _fits(value, hints[key]):
            return f"'{_name(key, 40)}' is {_name(value, 40)}"
    return None


def _hints(record: type) -> dict[str, Any]:
    if record not in _HINTS:
        _HINTS[record] = typing.get_type_hints(record)
    return _HINTS[record]


_HINTS: dict[type, dict[str, Any]] = {}


def _fits(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    if args and type(None) in args:  # X | None
        return value is None or _fits(value, next(a for a in args if a is not type(None)))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (str, dict):
        return isinstance(value, hint)
    return True


def _file(results: Any, path: str) -> dict | None:
    """The parsed content of one params/metrics file in a ``dvc exp show`` entry, or None."""
    if not isinstance(results, dict):
        return None
    entry = results.get(path) or results.get(path.replace("/", "\\"))
    data = entry.get("data") if isinstance(entry, dict) else None
    return data if isinstance(data, dict) else None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"common": {"epochs": 3}}}`` -> ``{"train.common.epochs": 3}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
