"""The precision policy: what fp32, fp16, bf16 and fp8 mean on this machine, and how to run them.

| precision | backend  | the forward pass runs under                                   | GradScaler |
|-----------|----------|---------------------------------------------------------------|------------|
| fp32      | native   | no autocast; TF32 off for matmuls and cuDNN convs             | off        |
| fp16      | native   | ``torch.autocast(fp16)`` (CPU too: real fp16, speed not meaningful) | on   |
| bf16      | native   | ``torch.autocast(bf16)``                                      | off        |
| fp8       | te       | ``torch.autocast(bf16)`` + Transformer Engine ``te.autocast(recipe)`` | off |
| fp8       | torchao  | ``torch.autocast(bf16)``; the layers are torchao ``Float8Linear`` (r2gen.fp8_torchao) | off |
| fp8       | emulated | ``torch.autocast(bf16)`` + :func:`r2gen.fp8_emulation.fp8_autocast` | off  |

``backend: auto`` picks native for fp32/fp16/bf16. For fp8 it picks te on a CUDA GPU with compute
capability >= 8.9 where ``transformer_engine`` imports and TE's own
``FP8GlobalStateManager.is_fp8_available()`` agrees (it also checks the CUDA and cuBLASLt versions);
else torchao on such a GPU where ``torchao`` imports; else emulated; and records why
(``PrecisionPlan.reason``). ``backend: torchao`` also runs on a CPU, through torchao's own code and
``torch._scaled_mm``: FP8 numerics only, like the emulation. All fp8 backends use the HYBRID format
(E4M3 forward, E5M2 backward) and the same layers: the ``nn.Linear`` modules that the model lists in
``fp8_candidates()`` whose in and out features are multiples of 16; the rest of the model runs in
bf16 autocast. te and emulated take the recipe (``delayed`` or ``current`` scaling); torchao has
current (tensorwise dynamic) scaling only, so ``backend: torchao`` with ``delayed`` is an error and
``auto`` choosing torchao records ``current``. An emulated or CPU run reproduces FP8 numerics, never
FP8 speed (``speed_comparable: false``).

Inference (validation, evaluation, ``r2gen generate``) on TE with the delayed recipe: TE updates
delayed scales only in grad-enabled forwards, so a layer that never trained (a model file loaded for
evaluation) would quantize with scale 1 throughout. Such a layer runs its no-grad forwards under TE's
current scaling instead, which is what the emulation does for a layer with no history; a layer
that has trained (validation during training) keeps its delayed scales.

Converting a model leaves the CPU and CUDA RNG streams where they were (``te.Linear`` runs its
weight init on the device's generator), so dropout masks are the same at every precision.

Typical use (the training loop)::

    device = select_device(cfg.device)
    plan = resolve(precision, backend, device, fp8_recipe)
    set_fp32_numerics(device)
    model = build_model(...).to(device)
    conversion = convert_model(model, plan)  # before the optimizer is built
    scaler = plan.grad_scaler()
    with plan.autocast():
        loss = model(images, targets).loss
    scaler.scale(loss).backward()
    ...
    verify_fp8(model, plan)  # after the first step

Checkpoints load with ``torch.load(weights_only=True)`` for every backend: the emulated fp8 state is
tensor buffers, torchao keeps none, and our ``te.Linear`` subclass stores TE's delayed-scaling state
(``fp8_meta`` scale, scale_inv where TE has one, and amax history, forward and backward) as a dict
of plain tensors under ``_extra_state`` instead of TE's pickle, and restores it without handing TE a
pickle, so a resumed run takes the next step as the unkilled one would. (TE >= 2.18 refuses its own
pickled delayed state unless ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``; a uint8 ``_extra_state``
from elsewhere still goes to TE, which decides.) ``plain_state_dict(...)`` drops all fp8 state. TE
and the emulation differ in one deliberate way: TE's delayed scaling starts training from scale 1,
the emulation from the first step's amax (see :mod:`r2gen.fp8_emulation`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from r2gen import fp8_emulation, fp8_torchao
from r2gen.config import BACKENDS, FP8_RECIPES, PRECISIONS, check_choice
from r2gen.errors import PrecisionError
from r2gen.fp8_emulation import EmulatedFp8Linear

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.bfloat16,  # everything that is not an FP8 Linear
}
TE_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
FP8_MIN_CAPABILITY = TE_MIN_CAPABILITY  # torch._scaled_mm on CUDA needs them too (torchao)
BF16_MIN_CAPABILITY = (8, 0)  # Ampere
FP8_MULTIPLE = 16  # TE's FP8 GEMMs need in/out features divisible by 16
FP8_STATE_KEYS = ("_extra_state", "fp8_amax_history", "fp8_scale")  # state-dict leaves that are fp8 bookkeeping
FP8_FORMAT = "HYBRID (E4M3 forward, E5M2 backward)"
# CPU flags of native low-precision arithmetic (x86 AVX-512/AMX; Arm "bf16" and "asimdhp").
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPU_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})


@dataclass(frozen=True)
class Hardware:
    """What :func:`probe_hardware` found for one device."""

    cuda_available: bool
    device_name: str
    capability: tuple[int, int] | None = None  # CUDA compute capability; None on a CPU
    te_version: str | None = None  # transformer_engine version if it imports
    te_error: str | None = None  # why TE cannot run fp8 here (no import, or TE's own refusal), or why not tried
    torchao_version: str | None = None  # torchao version if its float8 training imports (probed for fp8 only)
    torchao_error: str | None = None  # why it does not, or why it was not tried


def probe_hardware(device: torch.device) -> Hardware:
    """Ask the machine about ``device``: its name, CUDA compute capability, Transformer Engine.

    The only function here that touches the hardware; tests monkeypatch it to play other machines.
    """
    cuda_available = torch.cuda.is_available()
    if device.type != "cuda" or not cuda_available:
        return Hardware(cuda_available, _cpu_name(), te_error="not tried without a CUDA device")
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if capability < TE_MIN_CAPABILITY:
        return Hardware(True, name, capability, te_error="not tried below compute capability 8.9")
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or OSError/RuntimeError when its CUDA libraries do not match
        return Hardware(True, name, capability, te_error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    version = transformer_engine.__version__
    available, why = _te_fp8_available()
    if not available:  # e.g. a CUDA or cuBLASLt too old for FP8 on this GPU: TE would refuse at step 1
        return Hardware(True, name, capability, te_version=version,
                        te_error=f"Transformer Engine {version} reports FP8 unavailable: {why}")
    return Hardware(True, name, capability, te_version=version)


def probe_torchao() -> tuple[str | None, str | None]:
    """``(version, None)`` where torchao's float8 training imports, else ``(None, why)``; tests replace it."""
    return fp8_torchao.probe()


