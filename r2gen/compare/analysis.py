"""The multi-seed numbers: per group, precision and metric, mean ± std over seeds and the test against fp32.

Within a group (:mod:`r2gen.compare.grouping`), per precision and metric of :data:`METRICS`:
mean ± std over seeds, and the difference from fp32 with its 95% confidence interval, tested by
Welch's t-test of the per-seed values (a ratio to fp32, computed inside each experiment, by a
one-sample t-test against its no-difference value); see :mod:`r2gen.compare.stats`. Runs that are
not speed measurements carry no speed number at all; time to quality comes from
:mod:`r2gen.compare.ttq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from r2gen.compare import labels
from r2gen.compare.derived import known, throughput_ratio, time_reduction
from r2gen.compare.dvclive import History
from r2gen.compare.exp_show import BACKEND, SAMPLES_PER_S, SPEED_COMPARABLE, TRAIN_SECONDS, Experiment
from r2gen.compare.grouping import Group, group_experiments
from r2gen.compare.labels import SPEED_FLAG
from r2gen.compare.stats import Difference, Stat, one_sample_test, welch_test
from r2gen.compare.ttq import QualityTarget, TTQCell, resolve_target, ttq_cells
from r2gen.config import PRECISIONS
from r2gen.errors import R2GenError
from r2gen.records import EvalSummary, TrainSummary

RECORDS = {"train": TrainSummary, "eval": EvalSummary}  # where a Metric of each source is read
RATIOS = {"throughput_ratio_vs_fp32": (throughput_ratio, SAMPLES_PER_S, 1.0),  # key -> (derive, from, null)
          "time_reduction_vs_fp32": (time_reduction, TRAIN_SECONDS, 0.0)}


@dataclass(frozen=True)
class Metric:
    key: str  # a key of the source's record (checked), or of RATIOS
    label: str
    source: str  # train | eval (metrics/<source>/<p>.json) | ratio (vs fp32 in the same experiment)
    better: str  # higher | lower
    speed: bool = False  # a speed claim: none for runs that are not speed measurements
    unit: str = ""  # bytes | ratio | fraction | "" (plain number)
    untested: str = ""  # why it is not tested against fp32 (empty: it is)

    def __post_init__(self) -> None:
        keys = RECORDS[self.source].keys() if self.source in RECORDS else tuple(RATIOS)
        if self.key not in keys:
            raise KeyError(f"metric {self.key!r} ({self.source}) is not one of {', '.join(keys)}")

    @property
    def null(self) -> float | None:
        """The value that means "no difference from fp32" for a ratio metric."""
        return RATIOS[self.key][2] if self.key in RATIOS else None


QUALITY = (
    Metric("train_loss", "train loss (last epoch)", "train", "lower"),
    Metric("val_loss", "val loss", "train", "lower"),
    Metric("test_loss", "test loss", "eval", "lower"),
    *(Metric(k, k, "eval", "higher") for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")),
    *(Metric(k, k.replace("_", " "), "eval", "higher") for k in ("CE_precision", "CE_recall", "CE_F1")),
)
# Absolute speeds of different experiments also differ with the machine's load at the time; only the
# ratios to fp32 measured in the same experiment are compared.
SAME_RUN = "compared as the same-run ratio to fp32"
SPEED = (
    Metric("samples_per_s", "training samples/s", "train", "higher", speed=True, untested=SAME_RUN),
    Metric("throughput_ratio_vs_fp32", "throughput ratio vs fp32 (same run)", "ratio", "higher", True, "ratio"),
    Metric("train_seconds", "train time (s)", "train", "lower", speed=True, untested=SAME_RUN),
    Metric("time_reduction_vs_fp32", "time reduction vs fp32 (same run)", "ratio", "higher", True, "fraction"),
    Metric("peak_memory_bytes", "peak memory", "train", "lower", unit="bytes"),
    # Generation runs at evaluate.precision for every model: a speed measurement, but not of p.
    Metric("reports_per_s", "generation reports/s (at the eval precision)", "eval", "higher",
           untested="every model generates at the same precision"),
)
METRICS = QUALITY + SPEED


@dataclass(frozen=True)
class Cell:
    """One metric of one precision in one group."""

    stat: Stat | None
    difference: Difference | None  # vs fp32; None for fp32 itself and with fewer than 2 seeds
    note: str = ""


def metric_value(e: Experiment, metric: Metric, p: str):
    """The value of ``metric`` for ``p`` in one experiment (a ratio: against fp32 of the same experiment)."""
    if metric.source == "ratio":
        derive, key, _ = RATIOS[metric.key]
        return derive(e.train[p].get(key), e.train["fp32"].get(key))
    return (e.train if metric.source == "train" else e.eval)[p].get(metric.key)


def metric_values(group: Group, metric: Metric, p: str) -> tuple[list[float], str]:
    """The per-seed values of ``metric`` for ``p`` in ``group``, and a note on any left out."""
    values, missing = [], 0
    for e in group.experiments:
        if metric.speed and not (e.speed_comparable(p) and e.speed_comparable("fp32")):
            return [], SPEED_FLAG
        value = metric_value(e, metric, p)
        if known(value):
            values.append(float(value))
        else:
            missing += 1
    return values, f"missing in {missing} of {len(group.experiments)} experiments" if missing else ""


def compare(group: Group, metric: Metric, precisions: Sequence[str]) -> dict[str, Cell]:
    """Mean ± std of ``metric`` per precision, each non-fp32 precision tested against fp32."""
    reference, _ = metric_values(group, metric, "fp32")
    cells = {}
    for p in precisions:
        values, note = metric_values(group, metric, p)
        stat = Stat(tuple(values)) if values else None
        difference = None
        if stat is not None and p != "fp32" and not metric.untested:
            difference = (one_sample_test(values, metric.null) if metric.null is not None
                          else welch_test(values, reference))
        cells[p] = Cell(stat, difference, note)
    return cells


@dataclass(frozen=True)
class GroupResult:
    group: Group
    equal_batch: bool
    cells: dict[str, dict[str, Cell]]  # metric key -> precision -> cell
    ttq: dict[str, TTQCell]  # precision -> time to quality (empty without a target)


@dataclass(frozen=True)
class Analysis:
    precisions: tuple[str, ...]
    groups: tuple[GroupResult, ...]
    skipped: tuple[str, ...]  # experiments left out, with the reason
    target: QualityTarget
    target_value: float | None
    target_text: str

    def label(self, p: str) -> str:
        """``fp8 (emulated)`` / ``fp16 (numerics only)`` when any experiment's run was not a speed measurement."""
        runs = [e.train[p] for r in self.groups for e in r.group.experiments]
        return labels.label(p, any(t.get(BACKEND) == labels.EMULATED for t in runs),
                            any(t.get(SPEED_COMPARABLE) is False for t in runs))


