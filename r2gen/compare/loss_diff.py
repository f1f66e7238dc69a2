"""The loss-curve part of ``r2gen check-metrics --md``: baseline vs workspace training loss per precision.

The histories are dvclive's ``train/loss`` of each precision (:func:`r2gen.layout.step_history`), read
through ``read(path) -> text | None`` so that the baseline side can come from git (``git show
REV:PATH``) and the workspace side from files. The result is a figure (dashed: baseline, solid:
workspace, one colour per precision, smoothed as in the precision report) and a small table of the
last smoothed loss on each side; a precision with no history on a side says so in the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from r2gen import layout
from r2gen.compare import fmt
from r2gen.compare.dvclive import Series, parse_tsv
from r2gen.compare.figures import ema, write_loss_diff_figure

Reader = Callable[[str], "str | None"]


def load_losses(read: Reader, precisions: Sequence[str], live: str = layout.LIVE) -> dict[str, Series]:
    """``{precision: train/loss history}`` of the precisions that have one on this side."""
    out = {}
    for p in precisions:
        path = layout.step_history(layout.live_run(p, live), "loss").as_posix()
        text = read(path)
        if text is not None:
            rows = parse_tsv(text, path, "regenerate it with `dvc repro`")
            out[p] = Series(tuple(s for s, _ in rows), tuple(v for _, v in rows))
    return out


def _last(series: Series | None) -> float | None:
    if series is None or not series.values:
        return None
    return float(ema(series.values)[-1])


def loss_diff_markdown(base: dict[str, Series], work: dict[str, Series], precisions: Sequence[str], base_name: str,
                       figure: Path | None) -> str:
    """The markdown section; ``figure`` (written here when given and a history exists) is linked by its name,
    relative to the markdown file beside it (``cml comment create`` uploads such images)."""
    rows = []
    for p in precisions:
        b, w = base.get(p), work.get(p)
        old, new = _last(b), _last(w)
        same = b is not None and w is not None and b == w
        change = "identical history" if same else \
            f"{new - old:+.4f}" if old is not None and new is not None else "n/a"
        rows.append([p, fmt.num(old, 4) if b else "no history", fmt.num(new, 4) if w else "no history", change,
                     f"{len(b.steps) if b else 0} / {len(w.steps) if w else 0}"])
    parts = [f"#### Training loss: baseline `{base_name}` vs workspace",
             fmt.table(["precision", "last smoothed loss, baseline", "workspace", "change", "steps (baseline / workspace)"],
                       rows)]
    if figure is not None and (base or work):
        write_loss_diff_figure(base, work, precisions, figure)
        parts.append(f"![Training loss per step: baseline (dashed) vs workspace (solid)](./{figure.name})")
    elif figure is not None:
        parts.append("No loss history on either side: no figure.")
    parts.append(f"Interactive overlay of every declared plot: `dvc plots diff {base_name} --open`.")
    return "\n\n".join(parts)
