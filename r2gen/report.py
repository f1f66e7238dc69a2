"""The precision comparison: markdown tables, conclusions computed from the numbers, and figures.

Inputs are the files the pipeline already wrote: ``metrics/train/<p>.json`` (the training summary,
including :meth:`r2gen.precision.PrecisionPlan.describe`), ``metrics/eval/<p>.json`` (test loss and
report scores), ``metrics/eval/baseline.json`` (the image-blind baseline) and the dvclive history
``dvclive/train/<p>/plots/metrics/{train/loss,epoch/val_loss}.tsv``.

Two kinds of run are never presented as speed: an *emulated* one (FP8 numerics in software) and a
*numerics-only* one (``speed_comparable`` false, e.g. fp16 autocast on a CPU without native fp16
arithmetic). Both are marked in every table and figure, and left out of the "fastest" conclusion.
A missing optional key shows as "n/a"; no number is ever filled in.

Definitions used throughout (both are shown because they are easy to confuse: 1.8x the throughput
is a 44.4% shorter time, not "44% faster"):

- throughput ratio vs fp32 = samples/s of p / samples/s of fp32
- time reduction vs fp32   = 1 - train seconds of p / train seconds of fp32
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from r2gen.errors import R2GenError
from r2gen.io import atomic_dir, write_text

SPEED_FLAG = "numerics only — not a speed measurement"
NLG_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
CE_KEYS = ("CE_precision", "CE_recall", "CE_F1")
QUALITY_FIGURE_KEYS = ("BLEU_4", "ROUGE_L", "CIDEr", "CE_F1")
# One seed gives no variance estimate. Rules of thumb, stated in the report next to each use:
LOSS_RULE = 0.02  # relative test-loss difference that one seed cannot tell from noise
TIMING_RULE = 0.05  # relative throughput difference within run-to-run timing noise on a shared machine
COLORS = {"fp32": "tab:blue", "fp16": "tab:orange", "bf16": "tab:green", "fp8": "tab:red"}
FIGURES = {
    "loss_curves.png": "Training loss per step (light: raw, solid: smoothed) and validation loss (circles)",
    "throughput.png": "Training throughput (hatched: not a speed measurement)",
    "memory.png": "Peak memory during training (hatched: emulated)",
    "quality.png": "Report quality on the test split, with the image-blind baseline (dashed)",
}


@dataclass(frozen=True)
class Series:
    """One dvclive metric history: values at dvclive steps."""

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class RunData:
    """Everything the report reads, per precision (in the order given to :func:`load_run`)."""

    precisions: tuple[str, ...]
    train: dict[str, dict]  # metrics/train/<p>.json
    eval: dict[str, dict]  # metrics/eval/<p>.json
    baseline: dict  # metrics/eval/baseline.json
    step_loss: dict[str, Series]  # train/loss per optimizer step
    val_loss: dict[str, Series]  # epoch/val_loss at the validated epochs (may be empty)

    def emulated(self, p: str) -> bool:
        return self.train[p].get("backend") == "emulated"

    def speed_comparable(self, p: str) -> bool:
        """False for emulated runs and runs recorded with ``speed_comparable: false``."""
        return not self.emulated(p) and self.train[p].get("speed_comparable") is not False

    def label(self, p: str) -> str:
        """The precision's name as every table and figure shows it: ``fp8 (emulated)``."""
        if self.emulated(p):
            return f"{p} (emulated)"
        if not self.speed_comparable(p):
            return f"{p} (numerics only)"
        return p


