"""Number formats and markdown tables of both reports. An unknown value is shown as "n/a", never filled in.

The single-run report shows plain numbers (:func:`num`, :func:`times`, :func:`pct`, :func:`size`);
the multi-seed report shows ``mean ± std`` in a metric's unit (:func:`mean_std`, :func:`signed_unit`).
"""

from __future__ import annotations

from typing import Any

from r2gen.compare.derived import known
from r2gen.compare.stats import Stat

GIB, MIB = 2**30, 2**20


# ---------------------------------------------------------------------------------------- single values
def num(x: Any, digits: int | None = None) -> str:
    """A number for a table: fixed ``digits`` when given, else 2 decimals (0 above 100, 3 below 1)."""
    if not known(x):
        return "n/a"
    if digits is not None:
        return f"{x:.{digits}f}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def signed(x: Any, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if known(x) else "n/a"


def times(x: Any) -> str:
    """A ratio: ``1.80×``."""
    return f"{x:.2f}×" if known(x) else "n/a"


def pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if known(x) else "n/a"


def size(x: Any) -> str:
    """Bytes as GiB (from 1 GiB) or MiB."""
    if not known(x):
        return "n/a"
    return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / MIB:.0f} MiB"


def text(x: Any) -> str:
    """Any recorded value: yes/no for a bool, ``k=v, ...`` for a mapping, "n/a" for None or empty."""
    if x is None or x == "":
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, dict):
        return ", ".join(f"{k}={v}" for k, v in x.items()) or "n/a"
    return str(x)


def time_phrase(reduction: float | None) -> str:
    """``44.4% less training time`` / ``56.8% more training time``."""
    if not known(reduction):
        return "training time vs fp32 n/a"
    if reduction >= 0:
        return f"{pct(reduction)} less training time"
    return f"{pct(-reduction)} more training time"


# ---------------------------------------------------------------------------------------- values with a unit
def plain(x: float) -> str:
    return f"{x:.4g}"


def unit_value(x: float, unit: str, digits: int | None = None) -> str:
    """``x`` in ``unit``: bytes (GiB), ratio (×), fraction (%) or a plain number."""
    if unit == "bytes":
        return f"{x / GIB:.3f} GiB"
    if unit == "ratio":
        return f"{x:.2f}×"
    if unit == "fraction":
        return f"{100 * x:.1f}%"
    if digits is not None:
        return f"{x:,.{digits}f}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def mean_std(stat: Stat | None, unit: str, digits: int | None = None) -> str:
    """``mean ± std`` (a lone value without ±)."""
    if stat is None:
        return "n/a"
    if stat.std is None:
        return unit_value(stat.mean, unit, digits)
    if unit == "ratio":  # the spread of a ratio is not a ratio
        return f"{stat.mean:.2f}× ± {stat.std:.2f}"
    if unit == "fraction":
        return f"{100 * stat.mean:.1f}% ± {100 * stat.std:.1f} pts"
    if unit == "bytes":
        return f"{stat.mean / GIB:.3f} ± {stat.std / GIB:.3f} GiB"
    return f"{unit_value(stat.mean, unit, digits)} ± {unit_value(stat.std, unit, digits)}"


def signed_unit(x: float, unit: str) -> str:
    """A difference in ``unit``: ``+0.012 GiB``, ``+1.5 pts``, ``-0.03``."""
    if unit == "bytes":
        return f"{x / GIB:+.3f} GiB"
    if unit == "fraction":
        return f"{100 * x:+.1f} pts"
    return f"{x:+.4g}"


# ---------------------------------------------------------------------------------------- tables
def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; ``|`` in a cell is escaped and a newline becomes a space."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