def cpu_support() -> dict:
    """The CPU's vector capability and whether it has native bf16/fp16 arithmetic."""
    flags = _cpu_flags()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512
        "bf16": bool(flags & CPU_BF16_FLAGS),
        "fp16": bool(flags & CPU_FP16_FLAGS),
        "flags": sorted(flags & (CPU_BF16_FLAGS | CPU_FP16_FLAGS)),
    }


@dataclass(frozen=True)
class PrecisionPlan:
    """How one run computes: what the forward pass runs under, with which backend, on which device."""

    precision: str  # fp32 | fp16 | bf16 | fp8
    backend: str  # native | te | torchao | emulated
    device: torch.device
    autocast_dtype: torch.dtype | None  # None for fp32; bf16 for fp8 (te and emulated)
    fp8_recipe: str | None  # delayed | current for fp8 (torchao: current), else None
    requested_backend: str = "auto"  # what params.yaml asked for
    reason: str = ""  # why this backend, e.g. "auto: no CUDA device, so emulated"
    hardware: Hardware | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Everything the forward pass runs under (autocast, and the FP8 context for fp8)."""
        if self.precision == "fp8":
            return _fp8_context(self)
        if self.autocast_dtype is None:
            # Explicitly off, so an fp32 evaluation inside someone else's autocast stays fp32.
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for fp16 (bf16 and fp8's bf16 have fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def describe(self) -> dict:
        """JSON-safe record of the plan and the environment, for metrics and the report."""
        hardware = self.hardware or probe_hardware(self.device)
        cpu = cpu_support()
        return {
            "precision": self.precision,
            "backend": self.backend,
            "backend_requested": self.requested_backend,
            "backend_reason": self.reason,
            "autocast_dtype": _dtype_name(self.autocast_dtype),
            "grad_scaler": self.precision == "fp16",
            "fp8_recipe": self.fp8_recipe,
            "fp8_format": FP8_FORMAT if self.precision == "fp8" else None,
            "device": str(self.device),
            "device_name": hardware.device_name,
            "compute_capability": ".".join(map(str, hardware.capability)) if hardware.capability else None,
            "cpu_capability": cpu["capability"],
            "cpu_native_bf16": cpu["bf16"],
            "cpu_native_fp16": cpu["fp16"],
            "fp32_precision": fp32_precision_flags(),
            "torch": str(torch.__version__),
            "cuda": torch.version.cuda,
            "transformer_engine": hardware.te_version,
            "speed_comparable": self._speed_comparable(cpu),
            "note": self._note(cpu, hardware),
        }

    def _speed_comparable(self, cpu: dict) -> bool:
        if self.backend == "emulated" or (self.backend == "torchao" and self.device.type != "cuda"):
            return False
        if self.device.type == "cpu" and self.precision in ("fp16", "bf16"):
            return cpu[self.precision]
        return True

    def _note(self, cpu: dict, hardware: Hardware) -> str:
        p = self.precision
        if p == "fp32":
            return "fp32 with TF32 off for matmuls and cuDNN convs: the full-precision baseline"
        if p == "fp8" and self.backend == "te":
            return (f"fp8 via Transformer Engine {hardware.te_version} ({self.fp8_recipe} scaling, HYBRID) "
                    "inside bf16 autocast")
        if p == "fp8" and self.backend == "torchao":
            where = ("" if self.device.type == "cuda" else
                     " on a CPU through torch._scaled_mm: FP8 numerics only, its speed is not FP8 speed")
            return (f"fp8 via torchao {hardware.torchao_version} float8 training (tensorwise dynamic scaling, "
                    f"E4M3 forward, E5M2 gradients) inside bf16 autocast{where}")
        if p == "fp8":
            return (f"fp8 emulated ({self.fp8_recipe} scaling, HYBRID) inside bf16 autocast: FP8 numerics only, "
                    "its speed is not FP8 speed")
        if self.device.type == "cpu" and not cpu[p]:
            return (f"{p} autocast on a CPU without native {p} arithmetic ({cpu['capability']}): "
                    f"real {p} numerics, speed not comparable")
        scaler = " with GradScaler" if p == "fp16" else ""
        return f"{p} autocast{scaler} on {hardware.device_name}"


def select_device(requested: str) -> torch.device:
    """The torch device for ``train.common.device``: auto (cuda if available) | cpu | cuda."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise PrecisionError(_no_cuda_message("train.common.device is cuda"))
        return torch.device("cuda")
    raise PrecisionError(f"unsupported device '{requested}' (train.common.device in params.yaml), "
                         "must be one of: auto, cpu, cuda")


