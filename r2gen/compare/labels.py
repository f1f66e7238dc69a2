"""Which runs are speed measurements, and the name every table and figure gives a precision.

Two kinds of run are never presented as speed: an *emulated* one (FP8 numerics in software,
``backend: emulated``) and a *numerics-only* one (``speed_comparable: false``, e.g. fp16 autocast on
a CPU without native fp16 arithmetic). Both reports mark them by name, ``fp8 (emulated)`` and
``fp16 (numerics only)``, and show :data:`SPEED_FLAG` where a speed number would be.
"""

from __future__ import annotations

SPEED_FLAG = "numerics only — not a speed measurement"
EMULATED = "emulated"  # the backend of an emulated run (r2gen.precision)


def speed_comparable(backend: str | None, comparable: bool | None) -> bool:
    """False for an emulated run and for one recorded with ``speed_comparable: false``."""
    return backend != EMULATED and comparable is not False


def label(precision: str, emulated: bool, numerics_only: bool) -> str:
    """``fp8 (emulated)``, ``fp16 (numerics only)`` or the plain name."""
    if emulated:
        return f"{precision} ({EMULATED})"
    if numerics_only:
        return f"{precision} (numerics only)"
    return precision


def tick(label_text: str) -> str:
    """A label on two lines for an axis tick: ``fp8\\n(emulated)``."""
    return label_text.replace(" (", "\n(")
