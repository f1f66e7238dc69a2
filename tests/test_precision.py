"""Precision policy: resolve() table, numerics flags, autocast, emulated FP8 numerics and conversion."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from r2gen import precision
from r2gen.errors import PrecisionError
from r2gen.fp8_emulation import (E4M3, E5M2, GRAD_OUTPUT, INPUT, EmulatedFp8Linear, fp8_autocast, quantize,
                                 quantize_dequantize, scale_from_amax)
from r2gen.precision import Hardware, convert_model, plain_state_dict, resolve, verify_fp8

torch.set_num_threads(1)

NO_CUDA = Hardware(cuda_available=False, device_name="test cpu", te_error="not tried without a CUDA device")
H100 = Hardware(True, "NVIDIA H100", (9, 0), te_version="2.8.0")
H100_NO_TE = Hardware(True, "NVIDIA H100", (9, 0), te_error="ModuleNotFoundError: No module named 'transformer_engine'")
RTX3090 = Hardware(True, "NVIDIA GeForce RTX 3090", (8, 6), te_error="not tried below compute capability 8.9")
V100 = Hardware(True, "Tesla V100", (7, 0), te_error="not tried below compute capability 8.9")


NO_TORCHAO = (None, "ModuleNotFoundError: No module named 'torchao'")


@pytest.fixture
def machine(monkeypatch):
    """Play another machine: ``machine(hardware, torchao)`` replaces the hardware and torchao probes."""
    def play(hardware: Hardware, torchao: tuple = NO_TORCHAO) -> None:
        monkeypatch.setattr(precision, "probe_hardware", lambda device: hardware)
        monkeypatch.setattr(precision, "probe_torchao", lambda: torchao)
    return play


class Block(nn.Module):
    """A feed-forward block with an eligible and an ineligible (12 wide) Linear."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.narrow = nn.Linear(2 * d, 12)
        self.down = nn.Linear(12, d, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.narrow(torch.relu(self.up(x)))))


class ToyModel(nn.Module):
    """in -> block -> hidden -> head; the head is not a candidate (like R2Gen's vocab head)."""

    def __init__(self, d_in: int = 32, d: int = 32, classes: int = 4, skip_hidden: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.block = Block(d)
        self.hidden = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)
        self.skip_hidden = skip_hidden  # bypasses a converted layer, for verify_fp8

    def fp8_candidates(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Linear) and n != "head"]

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + self.block(h)
        if not self.skip_hidden:
            h = torch.relu(self.hidden(h))
        return self.head(h)


def toy_data(n: int = 64, d_in: int = 32, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    y = (x[:, :classes] * torch.arange(1, classes + 1)).argmax(1)  # learnable labels
    return x, y


def train(model: nn.Module, plan, steps: int, lr: float = 3e-3, optimizer=None) -> list[float]:
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in toy_data())
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    scaler = plan.grad_scaler()
    losses = []
    for _ in range(steps):
        with plan.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses


def fp8_model(recipe: str = "delayed", **kwargs):
    torch.manual_seed(0)
    model = ToyModel(**kwargs)
    plan = resolve("fp8", "emulated", "cpu", recipe)
    return model, plan, convert_model(model, plan)


# --- resolve ------------------------------------------------------------------------------------

CPU_TABLE = {
    ("fp32", "auto"): "native", ("fp32", "native"): "native",
    ("fp16", "auto"): "native", ("fp16", "native"): "native",
    ("bf16", "auto"): "native", ("bf16", "native"): "native",
    ("fp8", "auto"): "emulated", ("fp8", "emulated"): "emulated",
    ("fp32", "te"): "backend te is for fp8 only", ("fp32", "emulated"): "backend emulated is for fp8 only",
    ("fp32", "torchao"): "backend torchao is for fp8 only", ("bf16", "torchao"): "backend torchao is for fp8 only",
    ("fp16", "te"): "backend te is for fp8 only", ("fp16", "emulated"): "backend emulated is for fp8 only",
    ("bf16", "te"): "backend te is for fp8 only", ("bf16", "emulated"): "backend emulated is for fp8 only",
    ("fp8", "native"): "fp8 has no native torch backend",
    ("fp8", "te"): "fp8 with backend te needs a CUDA GPU with compute capability >= 8.9 and transformer-engine; "
                   "found: no CUDA device. Use backend: torchao, emulated (numerics only) or auto",
}


