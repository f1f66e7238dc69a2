"""The figures of both reports (PNG, matplotlib's object API: no global state, no display needed).

One colour per precision in every figure of both reports; runs that are not speed measurements are
hatched and labelled (:mod:`r2gen.compare.labels`); a missing value is drawn as "n/a".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.figure import Figure

from r2gen.compare.derived import known
from r2gen.compare.fmt import num, text
from r2gen.compare.labels import tick

if TYPE_CHECKING:
    from r2gen.compare.analysis import Analysis
    from r2gen.compare.runs import RunData
    from r2gen.compare.stats import Stat

COLORS = {"fp32": "tab:blue", "fp16": "tab:orange", "bf16": "tab:green", "fp8": "tab:red"}
PRECISION_FIGURES = {
    "loss_curves.png": "Training loss per step (light: raw, solid: smoothed) and validation loss (circles)",
    "throughput.png": "Training throughput (hatched: not a speed measurement)",
    "memory.png": "Peak memory during training (hatched: emulated)",
    "quality.png": "Report quality on the test split, with the image-blind baseline (dashed)",
}
# Drawn from the per-step histories when a run logged them (older histories did not): see HISTORY_FIGURES_NEED.
HISTORY_FIGURES = {
    "grad_norm.png": "Global gradient L2 norm per step, before clipping (light: raw, solid: smoothed; log scale)",
    "loss_scale.png": "GradScaler loss scale per step and the steps it skipped (precisions with a GradScaler)",
    "fp8_layers.png": "FP8 per layer: GEMM error vs fp32 per probed epoch, and underflow/saturation at the last",
}
QUALITY_FIGURE_KEYS = ("BLEU_4", "ROUGE_L", "CIDEr", "CE_F1")
EXPERIMENT_FIGURES = {
    "seed_quality.png": "Quality per precision and batch mode: mean ± std over seeds (dots: single seeds)",
    "seed_throughput.png": "Throughput ratio vs fp32, measured within each run: mean ± std over seeds",
    "time_to_quality.png": "Time to quality: samples and training seconds until the target, mean ± std",
}
FIGURE_METRICS = ("test_loss", "BLEU_4", "CE_F1", "train_loss")  # seed_quality.png, one panel each
GROUP_HATCHES = (None, "..", "//", "xx")  # tells the groups (batch modes) apart in the figures


def color(p: str, i: int) -> str:
    """The precision's colour (matplotlib's i-th default for another name)."""
    return COLORS.get(p, f"C{i}")


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same numbers, same bytes


# ---------------------------------------------------------------------------------------- the precision report
def ema(values: Sequence[float], beta: float = 0.8) -> np.ndarray:
    """Bias-corrected exponential moving average that steps over non-finite values."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg, weight = beta * avg + (1 - beta) * v, beta * weight + (1 - beta)
        out.append(avg / weight if weight else math.nan)
    return np.asarray(out)


