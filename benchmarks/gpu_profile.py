"""Where a training step's time goes: ``torch.profiler`` over a few steps, top operators and model parts.

Operators are ranked by self device time (CUDA kernels; on a CPU, self CPU time). Model parts
(visual extractor, encoder, Relational Memory, decoder layers, vocabulary head) are
``record_function`` ranges around their forward passes, so their time is the forward's only: the
backward of each part shows up under ``autograd::engine::evaluate_function: ...Backward`` operators.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

PARTS = ("visual", "att_embed", "encoder", "rm", "decoder_layers", "logit")  # attributes of R2Gen
RANGE_PREFIX = "part::"


@contextlib.contextmanager
def part_ranges(model: torch.nn.Module):
    """Wrap the forward of each part of R2Gen (each decoder layer on its own) in a profiler range."""
    handles, open_ranges = [], {}
    modules = []
    for name in PARTS:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.ModuleList):
            modules += [(f"{name}.{i}", m) for i, m in enumerate(module)]
        elif module is not None:
            modules.append((name, module))
    for name, module in modules:
        def pre(mod, args, name=name):
            open_ranges[name] = record_function(RANGE_PREFIX + name)
            open_ranges[name].__enter__()

        def post(mod, args, out, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _time_us(event, attribute: str) -> float:
    # torch >= 2.4 names it device_time; older releases cuda_time. Both are microseconds.
    for name in (attribute.replace("DEV", "device"), attribute.replace("DEV", "cuda")):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile_steps(runner, batch: int, steps: int, top: int = 15) -> dict:
    """Profile ``steps`` training steps of ``runner`` at ``batch``: top operators and model parts, per step."""
    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    feed = runner.batches(batch)
    runner.step(*next(feed))  # not profiled: the first call of the profiler's own setup
    with part_ranges(runner.model), profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step(*next(feed))
        if cuda:
            torch.cuda.synchronize(runner.device)
    events = prof.key_averages()

    def self_us(e) -> float:
        return _time_us(e, "self_DEV_time_total") if cuda else float(e.self_cpu_time_total)

    def total_us(e) -> float:
        return _time_us(e, "DEV_time_total") if cuda else float(e.cpu_time_total)

    host = [e for e in events if e.device_type == DeviceType.CPU]
    ops = [e for e in host if not e.key.startswith(RANGE_PREFIX)]
    # On CUDA the kernels are events of their own (device type CUDA) and their launching operators carry
    # the same time as self device time: the step's GPU time is the kernels' sum, not the operators'.
    kernels = [e for e in events if e.device_type != DeviceType.CPU and not e.key.startswith(RANGE_PREFIX)]
    whole = sum(self_us(e) for e in (kernels if cuda and kernels else ops)) or 1.0
    ranked = sorted(ops, key=self_us, reverse=True)[:top]
    parts = sorted((e for e in host if e.key.startswith(RANGE_PREFIX)), key=total_us, reverse=True)
    return {
        "clock": "self CUDA time" if cuda else "self CPU time (not a GPU measurement)",
        "steps": steps, "batch": batch, "total_ms_per_step": whole / 1000 / steps,
        "top_kernels": [{"name": e.key, "ms_per_step": self_us(e) / 1000 / steps, "share": self_us(e) / whole}
                        for e in sorted(kernels, key=self_us, reverse=True)[:top]] if cuda else [],
        "top_operators": [{"name": e.key, "ms_per_step": self_us(e) / 1000 / steps, "share": self_us(e) / whole,
                           "calls_per_step": e.count / steps} for e in ranked],
        "forward_parts": [{"name": e.key.removeprefix(RANGE_PREFIX), "ms_per_step": total_us(e) / 1000 / steps,
                           "share": total_us(e) / whole, "calls_per_step": e.count / steps} for e in parts],
    }
