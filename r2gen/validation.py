"""Teacher-forced loss over a split: the val loss of training and the test loss of evaluation."""

from __future__ import annotations

import torch

from r2gen.data.batches import StudyBatches
from r2gen.distributed import World
from r2gen.model.r2gen import R2Gen
from r2gen.precision import PrecisionPlan


def evaluate_loss(model: R2Gen, batches: StudyBatches, plan: PrecisionPlan, world: World = World()) -> float:
    """Teacher-forced token-mean NLL over a split (eval mode, no dropout); under DDP, over all ranks' shards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for images, labels in batches:
            images, labels = images.to(plan.device), labels.to(plan.device)
            with plan.autocast():
                out = model(images, labels)
            n = float(R2Gen.target_mask(labels).sum())
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    if world.distributed:
        sums = torch.tensor([total, count], dtype=torch.float64, device=plan.device)
        total, count = world.all_reduce_sum(sums).tolist()
    return total / max(count, 1.0)