# ---------------------------------------------------------------------------------------- loading
def load_run(metrics_dir: Path, live_dir: Path, precisions: Sequence[str]) -> RunData:
    """Read the training, evaluation and baseline metrics and the loss histories of ``precisions``.

    Raises:
        R2GenError: a file is missing or unreadable (the message names it and says to run `dvc repro`).
    """
    metrics_dir, live_dir = Path(metrics_dir), Path(live_dir)
    train, evals, step_loss, val_loss = {}, {}, {}, {}
    for p in precisions:
        train[p] = _read_json(metrics_dir / "train" / f"{p}.json", p)
        evals[p] = _read_json(metrics_dir / "eval" / f"{p}.json", p)
        history = live_dir / p / "plots" / "metrics"
        step_loss[p] = _read_series(history / "train" / "loss.tsv", required=True)
        val_loss[p] = _read_series(history / "epoch" / "val_loss.tsv", required=False)
    baseline = _read_json(metrics_dir / "eval" / "baseline.json", None)
    return RunData(tuple(precisions), train, evals, baseline, step_loss, val_loss)


def _read_json(path: Path, precision: str | None) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise R2GenError(f"{path} not found; run `dvc repro` to produce it") from None
    except (OSError, ValueError) as exc:
        raise R2GenError(f"{path} is not readable JSON ({exc.__class__.__name__}); "
                         "run `dvc repro` to rewrite it") from None
    if not isinstance(data, dict):
        raise R2GenError(f"{path} does not hold a JSON object; run `dvc repro` to rewrite it")
    if precision is not None and data.get("precision", precision) != precision:
        raise R2GenError(f"{path} holds results of precision {data['precision']!r}, not {precision!r}; "
                         "run `dvc repro` to rewrite it")
    return data


def _read_series(path: Path, required: bool) -> Series:
    """A dvclive TSV (``[timestamp] step <name>``): the step column and the last column."""
    if not path.exists():
        if required:
            raise R2GenError(f"{path} not found; run `dvc repro` to produce the training history")
        return Series((), ())
    rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t") if r]
    try:
        step_col = rows[0].index("step")
        steps = tuple(int(r[step_col]) for r in rows[1:])
        values = tuple(float(r[-1]) for r in rows[1:])  # float() reads dvclive's nan/inf too
    except (IndexError, ValueError):
        raise R2GenError(f"{path} is not a dvclive history (step and value columns); run `dvc repro`") from None
    return Series(steps, values)


# ---------------------------------------------------------------------------------------- numbers
def throughput_ratio(samples_per_s: float | None, fp32_samples_per_s: float | None) -> float | None:
    """samples/s of a precision over fp32's (1.8 means 1.8x the throughput); None if unknown."""
    if samples_per_s is None or not fp32_samples_per_s:
        return None
    return samples_per_s / fp32_samples_per_s


def time_reduction(seconds: float | None, fp32_seconds: float | None) -> float | None:
    """1 - time / fp32's time (0.444 means 44.4% less time; negative means slower); None if unknown."""
    if seconds is None or not fp32_seconds:
        return None
    return 1.0 - seconds / fp32_seconds


def _batch_multiplier(train: dict, fp32: dict) -> float | None:
    """How many times fp32's batch would fit in fp32's memory at this precision (an estimate).

    Memory per sample = (peak - memory before training) / batch size; the ratio fp32 / p. Fixed
    costs (gradients, optimizer state) count as if they grew with the batch, so this understates
    the real multiplier.
    """
    def per_sample(t: dict) -> float | None:
        peak, batch = t.get("peak_memory_bytes"), t.get("batch_size")
        if peak is None or not batch:
            return None
        working = peak - (t.get("baseline_rss_bytes") or 0)
        return working / batch if working > 0 else None

    mine, ref = per_sample(train), per_sample(fp32)
    return ref / mine if mine and ref else None


