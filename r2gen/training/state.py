"""What a training run has done so far, and the checkpoint that lets a killed run resume bit-exactly.

The checkpoint (``<checkpoint_dir>/last.pt``, written atomically after every epoch) is a plain dict
that ``torch.load(weights_only=True)`` reads: the config fingerprint, the model, optimizer,
scheduler and GradScaler states, every RNG stream the run draws from, and :class:`TrainState` as a
dict. A run resumes from it only when the fingerprint of its config matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2gen.checkpoint import load_torch, save_torch
from r2gen.config import TrainSpec, to_dict
from r2gen.distributed import World

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters and histories of a run, updated every step and saved in every checkpoint."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps taken (skipped ones included)
    samples: int = 0  # studies trained on (global: all ranks)
    timed_samples: int = 0  # studies of the steps after train.common.warmup_steps
    timed_seconds: float = 0.0  # their seconds
    wall_seconds: float = 0.0  # seconds of every step (validation excluded)
    nonfinite_steps: int = 0
    skipped_steps: int = 0  # GradScaler skipped the update (inf/NaN gradients)
    epoch_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    batch_size: int | None = None  # per process; a resumed max-batch run keeps its probed batch
    batch_probe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``state`` entry (plain types: the safe loader reads it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainState":
        return cls(**raw)


def config_fingerprint(spec: TrainSpec, world_size: int = 1) -> str:
    """Hash of everything that changes the training result: a checkpoint resumes only if it matches."""
    relevant = {
        "precision": spec.precision, "seed": spec.seed, "threads": spec.threads,
        "data": to_dict(spec.data), "tokenizer": to_dict(spec.tokenizer), "model": to_dict(spec.model),
        "train": {"common": to_dict(spec.common), spec.precision: to_dict(spec.train)},
    }
    if world_size > 1:  # the global batch is world_size * batch_size
        relevant["world_size"] = world_size
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Trainables:
    """The objects whose state a checkpoint holds (the model unwrapped from DDP)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batch_gen: torch.Generator  # the shuffling and augmentation stream


def load_resumable(ckpt_path: Path, fingerprint: str) -> dict | None:
    """The checkpoint of a killed run of this config, or None (none, or written for another config)."""
    if not ckpt_path.exists():
        return None
    ckpt = load_torch(ckpt_path, "training checkpoint")
    if ckpt.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it was written for another config", ckpt_path)
        return None
    return ckpt


def save_checkpoint(path: Path, fingerprint: str, parts: Trainables, state: TrainState, device: torch.device,
                    world: World) -> None:
    """Write the checkpoint on rank 0; every rank calls it (the others hand in their dropout streams)."""
    rng = _rng_state(device)
    ranks = world.gather(rng) if world.distributed else None  # every rank's dropout stream
    if not world.is_main:
        return
    save_torch({
        "fingerprint": fingerprint,
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
        "rng": {**rng, "batches": parts.batch_gen.get_state(), "python": list(random.getstate()),
                **({"ranks": ranks} if ranks else {})},
        "state": state.to_dict(),
    }, path)


def restore_checkpoint(ckpt: dict, parts: Trainables, device: torch.device, world: World) -> TrainState:
    """Load a checkpoint's states into ``parts`` and this rank's RNG streams; returns its TrainState."""
    parts.model.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"]["ranks"][world.rank] if world.distributed else ckpt["rng"], device)
    parts.batch_gen.set_state(ckpt["rng"]["batches"])
    random.setstate(_to_tuple(ckpt["rng"]["python"]))
    return TrainState.from_dict(ckpt["state"])


def _rng_state(device: torch.device) -> dict:
    """The RNG streams that dropout draws from on this rank."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(obj):
    """random.getstate() round-trips through lists in the checkpoint."""
    return tuple(_to_tuple(x) for x in obj) if isinstance(obj, list) else obj