def resolve(precision: str, backend: str = "auto", device: str | torch.device = "cpu",
            fp8_recipe: str = "delayed") -> PrecisionPlan:
    """Turn ``precision`` and ``backend`` (from ``train.<precision>``) into a plan for ``device``.

    Raises:
        PrecisionError: an unknown value, or a combination this machine cannot run; the message
            says what was found and which setting to change.
    """
    key = f"train.{precision}.backend"
    check_choice("precision", precision, PRECISIONS, PrecisionError, " in params.yaml")
    check_choice(key, backend, BACKENDS, PrecisionError, " in params.yaml")
    check_choice(f"train.{precision}.fp8_recipe", fp8_recipe, FP8_RECIPES, PrecisionError, " in params.yaml")
    device = torch.device(device)
    hardware = probe_hardware(device)
    if device.type == "cuda" and not hardware.cuda_available:
        raise PrecisionError(_no_cuda_message(f"device {device} was requested"))
    dtype = AUTOCAST_DTYPES[precision]

    if precision != "fp8":
        if backend in ("te", "torchao", "emulated"):
            raise PrecisionError(f"backend {backend} is for fp8 only ({precision} runs on torch's native autocast); "
                                 f"set {key} to native or auto in params.yaml")
        if precision == "bf16" and hardware.capability and hardware.capability < BF16_MIN_CAPABILITY:
            raise PrecisionError(f"bf16 needs a CUDA GPU with compute capability >= 8.0; found: "
                                 f"{_found(hardware, device)}. Use precision fp16 or fp32, or "
                                 "train.common.device: cpu in params.yaml")
        reason = "auto: native torch autocast" if backend == "auto" else "requested"
        return PrecisionPlan(precision, "native", device, dtype, None, backend, reason, hardware)

    if backend == "native":
        raise PrecisionError(f"fp8 has no native torch backend here; set {key} in params.yaml to te (CUDA GPU with "
                             "compute capability >= 8.9 and transformer-engine), torchao, emulated (numerics only) "
                             "or auto")
    if backend == "torchao" or (backend == "auto" and device.type == "cuda" and _te_problem(hardware, device)):
        version, error = probe_torchao()  # imported only where it may run
        hardware = dataclasses.replace(hardware, torchao_version=version, torchao_error=error)
    chosen, recipe, reason = _fp8_backend(backend, fp8_recipe, device, hardware, key)
    return PrecisionPlan("fp8", chosen, device, dtype, recipe, backend, reason, hardware)


