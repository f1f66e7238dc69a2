"""R2Gen's training recipe at one precision, with resume, dvclive logging and honest measurements.

Recipe (public code, R2GEN_NOTES.md §6): Adam(amsgrad) with lr 5e-5 for the visual extractor and
1e-4 for the rest, weight decay 5e-5, StepLR stepped per epoch, element-wise gradient value
clipping (after ``unscale_`` under fp16), token-mean NLL. Differences, on purpose: checkpoints hold
the scheduler, scaler and RNG states (the public code drops the scheduler), the shipped model is the
last epoch's (the public code picks by val BLEU-4 and also tracks test), and the laterality-swapping
horizontal flip is off by default (``data.hflip``).

Every epoch ends with an atomic checkpoint in ``checkpoint_dir``; rerunning with the same config
resumes from it and reaches the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import r2gen
from r2gen import precision as prec
from r2gen.checkpoint import load_torch, save_model, save_torch
from r2gen.config import Params, to_dict
from r2gen.data.images import PreparedSplit, load_prepared
from r2gen.errors import R2GenError
from r2gen.distributed import World, sync_batch_norms
from r2gen.io import write_json, write_text
from r2gen.model.r2gen import R2Gen
from r2gen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- data
class StudyBatches:
    """Mini-batches ``(uint8 images (B, V, S, S), token ids (B, T))`` from a prepared split.

    Training batches are shuffled by ``generator``, and each view is randomly cropped (and
    optionally flipped) as R2Gen's torchvision transforms do; evaluation batches are in order.

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

    def __len__(self) -> int:
        n, step = len(self.labels), self.batch_size * self.world
        if not self.train:
            return math.ceil(len(range(self.rank, n, self.world)) / self.batch_size)
        return n // step + (n % step >= self.world)

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
            augment = self._draw_augmentation(len(idx))
            # Equal slices of a full batch; slices of a short last batch differ in size by one at most.
            sizes = [len(part) for part in torch.tensor_split(idx, self.world)]
            lo = sum(sizes[: self.rank])
            hi = lo + sizes[self.rank]
            yield self._batch(idx[lo:hi], {k: v[lo:hi] for k, v in augment.items()})

    def _draw_augmentation(self, B: int) -> dict[str, torch.Tensor]:
        """Random crop offsets (B, V, 2) and flips (B, V) of a global batch, drawn in R2Gen's order."""
        V, S = self.split.images.shape[1], self.split.images.shape[-1]
        out = {}
        if S > self.image_size:  # RandomCrop, drawn per view like R2Gen's per-image transform
            out["offsets"] = torch.randint(0, S - self.image_size + 1, (B, V, 2), generator=self.generator)
        if self.hflip:
            out["flip"] = torch.rand(B, V, generator=self.generator) < 0.5
        return out

    def _batch(self, idx: torch.Tensor, augment: dict[str, torch.Tensor] | None):
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx.numpy()]))
        if augment is not None:
            images = self._augment(images, augment)
        labels = torch.nn.utils.rnn.pad_sequence([self.labels[i] for i in idx.tolist()], batch_first=True)
        return images, labels

    def _augment(self, images: torch.Tensor, augment: dict[str, torch.Tensor]) -> torch.Tensor:
        size = self.image_size
        if "offsets" in augment:
            images = torch.stack([
                torch.stack([images[b, v, y : y + size, x : x + size] for v, (y, x) in enumerate(offsets.tolist())])
                for b, offsets in enumerate(augment["offsets"])
            ])
        if "flip" in augment:
            images = torch.where(augment["flip"][:, :, None, None], images.flip(-1), images)
        return images


def evaluate_loss(model: R2Gen, batches: StudyBatches, plan: prec.PrecisionPlan, world: World = World()) -> float:
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


# ---------------------------------------------------------------------------------------- logging
class LiveLogger:
    """dvclive, configured for a DVC pipeline: no dvc.yaml rewrite, no experiment commit."""

    def __init__(self, live_dir: Path, resume_step: int | None, system_monitor: bool):
        from dvclive import Live

        if resume_step is None:
            shutil.rmtree(live_dir, ignore_errors=True)
        else:
            _truncate_history(live_dir, resume_step)
        self.live = Live(str(live_dir), resume=resume_step is not None, dvcyaml=False,
                         save_dvc_exp=False, monitor_system=system_monitor)
        self._started = resume_step is not None
        if self._started:
            self.live.step = resume_step

    def log_step(self, metrics: dict[str, float]) -> None:
        """Metrics of a new training step (dvclive step = optimizer steps so far - 1)."""
        with self._writing():
            if self._started:
                self.live.next_step()
            self._started = True
            self.log(metrics)

    def log(self, metrics: dict[str, float]) -> None:
        """Metrics at the current step (epoch metrics share the step of the epoch's last step)."""
        with self._writing():
            for name, value in metrics.items():
                self.live.log_metric(name, value)

    def end(self) -> None:
        with self._writing():
            self.live.end()

    @contextlib.contextmanager
    def _writing(self):
        """dvclive appends in place: a full disk is a one-line error (a rerun repairs the history)."""
        try:
            yield
        except OSError as exc:
            raise R2GenError(f"could not write the training history in {self.live.dir}: {exc.strerror or exc}; "
                             "check free disk space and permissions, then rerun to resume") from None