@pytest.mark.parametrize("precision_name,backend", sorted(CPU_TABLE))
def test_resolve_on_cpu_gives_plan_or_error_for_every_combination(machine, precision_name, backend):
    machine(NO_CUDA)
    expected = CPU_TABLE[(precision_name, backend)]
    if expected in ("native", "emulated"):
        plan = resolve(precision_name, backend, "cpu")
        assert (plan.precision, plan.backend, plan.requested_backend) == (precision_name, expected, backend)
        assert plan.autocast_dtype == precision.AUTOCAST_DTYPES[precision_name]
        assert plan.fp8_recipe == ("delayed" if precision_name == "fp8" else None)
    else:
        with pytest.raises(PrecisionError, match="params.yaml") as info:
            resolve(precision_name, backend, "cpu")
        assert expected in str(info.value)
        assert "\n" not in str(info.value)


def test_resolve_rejects_unknown_values_with_the_valid_set():
    with pytest.raises(PrecisionError, match="must be one of: fp32, fp16, bf16, fp8"):
        resolve("fp4")
    with pytest.raises(PrecisionError, match="must be one of: auto, native, te, torchao, emulated"):
        resolve("fp8", "tensorrt")
    with pytest.raises(PrecisionError, match="must be one of: delayed, current"):
        resolve("fp8", fp8_recipe="mxfp8")


def test_auto_backend_choice_and_reason_are_recorded_in_describe(machine):
    machine(NO_CUDA)
    info = resolve("fp8", "auto", "cpu", "current").describe()
    assert info["backend"] == "emulated" and info["backend_requested"] == "auto"
    assert "found: no CUDA device" in info["backend_reason"]
    assert info["fp8_recipe"] == "current" and info["autocast_dtype"] == "bfloat16"
    assert info["speed_comparable"] is False and "not FP8 speed" in info["note"]


def test_describe_is_json_safe_for_every_cpu_plan():
    for name in precision.PRECISIONS:
        info = resolve(name).describe()
        assert json.loads(json.dumps(info)) == info
        assert {"precision", "backend", "autocast_dtype", "fp8_recipe", "device_name", "torch", "cuda",
                "transformer_engine", "speed_comparable", "note", "cpu_capability"} <= info.keys()


@pytest.mark.parametrize("native,comparable", [(False, False), (True, True)])
def test_cpu_low_precision_speed_is_comparable_only_with_native_kernels(monkeypatch, native, comparable):
    monkeypatch.setattr(precision, "cpu_support",
                        lambda: {"capability": "AVX512", "bf16": native, "fp16": native, "flags": []})
    assert resolve("fp16").describe()["speed_comparable"] is comparable
    assert resolve("bf16").describe()["speed_comparable"] is comparable
    assert resolve("fp32").describe()["speed_comparable"] is True


def test_auto_picks_te_on_a_capable_gpu_with_transformer_engine(machine):
    machine(H100)
    for backend in ("auto", "te"):
        plan = resolve("fp8", backend, "cuda")
        assert (plan.backend, plan.autocast_dtype) == ("te", torch.bfloat16)
    info = resolve("fp8", "auto", "cuda").describe()
    assert info["compute_capability"] == "9.0" and info["transformer_engine"] == "2.8.0"
    assert info["speed_comparable"] is True and "Transformer Engine 2.8.0" in info["note"]
    assert resolve("fp8", "emulated", "cuda").backend == "emulated"  # still allowed, for comparisons


@pytest.mark.parametrize("hardware,found", [
    (RTX3090, "found: NVIDIA GeForce RTX 3090 with compute capability 8.6."),
    (H100_NO_TE, "found: NVIDIA H100 (compute capability 9.0) but transformer_engine does not import "
                 "(ModuleNotFoundError: No module named 'transformer_engine')"),
])
def test_te_backend_errors_say_what_was_found_and_auto_falls_back(machine, hardware, found):
    machine(hardware)
    with pytest.raises(PrecisionError, match="Use backend: torchao, emulated") as info:
        resolve("fp8", "te", "cuda")
    assert found in str(info.value)
    plan = resolve("fp8", "auto", "cuda")
    assert plan.backend == "emulated" and found.rstrip(".") in plan.reason


