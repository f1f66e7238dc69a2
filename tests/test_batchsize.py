"""The max-batch probe (doubling then bisection against a memory budget) and the learning-rate rules."""

from __future__ import annotations

import math
import random

import pytest
import torch

from r2gen.config import PRECISIONS, TrainSpec
from r2gen.training.batchsize import (LR_RULES, OutOfMemory, ProbeSpec, cuda_try_batch, find_max_batch, r2gen_step,
                                      scaled_lr, subprocess_try_batch)
from r2gen.errors import ConfigError, R2GenError

from helpers import tiny_params

MIB = 2**20


class FakeMemory:
    """A training step whose peak is ``a * batch + c`` bytes, raising OOM above ``oom_above`` studies."""

    def __init__(self, a: int, c: int, oom_above: int | None = None, error: type[BaseException] = OutOfMemory):
        self.a, self.c, self.oom_above, self.error = a, c, oom_above, error
        self.tried: list[int] = []

    def __call__(self, batch: int) -> int:
        self.tried.append(batch)
        if self.oom_above is not None and batch > self.oom_above:
            raise self.error(f"tried to allocate {self.a * batch} bytes")
        return self.a * batch + self.c


def test_probe_finds_the_largest_batch_under_a_linear_memory_model():
    step = FakeMemory(a=10 * MIB, c=100 * MIB)
    result = find_max_batch(step, budget_bytes=1000 * MIB, start=4, limit=4096)
    assert result.batch == 90  # 10*90 + 100 = 1000 MiB exactly fits; 91 does not
    assert result.limited_by == "budget"
    assert step.tried[:6] == [4, 8, 16, 32, 64, 128]  # doubles until 128 overflows, then bisects
    assert result.peaks == {b: 10 * MIB * b + 100 * MIB for b in step.tried}
    assert [p.fits for p in result.probes] == [10 * b + 100 <= 1000 for b in step.tried]
    assert len(step.tried) == len(set(step.tried)) <= 6 + math.ceil(math.log2(64))
    assert result.log_lines()[-1] == "largest batch within budget: 90 (budget-limited; 12 probes)"
    assert result.summary().startswith("budget 0.98 GiB | 4: 0.14 GiB fits | 8: 0.18 GiB fits | ")
    assert "| 128: 1.35 GiB does not fit |" in result.summary()


@pytest.mark.parametrize("error", [OutOfMemory, MemoryError, torch.OutOfMemoryError])
def test_an_out_of_memory_error_counts_as_not_fitting(error):
    # The budget would allow 900, but the device runs out above 50 (fragmentation, other processes).
    step = FakeMemory(a=MIB, c=0, oom_above=50, error=error)
    result = find_max_batch(step, budget_bytes=900 * MIB, start=8, limit=4096)
    assert result.batch == 50
    failed = [p for p in result.probes if p.peak_bytes is None]
    assert failed and all(not p.fits and p.batch > 50 for p in failed)
    assert "out of memory" in failed[0].line(900 * MIB) and "tried to allocate" in failed[0].note


def test_probe_stops_at_the_limit_without_trying_beyond_it():
    step = FakeMemory(a=1, c=0)
    result = find_max_batch(step, budget_bytes=10**12, start=16, limit=210)
    assert result.batch == 210 and result.limited_by == "limit"
    assert max(step.tried) == 210 and step.tried == [16, 32, 64, 128, 210]


def test_a_start_that_does_not_fit_is_a_clear_error():
    with pytest.raises(R2GenError, match=r"even batch 16 needs 1\.56 GiB.*memory_budget_gb"):
        find_max_batch(FakeMemory(a=100 * MIB, c=0), budget_bytes=2**30, start=16, limit=64)
    with pytest.raises(R2GenError, match="even batch 16 ran out of memory"):
        find_max_batch(FakeMemory(a=1, c=0, oom_above=8), budget_bytes=2**30, start=16, limit=64)


