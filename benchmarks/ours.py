"""One timed run of our R2Gen: training steps or beam-search generation, as the pipeline runs them.

Training reads the prepared uint8 cache through ``r2gen.data.batches.StudyBatches`` and takes
training's own step, ``r2gen.training.step.train_step`` (forward under the precision plan's
autocast, scaled backward, ``unscale_``, element-wise gradient value clipping, Adam(amsgrad) with
R2Gen's two learning rates), without its non-finite skipping. A step's time includes assembling its batch. Generation is ``R2Gen.generate``'s search (incremental
decoding, beam 3) over test studies.

Everything imports the r2gen on ``sys.path``, so the same code times another checkout of this
project (``--impl LABEL=PATH``): before/after figures of a change come from one run. That checkout
needs the layout this file imports (``r2gen.training.step``, ``r2gen.data.batches``).
"""

from __future__ import annotations

import itertools
import time

import torch

from benchmarks.measure import (LoadMonitor, Profile, count_flops, peak_memory, reset_peak_memory, set_threads,
                                synchronize)
from r2gen import precision as prec
from r2gen.config import Params
from r2gen.data.batches import StudyBatches
from r2gen.data.images import load_prepared
from r2gen.decoding import beam_search
from r2gen.model.r2gen import IncrementalStepper, R2Gen
from r2gen.tokenizer import Tokenizer
from r2gen.training.state import seed_everything
from r2gen.training.step import build_optimizer, train_step


def params_for(profile: Profile, threads: int, seed: int, model: dict | None = None) -> Params:
    """The paper's optimiser settings around the profile's model (``model``: options of a --variant)."""
    return Params.from_dict({
        "seed": seed, "threads": threads,
        "data": {"image_size": profile.image_size},
        "tokenizer": {"max_seq_length": profile.max_len},
        "model": {**profile.model, **(model or {})},
        "train": {"common": {"lr_ve": 5e-5, "lr_ed": 1e-4, "weight_decay": 5e-5, "amsgrad": True,
                             "grad_clip_value": 0.1}},
    }, source="benchmark profile")


class Setup:
    """Model, data and precision plan of one run."""

    def __init__(self, spec: dict):
        self.profile = Profile(**spec["profile"])
        set_threads(spec["threads"])
        self.device = prec.select_device(spec["device"])
        self.plan = prec.resolve(spec["precision"], "auto", self.device)
        prec.set_fp32_numerics(self.device)
        self.params = params_for(self.profile, spec["threads"], spec["seed"], spec.get("model"))
        self.tokenizer = Tokenizer.load(spec["data"]["tokenizer"])
        self.prepared = spec["data"]["prepared"]
        seed_everything(spec["seed"])
        self.model = R2Gen(self.params.model, self.tokenizer.vocab_size).to(self.device)
        prec.convert_model(self.model, self.plan)

    def train_batches(self, seed: int):
        """Full training batches, endlessly (a new shuffled epoch when one ends)."""
        split = load_prepared(self.prepared, "train")
        batches = StudyBatches(split, self.tokenizer, self.profile.batch_size, self.profile.image_size,
                               train=True, generator=torch.Generator().manual_seed(seed))
        for _ in itertools.count():
            for images, labels in batches:
                if len(images) == self.profile.batch_size:
                    yield images, labels

    def test_images(self) -> torch.Tensor:
        """uint8 test studies (N, V, S, S), enough for the timed batches."""
        split = load_prepared(self.prepared, "test")
        n = self.profile.batch_size * self.profile.gen_batches
        if len(split.ids) < n:
            raise ValueError(f"{self.prepared}: {len(split.ids)} test studies, the profile needs {n}")
        return torch.from_numpy(split.images[:n].copy())

    def generate(self, images: torch.Tensor, early_exit: bool) -> torch.Tensor:
        """``R2Gen.generate``'s search, with R2Gen's fixed-length loop when ``early_exit`` is off."""
        p = self.profile
        images = images.to(self.device)
        with torch.no_grad(), self.plan.autocast():
            stepper = IncrementalStepper(self.model, self.model.encode(images), p.max_len)
            return beam_search(stepper, len(images), p.num_beams, p.max_len, early_exit=early_exit)


