"""R2Gen's optimizer and its one training step, shared by training, the batch-size probe and the benchmarks.

The step (public code, R2GEN_NOTES.md §6): forward under the precision plan's autocast, token-mean
NLL, ``zero_grad``, GradScaler-scaled backward, ``unscale_``, element-wise gradient value clipping,
``optimizer.step`` through the scaler. Under DDP the loss is R2Gen's token mean over the global
batch (:func:`global_batch_loss`), so N ranks compute what one process with the whole batch would.

Each step also measures the global L2 norm of the unscaled gradients before clipping
(:func:`grad_norm`): R2Gen clips by value, so this norm is the one view of the gradient's size that
every precision shares. It is taken after ``unscale_`` (fp16: the true gradient, not the scaled one)
and, under DDP, after the backward's all-reduce (the same value on every rank); it is read on the
host after the update, together with the loss, so it adds no sync before the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r2gen.config import TrainCommon
from r2gen.distributed import World
from r2gen.model.r2gen import R2Gen
from r2gen.precision import PrecisionPlan


def build_optimizer(model: R2Gen, common: TrainCommon, lr_factor: float = 1.0):
    """R2Gen's Adam (visual extractor and encoder-decoder groups) and StepLR; ``lr_factor`` scales
    both learning rates (batch_mode max: see :func:`r2gen.training.batchsize.choose_batch`)."""
    visual = list(model.visual.parameters())
    visual_ids = {id(p) for p in visual}
    rest = [p for p in model.parameters() if id(p) not in visual_ids]
    optimizer = torch.optim.Adam(
        [{"params": visual, "lr": common.lr_ve * lr_factor}, {"params": rest, "lr": common.lr_ed * lr_factor}],
        weight_decay=common.weight_decay, amsgrad=common.amsgrad,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, common.lr_step_size, common.lr_gamma)
    return optimizer, scheduler


def global_batch_loss(loss: torch.Tensor, labels: torch.Tensor, world: World) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One rank's R2Gen loss -> (loss to backpropagate, token-mean loss of the global batch, global batch size).

    DDP averages gradients over ranks. Weighting each rank's token mean by its share of the global
    tokens (times the world size) makes that average the gradient of R2Gen's token mean over the
    global batch: what one process holding the whole batch computes.
    """
    tokens = R2Gen.target_mask(labels).sum()
    totals = world.all_reduce_sum(torch.stack([tokens, loss.detach().float() * tokens,
                                               tokens.new_tensor(float(labels.shape[0]))]))  # (3,)
    return loss * (tokens * world.size / totals[0]), totals[1] / totals[0], int(totals[2])


@dataclass(frozen=True)
class StepResult:
    """What one :func:`train_step` did."""

    loss: float  # token-mean loss of the (global) batch
    samples: int  # studies in the (global) batch
    finite: bool  # the loss was finite
    skipped: bool  # GradScaler found inf/NaN gradients and skipped optimizer.step (checked with skip_nonfinite)
    # Global L2 norm of the unscaled gradients before clipping; None when no backward ran (non-finite
    # loss); inf/nan when the gradients overflowed (fp16: the step GradScaler skips).
    grad_norm: float | None = None

    @property
    def stepped(self) -> bool:
        """The weights were updated."""
        return self.finite and not self.skipped

    @property
    def finite_grad_norm(self) -> float | None:
        """The gradient norm where it is a number (what the history logs), else None."""
        return self.grad_norm if self.grad_norm is not None and math.isfinite(self.grad_norm) else None


def grad_norm(parameters) -> torch.Tensor:
    """Global L2 norm of the gradients of ``parameters``: ``sqrt(sum of every element squared)``, a 0-d
    fp32 tensor on the gradients' device (0 without gradients). One fused per-tensor norm, no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None).float()


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, plan: PrecisionPlan, clip_value: float, *, world: World = World(),
               skip_nonfinite: bool = True) -> StepResult:
    """One optimizer step of R2Gen on ``images`` (B, V, S, S) uint8 and ``labels`` (B, T).

    ``skip_nonfinite`` (training): a non-finite loss, the same verdict on every rank, skips the
    backward pass and the update, and a GradScaler step that lowered the scale is reported as
    skipped; both checks read values on the host. False (the batch probe and the benchmarks, which
    measure a full step): backward and update run whatever the loss, with no host sync before the
    update.
    """
    images, labels = images.to(plan.device, non_blocking=True), labels.to(plan.device, non_blocking=True)
    with plan.autocast():
        out = model(images, labels)
    loss, samples = out.loss, images.shape[0]  # loss: token mean over this rank's studies
    if world.distributed:
        loss, loss_global, samples = global_batch_loss(loss, labels, world)
    else:
        loss_global = loss.detach()
    run = bool(torch.isfinite(loss_global)) if skip_nonfinite else True
    optimizer.zero_grad(set_to_none=True)
    skipped, norm = False, None
    if run:
        scale_before = scaler.get_scale() if skip_nonfinite and scaler.is_enabled() else None
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = grad_norm(model.parameters())  # before clipping: the gradient the step computed
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        scaler.step(optimizer)
        scaler.update()
        skipped = scale_before is not None and scaler.get_scale() < scale_before
    value = float(loss_global)
    return StepResult(value, samples, math.isfinite(value), skipped, None if norm is None else float(norm))