def _loss_figure(run: RunData, path: Path) -> None:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, p in enumerate(run.precisions):
        c, s, v = color(p, i), run.step_loss[p], run.val_loss[p]
        ax.plot(s.steps, s.values, color=c, alpha=0.25, linewidth=0.8)
        ax.plot(s.steps, ema(s.values), color=c, linewidth=1.6, label=f"{run.label(p)} train")
        if v.steps:
            ax.scatter(v.steps, v.values, color=c, edgecolors="black", s=45, zorder=3, label=f"{run.label(p)} val")
    ax.set(xlabel="optimizer step", ylabel="loss (token-mean NLL)", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    _save(fig, path)


def _bar_figure(run: RunData, path: Path, values: dict[str, float | None], flagged: dict[str, bool],
                flag_text: str, ylabel: str, title: str, fmt) -> None:
    """Bars per precision; flagged ones hatched and labelled with ``flag_text``; missing ones "n/a"."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(run.precisions))
    top = max((v for v in values.values() if known(v)), default=1.0) or 1.0
    for i, p in enumerate(run.precisions):
        v = values[p]
        if not known(v):
            ax.text(i, 0.02 * top, "n/a", ha="center", va="bottom")
            continue
        ax.bar(i, v, color=color(p, i), alpha=0.45 if flagged[p] else 0.9, edgecolor="black",
               hatch="//" if flagged[p] else None)
        ax.text(i, v + 0.01 * top, fmt(v) + (f"\n{flag_text}" if flagged[p] else ""), ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(x, [tick(run.label(p)) for p in run.precisions])
    ax.set_ylim(0, top * 1.25)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _quality_figure(run: RunData, path: Path) -> None:
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, len(QUALITY_FIGURE_KEYS))
    ticks = [tick(run.label(p)) for p in run.precisions]
    baseline_line = None
    for ax, key in zip(axes, QUALITY_FIGURE_KEYS):
        for i, p in enumerate(run.precisions):
            v = getattr(run.eval[p], key)
            if known(v):
                ax.bar(i, v, color=color(p, i), edgecolor="black", hatch="//" if run.emulated(p) else None)
            else:
                ax.text(i, 0, "n/a", ha="center", va="bottom")
        if known(getattr(run.baseline, key)):
            baseline_line = ax.axhline(getattr(run.baseline, key), color="black", linestyle="--", linewidth=1.2)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
    if baseline_line is not None:
        fig.legend([baseline_line], ["image-blind baseline (most frequent training report)"],
                   loc="outside upper center", fontsize=8)
    _save(fig, path)


def _grad_norm_figure(run: RunData, path: Path) -> None:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, p in enumerate(run.precisions):
        s = run.grad_norm.get(p)
        if s is None or not s.steps:
            continue
        ax.plot(s.steps, s.values, color=color(p, i), alpha=0.25, linewidth=0.8)
        ax.plot(s.steps, ema(s.values), color=color(p, i), linewidth=1.6, label=run.label(p))
    ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="‖g‖₂ of the unscaled gradients (before clipping)",
           title="Global gradient norm per step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def _loss_scale_figure(run: RunData, path: Path) -> None:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, p in enumerate(scaled_precisions(run)):
        s, skipped = run.loss_scale[p], run.skipped_steps.get(p)
        ax.step(s.steps, s.values, where="post", color=color(p, i), linewidth=1.6, label=f"{run.label(p)} loss scale")
        if skipped is not None and skipped.steps:  # a skipped step: the cumulative count went up there
            prev = (0.0, *skipped.values[:-1])
            at = [st for st, v, b in zip(skipped.steps, skipped.values, prev) if v > b]
            scale = dict(zip(s.steps, s.values))
            ax.scatter(at, [scale.get(st, math.nan) for st in at], marker="x", color="black", zorder=3,
                       label=f"{run.label(p)} skipped step ({len(at)})")
    ax.set_yscale("log", base=2)
    ax.set(xlabel="optimizer step", ylabel="loss scale (after the step's update)", title="GradScaler loss scale")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def scaled_precisions(run: RunData) -> list[str]:
    """The precisions whose run used a GradScaler and logged its scale."""
    return [p for p in run.precisions if run.train[p].grad_scaler and run.loss_scale.get(p) is not None
            and run.loss_scale[p].steps]


def history_figures(run: RunData) -> dict[str, str]:
    """The :data:`HISTORY_FIGURES` this run has histories for (name -> caption)."""
    names = []
    if any(s.steps for s in run.grad_norm.values()):
        names.append("grad_norm.png")
    if scaled_precisions(run):
        names.append("loss_scale.png")
    if fp8_table_precision(run) is not None:
        names.append("fp8_layers.png")
    return {n: HISTORY_FIGURES[n] for n in names}


def fp8_table_precision(run: RunData) -> str | None:
    """The first precision with an FP8 layer table that has rows (the one fp8_layers.png shows)."""
    return next((p for p in run.precisions if run.fp8_layers.get(p, {}).get("rows")), None)


FP8_SHARES = (("input_underflow", "input\nunderflow"), ("weight_underflow", "weight\nunderflow"),
              ("grad_output_underflow", "grad\nunderflow"), ("input_saturation", "input\nsaturation"),
              ("weight_saturation", "weight\nsaturation"), ("grad_output_saturation", "grad\nsaturation"))


def _fp8_layers_figure(run: RunData, path: Path) -> None:
    p = fp8_table_precision(run)
    table = run.fp8_layers[p]
    epochs = table["epochs"]
    layers = list(dict.fromkeys(r["layer"] for r in table["rows"]))
    at = {(r["layer"], r["epoch"]): r for r in table["rows"]}
    error = np.array([[at.get((layer, e), {}).get("gemm_rel_error", math.nan) for e in epochs] for layer in layers])
    last = max(epochs)
    shares = np.array([[100 * at.get((layer, last), {}).get(k, math.nan) for k, _ in FP8_SHARES] for layer in layers])
    fig = Figure(figsize=(12, 1.6 + 0.32 * len(layers)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[len(epochs) + 2, len(FP8_SHARES) + 2])
    for ax, values, cols, title, unit in (
            (left, error, [f"epoch {e}" for e in epochs], "GEMM relative error vs fp32", "{:.3f}"),
            (right, shares, [label for _, label in FP8_SHARES], f"elements lost at epoch {last} (%)", "{:.2f}")):
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(layers)), layers if ax is left else [""] * len(layers), fontsize=7)
        ax.set_title(title, fontsize=9)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, unit.format(v) if math.isfinite(v) else "n/a", ha="center", va="center", fontsize=6,
                    color="white")
    fig.suptitle(f"{run.label(p)}: FP8 numerics per layer ({table['backend']}, {table['fp8_recipe']} scaling)",
                 fontsize=10)
    _save(fig, path)


def write_loss_diff_figure(base: dict, work: dict, precisions: Sequence[str], path: Path) -> None:
    """Smoothed training loss per step, one panel per precision: the baseline dashed, the workspace solid."""
    cols = min(len(precisions), 2)
    rows = math.ceil(len(precisions) / cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    for i, (ax, p) in enumerate(zip(axes, precisions)):
        for side, style, name in ((base, "--", "baseline"), (work, "-", "workspace")):
            s = side.get(p)
            if s is not None and s.steps:
                ax.plot(s.steps, ema(s.values), color=color(p, i), linestyle=style, linewidth=1.4, label=name)
            else:
                ax.text(0.5, 0.5 if side is base else 0.4, f"no {name} history", transform=ax.transAxes, ha="center")
        ax.set_yscale("log")
        ax.set_title(p, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in axes[len(precisions):]:
        ax.set_visible(False)
    fig.supxlabel("optimizer step", fontsize=9)
    fig.supylabel("training loss (smoothed, log scale)", fontsize=9)
    _save(fig, path)


def write_precision_figures(run: RunData, directory: Path) -> None:
    """The precision report's :data:`PRECISION_FIGURES` into ``directory``, and the
    :data:`HISTORY_FIGURES` that the run's histories allow (:func:`history_figures`)."""
    train = run.train
    drawn = history_figures(run)
    if "grad_norm.png" in drawn:
        _grad_norm_figure(run, directory / "grad_norm.png")
    if "loss_scale.png" in drawn:
        _loss_scale_figure(run, directory / "loss_scale.png")
    if "fp8_layers.png" in drawn:
        _fp8_layers_figure(run, directory / "fp8_layers.png")
    _loss_figure(run, directory / "loss_curves.png")
    _bar_figure(run, directory / "throughput.png", {p: train[p].samples_per_s for p in run.precisions},
                {p: not run.speed_comparable(p) for p in run.precisions}, "numerics only,\nnot speed",
                "samples/s (training)", "Training throughput", num)
    _bar_figure(run, directory / "memory.png",
                {p: train[p].peak_memory_bytes / 2**30 if known(train[p].peak_memory_bytes) else None
                 for p in run.precisions},
                {p: run.emulated(p) for p in run.precisions}, "emulated", "GiB",
                f"Peak memory ({text(train[run.precisions[0]].peak_memory_kind)})", lambda v: f"{v:.2f}")
    _quality_figure(run, directory / "quality.png")


# ---------------------------------------------------------------------------------------- the multi-seed report
def _grouped_bars(ax, analysis: Analysis, stats: dict[tuple[int, str], Stat | None], ylabel: str,
                  notes: dict[tuple[int, str], str] | None = None) -> None:
    """Bars per precision (x), one per group side by side; error bars = std; dots = seeds; n/a where missing.

    ``notes`` are written above (or instead of) the bars, e.g. how many runs reached a target.
    """
    notes = notes or {}
    groups, precisions = analysis.groups, analysis.precisions
    width = 0.8 / max(len(groups), 1)
    for gi, r in enumerate(groups):
        for pi, p in enumerate(precisions):
            x = pi - 0.4 + width * (gi + 0.5)
            s, note = stats.get((gi, p)), notes.get((gi, p), "")
            if s is None:
                ax.text(x, 0, f"n/a {note}", ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            if note:
                ax.text(x, s.mean + (s.std or 0), note, ha="center", va="bottom", fontsize=6)
            ax.bar(x, s.mean, width, yerr=s.std or 0, capsize=3, color=color(p, pi),
                   alpha=0.9 if gi == 0 else 0.5, edgecolor="black", hatch=GROUP_HATCHES[gi % len(GROUP_HATCHES)],
                   label=r.group.label if pi == 0 else None)
            ax.scatter([x] * s.n, s.values, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(precisions)), [tick(analysis.label(p)) for p in precisions], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _cells(analysis: Analysis, key: str) -> dict[tuple[int, str], Stat | None]:
    return {(gi, p): r.cells[key][p].stat for gi, r in enumerate(analysis.groups) for p in analysis.precisions}


def write_experiment_figures(analysis: Analysis, directory: Path, metric_labels: dict[str, str]) -> None:
    """The multi-seed report's :data:`EXPERIMENT_FIGURES` into ``directory`` (panels titled by ``metric_labels``)."""
    fig = Figure(figsize=(4 * len(FIGURE_METRICS), 4.2), layout="constrained")
    axes = fig.subplots(1, len(FIGURE_METRICS))
    for ax, key in zip(axes, FIGURE_METRICS):
        _grouped_bars(ax, analysis, _cells(analysis, key), metric_labels[key])
        ax.set_title(metric_labels[key])
    axes[0].legend(fontsize=7, loc="lower left")
    _save(fig, directory / "seed_quality.png")

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _grouped_bars(ax, analysis, _cells(analysis, "throughput_ratio_vs_fp32"), "samples/s ÷ fp32's in the same run")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_title("Throughput ratio vs fp32 (n/a: not a speed measurement)")
    ax.legend(fontsize=7)
    _save(fig, directory / "seed_throughput.png")

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, what, ylabel in ((axes[0], "samples", "training samples to target"),
                             (axes[1], "seconds", "training seconds to target")):
        _grouped_bars(ax, analysis, {(gi, p): getattr(r.ttq[p], what) if p in r.ttq else None
                                     for gi, r in enumerate(analysis.groups) for p in analysis.precisions}, ylabel,
                      {(gi, p): f"{c.reached}/{c.runs} reached" for gi, r in enumerate(analysis.groups)
                       for p, c in r.ttq.items()})
    fig.suptitle(f"Time to quality: {analysis.target_text}", fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:  # no bars at all without a target
        axes[0].legend(fontsize=7)
    _save(fig, directory / "time_to_quality.png")