def _fp8_backend(backend: str, recipe: str, device: torch.device, hardware: Hardware,
                 key: str) -> tuple[str, str, str]:
    """``(backend, recipe, reason)`` for an fp8 plan, or a one-line PrecisionError naming what was found."""
    te_problem = _te_problem(hardware, device)
    torchao_problem = _torchao_problem(hardware, device)
    if backend == "te" and te_problem:
        raise PrecisionError(f"fp8 with backend te needs a CUDA GPU with compute capability >= 8.9 and "
                             f"transformer-engine; found: {te_problem}. Use backend: torchao, emulated "
                             f"(numerics only) or auto ({key} in params.yaml)")
    if backend == "torchao":
        if torchao_problem:
            raise PrecisionError(f"fp8 with backend torchao cannot run here; found: {torchao_problem}. Use "
                                 f"backend: emulated (numerics only) or auto ({key} in params.yaml)")
        if recipe != "current":
            raise PrecisionError(f"fp8 with backend torchao has current (tensorwise dynamic) scaling only, not "
                                 f"{recipe}; set train.fp8.fp8_recipe: current in params.yaml, or use backend te "
                                 "or emulated")
        where = "" if device.type == "cuda" else " (a CPU: numerics only)"
        return "torchao", recipe, f"requested{where}"
    if backend != "auto":
        return backend, recipe, "requested"
    if not te_problem:
        return "te", recipe, f"auto: {hardware.device_name} with transformer-engine {hardware.te_version}"
    if device.type == "cuda" and not torchao_problem:
        changed = f"; recipe current, not {recipe}: torchao scales per tensor only" if recipe != "current" else ""
        return "torchao", "current", (f"auto: torchao {hardware.torchao_version} on {hardware.device_name} because "
                                      f"te cannot run (found: {te_problem}){changed}")
    torchao = f"; torchao cannot run either: {torchao_problem}" if device.type == "cuda" else ""
    return "emulated", recipe, (f"auto: emulated because fp8 backend te needs cc >= 8.9 and transformer-engine; "
                                f"found: {te_problem}{torchao}")


