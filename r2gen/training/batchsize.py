"""The largest batch that fits a memory budget, and the learning rate to train it with.

``batch_mode: max`` trains every precision at the largest batch whose training step stays within
``memory_budget``. :func:`find_max_batch` finds it with a short probe: starting from ``start`` it
doubles the batch while a step fits, then bisects between the last batch that fitted and the first
that did not. Each probe runs real training steps (forward, backward, optimizer step, twice, so
that Adam's state exists as it does in steady state) on worst-case input: every report at the
maximum length, so no batch of the real data needs more.

How a probe measures a step's peak memory:

- CUDA (:func:`cuda_try_batch`): the whole search runs in one child process
  (:func:`cuda_probe_in_child`), never in the training process: under DDP the probe then runs no
  collective on rank 0 alone while the other ranks wait (Transformer Engine's delayed scaling
  all-reduces amaxes over the world group whenever a process group exists), and TE's process-wide
  FP8 state and the allocator of the training process never see the probe's model. In the child,
  ``torch.cuda.reset_peak_memory_stats`` before each step and ``torch.cuda.max_memory_reserved``
  after it: reserved, not allocated, so the allocator's cached and fragmented blocks count; an
  allocation that fails is ``torch.OutOfMemoryError``.
- CPU (:func:`subprocess_try_batch`): a process's peak RSS cannot be reset, and the allocator keeps
  freed memory, so an in-process measurement after a larger batch would report that batch's memory.
  Every probe therefore runs in a fresh Python process and reports that process's own peak RSS
  (the quantity the training summary records as ``peak_memory_bytes`` on CPU). A probe process the
  kernel kills (its OOM killer) counts as "does not fit". Each probe costs a process start, an
  import of torch and a kernel warm-up: 10-30 s on our 2-core machines.

What a batch must fit (:func:`budget_bytes`, :func:`ddp_overhead_bytes`): on CUDA, 90% of the memory
the training process finds free before the probe (``torch.cuda.mem_get_info``: its CUDA context,
NCCL's communicator and other processes' memory are not free), or ``memory_budget_gb`` if lower.
Under DDP a probe's step builds training's :class:`~r2gen.distributed.SyncedBatchNorm2d` (which keeps
an fp32 copy of what it normalises) and adds what DDP allocates beside the step: its gradient
buckets (a copy of every gradient) and, on CUDA, a reserve for NCCL's buffers.

A larger batch means fewer optimizer steps per epoch; :func:`scaled_lr` rescales the learning rate
for it (the rules and the default are documented there).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from r2gen import precision as prec
from r2gen.config import ModelConfig, TrainCommon, TrainPrecision, TrainSpec, from_dict, to_dict
from r2gen.distributed import World, sync_batch_norms
from r2gen.errors import ConfigError, R2GenError
from r2gen.model.r2gen import R2Gen
from r2gen.training.state import TrainState
from r2gen.training.step import build_optimizer, train_step

log = logging.getLogger(__name__)

LR_RULES: tuple[str, ...] = ("none", "linear", "sqrt")
DEFAULT_LR_RULE = "sqrt"
PROBE_STEPS = 2  # the second step runs with Adam's state allocated by the first, as every later step does
PROBE_RESOLUTION = 8  # the probed batch is within 8 of the exact largest (and GPU-friendly bisection points)
CUDA_USABLE = 0.9  # of the free memory: cuBLAS/cuDNN workspaces and the allocator's rounding need the rest
# NCCL's buffers live outside torch's allocator: NCCL_BUFFSIZE (4 MiB) per channel and peer, plus its
# communicator's workspace; a few hundred MiB on one node of up to 8 GPUs.
NCCL_RESERVE_BYTES = 512 * 2**20
# torchrun's variables: a probe process must not believe it is a rank of the training job.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


class OutOfMemory(Exception):
    """A probe step that could not allocate its memory (or whose process was killed for it)."""


@dataclass(frozen=True)
class Probe:
    """One probed batch size: its peak memory (None when it ran out of memory) and the verdict."""

    batch: int
    peak_bytes: int | None
    fits: bool
    note: str = ""  # why it did not fit, e.g. the out-of-memory message

    def line(self, budget_bytes: int) -> str:
        peak = "out of memory" if self.peak_bytes is None else f"peak {_gib(self.peak_bytes)}"
        verdict = "fits" if self.fits else "does not fit"
        return f"batch {self.batch}: {peak} | {verdict} (budget {_gib(budget_bytes)})" + (
            f" | {self.note}" if self.note else "")


@dataclass(frozen=True)
class ProbeResult:
    """The largest batch that fits, how it was found, and what limited it."""

    batch: int
    budget_bytes: int
    limit: int
    probes: tuple[Probe, ...]  # in the order they ran

    @property
    def peaks(self) -> dict[int, int | None]:
        """Measured peak bytes per probed batch (None: out of memory)."""
        return {p.batch: p.peak_bytes for p in self.probes}

    @property
    def limited_by(self) -> str:
        """``limit`` when the batch reached ``limit`` still within budget, else ``budget``."""
        return "limit" if self.batch == self.limit else "budget"

    def summary(self) -> str:
        """One line for the training summary: ``budget 1.00 GiB | 16: 0.78 GiB fits | 32: ...``."""
        def one(p: Probe) -> str:
            return f"{p.batch}: {'out of memory' if p.peak_bytes is None else _gib(p.peak_bytes)} " \
                   f"{'fits' if p.fits else 'does not fit'}"
        return " | ".join([f"budget {_gib(self.budget_bytes)}", *map(one, self.probes)])

    def to_dict(self) -> dict:
        """JSON-safe form (what a probe process answers)."""
        return {"batch": self.batch, "budget_bytes": self.budget_bytes, "limit": self.limit,
                "probes": [asdict(p) for p in self.probes]}

    @classmethod
    def from_dict(cls, raw: dict) -> "ProbeResult":
        return cls(raw["batch"], raw["budget_bytes"], raw["limit"], tuple(Probe(**p) for p in raw["probes"]))

    def log_lines(self) -> list[str]:
        return [p.line(self.budget_bytes) for p in self.probes] + [
            f"largest batch within budget: {self.batch} ({self.limited_by}-limited; "
            f"{len(self.probes)} probes)"]


def find_max_batch(try_batch: Callable[[int], int], budget_bytes: int, start: int, limit: int,
                   *, resolution: int = 1) -> ProbeResult:
    """The largest batch in ``[start, limit]`` whose step's peak memory is within ``budget_bytes``.

    Doubles from ``start`` while ``try_batch`` fits, then bisects between the last batch that fitted
    and the first that did not, until they are ``resolution`` apart (8 keeps GPU batches multiples
    of 8 apart; 1 finds the exact largest). Assumes memory grows with the batch, which holds for a
    training step.

    Args:
        try_batch: runs a training step at batch ``b`` and returns its peak memory in bytes; may
            raise :class:`OutOfMemory`, ``MemoryError`` or ``torch.OutOfMemoryError`` instead.
        budget_bytes: the most memory a step may use (same quantity as ``try_batch`` returns).
        start: the first batch tried; it must fit.
        limit: the largest batch worth trying (e.g. the training split's size).

    Raises:
        R2GenError: even ``start`` does not fit, or the arguments are not positive and ordered.
    """
    if budget_bytes <= 0 or start < 1 or limit < start or resolution < 1:
        raise R2GenError(f"batch-size probe needs budget > 0 and 1 <= start <= limit, got budget {budget_bytes}, "
                         f"start {start}, limit {limit}, resolution {resolution}")
    probes: list[Probe] = []

    def fits(batch: int) -> bool:
        try:
            peak, note = try_batch(batch), ""
        except (OutOfMemory, MemoryError, torch.OutOfMemoryError) as exc:
            peak, note = None, (str(exc).splitlines() or ["out of memory"])[0][:200]
        ok = peak is not None and peak <= budget_bytes
        probes.append(Probe(batch, peak, ok, note))
        return ok

    if not fits(start):
        first = probes[0]
        needed = "ran out of memory" if first.peak_bytes is None else f"needs {_gib(first.peak_bytes)}"
        raise R2GenError(f"batch-size probe: even batch {start} {needed}, over the memory budget of "
                         f"{_gib(budget_bytes)}; raise train.common.memory_budget_gb or lower "
                         "train.<precision>.batch_size in params.yaml")
    good, bad = start, None
    while good < limit:  # double while it fits
        batch = min(2 * good, limit)
        if fits(batch):
            good = batch
        else:
            bad = batch
            break
    while bad is not None and bad - good > resolution:  # bisect (good fits, bad does not)
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return ProbeResult(good, budget_bytes, limit, tuple(probes))


def scaled_lr(base_lr: float, base_batch: int, batch: int, rule: str = DEFAULT_LR_RULE) -> float:
    """The learning rate for ``batch``, given one tuned for ``base_batch``.

    Rules (``k = batch / base_batch``):

    - ``none``: ``base_lr``, unchanged.
    - ``linear``: ``base_lr * k``. The linear scaling rule for SGD (Goyal et al. 2017, "Accurate,
      Large Minibatch SGD: Training ImageNet in 1 Hour").
    - ``sqrt``: ``base_lr * sqrt(k)``. The square-root rule (Krizhevsky 2014, "One weird trick for
      parallelizing convolutional neural networks"; Hoffer et al. 2017), shown by Malladi et al.
      (NeurIPS 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms") to be the
      rule that keeps Adam's and RMSprop's dynamics when the batch grows.

    ``sqrt`` is the default because R2Gen trains with Adam: its update size is normalised by the
    gradient's second moment, so linear scaling overshoots; the noise of the gradient estimate
    falls as ``1/sqrt(batch)``, which the square root compensates.

    Raises:
        ConfigError: an unknown rule or a non-positive batch.
    """
    if rule not in LR_RULES:
        raise ConfigError(f"unsupported train.common.lr_scaling '{rule}', must be one of: {', '.join(LR_RULES)}")
    if base_batch < 1 or batch < 1:
        raise ConfigError(f"learning-rate scaling needs positive batch sizes, got {base_batch} and {batch}")
    k = batch / base_batch
    return {"none": base_lr, "linear": base_lr * k, "sqrt": base_lr * math.sqrt(k)}[rule]


# ---------------------------------------------------------------------------------------- our model
@dataclass(frozen=True)
class ProbeSpec:
    """What a probe's training step reads: the model, the optimizer, the precision, the input shape.

    A CPU probe process receives exactly this, as JSON (:meth:`to_dict`), not the whole config.
    """

    precision: str
    seed: int
    threads: int
    views: int  # views per study (data.dataset)
    image_size: int  # data.image_size
    max_seq_length: int  # tokenizer.max_seq_length: every probed report is this long
    model: ModelConfig
    common: TrainCommon
    train: TrainPrecision  # train.<precision>
    ddp: bool = False  # training runs under DDP: SyncedBatchNorm2d and DDP's buffers are part of a step

    @classmethod
    def of(cls, spec: TrainSpec, ddp: bool = False) -> "ProbeSpec":
        return cls(spec.precision, spec.seed, spec.threads, spec.data.views, spec.data.image_size,
                   spec.tokenizer.max_seq_length, spec.model, spec.common, spec.train, ddp)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ProbeSpec":
        return from_dict(cls, raw, source="batch-size probe request")

    def plan(self, device: torch.device | str) -> prec.PrecisionPlan:
        """The precision plan of a probe process (the training process hands in its own)."""
        return prec.resolve(self.precision, self.train.backend, device, self.train.fp8_recipe)


@dataclass
class ProbeStep:
    """``step(batch)``: runs a probe's training steps at ``batch``; holds the probe's model."""

    model: torch.nn.Module
    run: Callable[[int], None]

    def __call__(self, batch: int) -> None:
        self.run(batch)

    @property
    def gradient_bytes(self) -> int:
        """Bytes of the gradients of every trainable parameter (what DDP's buckets copy)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)


def r2gen_step(spec: ProbeSpec, vocab_size: int, plan: prec.PrecisionPlan,
               steps: int = PROBE_STEPS) -> ProbeStep:
    """A function ``step(batch)`` that runs ``steps`` training steps of R2Gen under ``plan``.

    The model, optimizer and GradScaler are built here, as :mod:`r2gen.training` builds them (under
    ``spec.ddp`` with training's :class:`~r2gen.distributed.SyncedBatchNorm2d`, whose sums stay in
    this process: a probe has no process group), and live as long as the returned step. Each step
    is training's :func:`~r2gen.training.step.train_step` (forward, zero_grad, backward, unscale,
    clip, step), so the gradients of the previous step are alive during the next forward, as in
    training. Input is random: uint8 views at ``data.image_size`` and reports of
    ``tokenizer.max_seq_length`` tokens without padding, the longest any batch can hold.
    """
    if vocab_size < 2:
        raise R2GenError(f"batch-size probe needs a vocabulary of at least 2 ids, got {vocab_size}")
    device = plan.device
    prec.set_fp32_numerics(device)
    torch.manual_seed(spec.seed)
    model = R2Gen(spec.model, vocab_size).to(device)
    prec.convert_model(model, plan)
    if spec.ddp:
        sync_batch_norms(model, collective=False)
    optimizer, _ = build_optimizer(model, spec.common)
    scaler = plan.grad_scaler()
    model.train()
    views, size, length = spec.views, spec.image_size, spec.max_seq_length

    def step(batch: int) -> None:
        images = torch.randint(0, 256, (batch, views, size, size), dtype=torch.uint8).to(device)  # (B, V, S, S)
        labels = torch.randint(1, vocab_size, (batch, length)).to(device)  # (B, T): no padding anywhere
        labels[:, 0] = 0  # BOS
        for _ in range(steps):
            # A probe measures a full step, whatever the loss: no skipping, no host sync before the update.
            train_step(model, images, labels, optimizer, scaler, plan, spec.common.grad_clip_value,
                       skip_nonfinite=False)

    return ProbeStep(model, step)


def ddp_overhead_bytes(gradient_bytes: int, device: torch.device | str) -> int:
    """What DDP allocates beside a step: its gradient buckets (a copy of every gradient) and NCCL's buffers (CUDA)."""
    return gradient_bytes + (NCCL_RESERVE_BYTES if torch.device(device).type == "cuda" else 0)


def cuda_try_batch(step: Callable[[int], None], device: torch.device | str,
                   extra_bytes: int = 0) -> Callable[[int], int]:
    """``try_batch`` for :func:`find_max_batch` on CUDA: the peak reserved memory of ``step(batch)``
    plus ``extra_bytes`` (what the step does not allocate itself, e.g. :func:`ddp_overhead_bytes`).

    Reserved, not allocated: the caching allocator holds freed and fragmented blocks, and what it
    reserves is what the device must hold.
    """
    device = torch.device(device)

    def try_batch(batch: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        failure = None
        try:
            step(batch)
            torch.cuda.synchronize(device)
        except torch.OutOfMemoryError as exc:
            failure = (str(exc).splitlines() or ["CUDA out of memory"])[0]
        # Raised outside the handler: the traceback would keep the failed step's tensors alive.
        peak = torch.cuda.max_memory_reserved(device)
        torch.cuda.empty_cache()
        if failure is not None:
            raise OutOfMemory(failure)
        return peak + extra_bytes

    return try_batch


def _child_env() -> dict[str, str]:
    """A probe process's environment: this package importable from where this process imported it, and
    none of torchrun's variables (the probe is no rank of the training job)."""
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return env


def _run_child(entry: str, request: dict, what: str) -> dict:
    """Run ``r2gen.training.batchsize.<entry>()`` in a fresh Python process: one JSON request on stdin,
    its last stdout line (JSON) back. A signal (the kernel's OOM killer) is :class:`OutOfMemory`."""
    code = f"from r2gen.training.batchsize import {entry}; {entry}()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(request), capture_output=True, text=True,
                          env=_child_env())
    if proc.returncode < 0:  # killed by a signal: SIGKILL is how the kernel's OOM killer ends it
        raise OutOfMemory(f"probe process killed by signal {-proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise R2GenError(f"batch-size probe {what} failed (exit {proc.returncode}): {last}")
    answer = json.loads(lines[-1])
    if "error" in answer:
        raise R2GenError(answer["error"])
    return answer


def subprocess_try_batch(spec: ProbeSpec, vocab_size: int, steps: int = PROBE_STEPS) -> Callable[[int], int]:
    """``try_batch`` for :func:`find_max_batch` on CPU: the peak RSS of a fresh process running the steps
    (plus :func:`ddp_overhead_bytes` under ``spec.ddp``).

    Raises (from ``try_batch``):
        OutOfMemory: the step could not allocate, or the kernel killed the probe process.
        R2GenError: the probe process failed for another reason (its last stderr line is shown).
    """
    def try_batch(batch: int) -> int:
        request = {"spec": spec.to_dict(), "vocab_size": vocab_size, "batch": batch, "steps": steps}
        answer = _run_child("_probe_child", request, f"at batch {batch}")
        if "out_of_memory" in answer:
            raise OutOfMemory(answer["out_of_memory"])
        return int(answer["peak_bytes"])

    return try_batch


def _probe_child() -> None:
    """Body of a CPU probe process: one JSON request on stdin, one JSON answer line on stdout."""
    request = json.loads(sys.stdin.read())
    spec = ProbeSpec.from_dict(request["spec"])
    torch.set_num_threads(spec.threads)
    step = r2gen_step(spec, request["vocab_size"], spec.plan("cpu"), request["steps"])
    failure = None
    try:
        step(request["batch"])
    except (MemoryError, torch.OutOfMemoryError) as exc:
        failure = (str(exc).splitlines() or ["out of memory"])[0]
    # ru_maxrss: this fresh process's own peak resident set (KiB on Linux), as training records it.
    extra = ddp_overhead_bytes(step.gradient_bytes, "cpu") if spec.ddp else 0
    answer = ({"out_of_memory": failure} if failure is not None
              else {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + extra})
    print(json.dumps(answer), flush=True)


def cuda_probe_in_child(spec: ProbeSpec, vocab_size: int, device: torch.device, budget_bytes: int, start: int,
                        limit: int) -> ProbeResult:
    """:func:`find_max_batch` on CUDA ``device``, run in a fresh process (see the module docstring: why)."""
    request = {"spec": spec.to_dict(), "vocab_size": vocab_size, "device": str(device), "budget_bytes": budget_bytes,
               "start": start, "limit": limit}
    return ProbeResult.from_dict(_run_child("_cuda_probe_child", request, f"on {device}"))


def _cuda_probe_child() -> None:
    """Body of the CUDA probe process: the request of :func:`cuda_probe_in_child` on stdin, its
    :class:`ProbeResult` (or a one-line ``error``) as one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    spec = ProbeSpec.from_dict(request["spec"])
    device = torch.device(request["device"])
    torch.set_num_threads(spec.threads)
    if device.index is not None:  # cuda:N under DDP; plain "cuda" is the current device already
        torch.cuda.set_device(device)
    try:
        step = r2gen_step(spec, request["vocab_size"], spec.plan(device))
        extra = ddp_overhead_bytes(step.gradient_bytes, device) if spec.ddp else 0
        result = find_max_batch(cuda_try_batch(step, device, extra), request["budget_bytes"], request["start"],
                                request["limit"], resolution=PROBE_RESOLUTION)
        answer = result.to_dict()
    except R2GenError as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)


def probe_max_batch(spec: ProbeSpec, plan: prec.PrecisionPlan, vocab_size: int, budget_bytes: int, start: int,
                    limit: int) -> ProbeResult:
    """:func:`find_max_batch` for R2Gen under ``plan`` (its device), bisecting until the bounds are 8 apart.

    On CUDA the whole search runs in one child process (:func:`cuda_probe_in_child`). On CPU each
    probe is a fresh process: 10-30 s on our 2-core machines (process start, torch import, two
    steps, the first of which warms up the kernels), so a coarser bisection saves minutes there.
    """
    if plan.device.type == "cuda":
        return cuda_probe_in_child(spec, vocab_size, plan.device, budget_bytes, start, limit)
    return find_max_batch(subprocess_try_batch(spec, vocab_size), budget_bytes, start, limit,
                          resolution=PROBE_RESOLUTION)


@dataclass(frozen=True)
class BatchChoice:
    """The batch a run trains at and the learning-rate factor that goes with it."""

    batch: int  # per process
    lr_factor: float  # both learning rates are multiplied by it
    probe: str | None  # the probe's summary line (batch_mode max), else None


def choose_batch(spec: TrainSpec, plan: prec.PrecisionPlan, vocab_size: int, world: World, train_studies: int,
                 resumed: TrainState | None) -> BatchChoice:
    """The batch per process for ``train.common.batch_mode``, and its learning-rate factor.

    ``configured`` and ``equal``: ``train.<p>.batch_size`` (``equal``: the config checked it is the
    same for every precision) at the learning rates of params.yaml. ``max``: the largest batch whose
    training step fits :func:`budget_bytes`, found by rank 0's probe (:func:`probe_max_batch`, in
    child processes) and never above the training split (per process); every rank trains at the
    batch rank 0 broadcasts; the learning rates are rescaled from ``train.<p>.batch_size`` by
    ``lr_scaling``. A resumed run keeps the batch its first probe chose.
    """
    common, base = spec.common, spec.train.batch_size
    if common.batch_mode != "max":
        return BatchChoice(base, 1.0, None)
    if resumed is not None and resumed.batch_size is not None:
        batch, summary = resumed.batch_size, resumed.batch_probe
        log.info("batch probe: resumed run keeps batch %d", batch)
    else:
        answer = None
        if world.is_main:
            budget = budget_bytes(common.memory_budget_gb, plan.device, world.size)
            limit = max(1, train_studies // world.size)
            log.info("batch probe: %s on %s, budget %.2f GiB, from batch %d up to %d", spec.precision,
                     plan.device.type, budget / 2**30, min(base, limit), limit)
            result = probe_max_batch(ProbeSpec.of(spec, ddp=world.distributed), plan, vocab_size, budget,
                                     min(base, limit), limit)
            for line in result.log_lines():
                log.info("batch probe: %s", line)
            answer = (result.batch, result.summary())
        batch, summary = world.broadcast(answer)
    return BatchChoice(batch, scaled_lr(1.0, base, batch, common.lr_scaling), summary)


def budget_bytes(memory_budget_gb: float | None, device: torch.device | str, ranks: int = 1) -> int:
    """The most memory one process's training step may use (``train.common.memory_budget_gb``; null: the default).

    CUDA: 90% of the memory free now (``torch.cuda.mem_get_info``: this process's CUDA context and
    NCCL communicator, and other processes, hold the rest), ``memory_budget_gb`` if that is lower.
    CPU: ``memory_budget_gb``, else 90% of MemAvailable shared by the ``ranks`` processes on this host.
    """
    device = torch.device(device)
    asked = None if memory_budget_gb is None else int(memory_budget_gb * 2**30)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        usable = int(CUDA_USABLE * free)
        if asked is not None and asked > usable:
            log.info("batch probe: memory_budget_gb %.2f GiB is over 90%% of the %s free on %s (of %s): using %s",
                     asked / 2**30, _gib(free), device, _gib(total), _gib(usable))
        return usable if asked is None else min(asked, usable)
    if asked is not None:
        return asked
    try:
        with open("/proc/meminfo") as fh:
            available_kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    return int(0.9 * available_kib * 1024) // max(1, ranks)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