def _derived(run: RunData) -> dict[str, dict]:
    """Per precision: the comparisons against fp32 and the image-blind baseline."""
    fp32 = run.train.get("fp32", {})
    base_f1 = run.baseline.get("CE_F1")
    out = {}
    for p in run.precisions:
        t, e = run.train[p], run.eval[p]
        peak, ref_peak = t.get("peak_memory_bytes"), fp32.get("peak_memory_bytes")
        out[p] = {
            "throughput_ratio": throughput_ratio(t.get("samples_per_s"), fp32.get("samples_per_s")),
            "time_reduction": time_reduction(t.get("train_seconds"), fp32.get("train_seconds")),
            "peak_ratio": peak / ref_peak if peak is not None and ref_peak else None,
            "batch_multiplier": _batch_multiplier(t, fp32) if fp32 else None,
            "ce_f1_margin": e["CE_F1"] - base_f1 if e.get("CE_F1") is not None and base_f1 is not None else None,
        }
    return out


def _test_studies(run: RunData) -> int | None:
    counts = [run.eval[p].get("test_studies") for p in run.precisions]
    return max((c for c in counts if c), default=None)


def _score_noise(run: RunData) -> float | None:
    """1/sqrt(n): about two standard errors of test-set sampling alone for a mean score in [0, 1]."""
    n = _test_studies(run)
    return 1.0 / math.sqrt(n) if n else None


# ---------------------------------------------------------------------------------------- formatting
def _known(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x, digits: int | None = None) -> str:
    """A number for a table: fixed ``digits`` when given, else 2 decimals (0 above 100, 3 below 1)."""
    if not _known(x):
        return "n/a"
    if digits is not None:
        return f"{x:.{digits}f}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def _signed(x, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if _known(x) else "n/a"


def _ratio(x) -> str:
    return f"{x:.2f}×" if _known(x) else "n/a"


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if _known(x) else "n/a"


def _bytes(x) -> str:
    if not _known(x):
        return "n/a"
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def _text(x) -> str:
    if x is None or x == "":
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, dict):
        return ", ".join(f"{k}={v}" for k, v in x.items()) or "n/a"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def _time_phrase(reduction: float | None) -> str:
    if not _known(reduction):
        return "training time vs fp32 n/a"
    if reduction >= 0:
        return f"{_pct(reduction)} less training time"
    return f"{_pct(-reduction)} more training time"


# ---------------------------------------------------------------------------------------- tables
def _environment(run: RunData) -> str:
    """Machine facts (one value when every run agrees, else per precision), then the setup of each."""
    def device_memory(t: dict) -> str:
        peak, frac = t.get("peak_memory_bytes"), t.get("peak_memory_fraction")
        return _bytes(peak / frac) if _known(peak) and _known(frac) and frac > 0 else "n/a"

    machine = [
        ("device", lambda t, e: f"{_text(t.get('device'))}: {_text(t.get('device_name'))}"),
        ("CUDA compute capability", lambda t, e: _text(t.get("compute_capability"))),
        ("CPU vector capability", lambda t, e: f"{_text(t.get('cpu_capability'))} (native bf16: "
                                                f"{_text(t.get('cpu_native_bf16'))}, native fp16: "
                                                f"{_text(t.get('cpu_native_fp16'))})"),
        ("device memory (peak ÷ fraction)", lambda t, e: device_memory(t)),
        ("torch / CUDA / Transformer Engine", lambda t, e: f"{_text(t.get('torch'))} / {_text(t.get('cuda'))} / "
                                                          f"{_text(t.get('transformer_engine'))}"),
        ("threads (train / eval)", lambda t, e: f"{_text(t.get('threads'))} / {_text(e.get('threads'))}"),
        ("fp32 matmul/conv mode", lambda t, e: _text(t.get("fp32_precision"))),
        ("generation (eval) precision", lambda t, e: f"{_text(e.get('eval_precision'))} "
                                                     f"({_text(e.get('eval_backend'))})"),
        ("r2gen version", lambda t, e: _text(t.get("r2gen_version"))),
    ]
    rows = []
    for name, get in machine:
        values = {p: get(run.train[p], run.eval[p]) for p in run.precisions}
        same = len(set(values.values())) == 1
        rows.append([name, next(iter(values.values())) if same
                     else "; ".join(f"{run.label(p)}: {v}" for p, v in values.items())])
    setup = []
    for p in run.precisions:
        t = run.train[p]
        fp8 = p == "fp8"
        setup.append([
            run.label(p), _text(t.get("backend")), _text(t.get("backend_reason")),
            "none" if "autocast_dtype" in t and t["autocast_dtype"] is None else _text(t.get("autocast_dtype")),
            _text(t.get("grad_scaler")),
            f"{_text(t.get('fp8_recipe'))}, {_text(t.get('fp8_format'))}" if fp8 else "—",
            f"{_text(t.get('fp8_linear_converted'))} of {_text(t.get('fp8_linear_total'))}" if fp8 else "—",
            _text(t.get("speed_comparable")), _text(t.get("note")),
        ])
    return (_table(["", "value"], rows) + "\n\n" +
            _table(["precision", "backend", "backend choice", "autocast dtype", "GradScaler", "fp8 recipe, format",
                    "FP8 Linear layers", "speed comparable", "note"], setup))


