"""Time to quality (MLPerf style): the samples and training seconds until a validation metric reached a target.

The histories are dvclive's per-epoch files of each experiment (:mod:`r2gen.compare.dvclive`); the
target is relative to fp32's mean final value at equal batch, or absolute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from r2gen.compare.derived import known, samples_per_step, time_reduction
from r2gen.compare.dvclive import History
from r2gen.compare.exp_show import BATCH_SIZE, GLOBAL_BATCH_SIZE, STEPS, TRAIN_SECONDS
from r2gen.compare.fmt import plain
from r2gen.compare.grouping import Group
from r2gen.compare.labels import SPEED_FLAG
from r2gen.compare.stats import Stat


@dataclass(frozen=True)
class QualityTarget:
    """When a run has reached "quality": its validation metric at ``relative`` × a reference, or ``absolute``.

    The reference is fp32's mean final value over the seeds of the equal-batch group, so every run
    of every precision and batch mode chases the same number (as MLPerf's fixed targets).
    """

    metric: str = "val_loss"  # a dvclive epoch metric: <live dir>/plots/metrics/epoch/<metric>.tsv
    relative: float = 1.05  # loss: within 5% of fp32's final; a score: e.g. 0.95 for 95% of it
    absolute: float | None = None  # a fixed target instead of the relative one

    @property
    def lower_is_better(self) -> bool:
        return "loss" in self.metric

    def reached(self, value: float, target: float) -> bool:
        return value <= target if self.lower_is_better else value >= target


@dataclass(frozen=True)
class Reached:
    """When one run first reached the target (all None when it never did)."""

    step: int | None
    samples: float | None
    seconds: float | None
    estimated: bool  # samples/seconds derived from the summary, not logged per epoch


def time_to_quality(history: History, target: float, spec: QualityTarget, summary: dict) -> Reached:
    """Samples and training seconds until the metric first reached ``target``.

    Logged per-epoch totals (``epoch/samples``, ``epoch/train_seconds``) are used where the history
    has them. Otherwise each is estimated from the training summary: samples = optimizer steps ×
    global batch size (an overestimate by the short last batch of each epoch) and seconds =
    ``train_seconds`` × steps / total steps (as if every step took as long).
    """
    for step, value in zip(history.steps, history.values):
        if not spec.reached(value, target):
            continue
        done, total = step + 1, summary.get(STEPS)
        batch = samples_per_step(summary.get(GLOBAL_BATCH_SIZE), summary.get(BATCH_SIZE))
        train_seconds = summary.get(TRAIN_SECONDS)
        samples, seconds = history.samples.get(step), history.seconds.get(step)
        estimated = samples is None or seconds is None
        if samples is None and known(batch):
            samples = done * batch
        if seconds is None and known(train_seconds) and known(total) and total:
            seconds = train_seconds * done / total
        return Reached(step, samples, seconds, estimated)
    return Reached(None, None, None, estimated=False)


@dataclass(frozen=True)
class TTQCell:
    """Time to quality of one precision in one group."""

    runs: int  # experiments with a history
    reached: int  # of those, how many reached the target
    samples: Stat | None  # over the runs that reached it
    seconds: Stat | None  # None for runs that are not speed measurements
    reduction: Stat | None  # 1 − seconds / fp32's seconds in the same experiment (both reached)
    estimated: bool
    note: str = ""


def resolve_target(spec: QualityTarget, groups: Sequence[Group], histories: dict[tuple[str, str], History | None],
                   precisions: Sequence[str]) -> tuple[float | None, str]:
    """The target value and a sentence saying where it comes from (None: no fp32 history to base it on)."""
    if spec.absolute is not None:
        return spec.absolute, f"{spec.metric} {'≤' if spec.lower_is_better else '≥'} {spec.absolute:g} (absolute)"
    ref = next((g for g in groups if g.equal_batch(precisions)), groups[0] if groups else None)
    finals = [h.values[-1] for e in (ref.experiments if ref else ()) if (h := histories.get((e.rev, "fp32")))
              and h.values and math.isfinite(h.values[-1])]
    if not finals:
        return None, f"no fp32 {spec.metric} history to base the target on"
    mean = sum(finals) / len(finals)
    target = spec.relative * mean
    return target, (f"{spec.metric} {'≤' if spec.lower_is_better else '≥'} {plain(target)} = {spec.relative:g} × "
                    f"fp32's mean final {spec.metric} ({plain(mean)}, {len(finals)} seeds, group: {ref.label})")


def ttq_cells(group: Group, histories: dict[tuple[str, str], History | None], target: float,
              spec: QualityTarget, precisions: Sequence[str]) -> dict[str, TTQCell]:
    """Time to quality per precision over the group's seeds."""
    reached = {(e.rev, p): time_to_quality(h, target, spec, e.train[p])
               for e in group.experiments for p in precisions if (h := histories.get((e.rev, p))) is not None}
    cells = {}
    for p in precisions:
        runs = [(e, reached[e.rev, p]) for e in group.experiments if (e.rev, p) in reached]
        done = [(e, r) for e, r in runs if r.step is not None]
        notes = []
        if len(runs) < len(group.experiments):
            notes.append(f"no {spec.metric} history in {len(group.experiments) - len(runs)} experiments")
        if any(len(histories[e.rev, p].steps) < 2 for e, _ in runs):
            notes.append("one validation point per run: set train.common.validate: every_epoch")
        speed = all(e.speed_comparable(p) for e, _ in done)
        if not speed:
            notes.append(f"time: {SPEED_FLAG}")
        samples = [r.samples for _, r in done if known(r.samples)]
        seconds = [r.seconds for _, r in done if known(r.seconds)] if speed else []
        reductions = []
        if speed and p != "fp32":
            for e, r in done:
                ref = reached.get((e.rev, "fp32"))
                if ref and e.speed_comparable("fp32") and (red := time_reduction(r.seconds, ref.seconds)) is not None:
                    reductions.append(red)
        cells[p] = TTQCell(len(runs), len(done), Stat(tuple(samples)) if samples else None,
                           Stat(tuple(seconds)) if seconds else None, Stat(tuple(reductions)) if reductions else None,
                           any(r.estimated for _, r in done), "; ".join(notes))
    return cells
