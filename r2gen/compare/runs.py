"""The single-run report's input: the typed records of every precision and their loss histories.

``metrics/train/<p>.json``, ``metrics/eval/<p>.json`` and ``metrics/eval/baseline.json`` are read
into :mod:`r2gen.records` (a missing, renamed or unknown key is an error naming the file); the
dvclive histories ``dvclive/train/<p>/plots/metrics/{train/loss,epoch/val_loss}.tsv`` into
:class:`~r2gen.compare.dvclive.Series`, and where a run logged them the per-step gradient norm, loss
scale and skipped steps (``train/{grad_norm,loss_scale,skipped_steps}.tsv``). Paths come from :mod:`r2gen.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TypeVar

from r2gen import layout
from r2gen.compare import labels
from r2gen.compare.dvclive import Series, read_series
from r2gen.errors import R2GenError
from r2gen.fp8_table import read_table
from r2gen.records import BaselineSummary, EvalSummary, Record, TrainSummary

R = TypeVar("R", bound=Record)
OPTIONAL_STEP_HISTORIES = ("grad_norm", "loss_scale", "skipped_steps")  # RunData fields = dvclive train/<name>


@dataclass(frozen=True)
class RunData:
    """Everything the report reads, per precision (in the order given to :func:`load_run`)."""

    precisions: tuple[str, ...]
    train: dict[str, TrainSummary]  # metrics/train/<p>.json
    eval: dict[str, EvalSummary]  # metrics/eval/<p>.json
    baseline: BaselineSummary  # metrics/eval/baseline.json
    step_loss: dict[str, Series]  # train/loss per optimizer step
    val_loss: dict[str, Series]  # epoch/val_loss at the validated epochs (may be empty)
    # Per-step histories that older runs did not log (empty series then): train/grad_norm (every
    # precision), train/loss_scale and train/skipped_steps (GradScaler).
    grad_norm: dict[str, Series] = field(default_factory=dict)
    loss_scale: dict[str, Series] = field(default_factory=dict)
    skipped_steps: dict[str, Series] = field(default_factory=dict)
    # dvclive/train/<p>/fp8_layers.json where the run wrote one (fp8 runs; r2gen.fp8_table)
    fp8_layers: dict[str, dict] = field(default_factory=dict)

    def emulated(self, p: str) -> bool:
        return self.train[p].emulated

    def speed_comparable(self, p: str) -> bool:
        """False for emulated runs and runs recorded with ``speed_comparable: false``."""
        t = self.train[p]
        return labels.speed_comparable(t.backend, t.speed_comparable)

    def label(self, p: str) -> str:
        """The precision's name as every table and figure shows it: ``fp8 (emulated)``."""
        return labels.label(p, self.emulated(p), not self.speed_comparable(p))

    @property
    def fp32(self) -> TrainSummary | None:
        """fp32's training summary, the reference of every ratio (None when fp32 did not run)."""
        return self.train.get("fp32")

    @property
    def test_studies(self) -> int | None:
        """The test-set size (the largest recorded, should the evaluations differ)."""
        return max((e.test_studies for e in self.eval.values() if e.test_studies), default=None)


def load_run(metrics_dir: Path, live_dir: Path, precisions: Sequence[str]) -> RunData:
    """Read the training, evaluation and baseline metrics and the loss histories of ``precisions``.

    Raises:
        R2GenError: a file is missing, unreadable or not the record this version writes (the
            message names it and says to run `dvc repro`).
    """
    train, evals, step_loss, val_loss, fp8 = {}, {}, {}, {}, {}
    steps: dict[str, dict[str, Series]] = {name: {} for name in OPTIONAL_STEP_HISTORIES}
    for p in precisions:
        train[p] = _load(TrainSummary, layout.train_summary(p, metrics_dir), p)
        evals[p] = _load(EvalSummary, layout.eval_summary(p, metrics_dir), p)
        run = layout.live_run(p, live_dir)
        step_loss[p] = read_series(layout.step_history(run, "loss"), required=True)
        val_loss[p] = read_series(layout.epoch_history(run, "val_loss"), required=False)
        for name in OPTIONAL_STEP_HISTORIES:
            steps[name][p] = read_series(layout.step_history(run, name), required=False)
        if layout.fp8_layers(run).is_file():
            fp8[p] = read_table(layout.fp8_layers(run))
    baseline = _load(BaselineSummary, layout.baseline_summary(metrics_dir), None)
    return RunData(tuple(precisions), train, evals, baseline, step_loss, val_loss, **steps, fp8_layers=fp8)


def _load(cls: type[R], path: Path, precision: str | None) -> R:
    if not path.exists():
        raise R2GenError(f"{path} not found; run `dvc repro` to produce it")
    record = cls.load(path)
    if precision is not None and record.precision != precision:
        raise R2GenError(f"{path} holds results of precision {record.precision!r}, not {precision!r}; "
                         "run `dvc repro` to rewrite it")
    return record
