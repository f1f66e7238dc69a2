"""Per-layer FP8 numerics (r2gen.fp8_stats): exact statistics of hand-built tensors, and a probe that
observes a real emulated-FP8 training step without changing it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from r2gen import fp8_emulation as emu
from r2gen.fp8_stats import Fp8LayerProbe, tensor_stats
from r2gen.fp8_table import worst_layers

E4M3_MIN_SUBNORMAL = 2.0**-9
E5M2_MIN_SUBNORMAL = 2.0**-16


def test_underflow_and_saturation_fractions_of_a_hand_built_tensor_are_exact():
    # 8 elements: one zero (never counted), one far below E4M3's smallest subnormal, one exactly half of it
    # (rounds to even: zero), one at 3/4 of it (rounds up to the subnormal), two above 448, two normal.
    x = torch.tensor([0.0, 1e-10, E4M3_MIN_SUBNORMAL / 2, 0.75 * E4M3_MIN_SUBNORMAL, 500.0, -1000.0, 1.0, -2.0])
    stats = tensor_stats(x, 1.0, emu.E4M3)
    assert stats == {"amax": 1000.0, "scale": 1.0, "underflow": 2 / 8, "saturation": 2 / 8}
    # E5M2 reaches 57344 and 2**-16: nothing saturates, only 1e-10 flushes.
    assert tensor_stats(x, 1.0, emu.E5M2) == {"amax": 1000.0, "scale": 1.0, "underflow": 1 / 8, "saturation": 0.0}
    # A scale of 1/4 brings 500 and -1000 under 448 (125, -250) and pushes 2**-9 * 3/4 under the subnormal.
    quarter = tensor_stats(x, 0.25, emu.E4M3)
    assert quarter["saturation"] == 0.0 and quarter["underflow"] == 3 / 8


def test_current_scaling_never_saturates_and_counts_what_the_amax_pushes_under():
    x = torch.tensor([1e4, 1e-3, 1.0, 0.0])
    scale = emu.FP8_MAX[emu.E4M3] / 1e4  # 0.0448: 1e-3 becomes 4.5e-5 < 2**-9
    assert tensor_stats(x, scale, emu.E4M3) == pytest.approx(
        {"amax": 1e4, "scale": scale, "underflow": 1 / 4, "saturation": 0.0})


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = emu.EmulatedFp8Linear(16, 32)
        self.b = emu.EmulatedFp8Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _step(model, x, recipe, probe_layers=None):
    """One forward/backward under emulated fp8; returns (loss, grads, probe rows or None)."""
    model.zero_grad()
    probe = Fp8LayerProbe(probe_layers, recipe) if probe_layers else None
    with (probe if probe else torch.enable_grad()), emu.fp8_autocast(recipe):
        loss = model(x).pow(2).mean()
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss.detach(), grads, probe.rows() if probe else None


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_the_probe_observes_a_step_without_changing_it(recipe):
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(8, 16)
    _step(model, x, recipe)  # warm the delayed history so its scales are the stored ones
    twin = copy.deepcopy(model)
    loss, grads, _ = _step(model, x, recipe)
    scales_before = {n: m.fp8_scale.clone() for n, m in (("a", twin.a), ("b", twin.b))}
    probed_loss, probed_grads, rows = _step(twin, x, recipe, {"a": twin.a, "b": twin.b})
    assert torch.equal(loss, probed_loss) and all(torch.equal(g, h) for g, h in zip(grads, probed_grads))
    assert torch.equal(model.a.fp8_amax_history, twin.a.fp8_amax_history)
    assert [r["layer"] for r in rows] == ["a", "b"]
    row = rows[0]
    if recipe == "current":
        assert row["input_scale"] == pytest.approx(448.0 / float(x.abs().amax()))
        assert row["input_saturation"] == row["weight_saturation"] == row["grad_output_saturation"] == 0.0
    else:  # the delayed scales in use are the ones stored before the step
        assert row["input_scale"] == pytest.approx(float(scales_before["a"][0]))
        assert row["grad_output_scale"] == pytest.approx(float(scales_before["a"][2]))
    assert 0 < row["gemm_rel_error"] < 0.1
    if recipe == "current":  # stateless: the same forward again gives the output the probe saw
        with torch.no_grad(), emu.fp8_autocast(recipe):
            fp8_out = twin.a(x)
            exact = nn.functional.linear(x, twin.a.weight, twin.a.bias)
        assert row["gemm_rel_error"] == pytest.approx(float((fp8_out - exact).norm() / exact.norm()), rel=1e-6)


def test_worst_layers_orders_by_gemm_error():
    rows = [{"layer": "a", "gemm_rel_error": 0.01}, {"layer": "b", "gemm_rel_error": 0.2},
            {"layer": "c", "gemm_rel_error": 0.05}]
    assert [r["layer"] for r in worst_layers(rows, n=2)] == ["b", "c"]


def test_an_fp8_run_writes_the_layer_table_at_the_probed_epochs_and_trains_exactly_as_unprobed(
        tmp_path, tiny_data, monkeypatch):
    from helpers import paths_in, step_losses, tiny_params
    from r2gen import fp8_stats, fp8_table, layout
    from r2gen.config import TrainSpec
    from r2gen.training import train

    params = tiny_params(tiny_data["root"], train__common__epochs=3, model__d_model=32, model__d_ff=32,
                         train__fp8__backend="emulated")
    spec = TrainSpec.of(params, "fp8")
    probed = paths_in(tmp_path / "probed", tiny_data, "fp8")
    summary = train(spec, probed)
    table = fp8_table.read_table(layout.fp8_layers(probed.live_dir))
    assert table["backend"] == "emulated" and table["speed_comparable"] is False
    assert table["epochs"] == [1, 2, 3]
    layers = {r["layer"] for r in table["rows"]}
    assert len(layers) == summary.fp8_linear_converted > 0
    for row in table["rows"]:
        assert 0 <= row["input_underflow"] <= 1 and 0 <= row["grad_output_saturation"] <= 1
        assert row["input_amax"] > 0 and row["grad_output_scale"] > 0 and row["gemm_rel_error"] > 0
    monkeypatch.setattr(fp8_stats, "probe_epochs", lambda epochs: [])
    plain = paths_in(tmp_path / "plain", tiny_data, "fp8")
    unprobed = train(spec, plain)
    assert not layout.fp8_layers(plain.live_dir).exists()
    assert step_losses(probed.live_dir) == step_losses(plain.live_dir)
    assert summary.train_loss == unprobed.train_loss and summary.val_loss == unprobed.val_loss


def test_probe_epochs_are_the_first_middle_and_last():
    from r2gen.fp8_stats import probe_epochs

    assert probe_epochs(1) == [0] and probe_epochs(2) == [0, 1] and probe_epochs(30) == [0, 14, 29]
