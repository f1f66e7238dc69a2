"""The multi-seed report's input: the finished experiments in ``dvc exp show --json``.

Every experiment of a grid such as ``dvc exp run --queue -S seed=1,2,3 -S
train.common.batch_mode=equal,max`` trains all precisions with one seed, so its
``metrics/train/<p>.json`` and ``metrics/eval/<p>.json`` (paths from :mod:`r2gen.layout`) hold one
replicate of every precision. Those metrics stay the dicts DVC gives (an older experiment may lack
a key); every key read from them is named through its record (:meth:`r2gen.records.Record.key`),
so renaming a field breaks this module at import, not a report column silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from r2gen import layout
from r2gen.compare import labels
from r2gen.config import PRECISIONS
from r2gen.errors import R2GenError
from r2gen.records import TrainSummary

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
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "rev" in r for r in rows):
        raise R2GenError("input is not the output of `dvc exp show --json` (a list of revisions); "
                         "run `dvc exp show --json > exps.json` and pass that file")
    experiments, skipped, seen = [], [], set()
    for base in rows:
        for exp_range in base.get("experiments") or []:
            revs = exp_range.get("revs") or [{}]
            head = revs[0]
            name = exp_range.get("name") or head.get("name") or str(head.get("rev", "?"))[:7]
            state = (exp_range.get("executor") or {}).get("state", "success")  # run in the workspace: no executor
            if state != "success":
                skipped.append(f"{name}: {state}")
                continue
            if head.get("rev") in seen:
                continue
            data = head.get("data")
            if head.get("error") or not data:
                skipped.append(f"{name}: {(head.get('error') or {}).get('msg') or 'no data'}")
                continue
            experiment, missing = _experiment(name, head["rev"], base["rev"], data, precisions)
            if missing:
                skipped.append(f"{name}: missing {', '.join(missing)}")
                continue
            seen.add(head["rev"])
            experiments.append(experiment)
    return experiments, skipped


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
    return Experiment(name, rev, baseline, flatten(params), train, evals), []


def _file(results: dict, path: str) -> dict | None:
    """The parsed content of one params/metrics file in a ``dvc exp show`` entry, or None."""
    entry = results.get(path) or results.get(path.replace("/", "\\"))
    data = entry.get("data") if isinstance(entry, dict) else None
    return data if isinstance(data, dict) else None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"common": {"epochs": 3}}}`` -> ``{"train.common.epochs": 3}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