def set_fp32_numerics(device: str | torch.device) -> None:
    """Make fp32 mean IEEE fp32: TF32 off for matmuls, cuDNN convs/RNNs and oneDNN (CPU).

    Call it for every precision: autocast decides what runs in low precision, and what it leaves
    in fp32 (losses, norms, softmax, fp32 baselines) must not silently become TF32. torch >= 2.9
    runs cuDNN convs in TF32 by default. The flags are process-wide, so ``device`` only documents
    where the run will compute.
    """
    del device  # process-wide flags; see docstring
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # The current API (torch >= 2.9). Do not mix it with the legacy allow_tf32 flags: torch then
        # refuses to read torch.backends.cudnn.allow_tf32.
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        torch.backends.mkldnn.conv.fp32_precision = "ieee"
        torch.backends.mkldnn.rnn.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def fp32_precision_flags() -> dict:
    """The fp32 compute mode of matmuls and convs, as recorded in :meth:`PrecisionPlan.describe`."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return {"cuda_matmul": torch.backends.cuda.matmul.fp32_precision,
                "cudnn_conv": torch.backends.cudnn.conv.fp32_precision,
                "cpu_matmul": torch.backends.mkldnn.matmul.fp32_precision}
    return {"cuda_matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
            "cudnn_conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"}


def convert_model(model: nn.Module, plan: PrecisionPlan) -> dict:
    """Swap the model's eligible Linears for FP8 ones (TE or emulated), in place; fp8 plans only.

    The model names its candidates in ``model.fp8_candidates()`` (a list of ``(qualified_name,
    nn.Linear)``); a candidate is converted if its in and out features are multiples of 16 and it
    has one parent (a shared module would come untied). Parameters keep the names ``weight`` and
    ``bias``, so a plain model's state dict loads into the converted model (its fp8 state starts
    cold) and :func:`plain_state_dict` of the converted model loads into a plain one. Call it after
    ``model.to(device)`` and before building the optimizer (TE layers own new Parameters). The CPU
    and CUDA RNG streams are where they were before (TE's weight init draws from them; the weights
    are then overwritten with the Linear's), so fp8 runs draw the same dropout masks as the others.

    Returns:
        ``{"converted": [names], "skipped": {name: reason}, "linear_total": all nn.Linear modules of
        the model, "linear_converted": n}``; for fp32/fp16/bf16 nothing is converted.

    Raises:
        PrecisionError: fp8 was requested but no candidate is eligible (the run would be bf16).
    """
    report = {
        "converted": [],
        "skipped": {},
        "linear_total": sum(isinstance(m, nn.Linear) for m in model.modules()),
        "linear_converted": 0,
    }
    if plan.precision != "fp8":
        return report
    if not hasattr(model, "fp8_candidates"):
        raise TypeError(f"{type(model).__name__} has no fp8_candidates() method listing its FP8-eligible Linears")
    parents: dict[int, int] = {}  # id(module) -> number of (parent, attribute) slots holding it
    for _, module in model.named_modules(remove_duplicate=False):
        parents[id(module)] = parents.get(id(module), 0) + 1
    for name, linear in dict(model.fp8_candidates()).items():
        if model.get_submodule(name) is not linear:
            raise ValueError(f"fp8_candidates() of {type(model).__name__} names '{name}', which is another module")
        reason = _ineligible(linear, parents[id(linear)])
        if reason:
            report["skipped"][name] = reason
        else:
            report["converted"].append(name)
    report["linear_converted"] = len(report["converted"])

    if not report["converted"]:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(report["skipped"].items())[:3]) or "the model lists none"
        raise PrecisionError(f"fp8 would convert no layer of {type(model).__name__} ({reasons}); use model sizes "
                             "that are multiples of 16 (model.d_model, model.d_ff in params.yaml) or precision bf16")
    with _rng_untouched(plan.device):
        if plan.backend == "torchao":
            fp8_torchao.convert(model, report["converted"])
        else:
            make = EmulatedFp8Linear.from_linear if plan.backend == "emulated" else _te_linear_from
            for name in report["converted"]:
                parent_name, _, attribute = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attribute, make(model.get_submodule(name)))
    return report


def verify_fp8(model: nn.Module, plan: PrecisionPlan) -> None:
    """After the first training step: every converted layer ran its forward (and backward) in FP8.

    Catches a forward pass that ran outside ``plan.autocast()``, or a model that bypasses a converted
    layer, before an "fp8" run reports bf16 numbers. No-op for other precisions.
    """
    if plan.precision != "fp8":
        return
    fp8_type = {"emulated": lambda: EmulatedFp8Linear, "torchao": fp8_torchao.float8_linear_class,
                "te": _te_linear_class}[plan.backend]()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, fp8_type)]
    if not layers:
        raise PrecisionError("fp8 run has no FP8 layers: call r2gen.precision.convert_model(model, plan) "
                             "before training")
    failed = [name for name, m in layers if not _ran_in_fp8(m, plan)]
    if failed:
        shown = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise PrecisionError(f"fp8 check after step 1: {len(failed)} of {len(layers)} converted layers did not "
                             f"run in FP8 ({shown}); run the forward pass under plan.autocast() and call every "
                             "converted layer")


def plain_state_dict(state_dict: dict) -> dict:
    """``state_dict`` without fp8 bookkeeping (TE ``_extra_state``, emulated amax histories and scales).

    The result loads into the unconverted fp32 model (evaluation, ``r2gen generate``).
    """
    return {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in FP8_STATE_KEYS}


def mask_fill_value(dtype: torch.dtype) -> float:
    """The most negative finite value of ``dtype``, for additive attention masks (never -1e9 in fp16)."""
    return torch.finfo(dtype).min


# --- fp8 internals ---------------------------------------------------------------------------

@contextlib.contextmanager
def _fp8_context(plan: PrecisionPlan) -> Iterator[None]:
    with torch.autocast(plan.device.type, dtype=torch.bfloat16):
        if plan.backend == "torchao":  # a Float8Linear always computes in FP8: no context of its own
            fp8 = contextlib.nullcontext()
        elif plan.backend == "te":
            fp8 = _te_autocast(plan.fp8_recipe)
        else:
            fp8 = fp8_emulation.fp8_autocast(plan.fp8_recipe)
        with fp8:
            yield


@contextlib.contextmanager
def _rng_untouched(device: torch.device) -> Iterator[None]:
    """Restore the CPU (and, on CUDA, the device's) RNG state on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _ineligible(linear: nn.Module, parents: int) -> str | None:
    if not isinstance(linear, nn.Linear):
        return f"{type(linear).__name__} is not an nn.Linear"
    if isinstance(linear, EmulatedFp8Linear):
        return "already converted"
    if parents > 1:
        return f"shared by {parents} parents (converting one would untie them)"
    bad = [f"{attr} {getattr(linear, attr)}" for attr in ("in_features", "out_features")
           if getattr(linear, attr) % FP8_MULTIPLE]
    if bad:
        return f"{' and '.join(bad)} not a multiple of {FP8_MULTIPLE}"
    return None


def _ran_in_fp8(module: nn.Module, plan: PrecisionPlan) -> bool:
    if module.fp8_forward_calls == 0:
        return False
    if plan.backend == "emulated":
        return module.fp8_backward_calls > 0
    if plan.backend == "torchao":
        return True  # a Float8Linear has no non-fp8 path: every call ran torch._scaled_mm, forward and backward
    if plan.fp8_recipe != "delayed":
        return True  # TE's current scaling keeps no state that would show the backward
    # Delayed scaling records the backward's gradient amax in TE's history.
    return bool(module.fp8_meta["scaling_bwd"].amax_history.abs().sum() > 0)


def _import_te():
    import transformer_engine.pytorch as te

    return te


def _fp8_global_state():
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:  # TE < 2.10
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    return FP8GlobalStateManager


def _te_fp8_available() -> tuple[bool, str]:
    """TE's own verdict, ``FP8GlobalStateManager.is_fp8_available()``: (ok, reason); it checks CUDA/cuBLASLt."""
    try:
        verdict = _fp8_global_state().is_fp8_available()
    except Exception as exc:  # noqa: BLE001 - a TE that cannot even answer cannot run fp8
        return False, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    ok, why = verdict if isinstance(verdict, tuple) else (bool(verdict), "")
    return bool(ok), str(why or "no reason given")


@functools.cache
def _te_recipe(name: str):
    from transformer_engine.common import recipe

    if name == "delayed":
        # TE's defaults, spelled out because they define the numerics we compare against.
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, margin=0, amax_history_len=1024,
                                     amax_compute_algo="max")
    return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)