def _efficiency(run: RunData, derived: dict) -> str:
    eval_precisions = {run.eval[p].get("eval_precision") for p in run.precisions} - {None}
    gen = f"generation reports/s (at {'/'.join(sorted(eval_precisions)) or 'n/a'})"
    header = ["precision", "backend", "batch size", "epochs", "steps", "train time (s)", "samples/s",
              "throughput ratio vs fp32", "time reduction vs fp32", gen, "speed"]
    rows = []
    for p in run.precisions:
        t, d = run.train[p], derived[p]
        rows.append([run.label(p), _text(t.get("backend")), _text(t.get("batch_size")), _text(t.get("epochs")),
                     _text(t.get("steps")), _num(t.get("train_seconds"), 1), _num(t.get("samples_per_s")),
                     _ratio(d["throughput_ratio"]), _pct(d["time_reduction"]),
                     _num(run.eval[p].get("reports_per_s"), 3),
                     "measured" if run.speed_comparable(p) else SPEED_FLAG])
    return _table(header, rows)


def _memory(run: RunData, derived: dict) -> str:
    header = ["precision", "peak memory", "measured as", "fraction of device", "peak vs fp32",
              "memory before training", "batch multiplier vs fp32 (est.)", "note"]
    rows = []
    for p in run.precisions:
        t, d = run.train[p], derived[p]
        note = "emulated: memory of the emulation, not of FP8 storage" if run.emulated(p) else ""
        rows.append([run.label(p), _bytes(t.get("peak_memory_bytes")), _text(t.get("peak_memory_kind")),
                     _pct(t.get("peak_memory_fraction")), _ratio(d["peak_ratio"]),
                     _bytes(t.get("baseline_rss_bytes")), _ratio(d["batch_multiplier"]), note or "—"])
    return _table(header, rows)


def _quality(run: RunData, derived: dict) -> str:
    footnotes: dict[str, list[str]] = {}  # METEOR error -> the rows it applies to

    def scores(name: str, metrics: dict) -> list[str]:
        cells = []
        for key in NLG_KEYS + CE_KEYS:
            value = metrics.get(key)
            if key == "METEOR" and value is None:
                reason = _text(metrics.get("METEOR_error") or "no reason recorded")
                footnotes.setdefault(reason, []).append(name)
                cells.append(f"n/a [{list(footnotes).index(reason) + 1}]")
            else:
                cells.append(_num(value, 3))
        return cells

    header = ["precision", *NLG_KEYS, "CE precision", "CE recall", "CE F1", "CE F1 over baseline"]
    rows = [[run.label(p), *scores(run.label(p), run.eval[p]), _signed(derived[p]["ce_f1_margin"])]
            for p in run.precisions]
    base_name = f"image-blind baseline ({run.baseline.get('baseline', 'n/a')})"
    rows.append([base_name, *scores("baseline", run.baseline), "—"])
    notes = [f"[{i}] METEOR n/a for {', '.join(names)}: {reason}"
             for i, (reason, names) in enumerate(footnotes.items(), 1)]
    return _table(header, rows) + ("\n\n" + "\n".join(f"{n}  " for n in notes) if notes else "")


