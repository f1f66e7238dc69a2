"""The figures derived from the recorded ones, computed here and nowhere else.

Both reports use these: the single-run report on one run of every precision, the multi-seed report
inside each experiment (a ratio to fp32 is always taken against fp32 of the same run). Every
function returns None when an input is unknown (None, not a finite number) or the reference is 0.

- throughput ratio vs fp32 = samples/s of p / samples/s of fp32 (1.8 means 1.8x the throughput)
- time reduction vs fp32   = 1 - train seconds of p / train seconds of fp32 (1.8x the throughput is
  a 44.4% shorter time, not "44% faster"; negative means slower)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from r2gen.compare.runs import RunData


def known(x: Any) -> bool:
    """A finite number (not a bool, not None, not NaN/inf): what a table may show and a ratio may use."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ratio(value: Any, reference: Any) -> float | None:
    """``value / reference``."""
    return value / reference if known(value) and known(reference) and reference else None


def throughput_ratio(samples_per_s: float | None, fp32_samples_per_s: float | None) -> float | None:
    """samples/s of a precision over fp32's (1.8 means 1.8x the throughput); None if unknown."""
    return ratio(samples_per_s, fp32_samples_per_s)


def time_reduction(seconds: float | None, fp32_seconds: float | None) -> float | None:
    """1 - time / fp32's time (0.444 means 44.4% less time; negative means slower); None if unknown."""
    r = ratio(seconds, fp32_seconds)
    return None if r is None else 1.0 - r


def relative_change(value: float | None, reference: float | None) -> float | None:
    """``value / reference - 1``: the relative test loss vs fp32 (+0.05 is 5% higher)."""
    r = ratio(value, reference)
    return None if r is None else r - 1


def margin(value: float | None, reference: float | None) -> float | None:
    """``value - reference``: e.g. CE F1 over the image-blind baseline's."""
    return value - reference if known(value) and known(reference) else None


def per_sample_memory(peak_bytes: int | None, batch_size: int | None, before_bytes: int | None) -> float | None:
    """(peak - memory before training) / batch size; None if unknown or not positive."""
    if not known(peak_bytes) or not known(batch_size) or not batch_size:
        return None
    working = peak_bytes - (before_bytes or 0)
    return working / batch_size if working > 0 else None


def batch_multiplier(per_sample: float | None, fp32_per_sample: float | None) -> float | None:
    """How many times fp32's batch would fit in fp32's memory at this precision (an estimate).

    The ratio of the memory per sample, fp32 / p (:func:`per_sample_memory`). Fixed costs
    (gradients, optimizer state) count as if they grew with the batch, so this understates the
    real multiplier.
    """
    return ratio(fp32_per_sample, per_sample)


def samples_per_step(global_batch_size: int | None, batch_size: int | None) -> int | None:
    """Training samples per optimizer step: the global batch (all ranks) where recorded, else the batch."""
    return global_batch_size or batch_size


# ---------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class VsFp32:
    """One precision of a run against fp32 of the same run and the image-blind baseline (None: unknown)."""

    throughput_ratio: float | None
    time_reduction: float | None
    peak_ratio: float | None  # peak memory / fp32's
    batch_multiplier: float | None  # estimate, see batch_multiplier()
    test_loss_change: float | None  # test loss / fp32's - 1
    ce_f1_margin: float | None  # CE F1 - the baseline's


def vs_fp32(run: RunData) -> dict[str, VsFp32]:
    """Per precision of ``run``: its comparisons against fp32 and the image-blind baseline."""
    ref, ref_eval = run.train.get("fp32"), run.eval.get("fp32")
    out = {}
    for p in run.precisions:
        t, e = run.train[p], run.eval[p]
        out[p] = VsFp32(
            throughput_ratio=throughput_ratio(t.samples_per_s, ref.samples_per_s) if ref else None,
            time_reduction=time_reduction(t.train_seconds, ref.train_seconds) if ref else None,
            peak_ratio=ratio(t.peak_memory_bytes, ref.peak_memory_bytes) if ref else None,
            batch_multiplier=batch_multiplier(
                per_sample_memory(t.peak_memory_bytes, t.batch_size, t.baseline_rss_bytes),
                per_sample_memory(ref.peak_memory_bytes, ref.batch_size, ref.baseline_rss_bytes)) if ref else None,
            test_loss_change=relative_change(e.test_loss, ref_eval.test_loss) if ref_eval else None,
            ce_f1_margin=margin(e.CE_F1, run.baseline.CE_F1),
        )
    return out