def _te_autocast(recipe_name: str) -> contextlib.AbstractContextManager:
    te = _import_te()
    recipe = _te_recipe(recipe_name)
    if hasattr(te, "autocast"):  # TE >= 2.10; fp8_autocast is deprecated there
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


@functools.cache
def _te_linear_class() -> type:
    """``te.Linear`` made fit for our model: padded rows, an FP8 forward count, plain state dicts.

    Its ``_extra_state`` is TE's delayed-scaling state as a dict of plain tensors (see module
    docstring); a no-grad forward of a layer that never trained runs under TE's current scaling.
    """
    te = _import_te()

    class TELinear(te.Linear):
        fp8_forward_calls = 0
        _pending_fp8_state: dict | None = None  # restored from a checkpoint, copied in at the first FP8 forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # TE's FP8 GEMM needs the rows (batch x tokens) divisible by 8; zero rows change no amax.
            rows = x.numel() // x.shape[-1]
            x2 = x.reshape(rows, x.shape[-1])  # (N, in)
            pad = -rows % FP8_MULTIPLE
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))  # (N + pad, in)
            fp8 = _fp8_global_state().is_fp8_enabled()
            if fp8 and self._pending_fp8_state is not None:
                _te_restore_scaling(self, self._pending_fp8_state)
                self._pending_fp8_state = None
            cold = fp8 and _te_cold_inference(self)
            with _te_autocast("current") if cold else contextlib.nullcontext():
                y = super().forward(x2)  # (N + pad, out)
            self.fp8_forward_calls += int(fp8)
            return y[:rows].reshape(*x.shape[:-1], y.shape[-1])  # (..., out)

        def get_extra_state(self) -> dict:
            if self._pending_fp8_state is not None:  # restored, not yet run
                return dict(self._pending_fp8_state)
            return _te_scaling_state(self)

        def set_extra_state(self, state) -> None:
            if isinstance(state, dict):  # ours: plain tensors, nothing for TE to unpickle
                self._pending_fp8_state = dict(state) or None
            else:  # TE's own serialized state, from a checkpoint we did not write: TE decides
                super().set_extra_state(state)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs) -> None:
            # A plain Linear's state dict has no _extra_state: load the weights, keep TE's fresh fp8 state.
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            key = prefix + "_extra_state"
            if key not in state_dict and key in missing_keys:
                missing_keys.remove(key)

    return TELinear