def test_te_backend_on_cpu_device_of_a_gpu_machine_names_the_device_setting(machine):
    machine(Hardware(True, "test cpu"))
    with pytest.raises(PrecisionError, match=r"found: device cpu selected \(train.common.device\)"):
        resolve("fp8", "te", "cpu")


def test_bf16_on_a_pre_ampere_gpu_is_an_error(machine):
    machine(V100)
    with pytest.raises(PrecisionError, match="bf16 needs a CUDA GPU with compute capability >= 8.0; found: Tesla V100"):
        resolve("bf16", "auto", "cuda")
    assert resolve("fp16", "auto", "cuda").backend == "native"


def test_select_device():
    assert precision.select_device("cpu") == torch.device("cpu")
    assert precision.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PrecisionError, match="must be one of: auto, cpu, cuda"):
        precision.select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PrecisionError, match="set train.common.device to auto or cpu"):
            precision.select_device("cuda")


# --- fp32 flags, autocast, GradScaler -------------------------------------------------------------

def test_set_fp32_numerics_turns_tf32_off():
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    precision.set_fp32_numerics("cpu")
    flags = precision.fp32_precision_flags()
    assert flags["cuda_matmul"] == "ieee" and flags["cudnn_conv"] == "ieee"
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert resolve("fp32").describe()["fp32_precision"]["cudnn_conv"] == "ieee"


@pytest.mark.parametrize("name,dtype,scaler", [
    ("fp32", torch.float32, False), ("fp16", torch.float16, True),
    ("bf16", torch.bfloat16, False), ("fp8", torch.bfloat16, False),
])
def test_autocast_dtype_and_grad_scaler_per_precision(name, dtype, scaler):
    plan = resolve(name)
    linear, x = nn.Linear(8, 8), torch.randn(2, 8)
    with plan.autocast():
        assert linear(x).dtype == dtype  # fp8: layers that are not converted run in bf16
    assert plan.grad_scaler().is_enabled() is scaler


def test_fp32_autocast_disables_an_outer_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16), resolve("fp32").autocast():
        assert nn.Linear(4, 4)(torch.randn(1, 4)).dtype == torch.float32


def test_mask_fill_value_is_finite_in_each_dtype():
    assert precision.mask_fill_value(torch.float16) == -65504.0
    assert precision.mask_fill_value(torch.bfloat16) == torch.finfo(torch.bfloat16).min


# --- emulated fp8 numerics ------------------------------------------------------------------------