def test_resolution_stops_bisection_early_but_returns_a_batch_that_fits():
    step = FakeMemory(a=MIB, c=0)
    result = find_max_batch(step, budget_bytes=203 * MIB, start=8, limit=4096, resolution=8)
    assert 203 - 8 < result.batch <= 203
    assert result.peaks[result.batch] <= 203 * MIB


def test_probe_matches_brute_force_on_random_memory_models():
    rng = random.Random(0)
    for _ in range(300):
        a, c = rng.randint(1, 50), rng.randint(0, 500)
        start, limit = rng.randint(1, 20), rng.randint(20, 700)
        oom_above = rng.choice([None, rng.randint(start, 800)])
        budget = a * rng.randint(start, 800) + c
        fits = [b for b in range(start, limit + 1) if a * b + c <= budget and (oom_above is None or b <= oom_above)]
        assert fits  # the start fits by construction
        result = find_max_batch(FakeMemory(a, c, oom_above), budget, start, limit)
        assert result.batch == max(fits), (a, c, start, limit, oom_above, budget)


@pytest.mark.parametrize("kwargs", [dict(budget_bytes=0, start=1, limit=2), dict(budget_bytes=1, start=0, limit=2),
                                    dict(budget_bytes=1, start=4, limit=2)])
def test_nonsensical_probe_arguments_are_refused(kwargs):
    with pytest.raises(R2GenError):
        find_max_batch(FakeMemory(1, 0), **kwargs)


def test_learning_rate_rules():
    assert scaled_lr(1e-4, 16, 64, "none") == 1e-4
    assert scaled_lr(1e-4, 16, 64, "linear") == pytest.approx(4e-4)
    assert scaled_lr(1e-4, 16, 64, "sqrt") == pytest.approx(2e-4)
    assert scaled_lr(1e-4, 16, 64) == pytest.approx(2e-4)  # sqrt is the default (Adam)
    assert scaled_lr(1e-4, 64, 16, "linear") == pytest.approx(2.5e-5)  # smaller batches scale down too
    assert all(scaled_lr(3e-4, 16, 16, rule) == 3e-4 for rule in LR_RULES)


def test_unknown_learning_rate_rule_names_the_valid_ones():
    with pytest.raises(ConfigError, match="lr_scaling 'squareroot', must be one of: none, linear, sqrt"):
        scaled_lr(1e-4, 16, 32, "squareroot")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_r2gen_probe_step_trains_at_every_precision_and_any_batch(precision):
    spec = ProbeSpec.of(TrainSpec.of(tiny_params(), precision))
    step = r2gen_step(spec, vocab_size=30, plan=spec.plan("cpu"), steps=1)
    step(3)
    step(5)  # reuses the model and optimizer built once


@pytest.mark.slow
def test_cpu_probe_measures_a_fresh_process_per_batch_and_memory_grows_with_batch():
    params = tiny_params()
    try_batch = subprocess_try_batch(ProbeSpec.of(TrainSpec.of(params, "fp32")), vocab_size=30, steps=1)
    small, large = try_batch(2), try_batch(256)
    assert 50 * MIB < small < large  # a whole Python process with torch, then 128x the activations


def test_cpu_probe_reports_a_failed_process_in_one_line():
    params = tiny_params()
    try_batch = subprocess_try_batch(ProbeSpec.of(TrainSpec.of(params, "fp32")), vocab_size=1)  # the child refuses a 1-id vocabulary
    with pytest.raises(R2GenError, match=r"probe at batch 4 failed \(exit 1\).*vocabulary of at least 2"):
        try_batch(4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_probe_measures_peak_allocation_and_catches_out_of_memory():
    def step(batch: int) -> None:
        x = torch.empty(batch, MIB, dtype=torch.uint8, device="cuda")  # batch MiB
        if batch > 1024:
            torch.empty(10**15, dtype=torch.uint8, device="cuda")  # a petabyte: a real CUDA OOM
        del x

    try_batch = cuda_try_batch(step, "cuda")
    assert try_batch(64) >= 64 * MIB
    with pytest.raises(OutOfMemory):
        try_batch(2048)
    assert find_max_batch(try_batch, budget_bytes=2**40, start=64, limit=4096).batch == 1024