def _stability(run: RunData) -> str:
    header = ["precision", "train loss (last epoch)", "val loss", "test loss", "test loss vs fp32",
              "non-finite steps", "GradScaler skipped steps", "GradScaler final scale", "distinct reports"]
    ref = run.eval.get("fp32", {}).get("test_loss")
    rows = []
    for p in run.precisions:
        t, e = run.train[p], run.eval[p]
        loss = e.get("test_loss")
        rel = loss / ref - 1 if _known(loss) and _known(ref) and ref else None
        scaled = t.get("grad_scaler") is not False
        rows.append([run.label(p), _num(t.get("train_loss"), 4), _num(t.get("val_loss"), 4), _num(loss, 4),
                     f"{rel:+.1%}" if rel is not None else "n/a", _text(t.get("nonfinite_steps")),
                     _text(t.get("grad_scaler_skipped_steps")) if scaled else "off",
                     _num(t.get("grad_scaler_final_scale"), 0) if scaled else "off",
                     f"{_text(e.get('distinct_reports'))} of {_text(e.get('test_studies'))}"])
    return _table(header, rows)


# ---------------------------------------------------------------------------------------- conclusions
def _speed_findings(run: RunData, derived: dict) -> list[str]:
    measured = [p for p in run.precisions if run.speed_comparable(p) and _known(run.train[p].get("samples_per_s"))]
    excluded = [p for p in run.precisions if not run.speed_comparable(p)]
    found = []
    if not measured:
        found.append("No run here is a speed measurement, so no precision can be called fastest.")
    else:
        fastest = max(measured, key=lambda p: run.train[p]["samples_per_s"])
        sps = run.train[fastest]["samples_per_s"]
        others = [p for p in measured if p != fastest]
        if fastest == "fp32" and not others:
            found.append(f"**fp32 ({_num(sps)} samples/s) is the only speed measurement here**: no lower precision "
                         "ran with native kernels on this device, so none can be called faster or slower.")
        elif fastest == "fp32":
            found.append(f"**fp32 is the fastest** of the speed-comparable precisions here ({_num(sps)} samples/s); "
                         f"{', '.join(others)} did not beat it.")
        else:
            d = derived[fastest]
            found.append(f"**{fastest} is the fastest** precision here: {_num(sps)} samples/s, "
                         f"{_ratio(d['throughput_ratio'])} fp32's throughput and {_time_phrase(d['time_reduction'])}.")
        for p in others:
            if p != "fp32":
                d = derived[p]
                found.append(f"{p}: {_ratio(d['throughput_ratio'])} fp32's throughput, "
                             f"{_time_phrase(d['time_reduction'])}.")
        close = [p for p in measured if p != "fp32" and _known(derived[p]["throughput_ratio"])
                 and abs(derived[p]["throughput_ratio"] - 1) < TIMING_RULE]
        if close:
            found.append(f"{', '.join(close)} differ from fp32 by less than {TIMING_RULE:.0%} in throughput, "
                         "within run-to-run timing noise of one measurement.")
    if excluded:
        found.append(f"{', '.join(run.label(p) for p in excluded)}: {SPEED_FLAG}; "
                     "excluded from the speed comparison (their samples/s are shown, flagged, in the tables).")
    return found


def _memory_findings(run: RunData, derived: dict) -> list[str]:
    real = [p for p in run.precisions if not run.emulated(p) and _known(run.train[p].get("peak_memory_bytes"))]
    if not real:
        return []
    lowest = min(real, key=lambda p: run.train[p]["peak_memory_bytes"])
    kind = _text(run.train[lowest].get("peak_memory_kind"))
    parts = [f"{run.label(p)} {_bytes(run.train[p]['peak_memory_bytes'])}"
             + (f" ({_ratio(derived[p]['peak_ratio'])} fp32)" if p != "fp32" else "") for p in real]
    return [f"Lowest peak memory: **{run.label(lowest)}** ({kind}). Peaks: {'; '.join(parts)}."]