def fp8_grid(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All finite values of an fp8 dtype (fp32, ascending) and whether each has an even code."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(dtype).float()
    keep = torch.isfinite(values) & ~((values == 0) & (codes >= 128))  # drop nan/inf and -0
    values, codes = values[keep], codes[keep]
    order = values.argsort()
    return values[order], (codes[order] % 2 == 0)


def round_to_grid(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference: nearest grid value, ties to the even code, saturating at the largest value."""
    grid, even = fp8_grid(dtype)
    x = x.clamp(grid[0].item(), grid[-1].item())
    hi = torch.searchsorted(grid, x).clamp(1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = x - grid[lo], grid[hi] - x
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & even[hi])
    return torch.where(pick_hi, grid[hi], grid[lo])


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_representable_values_survive_quantize_dequantize(dtype):
    grid, _ = fp8_grid(dtype)
    one = torch.tensor(1.0)
    assert torch.equal(quantize_dequantize(grid, one, dtype), grid)
    # A power-of-two scale moves values along the grid exactly.
    assert torch.equal(quantize_dequantize(grid / 8, torch.tensor(8.0), dtype), grid / 8)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_rounds_to_nearest_even_like_a_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g) * torch.logspace(-6, 5, 20000)
    grid, _ = fp8_grid(dtype)
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact ties, the hard cases
    x = torch.cat([x, -x, midpoints])
    assert torch.equal(quantize_dequantize(x, torch.tensor(1.0), dtype), round_to_grid(x, dtype))


def test_quantize_saturates_instead_of_overflowing():
    big = torch.tensor([500.0, 1e6, -1e6, 6e4, 1e9])
    assert quantize(big, torch.tensor(1.0), E4M3).float().tolist() == [448.0, 448.0, -448.0, 448.0, 448.0]
    assert quantize(big, torch.tensor(1.0), E5M2).float().tolist() == [512.0, 57344.0, -57344.0, 57344.0, 57344.0]


def test_per_tensor_scale_maps_the_amax_to_the_format_maximum():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) * 3e-3
    amax = x.abs().amax()
    for dtype, fp8_max in ((E4M3, 448.0), (E5M2, 57344.0)):
        scale = scale_from_amax(amax, dtype)
        assert scale.item() == pytest.approx(fp8_max / amax.item())
        assert quantize(x, scale, dtype).float().abs().max().item() == fp8_max
        normal = (x * scale).abs() >= torch.finfo(dtype).smallest_normal
        error = ((quantize_dequantize(x, scale, dtype) - x) / x)[normal].abs().max().item()
        assert error <= torch.finfo(dtype).eps / 2 + 1e-6  # half an ulp: 3 (E4M3) or 2 (E5M2) mantissa bits
    assert scale_from_amax(torch.tensor(0.0), E4M3).item() == 1.0  # nothing to scale: keep 1


def reference_linear(x, weight, bias, x_scale, w_scale):
    return quantize_dequantize(x, x_scale, E4M3) @ quantize_dequantize(weight, w_scale, E4M3).t() + bias


def test_emulated_linear_forward_and_backward_match_the_fp8_reference():
    torch.manual_seed(0)
    layer = EmulatedFp8Linear.from_linear(nn.Linear(32, 16))
    x = torch.randn(5, 3, 32, requires_grad=True)
    upstream = torch.randn(5, 3, 16) * 1e-3
    with fp8_autocast("current"):
        out = layer(x)
    out.backward(upstream)

    x_scale = 448.0 / x.detach().abs().amax()
    w_scale = 448.0 / layer.weight.detach().abs().amax()
    g_scale = 57344.0 / upstream.abs().amax()
    assert torch.allclose(out, reference_linear(x.detach(), layer.weight.detach(), layer.bias.detach(), x_scale,
                                                w_scale), atol=1e-6, rtol=1e-6)
    g = quantize_dequantize(upstream, g_scale, E5M2)  # the backward quantizes the gradient to E5M2
    w = quantize_dequantize(layer.weight.detach(), w_scale, E4M3)
    xq = quantize_dequantize(x.detach(), x_scale, E4M3)
    assert torch.allclose(x.grad, g @ w, atol=1e-7, rtol=1e-5)
    assert torch.allclose(layer.weight.grad, g.reshape(-1, 16).t() @ xq.reshape(-1, 32), atol=1e-7, rtol=1e-5)
    assert torch.allclose(layer.bias.grad, upstream.sum((0, 1)))  # bias gradient is not quantized
    g_e4m3 = quantize_dequantize(upstream, 448.0 / upstream.abs().amax(), E4M3)
    assert not torch.allclose(x.grad, g_e4m3 @ w, atol=1e-7, rtol=1e-5)  # it really was E5M2


def test_emulated_linear_outside_fp8_autocast_is_a_plain_linear():
    linear = nn.Linear(16, 16)
    layer = EmulatedFp8Linear.from_linear(linear)
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), linear(x)) and layer.fp8_forward_calls == 0
    assert layer.weight is linear.weight  # the same Parameter: ties and optimizer references survive


def test_delayed_scaling_uses_the_history_and_current_scaling_the_tensor_now():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    x1 = torch.randn(8, 16)
    x2 = 4 * x1  # the input grows 4x in step 2
    outputs = {}
    for recipe in ("delayed", "current"):
        layer = EmulatedFp8Linear.from_linear(base)
        with fp8_autocast(recipe):
            layer(x1)
            outputs[recipe] = layer(x2).detach()
    w_scale = 448.0 / base.weight.detach().abs().amax()
    b = base.bias.detach()
    # delayed: step 2 still scales with step 1's amax, so the 4x input saturates at 448 / scale.
    expect_delayed = reference_linear(x2, base.weight.detach(), b, 448.0 / x1.abs().amax(), w_scale)
    expect_current = reference_linear(x2, base.weight.detach(), b, 448.0 / x2.abs().amax(), w_scale)
    assert torch.allclose(outputs["delayed"], expect_delayed, atol=1e-5)
    assert torch.allclose(outputs["current"], expect_current, atol=1e-5)
    assert (outputs["delayed"] - outputs["current"]).abs().max() > 1.0


def test_delayed_history_keeps_the_max_of_recent_amaxes():
    layer = EmulatedFp8Linear.from_linear(nn.Linear(16, 16))
    with fp8_autocast("delayed"):
        for amax in (2.0, 8.0, 4.0):
            layer(torch.full((1, 16), amax))
    assert layer.fp8_amax_history[:3, INPUT].tolist() == [4.0, 8.0, 2.0]  # newest first
    assert layer.fp8_scale[INPUT].item() == 448.0 / 8.0
    with torch.no_grad(), fp8_autocast("delayed"):  # evaluation does not feed the history
        layer(torch.full((1, 16), 100.0))
    assert layer.fp8_amax_history[0, INPUT].item() == 4.0


def test_delayed_scaling_does_not_zero_gradients_on_the_first_step():
    torch.manual_seed(0)
    layer = EmulatedFp8Linear.from_linear(nn.Linear(32, 32))
    x = torch.randn(16, 32)
    upstream = torch.randn(16, 32) * 1e-6  # small gradients, as from a mean loss over many tokens
    # TE starts from scale 1, where E5M2 (smallest subnormal 1.5e-5) flushes all of them to zero.
    assert quantize_dequantize(upstream, torch.tensor(1.0), E5M2).count_nonzero() == 0
    with fp8_autocast("delayed"):
        layer(x).backward(upstream)
    assert layer.weight.grad.count_nonzero() == layer.weight.numel()
    g = quantize_dequantize(upstream, 57344.0 / upstream.abs().amax(), E5M2)
    assert torch.allclose(layer.weight.grad, g.t() @ quantize_dequantize(x, 448.0 / x.abs().amax(), E4M3),
                          rtol=1e-5, atol=1e-12)
    assert layer.fp8_amax_history[0, GRAD_OUTPUT].item() == upstream.abs().amax().item()


# --- convert_model, verify_fp8, state dicts -------------------------------------------------------

def test_convert_model_swaps_exactly_the_eligible_candidates_and_reports_the_rest():
    model, plan, report = fp8_model()
    assert report == {
        "converted": ["inp", "block.up", "hidden"],
        "skipped": {"block.narrow": "out_features 12 not a multiple of 16",
                    "block.down": "in_features 12 not a multiple of 16"},
        "linear_total": 6,
        "linear_converted": 3,
    }
    converted = {n for n, m in model.named_modules() if isinstance(m, EmulatedFp8Linear)}
    assert converted == {"inp", "block.up", "hidden"}
    assert type(model.head) is nn.Linear and type(model.block.narrow) is nn.Linear


def test_convert_model_is_a_no_op_for_other_precisions():
    model = ToyModel()
    for name in ("fp32", "fp16", "bf16"):
        assert convert_model(model, resolve(name)) == {"converted": [], "skipped": {}, "linear_total": 6,
                                                       "linear_converted": 0}
    assert not any(isinstance(m, EmulatedFp8Linear) for m in model.modules())


def test_convert_model_skips_shared_layers_and_refuses_a_model_without_eligible_layers():
    model = ToyModel()
    model.alias = model.hidden  # one Linear under two names
    report = convert_model(model, resolve("fp8", "emulated"))
    assert report["skipped"]["hidden"] == "shared by 2 parents (converting one would untie them)"
    with pytest.raises(PrecisionError, match="fp8 would convert no layer of ToyModel .*multiples of 16"):
        convert_model(ToyModel(d_in=8, d=24), resolve("fp8", "emulated"))
    with pytest.raises(TypeError, match="fp8_candidates"):
        convert_model(nn.Sequential(nn.Linear(16, 16)), resolve("fp8", "emulated"))


def test_parameter_names_survive_and_plain_state_dicts_load_both_ways():
    plain = ToyModel()
    model, plan, _ = fp8_model()
    train(model, plan, steps=2)
    fp8_state = model.state_dict()
    assert fp8_state["inp.fp8_amax_history"].abs().sum() > 0
    assert set(plain_state_dict(fp8_state)) == set(plain.state_dict())
    plain.load_state_dict(plain_state_dict(fp8_state))  # strict: evaluation in an unconverted fp32 model

    fresh, _, _ = fp8_model()
    fresh.load_state_dict(plain.state_dict())  # strict: a plain checkpoint loads into a converted model
    assert fresh.inp.fp8_amax_history.abs().sum() == 0  # ... and its fp8 state starts cold
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), plain(x))  # outside the fp8 context both are the same fp32 network


def test_plain_state_dict_drops_transformer_engine_extra_state():
    state = {"a.weight": torch.ones(1), "a._extra_state": torch.empty(0, dtype=torch.uint8), "b.fp8_scale": 1}
    assert list(plain_state_dict(state)) == ["a.weight"]


def test_verify_fp8_passes_after_a_step_and_fails_when_a_layer_was_bypassed():
    model, plan, _ = fp8_model()
    train(model, plan, steps=1)
    verify_fp8(model, plan)

    bypassing, plan, _ = fp8_model(skip_hidden=True)
    train(bypassing, plan, steps=1)
    with pytest.raises(PrecisionError, match=r"1 of 3 converted layers did not run in FP8 \(hidden\)"):
        verify_fp8(bypassing, plan)


def test_verify_fp8_fails_when_the_forward_ran_outside_plan_autocast():
    model, plan, _ = fp8_model()
    x, y = toy_data()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(PrecisionError, match="3 of 3 converted layers did not run in FP8"):
        verify_fp8(model, plan)
    with pytest.raises(PrecisionError, match="call r2gen.precision.convert_model"):
        verify_fp8(ToyModel(), plan)


def test_resume_from_a_weights_only_checkpoint_repeats_the_next_step_exactly(tmp_path):
    model, plan, _ = fp8_model("delayed")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train(model, plan, steps=3, optimizer=optimizer)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")

    resumed, _, _ = fp8_model("delayed")
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=3e-3)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])

    resumed_losses = train(resumed, plan, steps=2, optimizer=resumed_optimizer)
    assert resumed_losses == train(model, plan, steps=2, optimizer=optimizer)
    for a, b in zip(resumed.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_fp8_and_bf16_losses_track_fp32_over_30_steps():
    """Emulated fp8 (both recipes) and bf16 stay within 0.05 of fp32's loss at every step."""
    losses = {}
    for name, recipe in (("fp32", "delayed"), ("bf16", "delayed"), ("fp8", "delayed"), ("fp8", "current")):
        torch.manual_seed(0)
        model = ToyModel()
        plan = resolve(name, fp8_recipe=recipe)
        convert_model(model, plan)
        losses[f"{name}-{recipe}"] = torch.tensor(train(model, plan, steps=30))
    reference = losses.pop("fp32-delayed")
    assert reference[-1] < 0.5 * reference[0]  # it learns
    for name, curve in losses.items():
        deviation = (curve - reference).abs().max().item()
        assert deviation < 0.05, f"{name} deviates from fp32 by {deviation:.4f}"


# --- Transformer Engine on a real GPU (skipped elsewhere) -----------------------------------------

def te_ready() -> bool:
    return torch.cuda.is_available() and precision.probe_hardware(torch.device("cuda")).te_version is not None


@pytest.mark.gpu
@pytest.mark.skipif(not te_ready(), reason="needs a CUDA GPU with compute capability >= 8.9 and transformer-engine")
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_backend_trains_in_fp8_and_tracks_the_emulation(recipe, tmp_path):
    device = torch.device("cuda")
    losses, models = {}, {}
    for backend in ("te", "emulated"):
        torch.manual_seed(0)
        model = models[backend] = ToyModel().to(device)
        plan = resolve("fp8", backend, device, recipe)
        assert convert_model(model, plan)["converted"] == ["inp", "block.up", "hidden"]
        losses[backend] = torch.tensor(train(model, plan, steps=10))
        verify_fp8(model, plan)
        with plan.autocast():
            assert model(torch.randn(5, 3, 32, device=device)).shape == (5, 3, 4)  # rows padded for TE
    assert (losses["te"] - losses["emulated"]).abs().max() < 0.05  # TE's delayed step 1 starts from scale 1

    torch.save(models["te"].state_dict(), tmp_path / "model.pt")  # _extra_state is a uint8 tensor
    plain = ToyModel().to(device)
    plain.load_state_dict(plain_state_dict(torch.load(tmp_path / "model.pt", weights_only=True)))
