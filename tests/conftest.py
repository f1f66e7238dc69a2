"""Shared fixtures: a tiny synthetic dataset, prepared and tokenized once per session, and tiny params."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r2gen.config import Params
from r2gen.data.images import load_prepared, prepare_dataset
from r2gen.data.synthetic import generate_sample
from r2gen.tokenizer import Tokenizer

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


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
                  **{p: {"batch_size": 4} for p in ("fp32", "fp16", "bf16", "fp8")}},
        "evaluate": {"batch_size": 4, "num_beams": 2, "max_new_tokens": 20, "meteor": False},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return Params.from_dict(raw)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """16 synthetic IU X-Ray studies at 48 px, prepared at 32 px, with their tokenizer."""
    base = tmp_path_factory.mktemp("tiny")
    root = base / "iu"
    generate_sample(root, studies=16, seed=5, image_size=48)
    params = tiny_params(root)
    prepared = base / "prepared"
    prepare_dataset(params.data, prepared)
    tokenizer = Tokenizer.build(load_prepared(prepared, "train").reports, "iu_xray", threshold=1, max_seq_length=60)
    tokenizer_path = base / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    return {"root": root, "prepared": prepared, "tokenizer": tokenizer_path, "params": params}
