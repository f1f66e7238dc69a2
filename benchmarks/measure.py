"""Benchmark profiles and the measuring instruments: clocks, machine load, peak memory, FLOPs, GEMM peak.

Nothing here imports r2gen: a worker process first puts the checkout it measures on ``sys.path``
(see :mod:`benchmarks.worker`), and only then imports that checkout's r2gen.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


@dataclass(frozen=True)
class Profile:
    """One benchmark configuration: model, data and how much to time."""

    name: str
    model: dict = field(default_factory=dict)  # r2gen ModelConfig fields (defaults are the paper's)
    image_size: int = 224  # model input side (R2Gen: 224)
    source_size: int = 256  # side of the synthetic PNGs both implementations read
    studies: int = 120  # synthetic IU X-Ray studies (70/10/20 % train/val/test)
    batch_size: int = 16
    num_beams: int = 3
    max_len: int = 60  # R2Gen's max_seq_length: generation steps and target length
    warmup_steps: int = 2  # training steps before the clock starts
    train_steps: int = 3  # timed training steps per run
    gen_batches: int = 1  # timed generation batches per run (after a one-study warm-up)
    matmul_n: int = 2048  # side of the GEMM that measures the machine's peak

    @property
    def reference_ok(self) -> bool:
        """The public code hard-wires torchvision ResNets (base width 64) and 224 px (AvgPool2d(7))."""
        return (self.model.get("visual_width", 64) == 64 and self.image_size == 224
                and self.model.get("visual_extractor", "resnet101") != "resnet10")

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    # Seconds, for the tests: a toy model on 32 px images.
    "tiny": Profile("tiny", model=dict(visual_extractor="resnet10", visual_width=8, d_model=32, d_ff=32,
                                       num_heads=4, num_layers=1, rm_num_heads=4, rm_d_model=32),
                    image_size=32, source_size=40, studies=12, batch_size=2, max_len=8,
                    warmup_steps=1, train_steps=2, matmul_n=256),
    # params.yaml's sample profile at R2Gen's batch, beam and length: minutes on a CPU.
    "sample": Profile("sample", model=dict(visual_extractor="resnet10", visual_width=8, d_model=64, d_ff=64,
                                           num_heads=4, num_layers=2, rm_num_heads=4, rm_d_model=64),
                      image_size=64, source_size=128, warmup_steps=3, train_steps=5),
    # The paper's model (ResNet101, d_model 512, 3 layers) at 224 px.
    "paper": Profile("paper"),
    # The paper's Transformer on a ResNet18 (d_vf 512).
    "resnet18": Profile("resnet18", model=dict(visual_extractor="resnet18")),
}


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads and use one inter-op thread (results depend on the count)."""
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already fixed once parallel work ran in this process
            pass


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker process: the same thread count for OpenMP, MKL and oneDNN."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- machine load
def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent busy by all processes since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as fh:
            return [float(v) for v in fh.read().split()[:3]]
    except OSError:
        return None


class LoadMonitor:
    """What else ran on the machine while a measurement ran.

    ``other_cores`` is the CPU time of every other process divided by the wall time, in cores: on a
    2-core machine measured at 1 thread, ~0 is a quiet machine and ~1 a busy neighbour.
    """

    def __enter__(self) -> "LoadMonitor":
        self.load_before = loadavg()
        self._busy = _busy_cpu_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        own = time.process_time() - self._own
        busy = _busy_cpu_seconds()
        self.record = {
            "loadavg_before": self.load_before,
            "loadavg_after": loadavg(),
            "wall_seconds": wall,
            "own_cpu_seconds": own,
            "other_cores": (None if busy is None or self._busy is None or wall <= 0
                            else max(0.0, (busy - self._busy - own) / wall)),
        }


# ------------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(peak bytes, what was measured): the CUDA allocator's peak, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"


# ------------------------------------------------------------------------------------- FLOPs
def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel SDPA dispatches to.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def count_flops(fn) -> tuple[int, object]:
    """(FLOPs of the matmuls, convolutions and attention that ``fn()`` runs, its return value).

    A multiply-add counts as 2 FLOPs; elementwise ops, norms and the optimizer are not counted
    (they are memory-bound and small next to the GEMMs).
    """
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        out = fn()
    return counter.get_total_flops(), out


# ------------------------------------------------------------------------------------- GEMM peak
def seconds(fn, device: torch.device = torch.device("cpu")) -> float:
    """Wall seconds of ``fn()``, with the device's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu",
                max_seconds: float = 20.0) -> dict:
    """Achieved GFLOP/s of an n x n x n matmul at the current thread count (median of ``repeats``).

    A 256-side product first estimates the rate, and ``n`` is halved until ``repeats`` products
    fit in ``max_seconds``: on a CPU without fast kernels for ``dtype`` (bf16 on AVX2) a 2048
    product takes tens of seconds.
    """
    dev = torch.device(device)

    def operands(side: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(side, side, device=dev).to(dtype), torch.randn(side, side, device=dev).to(dtype)

    probe = min(n, 256)
    a, b = operands(probe)
    a @ b  # warm-up: kernel selection, page faults
    rate = 2 * probe**3 / max(seconds(lambda: a @ b, dev), 1e-9)  # FLOP/s
    while n > 128 and 2 * n**3 / rate * repeats > max_seconds:
        n //= 2
    a, b = operands(n)
    a @ b
    runs = [seconds(lambda: a @ b, dev) for _ in range(repeats)]
    gflops = [2 * n**3 / s / 1e9 for s in runs]
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "gflops": statistics.median(gflops),
            "runs": gflops}
