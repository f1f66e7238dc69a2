"""One timed run of the PUBLIC R2Gen code (github.com/cuhksz-nlp/R2Gen), imported from the user's checkout.

Nothing of the public code is copied here: ``--reference-src`` points at a checkout (its
``models/`` and ``modules/`` folders), which this module puts on ``sys.path`` and imports in a
fresh worker process. The only changes are run-time shims (R2GEN_NOTES.md §11):

- ``Tensor.cuda()`` is the identity on a CPU run (the public beam search calls ``it.cuda()``);
- its DataLoader runs with ``num_workers=0``, so PNG decoding and transforms happen in the timed
  process at the pinned thread count (the public default of 2 workers would add processes that the
  thread count and the peak RSS do not see);
- ImageNet weights off (``visual_extractor_pretrained=False``), as for our side.

The training step is the body of the public ``Trainer._train_epoch`` (forward, ``compute_loss``,
``zero_grad``, ``backward``, ``clip_grad_value_(0.1)``, ``step``) around the public model,
optimizer builder, loss and data loader; generation is ``model(images, mode='sample')``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks.measure import (LoadMonitor, Profile, count_flops, peak_memory, reset_peak_memory, set_threads,
                                synchronize)

# What the public code must have for this adapter to drive it.
REQUIRED = ("models/r2gen.py", "modules/tokenizers.py", "modules/dataloaders.py", "modules/optimizers.py",
            "modules/loss.py")


def missing_files(src: str | Path) -> list[str]:
    """Files of ``REQUIRED`` that ``src`` lacks (empty: it looks like a checkout of the public code)."""
    return [name for name in REQUIRED if not (Path(src) / name).is_file()]


def public_args(profile: Profile, data: dict, seed: int) -> argparse.Namespace:
    """The public ``main.py`` arguments (its defaults and run_iu_xray.sh) for ``profile``."""
    m = profile.model
    extractor = m.get("visual_extractor", "resnet101")
    return argparse.Namespace(
        image_dir=str(Path(data["root"]) / "images") + "/", ann_path=str(Path(data["root"]) / "annotation.json"),
        dataset_name="iu_xray", max_seq_length=profile.max_len, threshold=3, num_workers=0,
        batch_size=profile.batch_size,
        visual_extractor=extractor, visual_extractor_pretrained=False,
        d_model=m.get("d_model", 512), d_ff=m.get("d_ff", 512),
        d_vf=2048 if extractor in ("resnet50", "resnet101", "resnet152") else 512,
        num_heads=m.get("num_heads", 8), num_layers=m.get("num_layers", 3), dropout=m.get("dropout", 0.1),
        logit_layers=1, bos_idx=0, eos_idx=0, pad_idx=0, use_bn=m.get("use_bn", 0),
        drop_prob_lm=m.get("drop_prob_lm", 0.5),
        rm_num_slots=m.get("rm_num_slots", 3), rm_num_heads=m.get("rm_num_heads", 8),
        rm_d_model=m.get("rm_d_model", 512),
        sample_method="beam_search", beam_size=profile.num_beams, temperature=1.0, sample_n=1, group_size=1,
        output_logsoftmax=1, decoding_constraint=0, block_trigrams=1,
        optim="Adam", lr_ve=5e-5, lr_ed=1e-4, weight_decay=5e-5, amsgrad=True, seed=seed,
    )


@contextlib.contextmanager
def cuda_as_identity(device: torch.device):
    """``Tensor.cuda()`` returns the tensor itself on a CPU run; untouched on a GPU."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class Public:
    """The public model, tokenizer, optimizer and loaders for one run."""

    def __init__(self, spec: dict):
        src = spec["src"]
        if missing_files(src):
            raise FileNotFoundError(f"{src} is not a checkout of the public R2Gen code (missing {missing_files(src)})")
        sys.path.insert(0, str(src))
        warnings.filterwarnings("ignore", category=UserWarning)  # torchvision's `pretrained=` deprecation
        from models.r2gen import R2GenModel
        from modules.dataloaders import R2DataLoader
        from modules.loss import compute_loss
        from modules.optimizers import build_optimizer
        from modules.tokenizers import Tokenizer

        self.profile = Profile(**spec["profile"])
        set_threads(spec["threads"])
        self.device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
        self.args = public_args(self.profile, spec["data"], spec["seed"])
        torch.manual_seed(spec["seed"])
        self.tokenizer = Tokenizer(self.args)
        self.model = R2GenModel(self.args, self.tokenizer).to(self.device)
        self.build_optimizer, self.compute_loss, self.loader_class = build_optimizer, compute_loss, R2DataLoader

    def batches(self, split: str):
        """Full batches of (images, reports_ids, reports_masks), endlessly for training."""
        loader = self.loader_class(self.args, self.tokenizer, split=split, shuffle=split == "train")
        while True:
            for _ids, images, reports_ids, reports_masks in loader:
                if len(images) == self.profile.batch_size:
                    yield images.to(self.device), reports_ids.to(self.device), reports_masks.to(self.device)
            if split != "train":
                return

    def train_step(self, optimizer, images, reports_ids, reports_masks) -> float:
        """The body of the public Trainer._train_epoch."""
        output = self.model(images, reports_ids, mode="train")
        loss = self.compute_loss(output, reports_ids, reports_masks)
        value = loss.item()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(self.model.parameters(), 0.1)
        optimizer.step()
        return value

    def generate(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), cuda_as_identity(self.device):
            return self.model(images, mode="sample")


