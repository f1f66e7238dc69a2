"""Model files: what `train` ships, `evaluate` scores and `r2gen generate` runs.

A model file is a plain dict loadable with ``torch.load(weights_only=True)`` (no pickled code):
the model config, the tokenizer, the fp32 weights (fp8 bookkeeping stripped) and what the training
run recorded (precision, backend, metrics, versions). The file alone rebuilds the model.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

import r2gen
from r2gen.config import ModelConfig, from_dict, to_dict
from r2gen.errors import CheckpointError
from r2gen.io import atomic_open

FORMAT = "r2gen-precision/model/1"


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file + rename, so a killed process never leaves half a file."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True; any failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}; train it first (dvc repro) or check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise CheckpointError(
            f"{path} was refused by the safe loader (weights_only=True): {first[:160]}; "
            "only load checkpoints written by r2gen-precision"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable {what} ({exc.__class__.__name__}); it may be truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a {what} written by r2gen-precision")
    return obj


def check_finite(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path} holds NaN/Inf values in '{key}'; the model diverged or the file is corrupt")


def save_model(path: str | os.PathLike, *, model_config: ModelConfig, vocab_size: int,
               tokenizer: dict, state_dict: dict, data: dict, info: dict) -> None:
    """Write a self-contained model file (atomic)."""
    save_torch(
        {
            "format": FORMAT,
            "version": r2gen.__version__,
            "model_config": to_dict(model_config),
            "vocab_size": vocab_size,
            "tokenizer": tokenizer,
            # JSON round trip: plain types only, so the file loads with weights_only=True
            "data": json.loads(json.dumps(data)),  # dataset, views, image_size: what the images must look like
            "info": json.loads(json.dumps(info)),  # precision plan, training summary, versions
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        },
        path,
    )


def load_model_file(path: str | os.PathLike) -> dict:
    """Read and validate a model file; returns its dict (see :func:`save_model`)."""
    ckpt = load_torch(path, "model file")
    if ckpt.get("format") != FORMAT:
        found = ckpt.get("format", "no format tag")
        raise CheckpointError(
            f"{path} is not a model file of this version (format: {found}, expected {FORMAT}); "
            "re-train it with this version or use the version that wrote it"
        )
    check_finite(ckpt["state_dict"], path)
    return ckpt


def build_model(ckpt: dict, path: str | os.PathLike = "model file"):
    """The R2Gen model of a loaded model file, weights in, in eval mode."""
    from r2gen.model.r2gen import R2Gen

    cfg = from_dict(ModelConfig, {**ckpt["model_config"], "pretrained": None}, source=str(path))
    model = R2Gen(cfg, ckpt["vocab_size"])
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model it describes ({len(missing)} missing, {len(unexpected)} unexpected "
            f"weights, e.g. {(missing or unexpected)[0]}); it was written by another version"
        )
    return model.eval()
