"""r2gen.flops: FLOPs of a real step equal a hand count; the peak table reads the right datasheet row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from r2gen import flops


def test_training_step_flops_equal_a_hand_count():
    # x (3, 8) -> Linear(8, 4) -> ReLU -> Linear(4, 2); the input needs no gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 8)

    def step():
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    forward = 2 * 3 * 8 * 4 + 2 * 3 * 4 * 2  # 192 + 48
    backward = (2 * 3 * 4 * 2) * 2 + 2 * 3 * 8 * 4  # layer 2: input and weight grads; layer 1: weight grad only
    assert flops.flops_per_sample(step, batch=3) == (forward + backward) / 3  # 528 / 3


def test_conv_and_attention_are_counted():
    conv = nn.Conv2d(2, 4, kernel_size=3, bias=False)
    total, _ = flops.count_flops(lambda: conv(torch.randn(1, 2, 5, 5)))
    assert total == 2 * (4 * 3 * 3) * (2 * 3 * 3)  # 2 x out pixels (4 ch x 3 x 3) x (in ch x k x k)
    q = torch.randn(1, 2, 4, 8)  # (B, heads, T, hs)
    total, _ = flops.count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q))
    assert total == 2 * (2 * 1 * 2 * 4 * 4 * 8)  # QK^T and AV: 2 FLOPs x B x h x T x T x hs each


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L4", "L4"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 4070", "RTX 4070"),
])
def test_device_names_map_to_their_datasheet_row(name, key):
    peak = flops.device_peak(name)
    assert peak is flops.DENSE_PEAK_TFLOPS[key]
    assert peak.source and set(peak.tflops) == set(flops.PEAK_PRECISIONS)


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4070 Ti", "NVIDIA GeForce RTX 4070 SUPER", "Tesla T4", "cpu"])
def test_other_chips_have_no_peak(name):
    assert flops.device_peak(name) is None


def test_dense_peaks_are_ordered_and_h200_fp8_is_half_the_sparse_figure():
    for peak in flops.DENSE_PEAK_TFLOPS.values():
        t = peak.tflops
        assert t["fp32"] < t["bf16"] == t["fp16"], peak.device
        assert t["fp8"] is None or t["fp8"] == pytest.approx(2 * t["bf16"], rel=0.01), peak.device
    assert flops.DENSE_PEAK_TFLOPS["H200 SXM"].tflops["fp8"] == 3958 / 2


def test_mfu():
    assert flops.mfu(1e12, 50.0, 100.0) == pytest.approx(0.5)
    assert flops.mfu(1e12, 50.0, None) is None


def test_matmul_probe_measures_or_says_why_not():
    out = flops.matmul_tflops("fp32", "cpu", n=64, repeats=2)
    assert out["tflops"] > 0 and len(out["runs"]) == 2
    with pytest.raises(ValueError, match="unknown precision"):
        flops.matmul_tflops("int4")
