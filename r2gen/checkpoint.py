"""Model files: what `train` ships, `evaluate` scores and `r2gen generate` runs.

A model file is a plain dict loadable with ``torch.load(weights_only=True)`` (no pickled code):
the model config, the tokenizer, the fp32 weights (fp8 bookkeeping stripped) and what the training
run recorded (precision, backend, metrics, versions). The file alone rebuilds the model.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

import r2gen
from r2gen.config import DATASETS, ModelConfig, from_dict, to_dict
from r2gen.data.datasets import MAX_IMAGE_SIDE
from r2gen.errors import CheckpointError
from r2gen.io import atomic_open, regular_file
from r2gen.tokenizer import Tokenizer

FORMAT = "r2gen-precision/model/1"


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file + rename, so a killed process never leaves half a file."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True; any failure is a one-line CheckpointError."""
    path = Path(path)
    regular_file(path, what, CheckpointError, missing="train it first (dvc repro) or check the path",
                 unreadable="check the path and its permissions",
                 folder=f"not a file; pass the .pt file inside it (e.g. {path}/model.pt)", other="pass the .pt file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"cannot read {what} {path}: permission denied; fix its permissions (chmod u+r) "
                              "or run as its owner")
    try:
        with warnings.catch_warnings():
            # torch warns before refusing a raw pickle of another protocol; the refusal says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by the safe loader (weights_only=True): {_refusal(exc)}; it is corrupt or was "
            "not written by r2gen-precision, restore or re-create it (never load it with weights_only=False)"
        ) from None
    except PermissionError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror}; fix its permissions") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle raises about anything: KeyError, struct.error, ...
        cls = type(exc)
        kind = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"  # struct.error
        raise CheckpointError(
            f"{path} is not a readable {what} ({kind}); it may be truncated or corrupt, restore or re-create it"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a {what} written by r2gen-precision (it holds a {type(obj).__name__}); check the path"
        )
    return obj


def _refusal(exc: pickle.UnpicklingError) -> str:
    """What the safe loader refused: torch wraps the unpickler's reason in lines of generic advice."""
    text = str(exc).split("\n\nCheck the documentation")[0]  # torch appends a link to its docs
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    # The reason is the line naming the blocked global, else the unpickler's message, which comes last.
    reason = next((line for line in lines if "GLOBAL" in line), lines[-1])
    return reason.removeprefix("WeightsUnpickler error: ").split(". Please use")[0][:200].rstrip(".")


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
    """Read and validate a model file; returns its dict (see :func:`save_model`).

    Everything a caller reads is checked here, so that a corrupt or edited file fails with one line
    instead of a KeyError in `r2gen generate`, or a 100000 px ``image_size`` that would allocate
    gigabytes.

    Raises:
        CheckpointError: a missing, unreadable or unsafe file, one of another format version, a
            missing or invalid field, a vocabulary size that does not match the tokenizer, or
            non-finite weights.
        R2GenError: the tokenizer stored in the file is corrupt.
    """
    ckpt = load_torch(path, "model file")
    if ckpt.get("format") != FORMAT:
        found = ckpt.get("format", "no format tag")
        raise CheckpointError(
            f"{path} is not a model file of this version (format: {found}, expected {FORMAT}); "
            "re-train it with this version or use the version that wrote it"
        )
    fix = "the file is incomplete or was edited; restore it or re-train it (dvc repro)"
    for key, kind in _FIELDS.items():
        if key not in ckpt:
            raise CheckpointError(f"{path} has no '{key}'; {fix}")
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):  # True is an int too
            raise CheckpointError(f"{path} holds a {type(ckpt[key]).__name__} as '{key}', not a {kind.__name__}; {fix}")
    bad = next((k for k, v in ckpt["state_dict"].items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise CheckpointError(f"{path} holds a state_dict entry {str(bad)[:80]!r} that is not a named tensor; {fix}")
    data = ckpt["data"]
    if data.get("dataset") not in DATASETS:
        raise CheckpointError(f"{path} names dataset {data.get('dataset')!r}, not one of {', '.join(DATASETS)}; {fix}")
    if data.get("views") not in (1, 2) or isinstance(data.get("views"), bool):
        raise CheckpointError(f"{path} reads {data.get('views')!r} views per study, not 1 or 2; {fix}")
    size = data.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_IMAGE_SIDE:
        raise CheckpointError(f"{path} has image_size {size!r}, not a whole number of 1 to {MAX_IMAGE_SIDE} px; {fix}")
    tokenizer = Tokenizer.load_dict(ckpt["tokenizer"], str(path), fix="restore the file or re-train it (dvc repro)")
    if tokenizer.vocab_size != ckpt["vocab_size"]:
        raise CheckpointError(
            f"{path} has vocab_size {ckpt['vocab_size']} but its tokenizer makes {tokenizer.vocab_size} ids; {fix}"
        )
    check_finite(ckpt["state_dict"], path)
    return ckpt


# What save_model writes (besides the format tag) and its type; "info" holds free-form JSON.
_FIELDS: dict[str, type] = {
    "version": str, "model_config": dict, "vocab_size": int, "tokenizer": dict, "data": dict, "info": dict,
    "state_dict": dict,
}


def build_model(ckpt: dict, path: str | os.PathLike = "model file"):
    """The R2Gen model of a loaded model file, weights in, in eval mode."""
    from r2gen.model.r2gen import R2Gen

    cfg = from_dict(ModelConfig, {**ckpt["model_config"], "pretrained": None}, source=str(path))
    model = R2Gen(cfg, ckpt["vocab_size"])
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # weights of the wrong shape
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")
        raise CheckpointError(
            f"{path} does not match the model it describes ({detail[:200].rstrip('.')}); "
            "it was written by another version or edited, restore it or re-train it (dvc repro)"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model it describes ({len(missing)} missing, {len(unexpected)} unexpected "
            f"weights, e.g. {(missing or unexpected)[0]}); it was written by another version"
        )
    return model.eval()
