"""The three fp8 backends: torchao's float8 training on a CPU, and Transformer Engine through a fake.

Transformer Engine needs CUDA, so ``fake_te`` installs a small stand-in into ``sys.modules`` that
reproduces the mechanisms our code depends on: ``te.Linear`` runs a weight init that draws from the
RNG; its delayed-scaling state (``fp8_meta[...].scale`` / ``.amax_history``) starts at scale 1, is
created at the first FP8 forward and updated only by grad-enabled passes; ``get_extra_state`` pickles
it and ``set_extra_state`` refuses a pickle unless ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` (TE >=
2.18); ``FP8GlobalStateManager.is_fp8_available()`` answers ``(bool, reason)``. torchao is the real
package (the ``dev`` extra installs it): its ``Float8Linear`` runs through ``torch._scaled_mm``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from r2gen import fp8_torchao, precision
from r2gen.checkpoint import load_torch
from r2gen.distributed import World
from r2gen.errors import PrecisionError
from r2gen.fp8_emulation import E4M3, E5M2
from r2gen.precision import Hardware, convert_model, resolve, verify_fp8
from r2gen.training.state import TrainState, Trainables, load_resumable, restore_checkpoint, save_checkpoint

torch.set_num_threads(1)
torchao_missing = fp8_torchao.probe()[0] is None
needs_torchao = pytest.mark.skipif(torchao_missing, reason="torchao not installed (pip install -e '.[dev]')")
UNSAFE = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


class Toy(nn.Module):
    """in -> dropout -> two eligible Linears -> 12-wide (ineligible) -> head (not a candidate)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.narrow = nn.Linear(32, 12)
        self.head = nn.Linear(12, 4)
        self.drop = nn.Dropout(0.1)

    def fp8_candidates(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Linear) and n != "head"]

    def forward(self, x):
        h = self.drop(torch.relu(self.inp(x)))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(torch.relu(self.narrow(h)))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 32, generator=g)
    return x, (x[:, :4] * torch.arange(1, 5)).argmax(1)


def step(model, plan, optimizer, scheduler=None) -> float:
    x, y = data()
    with plan.autocast():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()


def build(plan):
    torch.manual_seed(0)
    model = Toy()
    report = convert_model(model, plan)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    parts = Trainables(model, optimizer, scheduler, plan.grad_scaler(), torch.Generator().manual_seed(0))
    return parts, report


# --- a fake Transformer Engine ---------------------------------------------------------------------

class _FakeFp8:
    """TE's global FP8 state (FP8GlobalStateManager) and what our code asked of it."""

    enabled = False
    recipe = None
    available = (True, "")
    forward_recipes: list[str] = []  # "delayed" | "current": the recipe each FP8 forward ran under

    @classmethod
    def is_fp8_enabled(cls):
        return cls.enabled

    @classmethod
    def get_fp8_recipe(cls):
        return cls.recipe

    @classmethod
    def is_fp8_available(cls):
        return cls.available


class _Recipe:
    def __init__(self, delayed: bool, amax_history_len: int = 16, **_) -> None:
        self._delayed, self.amax_history_len = delayed, amax_history_len

    def delayed(self) -> bool:
        return self._delayed


@contextlib.contextmanager
def _fake_autocast(enabled=True, recipe=None, fp8_recipe=None):
    previous = (_FakeFp8.enabled, _FakeFp8.recipe)
    _FakeFp8.enabled, _FakeFp8.recipe = enabled, recipe or fp8_recipe
    try:
        yield
    finally:
        _FakeFp8.enabled, _FakeFp8.recipe = previous


def _q(x, scale, dtype):
    fp8_max = torch.finfo(dtype).max
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).float() / scale