def _quality_findings(run: RunData, derived: dict) -> list[str]:
    noise, n = _score_noise(run), _test_studies(run)
    if noise is not None:
        found = [f"Single seed, {n} test studies: score differences below {_num(noise, 3)} (1/√n, about two "
                 "standard errors of test-set sampling alone) and test-loss differences below "
                 f"{LOSS_RULE:.0%} are not read as real; seed-to-seed variation comes on top."]
    else:
        found = ["Single seed, test-set size n/a: no quality difference here can be told from noise."]
    if "fp32" in run.precisions:
        ref = run.eval["fp32"]
        for p in run.precisions:
            if p == "fp32":
                continue
            e, parts, beyond = run.eval[p], [], []
            loss, ref_loss = e.get("test_loss"), ref.get("test_loss")
            if _known(loss) and _known(ref_loss) and ref_loss:
                rel = loss / ref_loss - 1
                parts.append(f"test loss {_num(loss, 4)} vs {_num(ref_loss, 4)} ({rel:+.1%})")
                if abs(rel) >= LOSS_RULE:
                    beyond.append(f"test loss {'higher' if rel > 0 else 'lower'}")
            for key in ("BLEU_4", "CE_F1"):
                if _known(e.get(key)) and _known(ref.get(key)):
                    diff = e[key] - ref[key]
                    parts.append(f"{key} {_signed(diff)}")
                    if noise is not None and abs(diff) >= noise:
                        beyond.append(f"{key} {'higher' if diff > 0 else 'lower'}")
            if not parts:
                found.append(f"{run.label(p)} vs fp32: quality n/a (metrics missing).")
                continue
            verdict = (f"beyond single-seed noise: {', '.join(beyond)}" if beyond
                       else "all within what a single seed can tell")
            found.append(f"{run.label(p)} vs fp32: {', '.join(parts)}; {verdict}.")
    margins = {p: derived[p]["ce_f1_margin"] for p in run.precisions if _known(derived[p]["ce_f1_margin"])}
    if margins:
        found.append("CE F1 over the image-blind baseline: "
                     + ", ".join(f"{run.label(p)} {_signed(m)}" for p, m in margins.items()) + ".")
        blind = [run.label(p) for p, m in margins.items() if m <= 0]
        close = [run.label(p) for p, m in margins.items() if noise is not None and 0 < m < noise]
        if blind:
            found.append(f"At or below the image-blind baseline: {', '.join(blind)}; these models write reports "
                         "no better than one that ignores the image.")
        if close:
            found.append(f"Above the baseline by less than {_num(noise, 3)} (not distinguishable with one seed "
                         f"and this test set): {', '.join(close)}.")
    return found


def _stability_findings(run: RunData) -> list[str]:
    found = []
    for p in run.precisions:
        t = run.train[p]
        if t.get("nonfinite_steps"):
            found.append(f"{run.label(p)} had {t['nonfinite_steps']} non-finite loss steps (skipped).")
        if t.get("grad_scaler") is not False and t.get("grad_scaler_final_scale") is not None:
            found.append(f"{run.label(p)}: GradScaler skipped {_text(t.get('grad_scaler_skipped_steps'))} steps, "
                         f"final loss scale {_num(t['grad_scaler_final_scale'], 0)}.")
    if not any(run.train[p].get("nonfinite_steps") for p in run.precisions):
        found.append("No precision produced a non-finite training loss.")
    return found


def conclusions(run: RunData) -> list[str]:
    """The findings, each one sentence computed from the numbers (no fixed text about which is best)."""
    derived = _derived(run)
    return [*_speed_findings(run, derived), *_memory_findings(run, derived),
            *_quality_findings(run, derived), *_stability_findings(run)]


