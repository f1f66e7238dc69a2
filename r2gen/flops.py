"""Model FLOPs and the device's peak: what model FLOPs utilisation (MFU) is measured against.

- :func:`count_flops` / :func:`flops_per_sample`: the FLOPs of the matmuls, convolutions and
  attention that a real call runs (``torch.utils.flop_counter``; a multiply-add is 2 FLOPs; what the
  backward needs is counted as it runs, so a first layer whose input needs no gradient costs
  forward + weight-gradient only). Elementwise ops, norms and the optimizer are not counted.
  Count on the fp32 model: model FLOPs do not depend on the precision, and FP8 GEMMs of extension
  libraries (Transformer Engine) are invisible to the counter.
- :data:`DENSE_PEAK_TFLOPS` / :func:`device_peak`: vendor datasheet peaks per precision, dense
  (the datasheets' headline tensor figures assume 2:4 sparsity: halved here). fp32 is the
  non-tensor FP32 peak because our fp32 runs with TF32 off (``precision.set_fp32_numerics``).
  fp8's peak is the FP8 tensor peak although only the converted Linears run in FP8.
- :func:`matmul_tflops`: a measured GEMM rate per precision on this device (the achievable peak).
- :func:`mfu`: achieved model FLOP/s over a peak.

    step = lambda: train_step(model, images, labels, optimizer, scaler, plan, clip)
    per_sample = flops_per_sample(step, batch=len(images))
    peak = device_peak(torch.cuda.get_device_name())          # None for an unknown device
    print(mfu(per_sample, samples_per_s, peak.tflops["bf16"]))  # 0.0-1.0
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

PEAK_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak TFLOP/s of one device per precision (None: no such tensor cores) and where it is from."""

    device: str
    tflops: dict[str, float | None]
    source: str


# Dense (no sparsity) peaks, TFLOP/s. fp16/bf16/fp8 are tensor-core figures with FP32 accumulation
# (what autocast and FP8 training use); fp32 is the CUDA-core FP32 figure (TF32 off).
DENSE_PEAK_TFLOPS: dict[str, DevicePeak] = {p.device: p for p in (
    # NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column: FP32 67; BF16/FP16 1,979 and FP8 3,958
    # "with sparsity", halved.
    DevicePeak("H200 SXM", {"fp32": 67.0, "fp16": 989.5, "bf16": 989.5, "fp8": 1979.0},
               "NVIDIA H200 datasheet, H200 SXM: FP32 67; FP16/BF16 1979 and FP8 3958 TFLOPS with sparsity, halved"),
    # Same datasheet, H200 NVL column: FP32 60; BF16/FP16 1,671, FP8 3,341 with sparsity.
    DevicePeak("H200 NVL", {"fp32": 60.0, "fp16": 835.5, "bf16": 835.5, "fp8": 1670.5},
               "NVIDIA H200 datasheet, H200 NVL: FP32 60; FP16/BF16 1671 and FP8 3341 TFLOPS with sparsity, halved"),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67; BF16/FP16 1,979, FP8 3,958 with sparsity.
    DevicePeak("H100 SXM", {"fp32": 67.0, "fp16": 989.5, "bf16": 989.5, "fp8": 1979.0},
               "NVIDIA H100 datasheet, H100 SXM: FP32 67; FP16/BF16 1979 and FP8 3958 TFLOPS with sparsity, halved"),
    # Same datasheet, H100 NVL column: FP32 60; BF16/FP16 1,671, FP8 3,341 with sparsity.
    DevicePeak("H100 NVL", {"fp32": 60.0, "fp16": 835.5, "bf16": 835.5, "fp8": 1670.5},
               "NVIDIA H100 datasheet, H100 NVL: FP32 60; FP16/BF16 1671 and FP8 3341 TFLOPS with sparsity, halved"),
    # H100 PCIe (H100 datasheet, 2022 edition): FP32 51; BF16/FP16 1,513, FP8 3,026 with sparsity.
    DevicePeak("H100 PCIe", {"fp32": 51.0, "fp16": 756.5, "bf16": 756.5, "fp8": 1513.0},
               "NVIDIA H100 datasheet (2022), H100 PCIe: FP32 51; FP16/BF16 1513 and FP8 3026 TFLOPS with sparsity, halved"),
    # NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5; BF16/FP16 312 (624 with sparsity); no FP8.
    DevicePeak("A100", {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0, "fp8": None},
               "NVIDIA A100 datasheet (SXM and PCIe): FP32 19.5; FP16/BF16 312 TFLOPS dense; no FP8 tensor cores"),
    # NVIDIA L4 datasheet: FP32 30.3; BF16/FP16 242, FP8 485 with sparsity.
    DevicePeak("L4", {"fp32": 30.3, "fp16": 121.0, "bf16": 121.0, "fp8": 242.5},
               "NVIDIA L4 datasheet: FP32 30.3; FP16/BF16 242 and FP8 485 TFLOPS with sparsity, halved"),
    # NVIDIA Ada Lovelace architecture whitepaper (v2.1), appendix table for the RTX 4090: FP32 82.6;
    # FP16/BF16 tensor with FP32 accumulate 165.2; FP8 with FP32 accumulate 330.3 (dense figures; GeForce
    # runs FP32 accumulation at half the FP16-accumulate rate).
    DevicePeak("RTX 4090", {"fp32": 82.6, "fp16": 165.2, "bf16": 165.2, "fp8": 330.3},
               "NVIDIA Ada whitepaper, RTX 4090: FP32 82.6; FP16/BF16 165.2 and FP8 330.3 TFLOPS dense, FP32 accumulate"),
    # RTX 4070: not in the whitepaper's table. The 4090's per-SM rates (whitepaper) x the 4070's 46 SMs at its
    # 2.475 GHz boost clock (NVIDIA product page: 5888 CUDA cores): FP32 29.1 (the product page's "29 shader
    # TFLOPS"), FP16/BF16 58.3, FP8 116.6; 4 x 116.6 = the product page's 466 "AI TOPS" (FP8, sparse, FP16 acc.).
    DevicePeak("RTX 4070", {"fp32": 29.1, "fp16": 58.3, "bf16": 58.3, "fp8": 116.6},
               "derived: Ada whitepaper per-SM rates of the RTX 4090 x 46 SMs x 2.475 GHz (RTX 4070 product page); "
               "dense, FP32 accumulate"),
)}

