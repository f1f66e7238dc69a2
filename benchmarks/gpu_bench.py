"""The measuring half of ``make gpu-check``: every precision's training step timed, its memory, loss, FLOPs and profile.

One :class:`Runner` per precision holds a freshly seeded R2Gen (``r2gen.model``), its optimizer and
GradScaler, converted by ``r2gen.precision`` exactly as training does, and runs training's own
step (``r2gen.training.step.train_step``). Input is synthetic and the same for every precision: a
small pool of random uint8 studies and random reports of the full length, cycled, so the loss after
N steps compares numerics (the model learns the token marginals), not report quality.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from r2gen import flops
from r2gen import precision as prec
from r2gen.config import Params
from r2gen.model.r2gen import R2Gen
from r2gen.training.batchsize import OutOfMemory, find_max_batch
from r2gen.training.state import seed_everything
from r2gen.training.step import build_optimizer, train_step

FP8_BACKEND = "auto"  # whatever r2gen.precision's auto picks (TE, torchao where available, else emulated)
MEMORY_FRACTION = 0.85  # max batch: the step's reserved peak within this share of the GPU (context, fragmentation)


@dataclass(frozen=True)
class Size:
    """How big and how long: the paper profile on a GPU, a tiny one for the CPU test."""

    name: str
    model: dict = field(default_factory=dict)  # ModelConfig fields; defaults are the paper's
    image_size: int = 224
    views: int = 2  # IU X-Ray: frontal + lateral
    max_len: int = 60  # report length in tokens, BOS included (R2Gen's max_seq_length)
    vocab: int = 760  # about IU X-Ray's vocabulary at R2Gen's threshold 3
    batch: int = 16  # R2Gen's batch size: the "equal" batch
    warmup: int = 5  # untimed steps (cuDNN autotuning, allocator, TE amax history)
    steps: int = 20  # timed steps
    profile_steps: int = 3  # steps under torch.profiler
    max_limit: int = 1024  # the largest batch the search tries
    max_resolution: int = 32  # the search stops within this many studies of the largest that fits
    max_steps: int = 5  # timed steps at the largest batch
    matmul_n: int = 8192
    pool: int = 2  # distinct synthetic batches, cycled


SIZES = {
    "paper": Size("paper"),
    "tiny": Size("tiny", model=dict(visual_extractor="resnet10", visual_width=8, d_model=32, d_ff=32, num_heads=4,
                                    num_layers=1, rm_num_heads=4, rm_d_model=32),
                 image_size=32, max_len=8, vocab=40, batch=2, warmup=1, steps=3, profile_steps=1, max_limit=4,
                 max_resolution=1, max_steps=2, matmul_n=512),
}


def params_of(size: Size, seed: int) -> Params:
    """R2Gen's paper optimiser (params.yaml's ``paper:`` comments) around the size's model."""
    return Params.from_dict({"seed": seed, "data": {"image_size": size.image_size},
                             "tokenizer": {"max_seq_length": size.max_len}, "model": size.model},
                            source=f"gpu-check size {size.name}")


