"""Mini-batches of a prepared split for training (shuffled, augmented, sharded over DDP ranks) and evaluation."""

from __future__ import annotations

import math

import numpy as np
import torch

from r2gen.data.images import PreparedSplit
from r2gen.tokenizer import Tokenizer


class StudyBatches:
    """Mini-batches ``(uint8 images (B, V, S, S), token ids (B, T))`` from a prepared split.

    Training batches are shuffled by ``generator``, and each view is randomly cropped (and
    optionally flipped) as R2Gen's torchvision transforms do; evaluation batches are in order.
    A crop's offset (y, x) is uniform over every position of the view as resized (torchvision's
    ``RandomCrop`` on ``Resize(S)``'s output: 0..H-size, 0..W-size). When every view of the split
    is the same square (the bundled sample), the offsets are one ``torch.randint`` call over the
    batch, as before non-square views were kept, so such runs are unchanged; otherwise each is
    ``floor(u * range)`` with ``u`` uniform fp64 (one draw per offset, bias below 2**-40).

    With ``world`` ranks, ``batch_size`` is per rank: every rank draws the same permutation and the
    same augmentation for the global batch of ``world * batch_size`` studies and keeps its slice,
    so N ranks see exactly the studies (and crops) one process sees with batch ``N * batch_size``.
    A last global batch too small to give every rank a study is skipped. Evaluation shards studies
    round-robin (rank r: studies r, r+N, ...).
    """

    def __init__(self, split: PreparedSplit, tokenizer: Tokenizer, batch_size: int, image_size: int,
                 *, train: bool, hflip: bool = False, generator: torch.Generator | None = None,
                 rank: int = 0, world: int = 1):
        self.split, self.batch_size, self.image_size = split, batch_size, image_size
        self.train, self.hflip, self.generator = train, hflip, generator
        self.rank, self.world = rank, world
        self.labels = [torch.tensor(tokenizer.encode(r), dtype=torch.long) for r in split.reports]
        sizes = split.sizes  # (N, V, 2) (height, width) of each view as resized
        self.square = int(sizes.flat[0]) if sizes.size and (sizes == sizes.flat[0]).all() else None

    def __len__(self) -> int:
        n, step = len(self.labels), self.batch_size * self.world
        if not self.train:
            return math.ceil(len(range(self.rank, n, self.world)) / self.batch_size)
        return n // step + (n % step >= self.world)

    def smallest_batch(self) -> int:
        """The fewest studies one rank gets in a training batch of an epoch (0 if it gets none)."""
        n, step = len(self.labels), self.batch_size * self.world
        sizes = [self.batch_size] if n >= step else []
        if n % step >= self.world:  # a short last batch, split as evenly as tensor_split does
            sizes.append((n % step) // self.world)
        return min(sizes, default=0)

    def __iter__(self):
        n = len(self.labels)
        if not self.train:
            mine = torch.arange(self.rank, n, self.world)
            for start in range(0, len(mine), self.batch_size):
                yield self._batch(mine[start : start + self.batch_size], None)
            return
        order = torch.randperm(n, generator=self.generator)
        step = self.batch_size * self.world
        for start in range(0, n, step):
            idx = order[start : start + step]  # the global batch
            if len(idx) < self.world:
                break
            augment = self._draw_augmentation(idx)
            # Equal slices of a full batch; slices of a short last batch differ in size by one at most.
            sizes = [len(part) for part in torch.tensor_split(idx, self.world)]
            lo = sum(sizes[: self.rank])
            hi = lo + sizes[self.rank]
            yield self._batch(idx[lo:hi], {k: v[lo:hi] for k, v in augment.items()})

    def _draw_augmentation(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Random crop offsets (B, V, 2) and flips (B, V) of the global batch ``idx``, drawn in R2Gen's order."""
        B, V = len(idx), self.split.images.shape[1]
        out = {}
        if self.square is not None:
            if self.square > self.image_size:  # RandomCrop, drawn per view like R2Gen's per-image transform
                out["offsets"] = torch.randint(0, self.square - self.image_size + 1, (B, V, 2), generator=self.generator)
        else:
            ranges = torch.from_numpy(self.split.sizes[idx.numpy()]).long() - self.image_size + 1  # (B, V, 2)
            u = torch.rand(B, V, 2, generator=self.generator, dtype=torch.float64)
            out["offsets"] = torch.minimum((u * ranges).long(), ranges - 1)
        if self.hflip:
            out["flip"] = torch.rand(B, V, generator=self.generator) < 0.5
        return out

    def _batch(self, idx: torch.Tensor, augment: dict[str, torch.Tensor] | None):
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx.numpy()]))
        if augment is not None:
            images = self._augment(images, augment, self.split.sizes[idx.numpy()])
        labels = torch.nn.utils.rnn.pad_sequence([self.labels[i] for i in idx.tolist()], batch_first=True)
        return images, labels

    def _augment(self, images: torch.Tensor, augment: dict[str, torch.Tensor], sizes: np.ndarray) -> torch.Tensor:
        """Crop (and flip) stored views (B, V, L, S); ``sizes`` (B, V, 2) tells which are stored transposed."""
        if "offsets" in augment:
            images = torch.stack([
                torch.stack([crop_view(images[b, v], tuple(sizes[b, v]), y, x, self.image_size)
                             for v, (y, x) in enumerate(offsets.tolist())])
                for b, offsets in enumerate(augment["offsets"])
            ])
        if "flip" in augment:
            images = torch.where(augment["flip"][:, :, None, None], images.flip(-1), images)
        return images



def crop_view(stored: torch.Tensor, size_hw: tuple[int, int], y: int, x: int, size: int) -> torch.Tensor:
    """The ``size`` x ``size`` crop at (y, x) of a view resized to ``size_hw`` = (H, W) and stored long
    side first (r2gen.data.images: a landscape view, W > H, is stored transposed)."""
    height, width = size_hw
    if width > height:
        return stored[x : x + size, y : y + size].T
    return stored[y : y + size, x : x + size]