# torch.cuda.get_device_name() -> table key; the first match wins (NVL and PCIe before the SXM default).
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bH200\b.*\bNVL\b", "H200 NVL"), (r"\bH200\b", "H200 SXM"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"), (r"\bH100\b.*\bPCIe\b", "H100 PCIe"), (r"\bH100\b", "H100 SXM"),
    (r"\bA100\b", "A100"), (r"\bL4\b", "L4"),
    (r"\bRTX 4090\b(?! ?D)", "RTX 4090"), (r"\bRTX 4070\b(?! ?(Ti|SUPER))", "RTX 4070"),
)


def device_peak(device_name: str) -> DevicePeak | None:
    """The datasheet peaks of a device by its ``torch.cuda.get_device_name()``; None when not in the table.

    ``NVIDIA GeForce RTX 4070 Ti`` or ``... SUPER`` are other chips and are not matched.
    """
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return DENSE_PEAK_TFLOPS[key]
    return None


def mfu(flops_per_sample: float, samples_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over ``peak_tflops`` (None without a peak)."""
    if not peak_tflops or flops_per_sample <= 0 or samples_per_s <= 0:
        return None
    return flops_per_sample * samples_per_s / (peak_tflops * 1e12)


# ------------------------------------------------------------------------------------- counting
def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                        **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel SDPA dispatches to.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    """(FLOPs of the matmuls, convolutions and attention that ``fn()`` runs, its return value)."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        out = fn()
    return counter.get_total_flops(), out


def flops_per_sample(step: Callable[[], object], batch: int) -> float:
    """FLOPs of one call of ``step`` (e.g. a training step: forward, backward, update) per sample of ``batch``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    total, _ = count_flops(step)
    return total / batch


# ------------------------------------------------------------------------------------- GEMM probe
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemm(precision: str, n: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """An ``n x n x n`` product in ``precision``: fp8 through ``torch._scaled_mm`` (E4M3, unit scales)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    if precision == "fp32":
        return lambda: a @ b
    if precision in ("fp16", "bf16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        a16, b16 = a.to(dtype), b.to(dtype)
        return lambda: a16 @ b16
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()  # b column-major
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def matmul_tflops(precision: str, device: str | torch.device = "cpu", n: int = 4096, repeats: int = 10) -> dict:
    """Measured TFLOP/s of an ``n x n x n`` product in ``precision`` (median of ``repeats`` after 3 warm-ups).

    fp32 runs at whatever fp32 mode is set (call ``precision.set_fp32_numerics`` first for IEEE fp32).
    Returns ``{"precision", "n", "tflops", "runs"}``, or ``{"precision", "n", "error"}`` where the
    product cannot run here (e.g. ``_scaled_mm`` below compute capability 8.9).
    """
    if precision not in PEAK_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}, must be one of: {', '.join(PEAK_PRECISIONS)}")
    device = torch.device(device)
    try:
        gemm = _gemm(precision, n, device)
        for _ in range(3):
            gemm()
        runs = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            gemm()
            _synchronize(device)
            runs.append(2 * n**3 / max(time.perf_counter() - start, 1e-9) / 1e12)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return {"precision": precision, "n": n, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"precision": precision, "n": n, "tflops": statistics.median(runs), "runs": runs}
