"""batch_mode in training: configured and equal keep params.yaml's batches and learning rates; max trains at the probed
batch with rescaled learning rates, records the probe, and a resumed run keeps its batch; the config
refuses an "equal" mode whose batches differ. The probe itself is tested in test_batchsize.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import r2gen.training.batchsize as batchsize
from helpers import paths_in, tiny_params
from r2gen.training.batchsize import Probe, ProbeResult
from r2gen.errors import ConfigError
from r2gen.model.r2gen import R2Gen
from r2gen.training import TrainPaths, TrainSpec, train


def epoch_history(live_dir: Path, name: str) -> list[float]:
    with open(live_dir / "plots" / "metrics" / "epoch" / f"{name}.tsv") as fh:
        return [float(r[name]) for r in csv.DictReader(fh, delimiter="\t")]


def fake_probe(batches: list[int], calls: list):
    """probe_max_batch that answers the next batch of ``batches`` and records its arguments."""
    def probe(spec, plan, vocab_size, budget_bytes, start, limit):
        calls.append({"precision": spec.precision, "budget": budget_bytes, "start": start, "limit": limit})
        batch = batches[len(calls) - 1]
        probes = (Probe(start, 100, True), Probe(batch, 200, True), Probe(batch + 1, 300, False))
        return ProbeResult(batch, budget_bytes, limit, probes)
    return probe


def test_equal_mode_trains_at_the_configured_batch_and_learning_rates(tmp_path, tiny_data):
    params = tiny_params(tiny_data["root"], train__common__batch_mode="equal")
    summary = train(TrainSpec.of(params, "fp32"), paths_in(tmp_path, tiny_data))
    assert summary.batch_mode == "equal" and summary.batch_size == 4 and summary.batch_probe is None
    assert summary.lr_ed == 1e-3 and summary.lr_ve == 1e-3 and summary.lr_scaling is None
    # per-epoch samples and seconds so far: what time to quality reads beside the val loss
    assert epoch_history(tmp_path / "dvclive" / "fp32", "samples") == [11, 22]
    seconds = epoch_history(tmp_path / "dvclive" / "fp32", "train_seconds")
    assert 0 < seconds[0] < seconds[1] == pytest.approx(summary.train_seconds, rel=1e-6)


@pytest.mark.parametrize("rule,factor", [("sqrt", math.sqrt(9 / 4)), ("linear", 9 / 4), ("none", 1.0)])
def test_max_mode_trains_at_the_probed_batch_with_rescaled_learning_rates(tmp_path, tiny_data, monkeypatch,
                                                                          rule, factor):
    calls = []
    monkeypatch.setattr(batchsize, "probe_max_batch", fake_probe([9], calls))
    params = tiny_params(tiny_data["root"], train__common__batch_mode="max", train__common__memory_budget_gb=0.5,
                         train__common__lr_scaling=rule)
    paths = paths_in(tmp_path, tiny_data, "bf16")
    summary = train(TrainSpec.of(params, "bf16"), paths)
    assert calls == [{"precision": "bf16", "budget": 2**29, "start": 4, "limit": 11}]  # never above the split
    assert summary.batch_mode == "max" and summary.batch_size == 9 and summary.global_batch_size == 9
    assert summary.steps == 2 * 2  # 11 studies at batch 9: 2 steps per epoch
    assert summary.lr_ed == pytest.approx(1e-3 * factor) and summary.lr_ve == pytest.approx(1e-3 * factor)
    assert summary.lr_scaling == rule
    assert summary.batch_probe.startswith("budget 0.50 GiB | 4: ") and "9: " in summary.batch_probe
    assert json.loads(paths.metrics.read_text())["batch_size"] == 9
    with open(paths.live_dir / "plots" / "metrics" / "train" / "lr.tsv") as fh:
        assert float(next(csv.DictReader(fh, delimiter="\t"))["lr"]) == pytest.approx(1e-3 * factor)


def test_a_resumed_max_mode_run_keeps_the_batch_its_probe_chose(tmp_path, tiny_data, monkeypatch):
    calls = []
    monkeypatch.setattr(batchsize, "probe_max_batch", fake_probe([6, 8], calls))  # a second probe would say 8
    params = tiny_params(tiny_data["root"], train__common__batch_mode="max", train__common__epochs=3)
    paths = paths_in(tmp_path, tiny_data)
    original, n = R2Gen.forward, {"calls": 0}

    def crash_in_epoch_two(self, images, labels):
        if images.device.type == "meta":  # the run's model-FLOP count (r2gen.training.mfu), not a step
            return original(self, images, labels)
        n["calls"] += 1
        if n["calls"] == 4:  # epoch 1 = 2 steps + 1 val batch at batch 6
            raise RuntimeError("simulated crash")
        return original(self, images, labels)

    monkeypatch.setattr(R2Gen, "forward", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainSpec.of(params, "fp32"), paths)
    monkeypatch.setattr(R2Gen, "forward", original)
    summary = train(TrainSpec.of(params, "fp32"), paths)
    assert len(calls) == 1 and summary.batch_size == 6 and summary.steps == 3 * 2


def test_equal_mode_refuses_unequal_batches_and_names_the_fix():
    with pytest.raises(ConfigError, match=r"batch_mode is 'equal' but the global batches differ .*fp8 8.*batch_mode: configured or max"):
        tiny_params(train__fp8__batch_size=8, train__common__batch_mode="equal")
    with pytest.raises(ConfigError, match=r"batch_mode is 'equal' .*fp16 8"):
        tiny_params(train__fp16__nproc=2, train__common__batch_mode="equal")  # 4 x 2 processes
    for mode in ("configured", "max"):  # per-precision batches as set (configured), or probed (max)
        assert tiny_params(train__fp8__batch_size=8, train__common__batch_mode=mode).train.fp8.batch_size == 8


@pytest.mark.parametrize("key,value,message", [
    ("train__common__batch_mode", "maximum", "must be one of: configured, equal, max"),
    ("train__common__lr_scaling", "square", "must be one of: sqrt, linear, none"),
    ("train__common__memory_budget_gb", 0, "memory_budget_gb must be positive or null"),
    ("exp_report__ttq_relative", -1, "ttq_relative must be positive"),
])
def test_batch_and_report_settings_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_params(**{key: value})


@pytest.mark.slow
def test_max_mode_with_the_real_cpu_probe_reaches_the_split_when_memory_allows(tmp_path, tiny_data):
    params = tiny_params(tiny_data["root"], train__common__batch_mode="max", train__common__memory_budget_gb=64.0,
                         train__common__epochs=1)
    summary = train(TrainSpec.of(params, "fp32"), paths_in(tmp_path, tiny_data))
    # 4 fits, 8 fits, then the split's 11 (the limit): three probe processes, each under 64 GiB
    assert summary.batch_size == 11 and summary.batch_probe.count("fits") == 3
    assert summary.lr_ed == pytest.approx(1e-3 * math.sqrt(11 / 4))
