"""The conclusions of the multi-seed report: each one sentence computed from the numbers.

"Not flagged" means not shown with this many seeds, never "equal"; a quality gap of a batch mode
that changes the batch size is checked against the equal-batch group before it is called a
precision effect.
"""

from __future__ import annotations

from r2gen.compare.analysis import QUALITY, Analysis, GroupResult
from r2gen.compare.fmt import mean_std, plain, signed_unit
from r2gen.compare.labels import SPEED_FLAG
from r2gen.compare.stats import ALPHA, detectable_difference


def conclusions(analysis: Analysis) -> list[str]:
    """Findings, each one sentence computed from the numbers."""
    n = min((len(r.group.experiments) for r in analysis.groups), default=0)
    k = detectable_difference(n)
    if k is None:
        found = ["Fewer than 2 seeds per group: no difference can be told from seed-to-seed noise here."]
    else:
        found = [f"{n} seeds per group: Welch's test (p < {ALPHA}) flags a true difference of {k:.1f} seed "
                 "standard deviations only about half the time; \"not flagged\" means not shown with "
                 f"{n} seeds, not equal."]
    equal = [r for r in analysis.groups if r.equal_batch]
    for r in analysis.groups:
        found += _quality_findings(analysis, r, equal)
    found += _speed_findings(analysis)
    if analysis.target_value is not None:
        found += _ttq_findings(analysis)
    return found


def _quality_findings(analysis: Analysis, r: GroupResult, equal: list[GroupResult]) -> list[str]:
    """The quality differences from fp32 beyond the seed spread in one group, checked at equal batch."""
    found = []
    others = [p for p in analysis.precisions if p != "fp32"]
    flagged = [(m, p, r.cells[m.key][p].difference) for m in QUALITY for p in others
               if (d := r.cells[m.key][p].difference) is not None and d.exceeds]
    where = f"[{r.group.label}]" + (" (equal batch and steps)" if r.equal_batch else " (batch or steps differ)")
    if not flagged:
        found.append(f"{where} No quality metric of any precision differs from fp32 beyond the "
                     "seed-to-seed spread.")
    for m, p, d in flagged:
        sentence = (f"{where} {analysis.label(p)} {m.label}: {signed_unit(d.diff, m.unit)} vs fp32 "
                    f"(95% CI {signed_unit(d.ci[0], m.unit)} to {signed_unit(d.ci[1], m.unit)}, p = {d.p_value:.3f})")
        if not r.equal_batch and equal:
            # the equal-batch group that differs from this one in the fewest other settings
            ref = max(equal, key=lambda e: len(e.group.settings.items() & r.group.settings.items()))
            d_eq = ref.cells[m.key][p].difference
            if d_eq is not None and d_eq.exceeds and (d_eq.diff > 0) == (d.diff > 0):
                sentence += (f"; it survives at equal batch ({ref.group.label}: {signed_unit(d_eq.diff, m.unit)}, "
                             f"p = {d_eq.p_value:.3f}): at least part of it is a precision effect")
            else:
                eq = f"{signed_unit(d_eq.diff, m.unit)}, p = {d_eq.p_value:.3f}" if d_eq is not None else "n/a"
                sentence += (f"; it does not survive at equal batch ({ref.group.label}: {eq}): here it goes "
                             "with the batch size and the number of optimizer steps, and is no evidence "
                             "about the precision")
        found.append(sentence + ".")
    return found


def _speed_findings(analysis: Analysis) -> list[str]:
    """Throughput ratios and time reductions vs fp32 (same run), and which precisions carry no speed."""
    found = []
    others = [p for p in analysis.precisions if p != "fp32"]
    for r in analysis.groups:
        for p in others:
            cell = r.cells["throughput_ratio_vs_fp32"][p]
            if cell.stat is None:
                continue
            red = r.cells["time_reduction_vs_fp32"][p].stat
            d = cell.difference
            verdict = ("beyond the seed-to-seed spread" if d is not None and d.exceeds
                       else "not distinguishable from 1× with these seeds" if d is not None else "one seed")
            found.append(f"[{r.group.label}] {p}: {mean_std(cell.stat, 'ratio')} fp32's throughput ({verdict}); "
                         + (f"time reduction {mean_std(red, 'fraction')}" if red else "time reduction n/a") + ".")
    excluded = sorted({analysis.label(p) for r in analysis.groups for p in others
                       if r.cells["samples_per_s"][p].note == SPEED_FLAG})
    if excluded:
        found.append(f"{', '.join(excluded)}: {SPEED_FLAG}; no speed or time-to-quality time is claimed for them.")
    return found


def _ttq_findings(analysis: Analysis) -> list[str]:
    """Who reached the time-to-quality target, in how many samples and seconds, per group."""
    found = []
    for r in analysis.groups:
        parts = []
        for p in analysis.precisions:
            c = r.ttq.get(p)
            if c is None or not c.runs:
                continue
            what = f"{analysis.label(p)} {c.reached}/{c.runs}"
            if c.samples:
                what += f" in {mean_std(c.samples, '', 0)} samples"
            if c.seconds:
                what += f", {mean_std(c.seconds, '', 1)} s"
            parts.append(what)
        if parts:
            sign = "≤" if analysis.target.lower_is_better else "≥"
            found.append(f"[{r.group.label}] time to quality ({analysis.target.metric} {sign} "
                         f"{plain(analysis.target_value)}), runs that reached it: " + "; ".join(parts) + ".")
    return found
