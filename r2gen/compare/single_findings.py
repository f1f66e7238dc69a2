"""The conclusions of the precision report: each one sentence computed from the numbers.

No fixed text says which precision is best. With one seed there is no variance estimate, so the
rules of thumb of :mod:`r2gen.compare.stats` (score noise 1/√n, ``LOSS_RULE``, ``TIMING_RULE``)
are stated next to each use.
"""

from __future__ import annotations

from r2gen.compare import fmt
from r2gen.compare.derived import VsFp32, known, margin, vs_fp32
from r2gen.compare.labels import SPEED_FLAG
from r2gen.compare.runs import RunData
from r2gen.compare.stats import LOSS_RULE, TIMING_RULE, score_noise


def conclusions(run: RunData, derived: dict[str, VsFp32] | None = None) -> list[str]:
    """The findings on speed, memory, quality and stability (``derived``: :func:`vs_fp32` of ``run``)."""
    derived = derived if derived is not None else vs_fp32(run)
    return [*_speed_findings(run, derived), *_memory_findings(run, derived),
            *_quality_findings(run, derived), *_stability_findings(run)]


def _speed_findings(run: RunData, derived: dict[str, VsFp32]) -> list[str]:
    measured = [p for p in run.precisions if run.speed_comparable(p) and known(run.train[p].samples_per_s)]
    excluded = [p for p in run.precisions if not run.speed_comparable(p)]
    found = []
    if not measured:
        found.append("No run here is a speed measurement, so no precision can be called fastest.")
    else:
        fastest = max(measured, key=lambda p: run.train[p].samples_per_s)
        sps = run.train[fastest].samples_per_s
        others = [p for p in measured if p != fastest]
        if fastest == "fp32" and not others:
            found.append(f"**fp32 ({fmt.num(sps)} samples/s) is the only speed measurement here**: no lower "
                         "precision ran with native kernels on this device, so none can be called faster or slower.")
        elif fastest == "fp32":
            found.append(f"**fp32 is the fastest** of the speed-comparable precisions here ({fmt.num(sps)} "
                         f"samples/s); {', '.join(others)} did not beat it.")
        else:
            d = derived[fastest]
            found.append(f"**{fastest} is the fastest** precision here: {fmt.num(sps)} samples/s, "
                         f"{fmt.times(d.throughput_ratio)} fp32's throughput and {fmt.time_phrase(d.time_reduction)}.")
        for p in others:
            if p != "fp32":
                d = derived[p]
                found.append(f"{p}: {fmt.times(d.throughput_ratio)} fp32's throughput, "
                             f"{fmt.time_phrase(d.time_reduction)}.")
        close = [p for p in measured if p != "fp32" and known(derived[p].throughput_ratio)
                 and abs(derived[p].throughput_ratio - 1) < TIMING_RULE]
        if close:
            found.append(f"{', '.join(close)} differ from fp32 by less than {TIMING_RULE:.0%} in throughput, "
                         "within run-to-run timing noise of one measurement.")
    if excluded:
        found.append(f"{', '.join(run.label(p) for p in excluded)}: {SPEED_FLAG}; "
                     "excluded from the speed comparison (their samples/s are shown, flagged, in the tables).")
    return found


def _memory_findings(run: RunData, derived: dict[str, VsFp32]) -> list[str]:
    real = [p for p in run.precisions if not run.emulated(p) and known(run.train[p].peak_memory_bytes)]
    if not real:
        return []
    lowest = min(real, key=lambda p: run.train[p].peak_memory_bytes)
    kind = fmt.text(run.train[lowest].peak_memory_kind)
    parts = [f"{run.label(p)} {fmt.size(run.train[p].peak_memory_bytes)}"
             + (f" ({fmt.times(derived[p].peak_ratio)} fp32)" if p != "fp32" else "") for p in real]
    return [f"Lowest peak memory: **{run.label(lowest)}** ({kind}). Peaks: {'; '.join(parts)}."]


def _vs_fp32_quality(run: RunData, p: str, rel: float | None, noise: float | None) -> str:
    """One precision's test loss, BLEU-4 and CE F1 against fp32's, and which differences exceed the noise."""
    e, ref = run.eval[p], run.eval["fp32"]
    parts, beyond = [], []
    if rel is not None:
        parts.append(f"test loss {fmt.num(e.test_loss, 4)} vs {fmt.num(ref.test_loss, 4)} ({rel:+.1%})")
        if abs(rel) >= LOSS_RULE:
            beyond.append(f"test loss {'higher' if rel > 0 else 'lower'}")
    for key in ("BLEU_4", "CE_F1"):
        diff = margin(getattr(e, key), getattr(ref, key))
        if diff is not None:
            parts.append(f"{key} {fmt.signed(diff)}")
            if noise is not None and abs(diff) >= noise:
                beyond.append(f"{key} {'higher' if diff > 0 else 'lower'}")
    if not parts:
        return f"{run.label(p)} vs fp32: quality n/a (metrics missing)."
    verdict = (f"beyond single-seed noise: {', '.join(beyond)}" if beyond
               else "all within what a single seed can tell")
    return f"{run.label(p)} vs fp32: {', '.join(parts)}; {verdict}."


def _quality_findings(run: RunData, derived: dict[str, VsFp32]) -> list[str]:
    n = run.test_studies
    noise = score_noise(n)
    if noise is not None:
        found = [f"Single seed, {n} test studies: score differences below {fmt.num(noise, 3)} (1/√n, about two "
                 "standard errors of test-set sampling alone) and test-loss differences below "
                 f"{LOSS_RULE:.0%} are not read as real; seed-to-seed variation comes on top."]
    else:
        found = ["Single seed, test-set size n/a: no quality difference here can be told from noise."]
    if "fp32" in run.precisions:
        found += [_vs_fp32_quality(run, p, derived[p].test_loss_change, noise) for p in run.precisions if p != "fp32"]
    margins = {p: derived[p].ce_f1_margin for p in run.precisions if known(derived[p].ce_f1_margin)}
    if margins:
        found.append("CE F1 over the image-blind baseline: "
                     + ", ".join(f"{run.label(p)} {fmt.signed(m)}" for p, m in margins.items()) + ".")
        blind = [run.label(p) for p, m in margins.items() if m <= 0]
        close = [run.label(p) for p, m in margins.items() if noise is not None and 0 < m < noise]
        if blind:
            found.append(f"At or below the image-blind baseline: {', '.join(blind)}; these models write reports "
                         "no better than one that ignores the image.")
        if close:
            found.append(f"Above the baseline by less than {fmt.num(noise, 3)} (not distinguishable with one seed "
                         f"and this test set): {', '.join(close)}.")
    return found


def _stability_findings(run: RunData) -> list[str]:
    found = []
    for p in run.precisions:
        t = run.train[p]
        if t.nonfinite_steps:
            found.append(f"{run.label(p)} had {t.nonfinite_steps} non-finite loss steps (skipped).")
        if t.grad_scaler is not False and t.grad_scaler_final_scale is not None:
            found.append(f"{run.label(p)}: GradScaler skipped {fmt.text(t.grad_scaler_skipped_steps)} steps, "
                         f"final loss scale {fmt.num(t.grad_scaler_final_scale, 0)}.")
    if not any(run.train[p].nonfinite_steps for p in run.precisions):
        found.append("No precision produced a non-finite training loss.")
    return found
