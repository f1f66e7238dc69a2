"""Shared fixtures: a tiny synthetic dataset, prepared and tokenized once per session (helpers: tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_params

from r2gen.data.images import load_prepared, prepare_dataset
from r2gen.data.synthetic import generate_sample
from r2gen.tokenizer import Tokenizer

torch.set_num_threads(1)


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
