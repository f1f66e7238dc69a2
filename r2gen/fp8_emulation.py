"""Emulated FP8 training for ``nn.Linear``: Transformer Engine's numerics without an FP8 GPU.

Each converted Linear quantizes and immediately dequantizes the tensors that TE would feed to an FP8
GEMM, with one scale per tensor, and then multiplies in fp32 (TE's GEMMs accumulate in fp32):

    forward    y  = dq(q_e4m3(x)) @ dq(q_e4m3(W))^T + b        (output in the autocast dtype)
    backward   dx = dq(q_e5m2(dy)) @ dq(q_e4m3(W))
               dW = dq(q_e5m2(dy))^T @ dq(q_e4m3(x))           db = sum(dy), unquantized as in TE

This is TE's HYBRID format (E4M3 forward, E5M2 backward). ``q`` scales by ``s``, saturates at the
format's largest finite value (448 for E4M3, 57344 for E5M2) and rounds to nearest-even through
torch's float8 dtypes; ``dq`` multiplies by ``1/s``. The scale is ``fp8_max / amax`` (margin 0):

- ``current``: amax of the tensor being quantized (TE's ``Float8CurrentScaling``; stateless).
- ``delayed``: amax history of the last ``AMAX_HISTORY_LEN`` (1024) uses, ``max`` over it (TE's
  ``DelayedScaling`` defaults). The scale used at step t comes from steps before t, so a tensor
  that grows saturates until the history catches up, as in TE.

Cold start (delayed): TE starts from scale 1, which in our test flushed most step-1 gradients to
zero in E5M2 (a gradient of 1e-6 is below E5M2's smallest subnormal, 1.5e-5). Here a slot whose
history is still empty uses current scaling instead, then records that amax, so step 2 scales from
step 1's amax. This is the one deliberate difference from TE.

The history is updated once per call of the layer in a grad-enabled forward (and in every
backward), while TE updates once per ``autocast`` region; the two agree when each layer runs once per
training step. Like TE, a converted layer quantizes only inside :func:`fp8_autocast`; outside it
runs as a plain Linear. The amax history and scales are tensor buffers (``fp8_amax_history``,
``fp8_scale``), so checkpoints load with ``torch.load(weights_only=True)`` and a resumed run takes
the same next step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448.0, 57344.0
RECIPES = ("delayed", "current")
AMAX_HISTORY_LEN = 1024  # TE DelayedScaling default
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2  # slots (columns) of the amax history and scales

_active_recipe: str | None = None  # set by fp8_autocast, read by EmulatedFp8Linear.forward


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * scale`` rounded to the fp8 ``dtype``, saturating at its largest finite value."""
    fp8_max = FP8_MAX[dtype]
    # torch's cast overflows to inf (e5m2) or nan (e4m3fn) instead of saturating, so clamp first.
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of the fp8 tensor ``q``; multiplies by the reciprocal as TE's GEMM does."""
    return q.float() * scale.reciprocal()


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What an fp8 GEMM sees of ``x`` (fp32): quantize to ``dtype`` with ``scale``, dequantize."""
    return dequantize(quantize(x, scale, dtype), scale)


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, previous: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_max / amax`` as TE computes it: a zero or non-finite amax keeps the previous scale (or 1)."""
    previous = torch.ones_like(amax) if previous is None else previous
    scale = FP8_MAX[dtype] / amax
    scale = torch.where((amax > 0) & torch.isfinite(amax), scale, previous)
    # A tiny but nonzero amax overflows the division; TE then uses the largest fp32 instead.
    return torch.where(torch.isinf(scale), torch.full_like(scale, torch.finfo(torch.float32).max), scale)


@contextlib.contextmanager
def fp8_autocast(recipe: str = "delayed") -> Iterator[None]:
    """Run every :class:`EmulatedFp8Linear` called inside the block in emulated FP8 with ``recipe``."""
    global _active_recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown fp8 recipe '{recipe}', must be one of: {', '.join(RECIPES)}")
    previous, _active_recipe = _active_recipe, recipe
    try:
        yield
    finally:
        _active_recipe = previous


