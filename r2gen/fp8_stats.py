"""Per-layer FP8 numerics: where an FP8 Linear loses information, measured on a real training step.

For every converted Linear, :class:`Fp8LayerProbe` observes one forward and backward (hooks only:
no extra computation feeds the training step, no RNG is drawn, no fp8 state changes) and records,
per tensor that the FP8 GEMMs quantize (input and weight in E4M3, output gradient in E5M2):

- ``amax``: the largest absolute value;
- ``scale``: the scale the backend uses for it (``fp8_max / amax`` under current/tensorwise scaling,
  the delayed-scaling state otherwise; see :func:`scale_in_use`);
- ``underflow``: the fraction of nonzero elements that become zero in that format;
- ``saturation``: the fraction whose scaled magnitude exceeds the format's largest finite value
  (clipped to it).

and ``gemm_rel_error``: ``||y - y_ref|| / ||y_ref||`` of the layer's real output ``y`` (what the
backend computed, in its output dtype) against the same GEMM in fp32 on the same input and weight.

The statistics are exact functions of the tensors (:func:`tensor_stats`); the probe costs a few
reductions per layer and runs on logging steps only. The table file is :mod:`r2gen.fp8_table`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from r2gen import fp8_emulation as emu
from r2gen.fp8_emulation import E4M3, E5M2, FP8_MAX

SLOTS = (("input", E4M3), ("weight", E4M3), ("grad_output", E5M2))
FIELDS = ("amax", "scale", "underflow", "saturation")


@torch.no_grad()
def tensor_stats(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> dict[str, float]:
    """amax, scale, underflow and saturation fractions of ``x`` quantized to ``dtype`` with ``scale``.

    ``underflow`` counts the nonzero elements that round to zero (over all elements); ``saturation``
    the elements whose ``|x * scale|`` exceeds ``FP8_MAX[dtype]``.
    """
    x = x.detach().float()
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    scaled = x * scale
    q = scaled.clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype).float()
    n = max(x.numel(), 1)
    return {
        "amax": float(x.abs().amax()) if x.numel() else 0.0,
        "scale": float(scale),
        "underflow": float(((q == 0) & (x != 0)).sum()) / n,
        "saturation": float((scaled.abs() > FP8_MAX[dtype]).sum()) / n,
    }


def current_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tensorwise current (dynamic) scaling: ``fp8_max / amax`` (TE Float8CurrentScaling, torchao tensorwise)."""
    return emu.scale_from_amax(x.detach().abs().amax().float(), dtype)


def scale_in_use(module: nn.Module, slot: int, x: torch.Tensor, recipe: str) -> torch.Tensor:
    """The scale ``module``'s backend applies to ``x`` in ``slot`` (0 input, 1 weight, 2 output gradient).

    Emulated layers answer exactly (their own scale rule, without recording); TE layers under the
    delayed recipe read TE's ``fp8_meta`` scales; everything else (torchao's tensorwise dynamic
    scaling, TE current scaling) scales by the tensor's own amax.
    """
    dtype = SLOTS[slot][1]
    if isinstance(module, emu.EmulatedFp8Linear):
        return module._scale(slot, x, recipe, dtype, record=False)
    meta = getattr(module, "fp8_meta", None)
    if recipe == "delayed" and isinstance(meta, dict):
        key, index = ("scaling_bwd", 0) if slot == 2 else ("scaling_fwd", slot)
        state = meta.get(key)
        if state is not None and getattr(state, "scale", None) is not None:
            return state.scale[index].detach().float()
    return current_scale(x, dtype)


class Fp8LayerProbe:
    """Hooks on the converted Linears that record :data:`FIELDS` per slot and the GEMM error of one step.

    Use around exactly one training step (forward and backward)::

        with Fp8LayerProbe(layers, recipe) as probe:
            loss = model(images, targets).loss
            loss.backward()
        rows = probe.rows()  # one dict per layer

    ``layers`` maps a name to the converted module. The scales are read before the layer runs
    (forward pre-hook, backward pre-hook), i.e. the scales its GEMMs use in that step.
    """

    def __init__(self, layers: dict[str, nn.Module], recipe: str):
        self.layers, self.recipe = layers, recipe
        self._stats: dict[str, dict[str, float]] = {name: {} for name in layers}
        self._handles: list = []

    def __enter__(self) -> "Fp8LayerProbe":
        for name, module in self.layers.items():
            self._handles += [
                module.register_forward_pre_hook(self._before_forward(name)),
                module.register_forward_hook(self._after_forward(name)),
                module.register_full_backward_pre_hook(self._before_backward(name)),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def rows(self) -> list[dict[str, float | str]]:
        """One row per layer: ``layer``, ``<slot>_<field>`` for each slot and field, ``gemm_rel_error``."""
        return [{"layer": name, **stats} for name, stats in self._stats.items()]

    def _record(self, name: str, slot: int, x: torch.Tensor, module: nn.Module) -> None:
        label, dtype = SLOTS[slot]
        stats = tensor_stats(x, scale_in_use(module, slot, x, self.recipe), dtype)
        self._stats[name].update({f"{label}_{k}": v for k, v in stats.items()})

    def _before_forward(self, name: str) -> Callable:
        def hook(module, args):
            if name in self._stats and "input_amax" in self._stats[name]:
                return  # a layer called twice in a step keeps its first call
            x = args[0]
            if torch.is_autocast_enabled(x.device.type):  # the backends quantize the autocast-dtype input
                x = x.to(torch.get_autocast_dtype(x.device.type))
            self._record(name, 0, x, module)
            self._record(name, 1, module.weight, module)
        return hook

    def _after_forward(self, name: str) -> Callable:
        @torch.no_grad()
        def hook(module, args, output):
            if "gemm_rel_error" in self._stats[name]:
                return
            bias = None if module.bias is None else module.bias.float()
            reference = nn.functional.linear(args[0].detach().float(), module.weight.detach().float(), bias)
            err = (output.detach().float() - reference).norm() / reference.norm().clamp_min(1e-30)
            self._stats[name]["gemm_rel_error"] = float(err) if math.isfinite(float(err)) else float("inf")
        return hook

    def _before_backward(self, name: str) -> Callable:
        def hook(module, grad_output):
            if grad_output[0] is not None and "grad_output_amax" not in self._stats[name]:
                self._record(name, 2, grad_output[0], module)
        return hook


def probe_epochs(epochs: int) -> list[int]:
    """The 0-based epochs whose first step is probed: the first, the middle and the last."""
    return sorted({0, (epochs - 1) // 2, epochs - 1})

