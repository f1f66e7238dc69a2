"""The precision report of one run of every precision: markdown tables, the headline summary, files.

Input is a :class:`~r2gen.compare.runs.RunData` (the typed records and loss histories). Emulated and
numerics-only runs are marked in every table and figure and never presented as speed
(:mod:`r2gen.compare.labels`); the comparisons against fp32 come from :mod:`r2gen.compare.derived`,
the conclusions from :mod:`r2gen.compare.single_findings`, the figures from
:mod:`r2gen.compare.figures`. A value that was not recorded (null) shows as "n/a"; no number is
ever filled in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from r2gen import layout
from r2gen.compare import fmt
from r2gen.compare.derived import VsFp32, known, vs_fp32
from r2gen.compare.figures import HISTORY_FIGURES, PRECISION_FIGURES, history_figures, write_precision_figures
from r2gen.compare.instruments import fp8_section, mfu_section
from r2gen.compare.labels import SPEED_FLAG
from r2gen.compare.runs import RunData
from r2gen.compare.single_findings import conclusions
from r2gen.errors import R2GenError
from r2gen.io import atomic_dir, write_text
from r2gen.records import EvalSummary, TrainSummary

NLG_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
CE_KEYS = ("CE_precision", "CE_recall", "CE_F1")
MACHINE = {  # the machine table's rows: what each precision's run recorded about where it ran
    "device": lambda t, e: f"{fmt.text(t.device)}: {fmt.text(t.device_name)}",
    "CUDA compute capability": lambda t, e: fmt.text(t.compute_capability),
    "CPU vector capability": lambda t, e: f"{fmt.text(t.cpu_capability)} (native bf16: "
                                          f"{fmt.text(t.cpu_native_bf16)}, native fp16: {fmt.text(t.cpu_native_fp16)})",
    "device memory (peak ÷ fraction)": lambda t, e: _device_memory(t),
    "torch / CUDA / Transformer Engine": lambda t, e: f"{fmt.text(t.torch)} / {fmt.text(t.cuda)} / "
                                                      f"{fmt.text(t.transformer_engine)}",
    "threads (train / eval)": lambda t, e: f"{fmt.text(t.threads)} / {fmt.text(e.threads)}",
    "fp32 matmul/conv mode": lambda t, e: fmt.text(t.fp32_precision),
    "generation (eval) precision": lambda t, e: f"{fmt.text(e.eval_precision)} ({fmt.text(e.eval_backend)})",
    "r2gen version": lambda t, e: fmt.text(t.r2gen_version),
}


# ---------------------------------------------------------------------------------------- tables
def _device_memory(t: TrainSummary) -> str:
    peak, frac = t.peak_memory_bytes, t.peak_memory_fraction
    return fmt.size(peak / frac) if known(peak) and known(frac) and frac > 0 else "n/a"


def _environment(run: RunData) -> str:
    """Machine facts (one value when every run agrees, else per precision), then the setup of each."""
    rows = []
    for name, get in MACHINE.items():
        values = {p: get(run.train[p], run.eval[p]) for p in run.precisions}
        same = len(set(values.values())) == 1
        rows.append([name, next(iter(values.values())) if same
                     else "; ".join(f"{run.label(p)}: {v}" for p, v in values.items())])
    setup = []
    for p in run.precisions:
        t, fp8 = run.train[p], p == "fp8"
        setup.append([
            run.label(p), fmt.text(t.backend), fmt.text(t.backend_reason),
            "none" if t.autocast_dtype is None else fmt.text(t.autocast_dtype), fmt.text(t.grad_scaler),
            f"{fmt.text(t.fp8_recipe)}, {fmt.text(t.fp8_format)}" if fp8 else "—",
            f"{fmt.text(t.fp8_linear_converted)} of {fmt.text(t.fp8_linear_total)}" if fp8 else "—",
            fmt.text(t.speed_comparable), fmt.text(t.note),
        ])
    return (fmt.table(["", "value"], rows) + "\n\n" +
            fmt.table(["precision", "backend", "backend choice", "autocast dtype", "GradScaler", "fp8 recipe, format",
                       "FP8 Linear layers", "speed comparable", "note"], setup))


def _efficiency(run: RunData, derived: dict[str, VsFp32]) -> str:
    eval_precisions = {run.eval[p].eval_precision for p in run.precisions} - {None}
    gen = f"generation reports/s (at {'/'.join(sorted(eval_precisions)) or 'n/a'})"
    header = ["precision", "backend", "batch size", "epochs", "steps", "train time (s)", "samples/s",
              "throughput ratio vs fp32", "time reduction vs fp32", gen, "speed"]
    rows = []
    for p in run.precisions:
        t, d = run.train[p], derived[p]
        rows.append([run.label(p), fmt.text(t.backend), fmt.text(t.batch_size), fmt.text(t.epochs),
                     fmt.text(t.steps), fmt.num(t.train_seconds, 1), fmt.num(t.samples_per_s),
                     fmt.times(d.throughput_ratio), fmt.pct(d.time_reduction),
                     fmt.num(run.eval[p].reports_per_s, 3),
                     "measured" if run.speed_comparable(p) else SPEED_FLAG])
    return fmt.table(header, rows)


def _memory(run: RunData, derived: dict[str, VsFp32]) -> str:
    header = ["precision", "peak memory", "measured as", "fraction of device", "peak vs fp32",
              "memory before training", "batch multiplier vs fp32 (est.)", "note"]
    rows = []
    for p in run.precisions:
        t, d = run.train[p], derived[p]
        note = "emulated: memory of the emulation, not of FP8 storage" if run.emulated(p) else ""
        rows.append([run.label(p), fmt.size(t.peak_memory_bytes), fmt.text(t.peak_memory_kind),
                     fmt.pct(t.peak_memory_fraction), fmt.times(d.peak_ratio),
                     fmt.size(t.baseline_rss_bytes), fmt.times(d.batch_multiplier), note or "—"])
    return fmt.table(header, rows)


def _quality(run: RunData, derived: dict[str, VsFp32]) -> str:
    footnotes: dict[str, list[str]] = {}  # METEOR error -> the rows it applies to

    def scores(name: str, metrics: EvalSummary) -> list[str]:
        cells = []
        for key in NLG_KEYS + CE_KEYS:
            value = getattr(metrics, key)
            if key == "METEOR" and value is None:
                reason = fmt.text(metrics.METEOR_error or "no reason recorded")
                footnotes.setdefault(reason, []).append(name)
                cells.append(f"n/a [{list(footnotes).index(reason) + 1}]")
            else:
                cells.append(fmt.num(value, 3))
        return cells

    header = ["precision", *NLG_KEYS, "CE precision", "CE recall", "CE F1", "CE F1 over baseline"]
    rows = [[run.label(p), *scores(run.label(p), run.eval[p]), fmt.signed(derived[p].ce_f1_margin)]
            for p in run.precisions]
    rows.append([f"image-blind baseline ({run.baseline.baseline})", *scores("baseline", run.baseline), "—"])
    notes = [f"[{i}] METEOR n/a for {', '.join(names)}: {reason}"
             for i, (reason, names) in enumerate(footnotes.items(), 1)]
    return fmt.table(header, rows) + ("\n\n" + "\n".join(f"{n}  " for n in notes) if notes else "")


def _stability(run: RunData, derived: dict[str, VsFp32]) -> str:
    header = ["precision", "train loss (last epoch)", "val loss", "test loss", "test loss vs fp32",
              "non-finite steps", "GradScaler skipped steps", "GradScaler final scale", "distinct reports"]
    rows = []
    for p in run.precisions:
        t, e, rel = run.train[p], run.eval[p], derived[p].test_loss_change
        scaled = t.grad_scaler is not False
        rows.append([run.label(p), fmt.num(t.train_loss, 4), fmt.num(t.val_loss, 4), fmt.num(e.test_loss, 4),
                     f"{rel:+.1%}" if rel is not None else "n/a", fmt.text(t.nonfinite_steps),
                     fmt.text(t.grad_scaler_skipped_steps) if scaled else "off",
                     fmt.num(t.grad_scaler_final_scale, 0) if scaled else "off",
                     f"{fmt.text(e.distinct_reports)} of {fmt.text(e.test_studies)}"])
    return fmt.table(header, rows)


def _gradients(run: RunData) -> str:
    """Per precision: the pre-clip gradient norm over the steps, and GradScaler's scale; a run whose
    history predates these metrics says so instead of showing numbers."""
    header = ["precision", "grad norm: median", "max", "last", "steps with a finite norm",
              "loss scale: min", "last", "GradScaler skipped steps"]
    rows = []
    for p in run.precisions:
        t, g, ls = run.train[p], run.grad_norm.get(p), run.loss_scale.get(p)
        if g is None or not g.steps:
            norms = ["not logged (history from before train/grad_norm: rerun `dvc repro`)", "—", "—", "—"]
        else:
            v = sorted(g.values)
            norms = [fmt.num(float(np.median(v)), 4), fmt.num(v[-1], 4), fmt.num(g.values[-1], 4),
                     f"{len(v)} of {fmt.text(t.steps)}"]
        scaled = bool(t.grad_scaler) and ls is not None and bool(ls.steps)
        scale = [fmt.num(min(ls.values), 0), fmt.num(ls.values[-1], 0)] if scaled else \
            ["off", "off"] if not t.grad_scaler else ["not logged", "not logged"]
        rows.append([run.label(p), *norms, *scale, fmt.text(t.grad_scaler_skipped_steps) if t.grad_scaler else "off"])
    return (fmt.table(header, rows) + "\n\nThe norm is the global L2 norm of the unscaled gradients before R2Gen's "
            "clipping by value; a step whose gradients overflowed (fp16: GradScaler skips it) has no finite norm.")


def _figures(run: RunData) -> str:
    lines = [f"![{caption}](figures/{name})" for name, caption in PRECISION_FIGURES.items()]
    drawn = history_figures(run)
    lines += [f"![{caption}](figures/{name})" for name, caption in drawn.items()]
    lines += [f"{name}: not drawn, no run logged its history (rerun `dvc repro`)" for name in HISTORY_FIGURES
              if name not in drawn]
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------------- the report
def headline_summary(run: RunData, headline: str) -> dict:
    """Flat headline metrics of one precision, for ``reports/summary.json`` and `dvc exp show`.

    Speed keys are null when the run is not a speed measurement (emulated or numerics only).
    """
    t, e, d = run.train[headline], run.eval[headline], vs_fp32(run)[headline]
    speed = run.speed_comparable(headline)
    return {
        "precision": headline,
        "backend": t.backend,
        "speed_comparable": speed,
        "train_loss": t.train_loss,
        "val_loss": t.val_loss,
        "test_loss": e.test_loss,
        **{k: getattr(e, k) for k in NLG_KEYS + CE_KEYS},
        "CE_F1_over_baseline": d.ce_f1_margin,
        "samples_per_s": t.samples_per_s if speed else None,
        "throughput_ratio_vs_fp32": d.throughput_ratio if speed else None,
        "time_reduction_vs_fp32": d.time_reduction if speed else None,
        "train_seconds": t.train_seconds if speed else None,
        "reports_per_s": e.reports_per_s,
        "peak_memory_bytes": t.peak_memory_bytes,
        "peak_memory_fraction": t.peak_memory_fraction,
        "batch_size": t.batch_size,
        "nonfinite_steps": t.nonfinite_steps,
        "grad_scaler_skipped_steps": t.grad_scaler_skipped_steps,
    }


def _definitions(run: RunData) -> list[str]:
    e0 = run.eval[run.precisions[0]]
    return [
        "**throughput ratio vs fp32** = samples/s ÷ fp32's samples/s (steady state: the first warm-up steps "
        "are not timed); **time reduction vs fp32** = 1 − train time ÷ fp32's train time (all steps). "
        "Both are shown because they differ: 1.8× the throughput is 44.4% less time, not \"44% faster\".",
        "**batch multiplier vs fp32 (est.)** = fp32's memory per sample ÷ this precision's, with memory per "
        "sample = (peak − memory before training) ÷ batch size. Fixed costs are counted as if they grew with "
        "the batch, so it understates the multiplier; measure the largest batch before relying on it.",
        "**CE** = clinical efficacy: precision/recall/F1 of the observations a rule-based labeler finds in the "
        "generated vs the reference reports. **CE F1 over baseline** = CE F1 − the image-blind baseline's.",
        f"Every model generates at the same precision ({fmt.text(e0.eval_precision)}, beam "
        f"{fmt.text(e0.num_beams)}, at most {fmt.text(e0.max_new_tokens)} tokens), so quality "
        "differences come from the training precision.",
        f"**References**: {_references(run)}",
    ]


REFERENCE_TEXT = {
    "truncated": "R2Gen's: each test report tokenized and decoded back (cleaned, rare words as <unk>, cut at "
                 "the tokenizer's max_seq_length), as the public code scores (`evaluate.references: truncated`)",
    "full": "the cleaned test reports, whole: every word, no length limit (`evaluate.references: full`); "
            "not comparable with R2Gen's published scores, which use truncated references",
}


def _references(run: RunData) -> str:
    """What the scores were computed against, from the metrics files (one statement, or per precision)."""
    kinds = {p: run.eval[p].references for p in run.precisions}
    kinds["baseline"] = run.baseline.references
    if len(set(kinds.values())) == 1:
        kind = next(iter(kinds.values()))
        return f"scored against {REFERENCE_TEXT.get(kind, fmt.text(kind))}."
    return ("**the files were scored against different references, so their scores do not compare**: "
            + "; ".join(f"{p}: {k}" for p, k in kinds.items()) + ".")


def render_markdown(run: RunData, headline: str) -> str:
    """The full markdown report (figures referenced as ``figures/<name>.png``)."""
    derived = vs_fp32(run)
    marked = [p for p in run.precisions if run.label(p) != p]
    legend = "".join(
        f"\n- **{run.label(p)}**: {fmt.text(run.train[p].note)}. Its samples/s are {SPEED_FLAG}." for p in marked)
    n = run.test_studies
    parts = [
        f"# Precision comparison: R2Gen at {', '.join(run.precisions)}",
        f"Headline model (params `precision`): **{run.label(headline)}**. Single seed; {fmt.text(n)} test studies. "
        "Every number below comes from `metrics/` and `dvclive/`; \"n/a\" means it was not recorded." + legend,
        "## Conclusions", "\n".join(f"- {c}" for c in conclusions(run, derived)),
        "## Environment", _environment(run),
        "## Training efficiency", _efficiency(run, derived),
        "### Model FLOPs utilisation", mfu_section(run),
        "## Memory", _memory(run, derived),
        f"## Quality\n\n### Report quality on the test split ({fmt.text(n)} studies) against "
        f"{'/'.join(sorted({e.references for e in run.eval.values()}))} references", _quality(run, derived),
        "### Losses and numerical stability", _stability(run, derived),
        "### Gradient norm and loss scale", _gradients(run),
        "### FP8 per-layer numerics", fp8_section(run),
        "## Figures", _figures(run),
        "## Definitions", "\n".join(f"- {d}" for d in _definitions(run)),
    ]
    return "\n\n".join(parts) + "\n"


def build_report(run: RunData, headline: str, out_dir: Path) -> dict:
    """Write ``precision_report.md`` and ``figures/*.png`` under ``out_dir``; return the headline summary.

    Raises:
        R2GenError: ``headline`` is not one of the run's precisions.
    """
    if headline not in run.precisions:
        raise R2GenError(f"headline precision {headline!r} (params.yaml `precision`) has no results; "
                         f"must be one of: {', '.join(run.precisions)}")
    out_dir = Path(out_dir)
    markdown = render_markdown(run, headline)
    with atomic_dir(out_dir / layout.FIGURES) as tmp:
        write_precision_figures(run, tmp)
    write_text(out_dir / layout.PRECISION_REPORT, markdown)
    return headline_summary(run, headline)
