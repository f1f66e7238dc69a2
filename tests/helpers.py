"""Helpers shared by the test modules: tiny params, paths of a training run, the copy-the-repo-and-run-dvc
plumbing, and hand-made PNG headers. Test modules import from here (``from helpers import tiny_params``), never from each other or
from conftest.py, which holds the fixtures only.
"""

from __future__ import annotations

import csv
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import yaml

from r2gen.config import PRECISIONS, Params

REPO = Path(__file__).resolve().parents[1]

# Params overrides for a real `dvc repro` in a few minutes on 2 cores, every stage and precision still exercised.
TINY = {
    "data": {"image_size": 32},
    "model": {"visual_extractor": "resnet10", "visual_width": 8, "d_model": 32, "d_ff": 32, "num_heads": 4,
              "num_layers": 1, "rm_num_heads": 4, "rm_d_model": 32},
    "train": {"common": {"epochs": 1, "validate": "last"}},
    "evaluate": {"num_beams": 2, "max_new_tokens": 30, "meteor": False},
}


def tiny_params(root: Path | str = "data/tiny", **overrides) -> Params:
    """A model small enough to train a few epochs in seconds on one thread."""
    raw = {
        "threads": 1,
        "seed": 3,
        "data": {"dataset": "iu_xray", "root": str(root), "image_size": 32},
        "model": {"visual_extractor": "resnet10", "visual_width": 8, "d_model": 32, "d_ff": 32,
                  "num_heads": 4, "num_layers": 1, "rm_num_heads": 4, "rm_d_model": 32},
        "train": {"common": {"epochs": 2, "lr_ve": 1e-3, "lr_ed": 1e-3, "log_every": 1000,
                             "validate": "every_epoch", "warmup_steps": 1},
                  **{p: {"batch_size": 4} for p in PRECISIONS}},
        "evaluate": {"batch_size": 4, "num_beams": 2, "max_new_tokens": 20, "meteor": False},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return Params.from_dict(raw)


def paths_in(tmp: Path, data: dict, precision: str = "fp32"):
    """The TrainPaths of one run under ``tmp``, reading the prepared data and tokenizer of ``data`` (tiny_data)."""
    # Imported here: a module that needs no training code can import this file without importing training.
    from r2gen.training import TrainPaths

    return TrainPaths(data["prepared"], data["tokenizer"], tmp / "models" / precision / "model.pt",
                      tmp / "checkpoints" / precision, tmp / "dvclive" / precision, tmp / "metrics" / f"{precision}.json")


def step_losses(live_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of a run's dvclive training-loss plot."""
    with open(live_dir / "plots" / "metrics" / "train" / "loss.tsv") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh, delimiter="\t")]


def sh(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def copy_repo(dest: Path, params_override: dict | None = None) -> Path:
    """The working tree (tracked and untracked-not-ignored files) as a fresh git repo, data pulled."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if params_override:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        _merge(params, params_override)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-qm", "copy"], dest)
    sh(["dvc", "pull", "-q", "data.dvc"], dest)
    return dest


def _merge(base: dict, override: dict) -> None:
    for key, value in override.items():
        if isinstance(value, dict):
            _merge(base.setdefault(key, {}), value)
        else:
            base[key] = value


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and a valid CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, depth: int = 8, color: int = 0, interlace: int = 0,
               idat: bytes = zlib.compress(b"\0" * 8)) -> bytes:
    """A PNG whose IHDR says anything we like, with valid CRCs so that only the values are wrong."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