class EmulatedFp8Linear(nn.Linear):
    """An ``nn.Linear`` that runs in emulated FP8 inside :func:`fp8_autocast` (see module docstring).

    Parameters keep the names ``weight`` and ``bias``; the fp8 state lives in the buffers
    ``fp8_amax_history`` (AMAX_HISTORY_LEN, 3) and ``fp8_scale`` (3,), one column per slot (input,
    weight, output gradient). ``fp8_forward_calls`` / ``fp8_backward_calls`` count the calls that
    really ran in FP8 (see ``r2gen.precision.verify_fp8``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("fp8_amax_history", torch.zeros(AMAX_HISTORY_LEN, 3, device=device))
        self.register_buffer("fp8_scale", torch.ones(3, device=device))
        self.fp8_forward_calls = 0
        self.fp8_backward_calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "EmulatedFp8Linear":
        """Wrap the parameters of ``linear`` (the same Parameter objects: ties and devices survive)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.fp8_amax_history = torch.zeros(AMAX_HISTORY_LEN, 3, device=linear.weight.device)
        new.fp8_scale = torch.ones(3, device=linear.weight.device)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recipe = _active_recipe
        if recipe is None:
            return super().forward(x)
        device_type = x.device.type
        # Under torch.autocast TE quantizes the input from the autocast dtype (bf16), not from fp32.
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x = x.to(out_dtype)
        # Only training forwards feed the history (TE updates it only when grad is enabled).
        record = torch.is_grad_enabled()
        x_scale = self._scale(INPUT, x, recipe, E4M3, record)
        w_scale = self._scale(WEIGHT, self.weight, recipe, E4M3, record)
        self.fp8_forward_calls += 1
        return _Fp8LinearFunction.apply(x, self.weight, self.bias, x_scale, w_scale, self, recipe)

    @torch.no_grad()
    def _scale(self, slot: int, tensor: torch.Tensor, recipe: str, dtype: torch.dtype, record: bool) -> torch.Tensor:
        """Scale for quantizing ``tensor`` in ``slot`` (0-dim fp32), updating the history if ``record``."""
        amax = tensor.detach().abs().amax().float()
        current = scale_from_amax(amax, dtype)
        if recipe == "current":
            return current
        history = self.fp8_amax_history[:, slot]  # (AMAX_HISTORY_LEN,) newest first
        # Cold start: nothing recorded yet, so scale from this tensor instead of TE's initial 1.
        scale = torch.where(history.amax() > 0, self.fp8_scale[slot], current)
        if record:
            history.copy_(torch.roll(history, 1))
            history[0] = amax
            self.fp8_scale[slot] = scale_from_amax(history.amax(), dtype, previous=self.fp8_scale[slot])
        return scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A plain Linear's state dict has no fp8 state: load its weights and start the fp8 state cold.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in ("fp8_amax_history", "fp8_scale"):
            key = prefix + name
            if key not in state_dict and key in missing_keys:
                missing_keys.remove(key)
                getattr(self, name).fill_(0.0 if name == "fp8_amax_history" else 1.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=emulated"


class _Fp8LinearFunction(torch.autograd.Function):
    """The FP8 GEMMs of one Linear: E4M3 input and weight forward, E5M2 output gradient backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_scale, w_scale, module, recipe):
        # x: (..., in) in the output dtype; weight: (out, in)
        with torch.autocast(x.device.type, enabled=False):
            qx = quantize(x, x_scale, E4M3)  # (..., in) fp8
            qw = quantize(weight, w_scale, E4M3)  # (out, in) fp8
            out = dequantize(qx, x_scale) @ dequantize(qw, w_scale).t()  # (..., out) fp32
            if bias is not None:
                out = out + bias.float()
        # Save the fp8 tensors, not their fp32 copies: the activation memory of an FP8 Linear.
        ctx.save_for_backward(qx, qw, x_scale, w_scale)
        ctx.module, ctx.recipe, ctx.has_bias = module, recipe, bias is not None
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qx, qw, x_scale, w_scale = ctx.saved_tensors
        module = ctx.module
        g_scale = module._scale(GRAD_OUTPUT, grad_out, ctx.recipe, E5M2, record=True)
        module.fp8_backward_calls += 1
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = quantize_dequantize(grad_out, g_scale, E5M2)  # (..., out) fp32
            if ctx.needs_input_grad[0]:
                grad_x = (g @ dequantize(qw, w_scale)).to(ctx.x_dtype)  # (..., in)
            if ctx.needs_input_grad[1]:
                g2 = g.reshape(-1, g.shape[-1])  # (N, out)
                x2 = dequantize(qx, x_scale).reshape(-1, qx.shape[-1])  # (N, in)
                grad_w = (g2.t() @ x2).to(ctx.w_dtype)  # (out, in)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_out.float().reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.w_dtype)  # (out,)
        return grad_x, grad_w, grad_b, None, None, None, None

