"""MFU of a training run (r2gen.training.mfu): model FLOPs counted without touching the run, the peak per
compute dtype and its source, and no utilisation claim where the run is not a speed measurement."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import tiny_params
from r2gen import flops
from r2gen import precision as prec
from r2gen.model.r2gen import R2Gen
from r2gen.training import mfu


def test_meta_count_equals_a_count_on_a_real_model_and_draws_no_random_numbers():
    model_cfg = tiny_params().model
    state = torch.random.get_rng_state()
    meta = mfu.model_flops_per_sample(model_cfg, 50, views=2, image_size=32, seq_len=12)
    assert torch.equal(state, torch.random.get_rng_state())
    net = R2Gen(model_cfg, 50).train()
    images = torch.zeros(3, 2, 32, 32, dtype=torch.uint8)
    labels = torch.ones(3, 12, dtype=torch.long)
    real = flops.flops_per_sample(lambda: net(images, labels).loss.backward(), batch=3)
    assert meta == real > 0
    # Longer reports cost more decoder FLOPs.
    assert mfu.model_flops_per_sample(model_cfg, 50, views=2, image_size=32, seq_len=24) > meta


def test_the_cpu_peak_is_measured_at_the_compute_dtype_and_leaves_the_rng_alone():
    plan = prec.resolve("fp32", "auto", "cpu")
    state = torch.random.get_rng_state()
    peak = mfu.measure_peak(plan, "cpu")
    assert torch.equal(state, torch.random.get_rng_state())
    assert peak.dtype == "fp32" and peak.tflops == peak.measured_tflops > 0
    assert peak.source.startswith("measured 1024x1024 fp32 GEMM")
    assert mfu.peak_dtype(prec.resolve("bf16", "auto", "cpu")) == "bf16"
    assert mfu.peak_dtype(prec.resolve("fp8", "emulated", "cpu")) == "fp8"


def test_a_known_cuda_device_is_measured_against_its_datasheet_with_the_probe_recorded(monkeypatch):
    monkeypatch.setattr(flops, "matmul_tflops", lambda dtype, device, n, repeats: {"tflops": 700.0})
    plan = types.SimpleNamespace(precision="bf16", autocast_dtype=torch.bfloat16, device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: __import__("contextlib").nullcontext())
    peak = mfu.measure_peak(plan, "NVIDIA H200")
    assert (peak.dtype, peak.tflops, peak.measured_tflops) == ("bf16", 989.5, 700.0)
    assert peak.source.startswith("datasheet: NVIDIA H200")
    unknown = mfu.measure_peak(plan, "Some Future GPU")
    assert unknown.tflops == 700.0 and unknown.source.startswith("measured 4096x4096 bf16")


def test_utilisation_is_flops_times_rate_over_the_peak_or_a_reason():
    peak = mfu.Peak("fp32", 0.2, "measured", 0.2)
    got = mfu.utilisation(1e9, 50.0, peak, speed_comparable=True, note="")
    assert got["achieved_tflops"] == pytest.approx(0.05) and got["mfu"] == pytest.approx(0.25)
    assert got["peak_source"] == "measured" and got["mfu_note"] is None
    emulated = mfu.utilisation(1e9, 50.0, None, speed_comparable=False, note="FP8 numerics only")
    assert emulated["mfu"] is None and emulated["flops_per_sample"] == 1e9
    assert emulated["achieved_tflops"] == pytest.approx(0.05)
    assert "not a speed measurement (FP8 numerics only)" in emulated["mfu_note"]
    failed = mfu.utilisation(1e9, 50.0, mfu.Peak("fp8", None, "fp8 GEMM probe failed: x", None), True, "")
    assert failed["mfu"] is None and "probe failed" in failed["mfu_note"]