_TE_SCALING = {"fwd": "scaling_fwd", "bwd": "scaling_bwd"}  # our key suffix -> TE's fp8_meta entry
_TE_SCALING_TENSORS = ("scale", "scale_inv", "amax_history")  # scale_inv: TE < 2.0 only


def _te_scaling_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The delayed-scaling tensors of a TE layer, ``{"scale_fwd": ..., "amax_history_bwd": ...}``; {} if none."""
    state = {}
    for suffix, key in _TE_SCALING.items():
        meta = layer.fp8_meta.get(key)
        for attr in _TE_SCALING_TENSORS:
            value = getattr(meta, attr, None)
            if torch.is_tensor(value):
                state[f"{attr}_{suffix}"] = value.detach().clone()
    return state if "amax_history_fwd" in state else {}  # current scaling keeps no state


def _te_restore_scaling(layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed delayed-scaling tensors into the layer's fp8_meta (called inside te.autocast)."""
    layer.init_fp8_metadata()  # TE creates the fp8_meta tensors for the active recipe (a no-op if they exist)
    for name, value in state.items():
        attr, _, suffix = name.rpartition("_")
        target = getattr(layer.fp8_meta.get(_TE_SCALING.get(suffix, "")), attr, None)
        if not torch.is_tensor(target) or target.shape != value.shape:
            raise PrecisionError(f"the checkpoint's TE fp8 state '{name}' {tuple(value.shape)} does not fit this "
                                 "layer (another fp8_recipe or TE version); delete the checkpoint to retrain")
        with torch.no_grad():
            target.copy_(value)