def synthetic_batch(size: Size, batch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random studies (B, V, S, S) uint8 and full-length reports (B, T), the same for every precision."""
    g = torch.Generator().manual_seed(1000 + index)
    images = torch.randint(0, 256, (batch, size.views, size.image_size, size.image_size), dtype=torch.uint8,
                           generator=g)
    labels = torch.randint(1, size.vocab, (batch, size.max_len), generator=g)
    labels[:, 0] = 0  # BOS
    return images, labels


class Runner:
    """One precision's model, optimizer and scaler, stepping on the synthetic pool."""

    def __init__(self, size: Size, precision: str, device: torch.device, seed: int):
        self.size, self.device = size, device
        self.params = params_of(size, seed)
        self.plan = prec.resolve(precision, FP8_BACKEND if precision == "fp8" else "auto", device, "delayed")
        prec.set_fp32_numerics(device)
        seed_everything(seed)
        self.model = R2Gen(self.params.model, size.vocab).to(device)
        self.conversion = prec.convert_model(self.model, self.plan)
        self.optimizer, _ = build_optimizer(self.model, self.params.train.common)
        self.scaler = self.plan.grad_scaler()
        self.model.train()
        self.steps_run = 0
        self._pool: dict[int, list] = {}

    def batches(self, batch: int):
        if batch not in self._pool:
            self._pool = {batch: [tuple(t.to(self.device) for t in synthetic_batch(self.size, batch, i))
                                  for i in range(self.size.pool)]}  # one batch size on the device at a time
        return itertools.cycle(self._pool[batch])

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Training's step, always updating (no non-finite skipping: a benchmark times full steps)."""
        loss = train_step(self.model, images, labels, self.optimizer, self.scaler, self.plan,
                          self.params.train.common.grad_clip_value, skip_nonfinite=False).loss
        if self.steps_run == 0:
            prec.verify_fp8(self.model, self.plan)  # an "fp8" row that did not run FP8 layers is an error
        self.steps_run += 1
        return loss

    def timed(self, batch: int, warmup: int, steps: int) -> dict:
        """``warmup`` untimed steps, then ``steps`` timed ones: samples/s, losses, peak memory of the timed steps."""
        feed = self.batches(batch)
        warm = [self.step(*next(feed)) for _ in range(warmup)]
        _synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        losses, marks = [], [time.perf_counter()]
        for _ in range(steps):
            losses.append(self.step(*next(feed)))  # float(loss): one host sync per step, as in training
            marks.append(time.perf_counter())
        _synchronize(self.device)
        seconds = time.perf_counter() - marks[0]
        return {"batch": batch, "warmup_steps": warmup, "timed_steps": steps, "seconds": seconds,
                "samples_per_s": batch * steps / seconds, "step_ms": 1000 * seconds / steps,
                "step_ms_each": [1000 * (b - a) for a, b in zip(marks, marks[1:])],
                "warmup_losses": warm, "losses": losses, "final_loss": losses[-1], **memory(self.device)}


def memory(device: torch.device) -> dict:
    """Peak memory since the last reset: the CUDA allocator's allocated and reserved, or the process's RSS."""
    if device.type == "cuda":
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
                "device_total_bytes": torch.cuda.get_device_properties(device).total_memory,
                "memory_kind": "torch.cuda max_memory_allocated / max_memory_reserved of the timed steps"}
    from r2gen.training.memory import peak_memory

    peak, total, kind = peak_memory(device)
    return {"peak_allocated_bytes": peak, "peak_reserved_bytes": None, "device_total_bytes": total,
            "memory_kind": f"{kind} (whole process, since start: not per precision)"}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- largest batch
def largest_batch(runner: Runner) -> dict:
    """The largest batch (within ``max_resolution``) whose two steps' reserved peak fits the GPU budget.

    CUDA: doubling from the equal batch, then bisection (``r2gen.training.batchsize.find_max_batch``),
    each probe after ``empty_cache`` and a peak reset; an OOM is "does not fit". CPU: a process's
    memory cannot be probed in-process, so the search only exercises the code up to ``max_limit``.
    """
    size, device = runner.size, runner.device
    cuda = device.type == "cuda"
    budget = int(MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory) if cuda else 1

    def try_batch(batch: int) -> int:
        failure = None
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            feed = runner.batches(batch)
            for _ in range(2):  # the second step runs with Adam's state allocated
                runner.step(*next(feed))
            _synchronize(device)
        except torch.OutOfMemoryError as exc:
            failure = (str(exc).splitlines() or ["CUDA out of memory"])[0][:200]
        runner._pool = {}
        if failure is not None:  # an OOM between unscale_ and update would leave the scaler refusing the next step
            runner.scaler = runner.plan.grad_scaler()
        if cuda:
            torch.cuda.empty_cache()  # outside the handler: its traceback would keep the step's tensors
        if failure is not None:
            raise OutOfMemory(failure)
        return torch.cuda.max_memory_reserved(device) if cuda else 0

    start = time.perf_counter()
    result = find_max_batch(try_batch, budget, size.batch, size.max_limit, resolution=size.max_resolution)
    return {"batch": result.batch, "limited_by": result.limited_by, "budget_bytes": budget if cuda else None,
            "probes": [{"batch": p.batch, "peak_reserved_bytes": p.peak_bytes if cuda else None, "fits": p.fits,
                        "note": p.note} for p in result.probes],
            "search_seconds": time.perf_counter() - start,
            "method": (f"CUDA: reserved peak of 2 steps <= {MEMORY_FRACTION:.0%} of the GPU, OOM = does not fit"
                       if cuda else "CPU: not measured in-process; the search runs up to its limit (code path only)")}


# ------------------------------------------------------------------------------------- FLOPs, GEMM peak
def model_flops_per_sample(size: Size, device: torch.device, seed: int) -> float:
    """Training FLOPs per study of the fp32 model (forward + backward; model FLOPs do not depend on precision)."""
    runner = Runner(size, "fp32", device, seed)
    images, labels = next(runner.batches(2))
    return flops.flops_per_sample(lambda: runner.step(images, labels), batch=2)


def matmul_peaks(size: Size, device: torch.device) -> dict:
    """Measured GEMM TFLOP/s per precision on this device (fp32 with TF32 off)."""
    prec.set_fp32_numerics(device)
    return {p: flops.matmul_tflops(p, device, n=size.matmul_n, repeats=10 if device.type == "cuda" else 2)
            for p in flops.PEAK_PRECISIONS}
