"""How busy the host was while a run was timed: the other processes' share of its CPUs.

A CPU timing taken while other jobs run measures them as much as us (a loaded 2-core host slowed
fp16 and bf16 by 3x). The meter reads the host's busy CPU time (``/proc/stat``) and this process's
own CPU time (``time.process_time``, all threads) over the same window; the difference is what
other processes used. Divided by the host's capacity (wall seconds x CPUs) it is ``other_cpu_share``
in the training summary: 0 on a quiet host, 1 when the others kept every CPU busy. The metrics gate
compares speed only between runs whose share stayed under ``r2gen.gate.BUSY_HOST``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat cpu line: user nice system [idle iowait] irq softirq steal


def host_busy_seconds() -> float | None:
    """CPU seconds all processes of the host have used since boot, or None where /proc/stat is absent."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    try:
        ticks = sum(int(fields[1 + i]) for i in _BUSY_FIELDS if 1 + i < len(fields))
    except ValueError:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class HostLoad:
    """Accumulates the other processes' CPU time and the host's capacity over timed windows."""

    other_seconds: float = 0.0  # CPU seconds of the other processes
    capacity_seconds: float = 0.0  # wall seconds x CPUs of the host
    available: bool = True  # False once a reading failed (no /proc/stat): the share is then unknown
    _start: tuple[float, float, float] | None = None

    def start(self) -> None:
        host = host_busy_seconds()
        if host is None:
            self.available = False
            return
        self._start = (host, time.process_time(), time.perf_counter())

    def stop(self) -> None:
        if self._start is None:
            return
        host, own, wall = host_busy_seconds(), time.process_time(), time.perf_counter()
        if host is None:
            self.available = False
            return
        host0, own0, wall0 = self._start
        self._start = None
        # Ticks are 10 ms: a short window can read less host time than our own; never below zero.
        self.other_seconds += max(0.0, (host - host0) - (own - own0))
        self.capacity_seconds += (wall - wall0) * (os.cpu_count() or 1)

    @property
    def other_share(self) -> float | None:
        """The other processes' share of the host's CPUs over the windows (0..1), or None if unknown."""
        if not self.available or self.capacity_seconds <= 0:
            return None
        return round(min(1.0, self.other_seconds / self.capacity_seconds), 4)