def analyse(experiments: Sequence[Experiment], histories: dict[tuple[str, str], History | None],
            target: QualityTarget = QualityTarget(), precisions: Sequence[str] = PRECISIONS,
            skipped: Sequence[str] = ()) -> Analysis:
    """Every group's statistics and time to quality.

    ``histories`` maps (experiment rev, precision) to the run's validation history (None or absent
    when the experiment has none).

    Raises:
        R2GenError: no experiments, or fp32 is not among the precisions (everything is relative to it).
    """
    if "fp32" not in precisions:
        raise R2GenError("the multi-seed comparison is relative to fp32; include fp32 in the precisions")
    groups = group_experiments(experiments)
    if not groups:
        raise R2GenError("no finished experiments in `dvc exp show`"
                         + (f" (left out: {'; '.join(skipped)})" if skipped else "")
                         + "; run the grid first: dvc exp run --queue -S seed=1,2,3 ... && dvc queue start")
    value, text = resolve_target(target, groups, histories, precisions)
    results = []
    for g in groups:
        cells = {m.key: compare(g, m, precisions) for m in METRICS}
        ttq = ttq_cells(g, histories, value, target, precisions) if value is not None else {}
        results.append(GroupResult(g, g.equal_batch(precisions), cells, ttq))
    return Analysis(tuple(precisions), tuple(results), tuple(skipped), target, value, text)