class _FakeLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, record):
        meta, delayed = layer.fp8_meta, _FakeFp8.recipe.delayed()
        amax = torch.stack([x.detach().abs().amax().float(), weight.detach().abs().amax().float()])
        scale = meta["scaling_fwd"].scale[:2].clone() if delayed else 448.0 / amax
        if delayed and record:  # TE records amaxes only when grad is enabled
            meta["scaling_fwd"].amax_history[0, :2] = torch.maximum(meta["scaling_fwd"].amax_history[0, :2], amax)
            meta["scaling_fwd"].scale[:2] = 448.0 / meta["scaling_fwd"].amax_history[:, :2].amax(0)
        with torch.autocast("cpu", enabled=False):
            xq, wq = _q(x, scale[0], E4M3), _q(weight, scale[1], E4M3)
            out = xq @ wq.t() + (bias.float() if bias is not None else 0)
        ctx.save_for_backward(xq, wq)
        ctx.layer, ctx.delayed, ctx.dtypes = layer, delayed, (x.dtype, weight.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xq, wq = ctx.saved_tensors
        amax = grad.abs().amax().float()
        meta = ctx.layer.fp8_meta["scaling_bwd"]
        scale = meta.scale[0].clone() if ctx.delayed else 57344.0 / amax
        if ctx.delayed:
            meta.amax_history[0, 0] = torch.maximum(meta.amax_history[0, 0], amax)
            meta.scale[0] = 57344.0 / meta.amax_history[:, 0].amax()
        g = _q(grad, scale, E5M2)
        return (g @ wq).to(ctx.dtypes[0]), (g.t() @ xq).to(ctx.dtypes[1]), grad.float().sum(0), None, None


class _FakeTELinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        nn.init.normal_(self.weight, std=0.02)  # TE's init_method: draws from the device's RNG
        self.fp8_meta = {}
        self.fp8_meta_tensors_initialized = False

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        if not _FakeFp8.enabled:
            return
        recipe = _FakeFp8.recipe
        if self.fp8_meta_tensors_initialized and self.fp8_meta["delayed"] == recipe.delayed():
            return
        self.fp8_meta["delayed"] = recipe.delayed()  # a recipe change re-creates the state, as in TE
        if recipe.delayed():
            n = recipe.amax_history_len
            self.fp8_meta["scaling_fwd"] = SimpleNamespace(scale=torch.ones(3), amax_history=torch.zeros(n, 3))
            self.fp8_meta["scaling_bwd"] = SimpleNamespace(scale=torch.ones(2), amax_history=torch.zeros(n, 2))
        else:
            self.fp8_meta["scaling_fwd"] = self.fp8_meta["scaling_bwd"] = SimpleNamespace()
        self.fp8_meta_tensors_initialized = True

    def forward(self, x):
        self.init_fp8_metadata()
        if not _FakeFp8.enabled:
            return nn.functional.linear(x, self.weight, self.bias)
        _FakeFp8.forward_recipes.append("delayed" if _FakeFp8.recipe.delayed() else "current")
        if torch.is_autocast_enabled("cpu"):
            x = x.to(torch.get_autocast_dtype("cpu"))
        return _FakeLinearFn.apply(x, self.weight, self.bias, self, torch.is_grad_enabled())

    def get_extra_state(self):  # TE: the delayed state as a pickle in a uint8 tensor
        state = {k: getattr(self.fp8_meta.get(k), "__dict__", None) for k in ("scaling_fwd", "scaling_bwd")}
        return torch.frombuffer(bytearray(pickle.dumps({"recipe": "DelayedScaling", **state})), dtype=torch.uint8)

    def set_extra_state(self, state):  # TE >= 2.18 (PR #3123)
        if os.environ.get(UNSAFE) != "1":
            raise RuntimeError("Refusing to load pickled Transformer Engine extra state for Linear. Delayed-scaling "
                               f"FP8 metadata can be stored as a Python pickle ... set {UNSAFE}=1.")
        raise AssertionError("a test loaded TE's pickle")


@pytest.fixture
def fake_te(monkeypatch):
    """Install the fake Transformer Engine; returns its global state class."""
    te = types.ModuleType("transformer_engine")
    te.__version__ = "2.20.0"
    te_pytorch = types.ModuleType("transformer_engine.pytorch")
    te_pytorch.Linear, te_pytorch.autocast = _FakeTELinear, _fake_autocast
    quantization = types.ModuleType("transformer_engine.pytorch.quantization")
    quantization.FP8GlobalStateManager = _FakeFp8
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = SimpleNamespace(HYBRID="HYBRID")
    recipe.DelayedScaling = lambda **kw: _Recipe(True, **{**kw, "amax_history_len": 16})
    recipe.Float8CurrentScaling = lambda **kw: _Recipe(False, **kw)
    te.pytorch, te.common, common.recipe, te_pytorch.quantization = te_pytorch, common, recipe, quantization
    for name, module in {"transformer_engine": te, "transformer_engine.pytorch": te_pytorch,
                         "transformer_engine.pytorch.quantization": quantization,
                         "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv(UNSAFE, raising=False)
    monkeypatch.setattr(_FakeFp8, "available", (True, ""))
    monkeypatch.setattr(_FakeFp8, "forward_recipes", [])
    precision._te_linear_class.cache_clear()
    precision._te_recipe.cache_clear()
    yield _FakeFp8
    precision._te_linear_class.cache_clear()
    precision._te_recipe.cache_clear()


def te_plan(recipe: str = "delayed"):
    """A TE plan on the CPU (TE's checks are the fake's; the layers compute on the CPU)."""
    hardware = Hardware(True, "fake GPU", (9, 0), te_version="2.20.0")
    return precision.PrecisionPlan("fp8", "te", torch.device("cpu"), torch.bfloat16, recipe, "te", "test", hardware)


# --- defect 2: resume of a TE delayed-scaling run ----------------------------------------------------

def resume_matches_unkilled(plan, tmp_path) -> tuple[list[float], list[float], dict]:
    """Train 3 steps, checkpoint (real save/restore code), 3 more; a resumed copy takes the same 3."""
    parts, _ = build(plan)
    for _ in range(3):
        step(parts.model, plan, parts.optimizer, parts.scheduler)
    ckpt_path = tmp_path / "last.pt"
    save_checkpoint(ckpt_path, "fp", parts, TrainState(step=3), plan.device, World())
    unkilled = [step(parts.model, plan, parts.optimizer, parts.scheduler) for _ in range(3)]

    resumed, _ = build(plan)
    ckpt = load_resumable(ckpt_path, "fp")  # torch.load(weights_only=True)
    assert restore_checkpoint(ckpt, resumed, plan.device, World()).step == 3
    again = [step(resumed.model, plan, resumed.optimizer, resumed.scheduler) for _ in range(3)]
    for (name, a), b in zip(parts.model.state_dict().items(), resumed.model.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name
    return unkilled, again, ckpt


def test_te_delayed_resume_restores_the_scaling_state_as_plain_tensors_bit_exactly(fake_te, tmp_path):
    unkilled, again, ckpt = resume_matches_unkilled(te_plan("delayed"), tmp_path)
    assert again == unkilled  # the restored scales and histories, not TE's fresh scale 1
    extra = ckpt["model"]["inp._extra_state"]
    assert set(extra) == {"scale_fwd", "amax_history_fwd", "scale_bwd", "amax_history_bwd"}
    assert all(torch.is_tensor(v) for v in extra.values()) and extra["amax_history_fwd"].abs().sum() > 0
    with pytest.raises(RuntimeError, match="Refusing to load pickled"):  # what TE does with its own pickle
        _FakeTELinear(32, 32).set_extra_state(_FakeTELinear(32, 32).get_extra_state())


def test_te_scaling_state_restored_before_any_step_is_saved_again_unchanged(fake_te):
    plan = te_plan("delayed")
    parts, _ = build(plan)
    step(parts.model, plan, parts.optimizer)
    saved = parts.model.state_dict()
    fresh, _ = build(plan)
    fresh.model.load_state_dict(saved)
    for key, value in fresh.model.state_dict()["up._extra_state"].items():
        assert torch.equal(value, saved["up._extra_state"][key])


def test_emulated_and_torchao_resume_bit_exactly_through_the_training_checkpoint(tmp_path):
    unkilled, again, _ = resume_matches_unkilled(resolve("fp8", "emulated", "cpu", "delayed"), tmp_path)
    assert again == unkilled
    if not torchao_missing:
        unkilled, again, ckpt = resume_matches_unkilled(resolve("fp8", "torchao", "cpu", "current"), tmp_path)
        assert again == unkilled
        assert not any("_extra_state" in k for k in ckpt["model"])  # torchao keeps no fp8 state
        assert load_torch(tmp_path / "last.pt")  # weights_only


# --- defect 6: inference of an untrained TE delayed model ----------------------------------------------

def test_te_delayed_inference_of_an_untrained_model_uses_current_scaling_like_the_emulation(fake_te):
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)) * 1e-4  # E4M3 at scale 1 flushes these
    outputs = {}
    for name, plan in (("te", te_plan("delayed")), ("emulated", resolve("fp8", "emulated", "cpu", "delayed"))):
        torch.manual_seed(0)
        model = Toy().eval()
        convert_model(model, plan)
        with torch.no_grad(), plan.autocast():
            outputs[name] = model(x).float()
    assert fake_te.forward_recipes == ["current"] * 3  # every converted layer
    assert torch.allclose(outputs["te"], outputs["emulated"], atol=1e-4)

    # One layer: current scaling keeps the small inputs; scale 1 (TE's delayed start) flushes them.
    layer = _FakeTELinear(32, 32)
    exact = nn.functional.linear(x, layer.weight, layer.bias).detach()
    relative = {}
    for name, recipe in (("current", _Recipe(False)), ("scale 1", _Recipe(True))):
        with torch.no_grad(), _fake_autocast(recipe=recipe):
            relative[name] = ((layer(x) - exact).abs().max() / exact.abs().max()).item()
    assert relative["current"] < 0.1 and relative["scale 1"] > 0.9


def test_te_inference_after_training_keeps_the_delayed_scales(fake_te):
    plan = te_plan("delayed")
    parts, _ = build(plan)
    step(parts.model, plan, parts.optimizer)
    fake_te.forward_recipes.clear()
    with torch.no_grad(), plan.autocast():
        parts.model(data()[0])  # validation during training
    assert fake_te.forward_recipes == ["delayed"] * 3


# --- defect 7: TE's weight init and the RNG ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["te", "emulated", "torchao"])
def test_convert_model_leaves_the_rng_stream_where_it_was(fake_te, backend):
    if backend == "torchao" and torchao_missing:
        pytest.skip("torchao not installed")
    plan = te_plan() if backend == "te" else resolve("fp8", backend, "cpu", "current")
    torch.manual_seed(0)
    model = Toy()
    before = torch.get_rng_state()
    convert_model(model, plan)
    assert torch.equal(torch.get_rng_state(), before)
    if backend == "te":  # the fake's init really draws, so the test can fail
        torch.set_rng_state(before)
        _FakeTELinear(32, 32)
        assert not torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(0)
    assert torch.equal(model.inp.weight, Toy().inp.weight)  # the Linear's weights, not TE's init


# --- defect 9: TE's own FP8 verdict -------------------------------------------------------------------

@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")


def test_capability_check_asks_transformer_engine_and_auto_avoids_a_refusing_te(fake_te, h100, monkeypatch):
    assert precision.probe_hardware(torch.device("cuda")).te_error is None
    assert resolve("fp8", "auto", "cuda").backend == "te"

    fake_te.available = (False, "CUDA 12.0 found, FP8 on sm 9.0 needs CUDA 12.1+")
    hardware = precision.probe_hardware(torch.device("cuda"))
    assert hardware.te_version == "2.20.0"
    assert hardware.te_error == ("Transformer Engine 2.20.0 reports FP8 unavailable: CUDA 12.0 found, FP8 on sm 9.0 "
                                 "needs CUDA 12.1+")
    with pytest.raises(PrecisionError, match="needs CUDA 12.1") as info:
        resolve("fp8", "te", "cuda")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(precision, "probe_torchao", lambda: (None, "ModuleNotFoundError: No module named 'torchao'"))
    plan = resolve("fp8", "auto", "cuda")
    assert plan.backend == "emulated" and "needs CUDA 12.1" in plan.describe()["backend_reason"]
    monkeypatch.setattr(precision, "probe_torchao", lambda: ("0.17.0", None))
    plan = resolve("fp8", "auto", "cuda")
    assert (plan.backend, plan.fp8_recipe) == ("torchao", "current")
    assert "needs CUDA 12.1" in plan.reason and "recipe current, not delayed" in plan.reason


# --- torchao: the choice, the errors ---------------------------------------------------------------------

H100_NO_TE = Hardware(True, "NVIDIA H100", (9, 0), te_error="ModuleNotFoundError: No module named 'transformer_engine'")
A100 = Hardware(True, "NVIDIA A100", (8, 0), te_error="not tried below compute capability 8.9")
CPU = Hardware(False, "test cpu", te_error="not tried without a CUDA device")
AO = ("0.17.0", None)
NO_AO = (None, "ModuleNotFoundError: No module named 'torchao'")


@pytest.mark.parametrize("hardware,torchao,backend,device,expected", [
    (CPU, AO, "auto", "cpu", "emulated"),  # auto never picks a numerics-only torchao run
    (CPU, AO, "torchao", "cpu", "torchao"),
    (CPU, NO_AO, "torchao", "cpu", "found: torchao not importable (ModuleNotFoundError: No module named 'torchao')"),
    (H100_NO_TE, AO, "auto", "cuda", "torchao"),
    (H100_NO_TE, NO_AO, "auto", "cuda", "emulated"),
    (H100_NO_TE, AO, "torchao", "cuda", "torchao"),
    (A100, AO, "auto", "cuda", "emulated"),
    (A100, AO, "torchao", "cuda", "found: CUDA sm 8.0 < 8.9 (NVIDIA A100)"),
    (Hardware(True, "NVIDIA H100", (9, 0), te_version="2.20.0"), AO, "auto", "cuda", "te"),
])
def test_torchao_choice_and_one_line_errors(monkeypatch, hardware, torchao, backend, device, expected):
    monkeypatch.setattr(precision, "probe_hardware", lambda device: hardware)
    monkeypatch.setattr(precision, "probe_torchao", lambda: torchao)
    if " " not in expected:
        plan = resolve("fp8", backend, device, "current")
        assert plan.backend == expected
        info = plan.describe()
        assert info["backend_reason"] == plan.reason and info["fp8_recipe"] == "current"
        if expected == "torchao":
            assert "torchao 0.17.0" in info["note"]
            assert info["speed_comparable"] is (device == "cuda")
            assert ("FP8 numerics only" in info["note"]) is (device == "cpu")
        if expected == "emulated" and device == "cuda":
            assert "torchao cannot run either" in plan.reason
        return
    with pytest.raises(PrecisionError, match="params.yaml") as info:
        resolve("fp8", backend, device, "current")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_torchao_with_the_delayed_recipe_is_an_error(monkeypatch):
    monkeypatch.setattr(precision, "probe_torchao", lambda: AO)
    with pytest.raises(PrecisionError, match="torchao has current .* scaling only, not delayed; set "
                                             "train.fp8.fp8_recipe: current"):
        resolve("fp8", "torchao", "cpu", "delayed")


def test_torchao_is_not_imported_for_plans_that_cannot_use_it(monkeypatch):
    def refuse():
        raise AssertionError("probed torchao")
    monkeypatch.setattr(precision, "probe_torchao", refuse)
    assert resolve("fp8", "auto", "cpu").backend == "emulated"
    assert resolve("bf16", "auto", "cpu").backend == "native"


# --- torchao: the real path on a CPU -----------------------------------------------------------------------

@needs_torchao
def test_torchao_trains_on_the_cpu_through_scaled_mm_on_the_same_layers(monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm

    def spy(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype))
        return scaled_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    plan = resolve("fp8", "torchao", "cpu", "current")
    parts, report = build(plan)
    emulated_report = build(resolve("fp8", "emulated", "cpu", "current"))[1]
    assert report == emulated_report  # the same filter: candidates whose dims are multiples of 16
    assert report["converted"] == ["inp", "up", "down"] and "narrow" in report["skipped"]
    float8 = fp8_torchao.float8_linear_class()
    assert {n for n, m in parts.model.named_modules() if isinstance(m, float8)} == {"inp", "up", "down"}
    assert type(parts.model.narrow) is nn.Linear and type(parts.model.head) is nn.Linear

    losses = [step(parts.model, plan, parts.optimizer) for _ in range(3)]
    verify_fp8(parts.model, plan)
    # 3 layers x 3 GEMMs (output; input and weight gradients) x 3 steps, all in float8
    assert len(calls) == 27
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    assert calls[:3] == [(e4m3, e4m3)] * 3  # forward: input and weight in E4M3
    assert set(calls[3:9]) <= {(e5m2, e4m3), (e4m3, e5m2)}  # backward: the output gradient in E5M2
    assert all(torch.isfinite(torch.tensor(losses)))
    with plan.autocast():
        assert parts.model(data()[0]).dtype == torch.bfloat16  # the CPU autocast reaches torchao's layers


@needs_torchao
def test_torchao_numerics_track_the_emulation_with_current_scaling():
    curves = {}
    for backend in ("torchao", "emulated"):
        plan = resolve("fp8", backend, "cpu", "current")
        parts, _ = build(plan)
        curves[backend] = torch.tensor([step(parts.model, plan, parts.optimizer) for _ in range(20)])
    assert curves["torchao"][-1] < curves["torchao"][0]
    assert (curves["torchao"] - curves["emulated"]).abs().max() < 0.05


@needs_torchao
def test_verify_fp8_catches_a_torchao_layer_that_never_ran():
    plan = resolve("fp8", "torchao", "cpu", "current")
    parts, _ = build(plan)
    with pytest.raises(PrecisionError, match="3 of 3 converted layers did not run in FP8"):
        verify_fp8(parts.model, plan)


@needs_torchao
def test_torchao_converts_r2gen_like_the_emulation_and_takes_a_training_step():
    from r2gen.config import ModelConfig
    from r2gen.model.r2gen import R2Gen

    cfg = ModelConfig(visual_extractor="resnet10", visual_width=8, d_model=32, d_ff=32, num_heads=4, num_layers=1,
                      rm_num_slots=3, rm_num_heads=4, rm_d_model=32)
    reports = {}
    for backend in ("emulated", "torchao"):
        torch.manual_seed(0)
        model = R2Gen(cfg, vocab_size=12)
        plan = resolve("fp8", backend, "cpu", "current")
        reports[backend] = convert_model(model, plan)
    assert reports["torchao"] == reports["emulated"] and reports["torchao"]["linear_converted"] > 0
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 2, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(1, 12, (2, 6), generator=g)], 1)
    with plan.autocast():
        loss = model(images, labels).loss
    loss.backward()
    verify_fp8(model, plan)
    assert torch.isfinite(loss)
    with plan.autocast():
        assert model.generate(images, num_beams=2, max_new_tokens=4).shape[0] == 2


def fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(torchao_missing or not fp8_gpu(), reason="needs torchao and a CUDA GPU of sm >= 8.9")
def test_torchao_on_a_gpu_trains_in_fp8_and_tracks_the_emulation():
    device = torch.device("cuda")
    curves = {}
    for backend in ("torchao", "emulated"):
        plan = resolve("fp8", backend, device, "current")
        torch.manual_seed(0)
        model = Toy().to(device)
        assert convert_model(model, plan)["converted"] == ["inp", "up", "down"]
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = (t.to(device) for t in data())
        losses = []
        for _ in range(10):
            with plan.autocast():
                loss = nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        verify_fp8(model, plan)
        curves[backend] = torch.tensor(losses)
    assert plan.describe()["speed_comparable"] is False  # the emulated one
    assert (curves["torchao"] - curves["emulated"]).abs().max() < 0.05
