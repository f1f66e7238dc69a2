"""FP8 training through torchao's float8 training (``train.fp8.backend: torchao``).

torchao (``pip install 'r2gen-precision[torchao]'``, pure Python, no build) swaps an ``nn.Linear``
for a ``torchao.float8.Float8Linear`` with :func:`torchao.float8.convert_to_float8_training` and its
default ``Float8LinearConfig``: tensorwise dynamic scaling (each tensor scaled from its own amax,
like TE's ``Float8CurrentScaling``), E4M3 input and weight, E5M2 output gradient, and the three GEMMs
of a step (output, input gradient, weight gradient) as ``torch._scaled_mm`` calls (on CUDA the
output GEMM uses cuBLASLt's fast accumulation, torchao's default). The layer keeps no fp8 state:
its state dict is ``weight`` and ``bias``, so checkpoints load with ``torch.load(weights_only=True)``
and resume bit-exactly where the device is deterministic.

On a CPU (torch 2.14 has a CPU ``torch._scaled_mm``; :func:`cpu_scaled_mm_error` checks the torch
at hand) torchao's real path runs unchanged, with one addition of ours: ``Float8Linear.forward``
applies only CUDA's autocast to its input (it reads ``torch.get_autocast_gpu_dtype()``), so a
forward pre-hook casts the input to the *CPU* autocast dtype first, which is what torchao does
itself on a GPU. Everything else (scaling, casts, GEMMs, backward) is torchao's code. A CPU run
gives FP8 numerics, never FP8 speed ("numerics only").

torchao is imported here only, and only when an fp8 plan asks for it.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterable

import torch
from torch import nn

MIN_VERSION = "0.10"  # convert_to_float8_training, Float8LinearConfig with tensorwise dynamic defaults


@functools.cache
def probe() -> tuple[str | None, str | None]:
    """``(version, None)`` where torchao's float8 training imports, else ``(None, why)``."""
    pytree_log = logging.getLogger("torch.utils._pytree")  # torchao >= 0.17 trips a deprecation warning there
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except Exception as exc:  # ImportError, or anything a mismatched torchao raises while importing
        first = (str(exc).splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first}".rstrip(": ")
    finally:
        pytree_log.setLevel(level)
    return str(getattr(torchao, "__version__", "unknown")), None


@functools.cache
def cpu_scaled_mm_error() -> str | None:
    """None where ``torch._scaled_mm`` multiplies float8 matrices on a CPU, else why not."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        b = torch.ones(16, 16).to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0)
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except Exception as exc:  # RuntimeError/NotImplementedError on a torch without the CPU kernel
        return f"torch {torch.__version__} has no CPU torch._scaled_mm ({type(exc).__name__})"
    return None


def convert(model: nn.Module, names: Iterable[str]) -> None:
    """Swap the Linears of ``model`` named ``names`` for torchao ``Float8Linear`` modules, in place.

    The swap keeps the Parameter objects (``Float8Linear.from_float`` reuses ``weight`` and ``bias``).
    Each converted layer counts its calls in ``fp8_forward_calls`` (for ``verify_fp8``).
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    wanted = set(names)
    convert_to_float8_training(model, config=Float8LinearConfig(),
                               module_filter_fn=lambda module, fqn: fqn in wanted)
    layer_type = float8_linear_class()
    for name in wanted:
        layer = model.get_submodule(name)
        if not isinstance(layer, layer_type):  # a torchao whose filter or swap works differently
            raise RuntimeError(f"torchao did not convert {name} ({type(layer).__name__}); "
                               f"torchao >= {MIN_VERSION} is needed")
        layer.fp8_forward_calls = 0
        layer.register_forward_pre_hook(_count_and_autocast)


def float8_linear_class() -> type:
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear


def _count_and_autocast(module: nn.Module, args: tuple) -> tuple | None:
    module.fp8_forward_calls += 1
    x = args[0]
    device_type = x.device.type
    if device_type != "cuda" and torch.is_autocast_enabled(device_type):
        # torchao applies the CUDA autocast dtype only; on a CPU apply the CPU one the same way.
        return (x.to(torch.get_autocast_dtype(device_type)), *args[1:])
    return None