def step(setup: Setup, optimizer, scaler, images, labels) -> float:
    """Training's step, always updating (a benchmark times full steps); returns the loss."""
    return train_step(setup.model, images, labels, optimizer, scaler, setup.plan,
                      setup.params.train.common.grad_clip_value, skip_nonfinite=False).loss


def train_run(spec: dict) -> dict:
    """Warm-up steps, then ``train_steps`` timed steps: samples/s, peak memory, machine load."""
    setup = Setup(spec)
    p = setup.profile
    optimizer, _ = build_optimizer(setup.model, setup.params.train.common)
    scaler = setup.plan.grad_scaler()
    setup.model.train()
    batches = setup.train_batches(spec["seed"])
    reset_peak_memory(setup.device)
    losses, seconds = [], []
    for _ in range(p.warmup_steps):
        losses.append(step(setup, optimizer, scaler, *next(batches)))
    with LoadMonitor() as load:
        for _ in range(p.train_steps):
            start = time.perf_counter()
            losses.append(step(setup, optimizer, scaler, *next(batches)))
            synchronize(setup.device)
            seconds.append(time.perf_counter() - start)
    peak, kind = peak_memory(setup.device)
    return {
        "samples_per_s": p.batch_size * p.train_steps / sum(seconds),
        "samples_per_cpu_s": p.batch_size * p.train_steps / load.record["own_cpu_seconds"],
        "step_seconds": seconds,
        "losses": losses,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "parameters": sum(t.numel() for t in setup.model.parameters()),
        "backend": setup.plan.backend,
        **load.record,
    }


def generate_run(spec: dict) -> dict:
    """A one-study warm-up, then ``gen_batches`` timed batches: reports/s and mean report length."""
    setup = Setup(spec)
    setup.model.eval()
    images = setup.test_images()
    p = setup.profile
    setup.generate(images[:1], spec["early_exit"])
    reset_peak_memory(setup.device)
    seconds, lengths = [], []
    with LoadMonitor() as load:
        for batch in images.split(p.batch_size):
            synchronize(setup.device)
            start = time.perf_counter()
            out = setup.generate(batch, spec["early_exit"])
            synchronize(setup.device)
            seconds.append(time.perf_counter() - start)
            lengths += (out > 0).sum(1).add(1).clamp(max=out.shape[1]).tolist()  # words + EOS
    peak, kind = peak_memory(setup.device)
    return {
        "reports_per_s": len(images) / sum(seconds),
        "reports_per_cpu_s": len(images) / load.record["own_cpu_seconds"],
        "batch_seconds": seconds,
        "mean_length": sum(lengths) / len(lengths),
        "early_exit": spec["early_exit"],
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "backend": setup.plan.backend,
        **load.record,
    }


def flops_run(spec: dict) -> dict:
    """Model FLOPs of one training step (per sample) and of a full-length search (per report)."""
    setup = Setup(spec)
    p = setup.profile
    optimizer, _ = build_optimizer(setup.model, setup.params.train.common)
    scaler = setup.plan.grad_scaler()
    out = {}
    if "train" in spec["phases"]:
        setup.model.train()
        images, labels = next(setup.train_batches(spec["seed"]))
        train, _ = count_flops(lambda: step(setup, optimizer, scaler, images, labels))
        out["train_per_sample"] = train / p.batch_size
    if "generate" in spec["phases"]:
        setup.model.eval()
        studies = setup.test_images()[:2]
        generate, _ = count_flops(lambda: setup.generate(studies, early_exit=False))
        out["generate_per_report"] = generate / len(studies)
    return out
