"""The multi-seed report: tables of mean ± std and the tests against fp32 per group, markdown, JSON, files.

Input is an :class:`~r2gen.compare.analysis.Analysis` of a DVC experiment grid; the conclusions
come from :mod:`r2gen.compare.grid_findings`, the figures from :mod:`r2gen.compare.figures`.

With 3 seeds per side, Welch's test has about 4 degrees of freedom at best: a real difference of
about 2.3 seed standard deviations is flagged only half the time. The report says so; "not
flagged" means "not shown with this many seeds", never "equal".
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from r2gen import layout
from r2gen.compare.analysis import METRICS, QUALITY, SPEED, Analysis, Cell, Metric
from r2gen.compare.derived import known
from r2gen.compare.exp_show import BACKEND, BATCH_SIZE, STEPS
from r2gen.compare.figures import EXPERIMENT_FIGURES, write_experiment_figures
from r2gen.compare.fmt import mean_std, plain, signed_unit, table
from r2gen.compare.grid_findings import conclusions
from r2gen.compare.labels import SPEED_FLAG
from r2gen.compare.stats import ALPHA, Difference, Stat
from r2gen.io import atomic_dir, write_json, write_text
from r2gen.records import TrainSummary

SETUP_KEYS = {BATCH_SIZE: "batch size", STEPS: "optimizer steps", TrainSummary.key("lr_ed"): "lr (encoder-decoder)",
              BACKEND: "backend"}


# ---------------------------------------------------------------------------------------- tables
def _diff_cell(metric: Metric, cell: Cell) -> str:
    d = cell.difference
    if d is None:
        return f"— ({metric.untested})" if metric.untested else "—"
    text = f"{signed_unit(d.diff, metric.unit)} [{signed_unit(d.ci[0], metric.unit)}, {signed_unit(d.ci[1], metric.unit)}], p={d.p_value:.3f}"
    return f"**{text} exceeds**" if d.exceeds else text


def _metric_table(analysis: Analysis, metrics: Sequence[Metric]) -> str:
    header = ["metric", "precision"]
    for r in analysis.groups:
        header += [f"{r.group.label}: mean ± std (n)", f"{r.group.label}: Δ vs fp32 [95% CI], p"]
    rows = []
    for m in metrics:
        for p in analysis.precisions:
            row = [m.label, analysis.label(p)]
            for r in analysis.groups:
                c = r.cells[m.key][p]
                if c.stat is None:
                    row += [c.note or "n/a", "—"]
                    continue
                mean = f"{mean_std(c.stat, m.unit)} ({c.stat.n})" + (f" ({c.note})" if c.note else "")
                row += [mean, _diff_cell(m, c) if p != "fp32" else "—"]
            rows.append(row)
    return table(header, rows)


def _setup_table(analysis: Analysis) -> str:
    """What each precision ran with, per group (several values: they differed between seeds)."""
    header = ["precision"] + [f"{r.group.label}: {what}" for r in analysis.groups for what in SETUP_KEYS.values()]
    rows = []
    for p in analysis.precisions:
        row = [analysis.label(p)]
        for r in analysis.groups:
            for key in SETUP_KEYS:
                values = sorted({e.train[p].get(key) for e in r.group.experiments},
                                key=lambda v: (not known(v), v if known(v) else 0, str(v)))
                row.append(" / ".join(plain(v) if known(v) else str(v if v is not None else "n/a") for v in values))
        rows.append(row)
    return table(header, rows)


def _ttq_table(analysis: Analysis) -> str:
    header = ["precision"]
    for r in analysis.groups:
        header += [f"{r.group.label}: {w}" for w in ("reached", "samples to target", "training s to target",
                                                     "time-to-target reduction vs fp32", "samples/s",
                                                     "throughput ratio vs fp32")]
    rows = []
    for p in analysis.precisions:
        row = [analysis.label(p)]
        for r in analysis.groups:
            c = r.ttq.get(p)
            if c is None:
                row += ["n/a"] * 6
                continue
            est = " (est.)" if c.estimated else ""
            row += [f"{c.reached}/{c.runs}" + (f" ({c.note})" if c.note else ""),
                    mean_std(c.samples, "", 0) + est if c.samples else "n/a",
                    mean_std(c.seconds, "", 1) + est if c.seconds else "n/a",
                    mean_std(c.reduction, "fraction") if c.reduction else ("—" if p == "fp32" else "n/a"),
                    mean_std(r.cells["samples_per_s"][p].stat, "", 2),
                    mean_std(r.cells["throughput_ratio_vs_fp32"][p].stat, "ratio") if p != "fp32" else "1×"]
        rows.append(row)
    return table(header, rows)


# ---------------------------------------------------------------------------------------- the report
def render_markdown(analysis: Analysis) -> str:
    """The multi-seed report (figures referenced as ``figures/<name>.png``)."""
    group_lines = "\n".join(
        f"- **{r.group.label}**: {len(r.group.experiments)} experiments, seeds "
        f"{', '.join(map(str, r.group.seeds))}; "
        + ("every precision at the same batch and number of optimizer steps" if r.equal_batch
           else "batch size or optimizer steps differ between precisions")
        + (f"; left out as repeated seeds: {', '.join(r.group.duplicates)}" if r.group.duplicates else "")
        for r in analysis.groups)
    tests = sum(1 for r in analysis.groups for m in METRICS for p in analysis.precisions
                if r.cells[m.key][p].difference is not None)
    method = [
        "mean ± std: over the seeds of a group (sample standard deviation, n − 1); (n) = seeds with a value.",
        f"Δ vs fp32: mean of the precision − mean of fp32 in the same group, with its 95% confidence interval. "
        f"**exceeds** = the difference exceeds the seed-to-seed spread: two-sided Welch's t-test (unequal "
        f"variances, Welch–Satterthwaite degrees of freedom) of the per-seed values, p < {ALPHA}. The ratio "
        "metrics are computed against fp32 inside each experiment, so they get a one-sample t-test against "
        "no difference (ratio 1×, reduction 0%).",
        f"{tests} tests in this report: at p < {ALPHA} about {ALPHA * tests:.1f} of them are flagged by chance "
        "alone when nothing differs. No correction for multiple comparisons is applied; read single flags "
        "with that in mind.",
        "Throughput ratio vs fp32 = samples/s ÷ fp32's samples/s in the same experiment (same machine, same "
        "hour); time reduction vs fp32 = 1 − train time ÷ fp32's in the same experiment. 1.8× the "
        "throughput is 44.4% less time, not \"44% faster\".",
        f"Runs that are not speed measurements (emulated fp8; fp16 on a CPU without fp16 arithmetic) show "
        f"\"{SPEED_FLAG}\" instead of any speed or time number.",
        "Time to quality: the first validation point at which a run's metric reached the target; samples "
        "and training seconds (optimizer steps only, validation excluded) up to that point. \"(est.)\": "
        "not logged per epoch, estimated from the training summary (steps × batch size; train time × "
        "steps ÷ total steps). Means are over the runs that reached the target.",
    ]
    parts = [
        f"# Multi-seed precision comparison: {', '.join(analysis.precisions)}",
        "Experiments from `dvc exp show`, grouped by everything but the seed:\n\n" + group_lines
        + (f"\n\nLeft out: {'; '.join(analysis.skipped)}." if analysis.skipped else ""),
        "## Conclusions", "\n".join(f"- {c}" for c in conclusions(analysis)),
        "## Method", "\n".join(f"- {m}" for m in method),
        "## Setup per group", _setup_table(analysis),
        "## Quality", _metric_table(analysis, QUALITY),
        "## Speed and memory", _metric_table(analysis, SPEED),
        f"## Time to quality\n\nTarget: {analysis.target_text}.",
        _ttq_table(analysis) if analysis.target_value is not None else "n/a: no target.",
        "## Figures", "\n\n".join(f"![{caption}](figures/{name})" for name, caption in EXPERIMENT_FIGURES.items()),
    ]
    return "\n\n".join(parts) + "\n"


def to_json(analysis: Analysis) -> dict:
    """The numbers behind the report, JSON-safe (no NaN), for other tools."""
    def stat(s: Stat | None) -> dict | None:
        return None if s is None else {"n": s.n, "mean": s.mean, "std": s.std, "values": list(s.values)}

    def diff(d: Difference | None) -> dict | None:
        return None if d is None else {"test": d.test, "diff": d.diff, "relative": d.relative, "ci95": list(d.ci),
                                       "p_value": d.p_value, "df": d.df, "exceeds_seed_spread": d.exceeds}

    return {
        "alpha": ALPHA,
        "target": {"metric": analysis.target.metric, "value": analysis.target_value, "text": analysis.target_text},
        "skipped": list(analysis.skipped),
        "groups": [{
            "label": r.group.label, "seeds": r.group.seeds, "experiments": [e.name for e in r.group.experiments],
            "equal_batch": r.equal_batch,
            "metrics": {key: {p: {"stat": stat(c.stat), "vs_fp32": diff(c.difference), "note": c.note}
                              for p, c in by_p.items()} for key, by_p in r.cells.items()},
            "time_to_quality": {p: {"runs": c.runs, "reached": c.reached, "samples": stat(c.samples),
                                    "seconds": stat(c.seconds), "time_reduction_vs_fp32": stat(c.reduction),
                                    "estimated": c.estimated, "note": c.note} for p, c in r.ttq.items()},
        } for r in analysis.groups],
    }


def build_report(analysis: Analysis, out_dir: Path) -> dict:
    """Write ``experiments_report.md``, ``experiments.json`` and ``figures/*.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    markdown = render_markdown(analysis)
    numbers = to_json(analysis)
    with atomic_dir(out_dir / layout.FIGURES) as tmp:
        write_experiment_figures(analysis, tmp, {m.key: m.label for m in METRICS})
    write_json(out_dir / layout.EXPERIMENTS_JSON, numbers)
    write_text(out_dir / layout.EXPERIMENTS_REPORT, markdown)
    return numbers