def _te_cold_inference(layer: nn.Module) -> bool:
    """A no-grad forward under delayed scaling in a layer that never recorded an amax (scale 1 in TE)."""
    if torch.is_grad_enabled():
        return False
    recipe = _fp8_global_state().get_fp8_recipe()
    delayed = recipe.delayed() if hasattr(recipe, "delayed") else type(recipe).__name__ == "DelayedScaling"  # TE 1.x
    if not delayed:
        return False
    history = getattr(layer.fp8_meta.get("scaling_fwd"), "amax_history", None)
    return history is None or not bool(history.abs().sum() > 0)


def _te_linear_from(linear: nn.Linear) -> nn.Module:
    # TE runs its weight init here (the RNG draws are undone by convert_model), then takes our weights.
    new = _te_linear_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             params_dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.train(linear.training)
    return new


# --- small helpers -----------------------------------------------------------------------------

def _found(hardware: Hardware, device: torch.device) -> str:
    """What the machine has, for 'found: ...' in error messages."""
    if device.type != "cuda":
        return "no CUDA device" if not hardware.cuda_available else f"device {device} selected (train.common.device)"
    cc = ".".join(map(str, hardware.capability))
    return f"{hardware.device_name} with compute capability {cc}"


def _te_problem(hardware: Hardware, device: torch.device) -> str | None:
    """Why Transformer Engine cannot run fp8 on ``device`` (None: it can)."""
    if device.type != "cuda" or hardware.capability < TE_MIN_CAPABILITY:
        return _found(hardware, device)
    cc = ".".join(map(str, hardware.capability))
    if hardware.te_version is None:
        return (f"{hardware.device_name} (compute capability {cc}) but transformer_engine does not import "
                f"({hardware.te_error}); install it with pip install 'r2gen-precision[fp8]'")
    if hardware.te_error:
        return f"{hardware.device_name} (compute capability {cc}) but {hardware.te_error}"
    return None


def _torchao_problem(hardware: Hardware, device: torch.device) -> str | None:
    """Why torchao's float8 training cannot run on ``device`` (None: it can; on a CPU, numerics only)."""
    if hardware.torchao_version is None:
        return (f"torchao not importable ({hardware.torchao_error or 'not tried'}); install it with "
                "pip install 'r2gen-precision[torchao]'")
    if device.type == "cuda":
        if hardware.capability < FP8_MIN_CAPABILITY:
            cc = ".".join(map(str, hardware.capability))
            return f"CUDA sm {cc} < 8.9 ({hardware.device_name}): no FP8 tensor cores for torch._scaled_mm"
        return None
    return fp8_torchao.cpu_scaled_mm_error()


def _no_cuda_message(what: str) -> str:
    return (f"{what} but no CUDA device is usable (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}); set train.common.device to auto or cpu in params.yaml")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: flags unknown, so no claim of native support
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 | Arm
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