def train_run(spec: dict) -> dict:
    ref = Public(spec)
    p = ref.profile
    optimizer = ref.build_optimizer(ref.args, ref.model)
    ref.model.train()
    batches = ref.batches("train")
    reset_peak_memory(ref.device)
    losses, seconds = [], []
    for _ in range(p.warmup_steps):
        losses.append(ref.train_step(optimizer, *next(batches)))
    with LoadMonitor() as load:
        for _ in range(p.train_steps):
            start = time.perf_counter()  # includes loading the batch, as the public loop does
            losses.append(ref.train_step(optimizer, *next(batches)))
            synchronize(ref.device)
            seconds.append(time.perf_counter() - start)
    peak, kind = peak_memory(ref.device)
    return {
        "samples_per_s": p.batch_size * p.train_steps / sum(seconds),
        "samples_per_cpu_s": p.batch_size * p.train_steps / load.record["own_cpu_seconds"],
        "step_seconds": seconds,
        "losses": losses,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "parameters": sum(t.numel() for t in ref.model.parameters()),
        "backend": "public code",
        **load.record,
    }


def generate_run(spec: dict) -> dict:
    ref = Public(spec)
    p = ref.profile
    ref.model.eval()
    batches = list(itertools.islice(ref.batches("test"), p.gen_batches))
    if len(batches) < p.gen_batches:
        raise ValueError(f"{spec['data']['root']}: too few test studies for {p.gen_batches} batches of {p.batch_size}")
    ref.generate(batches[0][0][:1])  # warm-up on one study
    reset_peak_memory(ref.device)
    seconds, lengths = [], []
    with LoadMonitor() as load:
        for images, _, _ in batches:
            synchronize(ref.device)
            start = time.perf_counter()
            out = ref.generate(images)
            synchronize(ref.device)
            seconds.append(time.perf_counter() - start)
            lengths += (out > 0).sum(1).add(1).clamp(max=out.shape[1]).tolist()
    peak, kind = peak_memory(ref.device)
    n = sum(len(images) for images, _, _ in batches)
    return {
        "reports_per_s": n / sum(seconds),
        "reports_per_cpu_s": n / load.record["own_cpu_seconds"],
        "batch_seconds": seconds,
        "mean_length": sum(lengths) / len(lengths),
        "early_exit": False,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "backend": "public code",
        **load.record,
    }


def flops_run(spec: dict) -> dict:
    ref = Public(spec)
    p = ref.profile
    optimizer = ref.build_optimizer(ref.args, ref.model)
    out = {}
    if "train" in spec["phases"]:
        ref.model.train()
        batch = next(ref.batches("train"))
        train, _ = count_flops(lambda: ref.train_step(optimizer, *batch))
        out["train_per_sample"] = train / p.batch_size
    if "generate" in spec["phases"]:
        ref.model.eval()
        images = next(ref.batches("test"))[0][:2]
        generate, _ = count_flops(lambda: ref.generate(images))
        out["generate_per_report"] = generate / len(images)
    return out

