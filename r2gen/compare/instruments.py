"""The precision report's instrument sections: model FLOPs utilisation and FP8 per-layer numerics.

MFU comes from ``metrics/train/<p>.json`` (r2gen/training/mfu.py); a run that is not a speed
measurement shows its FLOPs and the recorded reason for no utilisation figure. The FP8 section
reads ``dvclive/train/<p>/fp8_layers.json`` (r2gen.fp8_table) and lists, at the last probed epoch,
the layers whose FP8 GEMM output is furthest from the fp32 GEMM, with the fractions of their
inputs, weights and output gradients that flushed to zero or saturated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from r2gen.compare import fmt
from r2gen.fp8_table import worst_layers

if TYPE_CHECKING:
    from r2gen.compare.runs import RunData

WORST = 5  # layers listed as "lose most"
SLOT_LABELS = (("input", "E4M3"), ("weight", "E4M3"), ("grad_output", "E5M2"))


def mfu_section(run: RunData) -> str:
    """One row per precision: model FLOPs per sample, achieved rate, the peak and its source, MFU."""
    header = ["precision", "model GFLOP per sample", "achieved GFLOP/s", "peak (dtype)", "MFU", "peak source / note"]
    rows = []
    for p in run.precisions:
        t = run.train[p]
        peak = f"{fmt.num(t.peak_tflops * 1e3)} GFLOP/s ({t.peak_dtype})" if t.peak_tflops else "—"
        achieved = fmt.num(t.achieved_tflops * 1e3) if t.achieved_tflops is not None else "n/a"
        rows.append([run.label(p), fmt.num(t.flops_per_sample / 1e9, 4), achieved, peak,
                     fmt.pct(t.mfu) if t.mfu is not None else "no claim",
                     fmt.text(t.peak_source if t.mfu is not None else t.mfu_note)])
    return (fmt.table(header, rows) + "\n\nModel FLOPs are the matmuls, convolutions and attention of one "
            "training sample's forward and backward (torch.utils.flop_counter on the fp32 architecture; the same "
            "for every precision); achieved = FLOPs per sample x samples/s; MFU = achieved / peak of the run's "
            "compute dtype. On CPU the peak is a GEMM measured at the run's thread count, so MFU there is the "
            "share of this machine's own attainable GEMM rate.")


def fp8_section(run: RunData) -> str:
    """Per precision with an FP8 layer table: what was probed, and the layers that lose most."""
    parts = []
    for p in run.precisions:
        table = run.fp8_layers.get(p)
        if not table:
            continue
        last = max(table["epochs"])
        rows = [r for r in table["rows"] if r["epoch"] == last]
        kind = "emulated" if table["backend"] == "emulated" else table["backend"]
        parts.append(
            f"**{run.label(p)}** ({kind}, {fmt.text(table['fp8_recipe'])} scaling, {fmt.text(table['fp8_format'])}): "
            f"{len(rows)} FP8 Linear layers probed on the first step of epochs {', '.join(map(str, table['epochs']))} "
            f"(`dvclive/train/{p}/fp8_layers.json`, figure `fp8_layers.png`). Layers that lose most at epoch {last}:")
        header = ["layer", "GEMM rel. error vs fp32", *(f"{s} underflow ({f})" for s, f in SLOT_LABELS),
                  *(f"{s} saturation" for s, _ in SLOT_LABELS)]
        body = [[f"`{r['layer']}`", fmt.num(r.get("gemm_rel_error"), 3),
                 *(_share(r.get(f"{s}_underflow")) for s, _ in SLOT_LABELS),
                 *(_share(r.get(f"{s}_saturation")) for s, _ in SLOT_LABELS)]
                for r in worst_layers(rows, n=WORST)]
        parts.append(fmt.table(header, body))
        parts.append(_most_lost(rows, last))
    if not parts:
        return "No run wrote an FP8 layer table (only fp8 runs do; rerun `dvc repro` if an fp8 run predates it)."
    return "\n\n".join(parts + [
        "Underflow: nonzero elements that became zero in the format; saturation: elements whose scaled magnitude "
        "exceeded the format's largest value (448 E4M3, 57344 E5M2); the scale is the one the backend used in that "
        "step. The GEMM error compares the layer's real output with the same GEMM in fp32 on the same input."])


def _share(x) -> str:
    """A fraction of elements as a percentage with two decimals (0.01% of a 1M-element tensor is 100)."""
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "n/a"


def _most_lost(rows: list[dict], epoch: int) -> str:
    """One line: the layers with the largest share of elements flushed to zero or saturated, any slot."""
    lost = []
    for r in rows:
        share, slot, kind = max((r.get(f"{s}_{k}", 0.0), s, k) for s, _ in SLOT_LABELS for k in ("underflow", "saturation"))
        if share > 0:
            lost.append((share, r["layer"], slot, kind))
    if not lost:
        return f"No element of any probed tensor flushed to zero or saturated at epoch {epoch}."
    top = ", ".join(f"`{layer}` ({slot} {kind} {_share(share)})" for share, layer, slot, kind in sorted(lost, reverse=True)[:3])
    return f"Most elements lost at epoch {epoch}: {top}."