def _truncate_history(live_dir: Path, step: int) -> None:
    """Make the history end at ``step`` before resuming: what a killed run logged after it is dropped.

    The kill may also have cut a row or dvclive's summary (``metrics.json``) mid-write: rows that do
    not parse are dropped, and the summary is rebuilt from the last row of every metric, as dvclive
    itself would have written it at ``step``. Each file is replaced atomically.
    """
    live_dir = Path(live_dir)
    plots = live_dir / "plots" / "metrics"
    summary: dict = {}
    for tsv in sorted(plots.glob("**/*.tsv")):
        lines = tsv.read_text(encoding="utf-8", errors="replace").splitlines()
        header = lines[0].split("\t") if lines else []
        if "step" not in header:
            tsv.unlink()  # cut before its header was complete: nothing in it to keep
            continue
        rows = [row for row in (ln.split("\t") for ln in lines[1:]) if _row_step(row, header) <= step]
        write_text(tsv, "".join("\t".join(r) + "\n" for r in [header, *rows]))
        if rows:
            node = summary
            *parents, name = tsv.relative_to(plots).with_suffix("").parts
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = float(rows[-1][header.index(name)])
    write_json(live_dir / "metrics.json", {**summary, "step": step}, indent=4)


def _row_step(row: list[str], header: list[str]) -> float:
    """The step of a history row; infinity for a row cut by a kill (so that it is dropped)."""
    if len(row) != len(header):
        return math.inf
    try:
        float(row[-1])  # the value column, last in dvclive's rows
        return int(row[header.index("step")])
    except ValueError:
        return math.inf


