"""``fp8_layers.json``: the FP8 layer probe's table (r2gen.fp8_stats), written by training, read by the report.

Torch-free, so the report reads it without importing the model code. One row per converted Linear
and probed epoch: ``epoch`` (1-based), ``step``, ``layer``, ``<slot>_<field>`` for the slots
``input``, ``weight`` (E4M3) and ``grad_output`` (E5M2) and the fields ``amax``, ``scale``,
``underflow``, ``saturation``, and ``gemm_rel_error``.
"""

from __future__ import annotations

import json
from pathlib import Path

from r2gen.errors import DataError
from r2gen.io import atomic_open


def write_table(path: Path, rows: list[dict], plan: dict) -> None:
    """``fp8_layers.json``: the rows (one per layer and probed epoch) and the backend that produced them."""
    table = {"backend": plan["backend"], "fp8_recipe": plan["fp8_recipe"], "fp8_format": plan["fp8_format"],
             "speed_comparable": plan["speed_comparable"], "note": plan["note"],
             "epochs": sorted({r["epoch"] for r in rows}), "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(table, f, indent=1, allow_nan=True)


def read_table(path: Path) -> dict:
    """The table :func:`write_table` wrote; a file that is not one is a one-line DataError."""
    try:
        table = json.loads(Path(path).read_text())
        if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
            raise ValueError("no rows")
        return table
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not an FP8 layer table ({exc}); rerun `dvc repro` to rewrite it") from None


def worst_layers(rows: list[dict], key: str = "gemm_rel_error", n: int = 5) -> list[dict]:
    """The ``n`` rows with the largest ``key`` (the layers that lose most), largest first."""
    return sorted((r for r in rows if key in r), key=lambda r: r[key], reverse=True)[:n]

