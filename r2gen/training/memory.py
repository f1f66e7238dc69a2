"""What training records as its memory: the process's RSS before the loop and the peak of the run."""

from __future__ import annotations

import os
import resource

import torch


def rss_bytes() -> int:
    """The resident set of this process now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: torch.device) -> tuple[int, int, str]:
    """(peak bytes, device total bytes, what was measured)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return torch.cuda.max_memory_allocated(device), total, "torch.cuda.max_memory_allocated"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total, "peak RSS of the process"


def reset_peak(device: torch.device) -> None:
    """Start the peak of :func:`peak_memory` now (CUDA): what ran before (the batch probe) is not training's.

    On CPU the peak RSS of a process cannot be reset; the batch probe runs in other processes there.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