# ---------------------------------------------------------------------------------------- figures
def _color(p: str, i: int) -> str:
    return COLORS.get(p, f"C{i}")


def _ema(values: Sequence[float], beta: float = 0.8) -> np.ndarray:
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
        color, s, v = _color(p, i), run.step_loss[p], run.val_loss[p]
        ax.plot(s.steps, s.values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(s.steps, _ema(s.values), color=color, linewidth=1.6, label=f"{run.label(p)} train")
        if v.steps:
            ax.scatter(v.steps, v.values, color=color, edgecolors="black", s=45, zorder=3,
                       label=f"{run.label(p)} val")
    ax.set(xlabel="optimizer step", ylabel="loss (token-mean NLL)", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    fig.savefig(path, dpi=110, metadata={"Software": None})


def _bar_figure(run: RunData, path: Path, values: dict[str, float | None], flagged: dict[str, bool],
                flag_text: str, ylabel: str, title: str, fmt) -> None:
    """Bars per precision; flagged ones hatched and labelled with ``flag_text``; missing ones "n/a"."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(run.precisions))
    top = max((v for v in values.values() if _known(v)), default=1.0) or 1.0
    for i, p in enumerate(run.precisions):
        v = values[p]
        if not _known(v):
            ax.text(i, 0.02 * top, "n/a", ha="center", va="bottom")
            continue
        ax.bar(i, v, color=_color(p, i), alpha=0.45 if flagged[p] else 0.9, edgecolor="black",
               hatch="//" if flagged[p] else None)
        ax.text(i, v + 0.01 * top, fmt(v) + (f"\n{flag_text}" if flagged[p] else ""), ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(x, [run.label(p).replace(" (", "\n(") for p in run.precisions])
    ax.set_ylim(0, top * 1.25)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110, metadata={"Software": None})


def _quality_figure(run: RunData, path: Path) -> None:
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, len(QUALITY_FIGURE_KEYS))
    ticks = [run.label(p).replace(" (", "\n(") for p in run.precisions]
    baseline_line = None
    for ax, key in zip(axes, QUALITY_FIGURE_KEYS):
        for i, p in enumerate(run.precisions):
            v = run.eval[p].get(key)
            if _known(v):
                ax.bar(i, v, color=_color(p, i), edgecolor="black", hatch="//" if run.emulated(p) else None)
            else:
                ax.text(i, 0, "n/a", ha="center", va="bottom")
        if _known(run.baseline.get(key)):
            baseline_line = ax.axhline(run.baseline[key], color="black", linestyle="--", linewidth=1.2)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
    if baseline_line is not None:
        fig.legend([baseline_line], ["image-blind baseline (most frequent training report)"],
                   loc="outside upper center", fontsize=8)
    fig.savefig(path, dpi=110, metadata={"Software": None})


def _write_figures(run: RunData, directory: Path) -> None:
    train = run.train
    _loss_figure(run, directory / "loss_curves.png")
    _bar_figure(run, directory / "throughput.png", {p: train[p].get("samples_per_s") for p in run.precisions},
                {p: not run.speed_comparable(p) for p in run.precisions}, "numerics only,\nnot speed",
                "samples/s (training)", "Training throughput", _num)
    _bar_figure(run, directory / "memory.png",
                {p: train[p]["peak_memory_bytes"] / 2**30 if _known(train[p].get("peak_memory_bytes")) else None
                 for p in run.precisions},
                {p: run.emulated(p) for p in run.precisions}, "emulated", "GiB",
                f"Peak memory ({_text(train[run.precisions[0]].get('peak_memory_kind'))})", lambda v: f"{v:.2f}")
    _quality_figure(run, directory / "quality.png")


# ---------------------------------------------------------------------------------------- the report
def headline_summary(run: RunData, headline: str) -> dict:
    """Flat headline metrics of one precision, for ``reports/summary.json`` and `dvc exp show`.

    Speed keys are null when the run is not a speed measurement (emulated or numerics only).
    """
    t, e, d = run.train[headline], run.eval[headline], _derived(run)[headline]
    speed = run.speed_comparable(headline)
    return {
        "precision": headline,
        "backend": t.get("backend"),
        "speed_comparable": speed,
        "train_loss": t.get("train_loss"),
        "val_loss": t.get("val_loss"),
        "test_loss": e.get("test_loss"),
        **{k: e.get(k) for k in NLG_KEYS + CE_KEYS},
        "CE_F1_over_baseline": d["ce_f1_margin"],
        "samples_per_s": t.get("samples_per_s") if speed else None,
        "throughput_ratio_vs_fp32": d["throughput_ratio"] if speed else None,
        "time_reduction_vs_fp32": d["time_reduction"] if speed else None,
        "train_seconds": t.get("train_seconds") if speed else None,
        "reports_per_s": e.get("reports_per_s"),
        "peak_memory_bytes": t.get("peak_memory_bytes"),
        "peak_memory_fraction": t.get("peak_memory_fraction"),
        "batch_size": t.get("batch_size"),
        "nonfinite_steps": t.get("nonfinite_steps"),
        "grad_scaler_skipped_steps": t.get("grad_scaler_skipped_steps"),
    }


def render_markdown(run: RunData, headline: str) -> str:
    """The full markdown report (figures referenced as ``figures/<name>.png``)."""
    derived = _derived(run)
    marked = [p for p in run.precisions if run.label(p) != p]
    legend = "".join(
        f"\n- **{run.label(p)}**: {_text(run.train[p].get('note'))}. Its samples/s are {SPEED_FLAG}." for p in marked)
    n = _test_studies(run)
    e0 = run.eval[run.precisions[0]]
    definitions = [
        "**throughput ratio vs fp32** = samples/s ÷ fp32's samples/s (steady state: the first warm-up steps "
        "are not timed); **time reduction vs fp32** = 1 − train time ÷ fp32's train time (all steps). "
        "Both are shown because they differ: 1.8× the throughput is 44.4% less time, not \"44% faster\".",
        "**batch multiplier vs fp32 (est.)** = fp32's memory per sample ÷ this precision's, with memory per "
        "sample = (peak − memory before training) ÷ batch size. Fixed costs are counted as if they grew with "
        "the batch, so it understates the multiplier; measure the largest batch before relying on it.",
        "**CE** = clinical efficacy: precision/recall/F1 of the observations a rule-based labeler finds in the "
        "generated vs the reference reports. **CE F1 over baseline** = CE F1 − the image-blind baseline's.",
        f"Every model generates at the same precision ({_text(e0.get('eval_precision'))}, beam "
        f"{_text(e0.get('num_beams'))}, at most {_text(e0.get('max_new_tokens'))} tokens), so quality "
        "differences come from the training precision.",
    ]
    parts = [
        f"# Precision comparison: R2Gen at {', '.join(run.precisions)}",
        f"Headline model (params `precision`): **{run.label(headline)}**. Single seed; {_text(n)} test studies. "
        "Every number below comes from `metrics/` and `dvclive/`; \"n/a\" means it was not recorded." + legend,
        "## Conclusions", "\n".join(f"- {c}" for c in conclusions(run)),
        "## Environment", _environment(run),
        "## Training efficiency", _efficiency(run, derived),
        "## Memory", _memory(run, derived),
        f"## Quality\n\n### Report quality on the test split ({_text(n)} studies)", _quality(run, derived),
        "### Losses and numerical stability", _stability(run),
        "## Figures", "\n\n".join(f"![{caption}](figures/{name})" for name, caption in FIGURES.items()),
        "## Definitions", "\n".join(f"- {d}" for d in definitions),
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
    with atomic_dir(out_dir / "figures") as tmp:
        _write_figures(run, tmp)
    write_text(out_dir / "precision_report.md", markdown)
    return headline_summary(run, headline)