# ---------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_memory(device: torch.device) -> tuple[int, int, str]:
    """(peak bytes, device total bytes, what was measured)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return torch.cuda.max_memory_allocated(device), total, "torch.cuda.max_memory_allocated"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total, "peak RSS of the process"


# ---------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainPaths:
    prepared: Path
    tokenizer: Path
    model_out: Path  # the shipped model file
    checkpoint_dir: Path  # resume state (persisted across killed runs)
    live_dir: Path  # dvclive history
    metrics: Path  # summary JSON gated in CI


def config_fingerprint(params: Params, precision: str, world_size: int = 1) -> str:
    """Hash of everything that changes the training result: a checkpoint resumes only if it matches."""
    relevant = {
        "precision": precision, "seed": params.seed, "threads": params.threads,
        "data": to_dict(params.data), "tokenizer": to_dict(params.tokenizer), "model": to_dict(params.model),
        "train": {"common": to_dict(params.train.common), precision: to_dict(params.train.for_precision(precision))},
    }
    if world_size > 1:  # the global batch is world_size * batch_size
        relevant["world_size"] = world_size
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def choose_batch(params: Params, precision: str, vocab_size: int, device: torch.device, world: World,
                 train_studies: int, resumed_state: dict | None) -> tuple[int, float, str | None]:
    """(batch per process, learning-rate factor, probe summary) for ``train.common.batch_mode``.

    ``configured`` and ``equal``: ``train.<p>.batch_size`` (``equal``: the config checked it is the
    same for every precision) at the learning rates of params.yaml. ``max``: the largest batch whose training step fits
    ``memory_budget_gb``, found by rank 0's probe (:func:`r2gen.batchsize.probe_max_batch`) and
    never above the training split (per process); the learning rates are rescaled from
    ``train.<p>.batch_size`` by ``lr_scaling``. A resumed run keeps the batch its first probe chose.
    """
    from r2gen.batchsize import default_budget_bytes, probe_max_batch, scaled_lr

    common, base = params.train.common, params.train.for_precision(precision).batch_size
    if common.batch_mode != "max":
        return base, 1.0, None
    if resumed_state is not None and "batch_size" in resumed_state:
        batch, summary = resumed_state["batch_size"], resumed_state.get("batch_probe")
        log.info("batch probe: resumed run keeps batch %d", batch)
    else:
        answer = None
        if world.is_main:
            budget = (int(common.memory_budget_gb * 2**30) if common.memory_budget_gb is not None
                      else default_budget_bytes(device))
            limit = max(1, train_studies // world.size)
            log.info("batch probe: %s on %s, budget %.2f GiB, from batch %d up to %d", precision, device.type,
                     budget / 2**30, min(base, limit), limit)
            result = probe_max_batch(params, precision, vocab_size, device, budget, min(base, limit), limit)
            for line in result.log_lines():
                log.info("batch probe: %s", line)
            answer = (result.batch, result.summary())
        batch, summary = world.broadcast(answer)
    return batch, scaled_lr(1.0, base, batch, common.lr_scaling), summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: R2Gen, params: Params, lr_factor: float = 1.0):
    """R2Gen's Adam (visual extractor and encoder-decoder groups) and StepLR; ``lr_factor`` scales
    both learning rates (batch_mode max: see :func:`choose_batch`)."""
    common = params.train.common
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


def train(params: Params, precision: str, paths: TrainPaths) -> dict:
    """Train R2Gen at ``precision``; writes the model, the summary metrics and dvclive history.

    Under torchrun (``WORLD_SIZE`` > 1) this is one rank of a DDP run: it joins the process group,
    trains on its slice of every global batch, and only rank 0 logs and writes files.

    Returns the summary dict (also written to ``paths.metrics``; every rank returns it).
    """
    world = World.from_env()
    device = world.device(prec.select_device(params.train.common.device))
    with world.joined(device) as backend:
        return _train(params, precision, paths, world, device, backend)


def _train(params: Params, precision: str, paths: TrainPaths, world: World, device: torch.device,
           ddp_backend: str | None) -> dict:
    common, pcfg = params.train.common, params.train.for_precision(precision)
    torch.set_num_threads(params.threads)
    plan = prec.resolve(precision, pcfg.backend, device, pcfg.fp8_recipe)
    prec.set_fp32_numerics(device)
    fingerprint = config_fingerprint(params, precision, world.size)
    log.info("train %s | backend %s | device %s | threads %d | batch %d%s | config %s",
             precision, plan.backend, device, params.threads, pcfg.batch_size,
             f" x {world.size} ranks ({ddp_backend})" if world.distributed else "", fingerprint)
    if world.is_main:
        _check_writable([paths.model_out.parent, paths.metrics.parent, paths.checkpoint_dir, paths.live_dir])
        _remove_stale_temp_files(paths)

    tokenizer = Tokenizer.load(paths.tokenizer)
    train_split = load_prepared(paths.prepared, "train")
    val_split = load_prepared(paths.prepared, "val")
    if train_split.images.shape[1] != params.data.views:
        raise R2GenError(f"{paths.prepared} holds {train_split.images.shape[1]}-view studies but data.dataset "
                         f"is {params.data.dataset}; rerun `dvc repro prepare`")

    # A killed run's checkpoint is read first: a resumed max-batch run keeps the batch it probed.
    ckpt_path = paths.checkpoint_dir / "last.pt"
    ckpt = world.broadcast(_resumable(ckpt_path, fingerprint) if world.is_main else None)
    batch, lr_factor, probe = choose_batch(params, precision, tokenizer.vocab_size, device, world,
                                           len(train_split.ids), ckpt["state"] if ckpt is not None else None)
    if common.batch_mode == "max":
        log.info("batch_mode max: batch %d | learning rates x %.3g (%s rule from batch %d)", batch, lr_factor,
                 common.lr_scaling, pcfg.batch_size)

    seed_everything(params.seed)
    model = R2Gen(params.model, tokenizer.vocab_size).to(device)
    conversion = prec.convert_model(model, plan)
    if world.distributed:
        synced = sync_batch_norms(model)  # BatchNorm over the global batch: as one process would compute it
        log.info("DDP: %d ranks | %d BatchNorm2d layers synced over ranks | global batch %d",
                 world.size, synced, world.size * batch)
        torch.manual_seed(params.seed + world.rank)  # own dropout masks per rank; rank 0 keeps the 1-process stream
    optimizer, scheduler = build_optimizer(model, params, lr_factor)
    scaler = plan.grad_scaler()
    batch_gen = torch.Generator().manual_seed(params.seed)
    shard = {"rank": world.rank, "world": world.size}
    train_batches = StudyBatches(train_split, tokenizer, batch, params.data.image_size,
                                 train=True, hflip=params.data.hflip, generator=batch_gen, **shard)
    val_batches = StudyBatches(val_split, tokenizer, batch, params.data.image_size, train=False, **shard)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s parameters | vocabulary %d | %d train / %d val studies | %d steps per epoch",
             f"{n_params:,}", tokenizer.vocab_size, len(train_split.ids), len(val_split.ids), len(train_batches))

    # ---- resume (rank 0 read the checkpoint above and handed it to the others: no shared disk needed)
    state = {"epoch": 0, "step": 0, "samples": 0, "timed_samples": 0, "timed_seconds": 0.0, "wall_seconds": 0.0,
             "nonfinite_steps": 0, "skipped_steps": 0, "epoch_losses": [], "val_losses": [],
             "batch_size": batch, "batch_probe": probe}
    resume_step = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"]["ranks"][world.rank] if world.distributed else ckpt["rng"], device)
        batch_gen.set_state(ckpt["rng"]["batches"])
        random.setstate(_to_tuple(ckpt["rng"]["python"]))
        state = ckpt["state"]
        resume_step = state["step"] - 1
        log.info("resuming from %s: epoch %d done, step %d", ckpt_path, state["epoch"], state["step"])
        del ckpt
    live = LiveLogger(paths.live_dir, resume_step, system_monitor=device.type == "cuda") if world.is_main else None
    raw_model = model
    if world.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    baseline_rss = _rss_bytes()
    consecutive_nonfinite, verified = 0, False
    model.train()
    for epoch in range(state["epoch"], common.epochs):
        epoch_loss, epoch_n = 0.0, 0
        bar = tqdm(train_batches, desc=f"{precision} epoch {epoch + 1}/{common.epochs}", leave=False,
                   mininterval=5, disable=None if world.is_main else True)
        t0 = time.perf_counter()  # a step's time includes assembling its batch
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with plan.autocast():
                out = model(images, labels)
            loss, batch_samples = out.loss, images.shape[0]  # loss: token mean over this rank's studies
            if world.distributed:
                loss, loss_global, batch_samples = global_batch_loss(loss, labels, world)
            else:
                loss_global = loss.detach()
            finite = bool(torch.isfinite(loss_global))  # the same verdict on every rank
            optimizer.zero_grad(set_to_none=True)
            stepped = finite
            if finite:
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_value_(model.parameters(), common.grad_clip_value)
                scaler.step(optimizer)
                scaler.update()
                if scale_before is not None and scaler.get_scale() < scale_before:
                    stepped = False  # GradScaler found inf/NaN gradients and skipped the step
                    state["skipped_steps"] += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            dt, t0 = t1 - t0, t1
            state["step"] += 1
            if finite and not verified:  # the first full step of this process really ran in FP8
                prec.verify_fp8(raw_model, plan)
                verified = True
            if state["step"] > common.warmup_steps:
                state["timed_samples"] += batch_samples  # global samples: the whole DDP step
                state["timed_seconds"] += dt
            state["wall_seconds"] += dt
            state["samples"] += batch_samples
            if not finite:
                state["nonfinite_steps"] += 1
            consecutive_nonfinite = 0 if stepped else consecutive_nonfinite + 1
            if consecutive_nonfinite >= common.max_nonfinite_steps:
                raise R2GenError(
                    f"{precision}: {consecutive_nonfinite} consecutive non-finite steps (last loss {float(loss_global):.4g}); "
                    f"the last good checkpoint is kept in {paths.checkpoint_dir}. Lower the learning rate or use "
                    "a wider precision (bf16/fp32)"
                )
            value = float(loss_global)
            if finite:
                epoch_loss += value * batch_samples
                epoch_n += batch_samples
            lr = optimizer.param_groups[1]["lr"]
            if live is not None:
                live.log_step({"train/loss": value, "train/lr": lr,
                               "train/loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0})
            if state["step"] % common.log_every == 0:
                log.info("step %d | loss %.3f | lr %.1e | %.0f ms/step | %.2f GiB", state["step"], value, lr,
                         dt * 1000, _peak_memory(device)[0] / 2**30)
        bar.close()
        scheduler.step()
        state["epoch"] = epoch + 1
        train_loss = epoch_loss / max(epoch_n, 1)
        state["epoch_losses"].append(train_loss)
        # Samples and seconds so far: time to quality (r2gen exp-report) reads them beside val_loss.
        epoch_metrics = {"epoch/train_loss": train_loss, "epoch/samples": state["samples"],
                         "epoch/train_seconds": state["wall_seconds"]}
        if common.validate == "every_epoch" or state["epoch"] == common.epochs:
            val_loss = evaluate_loss(raw_model, val_batches, plan, world)
            state["val_losses"].append(val_loss)
            epoch_metrics["epoch/val_loss"] = val_loss
        log.info("epoch %d/%d | train loss %.4f%s", state["epoch"], common.epochs, train_loss,
                 f" | val loss {epoch_metrics['epoch/val_loss']:.4f}" if "epoch/val_loss" in epoch_metrics else "")
        rng = _rng_state(device)
        ranks = world.gather(rng) if world.distributed else None  # every rank's dropout stream
        if live is not None:
            live.log(epoch_metrics)
            save_torch({
                "fingerprint": fingerprint,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": {**rng, "batches": batch_gen.get_state(), "python": list(random.getstate()),
                        **({"ranks": ranks} if ranks else {})},
                "state": state,
            }, ckpt_path)

    peak, total, peak_kind = _peak_memory(device)
    samples_per_s = state["timed_samples"] / state["timed_seconds"] if state["timed_seconds"] else None
    summary = {
        "precision": precision,
        **{k: v for k, v in plan.describe().items() if k != "precision"},
        "fp8_linear_converted": conversion.get("linear_converted", 0),
        "fp8_linear_total": conversion.get("linear_total", 0),
        "grad_scaler_final_scale": scaler.get_scale() if scaler.is_enabled() else None,
        "grad_scaler_skipped_steps": state["skipped_steps"],
        "nonfinite_steps": state["nonfinite_steps"],
        "batch_mode": common.batch_mode,
        "batch_size": batch,
        "batch_probe": probe,
        "lr_scaling": common.lr_scaling if common.batch_mode == "max" else None,
        "lr_ve": common.lr_ve * lr_factor,
        "lr_ed": common.lr_ed * lr_factor,
        "world_size": world.size,
        "global_batch_size": batch * world.size,
        "ddp_backend": ddp_backend,
        "epochs": common.epochs,
        "steps": state["step"],
        "threads": params.threads,
        "train_loss": state["epoch_losses"][-1],
        "val_loss": state["val_losses"][-1] if state["val_losses"] else None,
        "samples_per_s": samples_per_s,
        "train_seconds": state["wall_seconds"],
        "peak_memory_bytes": peak,
        "peak_memory_fraction": peak / total,
        "peak_memory_kind": peak_kind + (f" (rank 0 of {world.size})" if world.distributed else ""),
        "baseline_rss_bytes": baseline_rss if device.type == "cpu" else None,
        "parameters": n_params,
        "r2gen_version": r2gen.__version__,
    }
    if live is None:
        return summary
    save_model(
        paths.model_out, model_config=params.model, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.to_dict(),
        state_dict=prec.plain_state_dict(raw_model.state_dict()),
        data={"dataset": params.data.dataset, "views": params.data.views, "image_size": params.data.image_size},
        info={"train": summary, "fingerprint": fingerprint},
    )
    write_json(paths.metrics, summary)
    live.end()
    # The run is complete: a later run with the same config trains afresh instead of "resuming"
    # a finished run (e.g. `dvc repro --force`). The folder stays, as the stage's declared output.
    write_json(paths.checkpoint_dir / "status.json", {"complete": True, "fingerprint": fingerprint,
                                                      "epochs": state["epoch"], "steps": state["step"]})
    ckpt_path.unlink(missing_ok=True)
    return summary


def _resumable(ckpt_path: Path, fingerprint: str) -> dict | None:
    """The checkpoint of a killed run of this config, or None (none, or written for another config)."""
    if not ckpt_path.exists():
        return None
    ckpt = load_torch(ckpt_path, "training checkpoint")
    if ckpt.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it was written for another config", ckpt_path)
        return None
    return ckpt


def _rng_state(device: torch.device) -> dict:
    """The RNG streams that dropout draws from on this rank."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_writable(directories: list[Path]) -> None:
    """Fail before training, not after it, when an output directory cannot be created or written."""
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise R2GenError(f"cannot write to output directory {directory}: {exc.strerror or exc}; "
                             "fix its permissions, free disk space or choose another path") from None


def _remove_stale_temp_files(paths: TrainPaths) -> None:
    """Delete the temporary files of atomic writes that a killed run left behind (never read, only litter)."""
    stale = [*paths.model_out.parent.glob(f".{paths.model_out.name}.*.tmp"),
             *paths.metrics.parent.glob(f".{paths.metrics.name}.*.tmp"),
             *paths.checkpoint_dir.glob(".*.tmp"), *paths.live_dir.rglob(".*.tmp")]
    for tmp in stale:
        if tmp.is_file():
            tmp.unlink()
    if stale:
        log.info("removed %d temporary files of a killed run", len(stale))


def _to_tuple(obj):
    """random.getstate() round-trips through lists in the checkpoint."""
    return tuple(_to_tuple(x) for x in obj) if isinstance(obj, list) else obj
