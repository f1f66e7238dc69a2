"""Model FLOPs utilisation of a training run: FLOPs per sample, achieved FLOP/s, and the peak it is measured against.

- **Model FLOPs per sample** are counted once per run (``r2gen.flops.count_flops``) on a forward and
  backward of the run's fp32 architecture built on the ``meta`` device, at the run's image size and
  the training split's median report length. Meta tensors have shapes and no data, so the count
  draws no random numbers, allocates nothing and leaves the training run untouched; and it is the
  same for every precision, as model FLOPs are by definition (an FP8 GEMM of an extension library,
  invisible to torch's counter, is still counted).
- **The peak** is per compute dtype (fp32 for fp32, the autocast dtype for fp16/bf16, fp8 for fp8).
  On CUDA: the dense datasheet figure of ``r2gen.flops.DENSE_PEAK_TFLOPS`` where the device is in
  the table, else the measured GEMM rate. On CPU: the measured GEMM rate at the run's thread count
  (``r2gen.flops.matmul_tflops``, a short probe at setup with the RNG state restored after it).
  Both sources are recorded.
- **No utilisation claim** where the run is not a speed measurement (emulated fp8, fp16/bf16
  without native CPU arithmetic, torchao on CPU): those rows get FLOPs and the reason instead.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from r2gen import flops
from r2gen.config import ModelConfig
from r2gen.model.r2gen import R2Gen
from r2gen.precision import PrecisionPlan

CPU_PROBE_N = 1024  # a 2 GFLOP product: tens of ms per repeat on 2 cores
CPU_PROBE_REPEATS = 5


@dataclass(frozen=True)
class Peak:
    """The peak a run's utilisation is measured against (``tflops`` None: no claim, see ``note``)."""

    dtype: str  # fp32 | fp16 | bf16 | fp8
    tflops: float | None
    source: str
    measured_tflops: float | None


def model_flops_per_sample(model: ModelConfig, vocab_size: int, views: int, image_size: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) of one sample of ``model``, counted on the meta device."""
    with torch.device("meta"):
        net = R2Gen(model, vocab_size)
        images = torch.zeros(2, views, image_size, image_size, dtype=torch.uint8)
        labels = torch.ones(2, seq_len, dtype=torch.long)
    net.train()

    def step() -> None:
        net(images, labels).loss.backward()

    return flops.flops_per_sample(step, batch=2)


def median_length(token_lists: list[torch.Tensor]) -> int:
    """The median length (tokens, with BOS/EOS) of a split's encoded reports."""
    return int(statistics.median(len(t) for t in token_lists)) if token_lists else 1


def peak_dtype(plan: PrecisionPlan) -> str:
    if plan.precision == "fp8":
        return "fp8"
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[plan.autocast_dtype]


def measure_peak(plan: PrecisionPlan, device_name: str) -> Peak:
    """The peak of ``plan``'s compute dtype on its device; the CPU's RNG (and CUDA's) is left as it was."""
    dtype = peak_dtype(plan)
    on_cuda = plan.device.type == "cuda"
    n, repeats = (4096, 10) if on_cuda else (CPU_PROBE_N, CPU_PROBE_REPEATS)
    with torch.random.fork_rng(devices=[plan.device] if on_cuda else []):
        probe = flops.matmul_tflops(dtype, plan.device, n=n, repeats=repeats)
    measured = probe.get("tflops")
    probe_text = (f"measured {n}x{n} {dtype} GEMM, median of {repeats}" if measured is not None
                  else f"{dtype} GEMM probe failed: {probe.get('error')}")
    sheet = flops.device_peak(device_name) if on_cuda else None
    if sheet is not None and sheet.tflops.get(dtype):
        return Peak(dtype, sheet.tflops[dtype], f"datasheet: {sheet.source}", measured)
    return Peak(dtype, measured, probe_text, measured)


def utilisation(flops_per_sample: float, samples_per_s: float | None, peak: Peak | None,
                speed_comparable: bool, note: str) -> dict:
    """The TrainSummary fields: FLOPs, achieved TFLOP/s and MFU, or the reason for no utilisation claim."""
    achieved = flops_per_sample * samples_per_s / 1e12 if samples_per_s else None
    fields = {"flops_per_sample": flops_per_sample, "achieved_tflops": achieved, "peak_tflops": None,
              "peak_dtype": None, "peak_source": None, "measured_peak_tflops": None, "mfu": None, "mfu_note": None}
    if not speed_comparable:
        fields["mfu_note"] = f"no utilisation claim: not a speed measurement ({note})"
        return fields
    if peak is None or peak.tflops is None or achieved is None:
        fields["mfu_note"] = "no utilisation claim: " + (peak.source if peak is not None else "no timed steps")
        return fields
    fields.update(peak_tflops=peak.tflops, peak_dtype=peak.dtype, peak_source=peak.source,
                  measured_peak_tflops=peak.measured_tflops, mfu=achieved / peak.tflops)
    return fields
