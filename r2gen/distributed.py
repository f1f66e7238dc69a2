"""Data-parallel training: torchrun launching, the process group, and batch statistics over all ranks.

``train.<p>.nproc: N`` in params.yaml (or ``R2GEN_NPROC=N``, which overrides it) makes the train
stage replace itself with ``python -m torch.distributed.run --standalone --nproc-per-node N`` running
the same command. Each worker reads torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` into a
:class:`World`, joins a gloo (CPU) or NCCL (CUDA) process group, and trains on its slice of every
global batch.

The batch size in params.yaml is per rank: N ranks with batch b train like one process with batch
N*b, which the training loop makes exact by weighting each rank's token-mean loss by its share of
the global tokens and by computing the visual trunk's BatchNorm statistics over the global batch
(:class:`SyncedBatchNorm2d`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from r2gen.errors import ConfigError

log = logging.getLogger(__name__)

NPROC_ENV = "R2GEN_NPROC"
MAX_NPROC = 1024  # train.<p>.nproc's range (r2gen.config.RANGES)
# Rank 0 alone writes checkpoints and the model while the others wait in the next collective.
TIMEOUT = timedelta(minutes=60)


def requested_nproc(default: int = 1) -> int:
    """Processes to train with: ``$R2GEN_NPROC`` if set, else ``default`` (``train.<p>.nproc``)."""
    raw = os.environ.get(NPROC_ENV, "").strip()
    if not raw:
        return default
    # isdigit() alone accepts non-ASCII digits ('٣', '²'); int() reads some of them and not others.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_NPROC:
        shown = raw if len(raw) <= 20 else raw[:20] + "..."
        raise ConfigError(f"{NPROC_ENV}={shown!r} is not a positive integer of at most {MAX_NPROC}; set it to the number "
                          "of processes (e.g. GPUs on this node) or unset it")
    return int(raw)


def launch_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process with torchrun running ``argv`` (script and its arguments) on ``nproc`` local ranks.

    ``exec`` keeps the process id, so whoever waits for this process (``dvc repro``) waits for torchrun,
    and a kill of its process group reaches torchrun; the workers follow it (see :meth:`World.joined`).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        """The rank and world size torchrun put in the environment, else a single process."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that logs, writes metrics and checkpoints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` under DDP on GPUs.

        Raises:
            ConfigError: ``LOCAL_RANK`` names no GPU of this node (more processes than GPUs).
        """
        if self.distributed and device.type == "cuda":
            count = torch.cuda.device_count()
            if not 0 <= self.local_rank < count:
                raise ConfigError(
                    f"LOCAL_RANK={self.local_rank} but torch.cuda.device_count() is {count} on this node: "
                    f"launch at most {count} processes per node (train.<precision>.nproc or {NPROC_ENV}; "
                    "check CUDA_VISIBLE_DEVICES)")
            return torch.device("cuda", self.local_rank)
        return device

    @contextlib.contextmanager
    def joined(self, device: torch.device) -> Iterator[str | None]:
        """Join the process group (gloo on CPU, NCCL on CUDA) for the block; yields the backend name."""
        if not self.distributed:
            yield None
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _exit_with_launcher()
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one log: rank 0's
        dist.init_process_group(backend, rank=self.rank, world_size=self.size, timeout=TIMEOUT)
        try:
            yield backend
        finally:
            dist.destroy_process_group()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op for one process)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object; checkpoints included)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def _exit_with_launcher() -> None:
    """Die as soon as torchrun dies: a SIGKILLed launcher must not leave workers training on.

    torchrun starts each worker in its own session, so a kill of the launcher's process group (a
    killed ``dvc repro``) does not reach them; an orphan would keep writing checkpoints while the
    rerun resumes from them. A daemon thread watches the parent and SIGKILLs this process when it changes.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


# ---------------------------------------------------------------------------------------- BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (each rank's input feeds every rank's output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch: the samples of every rank.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one all-reduces per-channel sums and sums of
    squares (one collective per call, forward and backward), so gloo and NCCL runs compute the same
    thing and gradients flow through the global statistics. Evaluation uses the running
    statistics, like BatchNorm2d. ``collective=False`` (the batch-size probe, which has no process
    group) computes the same tensors from this process's samples alone.
    """

    collective: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()
        count = torch.full((1,), x.numel() / C, dtype=torch.float32, device=x.device)
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])  # (2C+1,)
        total = _AllReduceSum.apply(local) if self.collective else local  # (2C+1,) over all ranks
        n = total[2 * C]
        mean = total[:C] / n  # (C,)
        var = (total[C : 2 * C] / n - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp(min=1), momentum)  # unbiased, as BatchNorm keeps
        scale = self.weight * torch.rsqrt(var + self.eps)  # (C,)
        shift = self.bias - mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)  # (B, C, H, W)


def sync_batch_norms(model: nn.Module, collective: bool = True) -> int:
    """Swap every BatchNorm2d of ``model`` for a :class:`SyncedBatchNorm2d` (same weights); returns how many.

    Only affine BatchNorm2d with running statistics (all of the ResNet trunk's); R2Gen's optional
    ``use_bn`` token BatchNorm keeps per-rank statistics. ``collective=False``: no all-reduce (see
    :class:`SyncedBatchNorm2d`).
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d and child.affine and child.track_running_stats:
                synced = SyncedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats, device=child.weight.device)
                synced.load_state_dict(child.state_dict())
                synced.collective = collective
                setattr(parent, name, synced)
                count += 1
    return count
