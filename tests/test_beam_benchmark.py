"""benchmarks.beam: both steppers time the same search and must agree (a planted difference fails)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import beam
from helpers import tiny_params
from r2gen.model.r2gen import FullRecomputeStepper, R2Gen


@pytest.fixture()
def model_and_images():
    torch.manual_seed(0)
    model = R2Gen(tiny_params().model, vocab_size=40)
    return model, torch.randint(0, 256, (3, 2, 32, 32), dtype=torch.uint8)


def test_compare_reports_both_rates_for_identical_sequences(model_and_images):
    result = beam.compare(*model_and_images, num_beams=2, max_len=8, rounds=2)
    assert result["identical"] and result["studies"] == 3
    assert result["incremental_reports_per_s"] > 0 and result["full_recompute_reports_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["incremental_reports_per_s"] / result["full_recompute_reports_per_s"])


def test_compare_fails_when_the_searches_disagree(model_and_images, monkeypatch):
    real_step = FullRecomputeStepper.step

    def biased(self, tokens):
        logprobs = real_step(self, tokens).clone()
        logprobs[:, 5] += 100.0  # token 5 always wins in the reference only
        return logprobs

    monkeypatch.setattr(FullRecomputeStepper, "step", biased)
    with pytest.raises(AssertionError, match="different sequences"):
        beam.compare(*model_and_images, num_beams=2, max_len=8, rounds=1)
