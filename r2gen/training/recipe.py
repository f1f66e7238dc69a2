"""R2Gen's training recipe at one precision: setup, epochs of steps, validation, summary, shipping.

Recipe (public code, R2GEN_NOTES.md §6): Adam(amsgrad) with lr 5e-5 for the visual extractor and
1e-4 for the rest, weight decay 5e-5, StepLR stepped per epoch, element-wise gradient value
clipping (after ``unscale_`` under fp16), token-mean NLL. Differences, on purpose: checkpoints hold
the scheduler, scaler and RNG states (the public code drops the scheduler), the shipped model is the
last epoch's (the public code picks by val BLEU-4 and also tracks test), and the laterality-swapping
horizontal flip is off by default (``data.hflip``).

Every epoch ends with an atomic checkpoint in ``checkpoint_dir``; rerunning with the same config
resumes from it and reaches the same result as an uninterrupted run.

:func:`train` reads top to bottom: :func:`setup` builds the run (resuming a killed one), then each
epoch is :func:`run_epoch` and :func:`end_epoch` (scheduler, :func:`validate`, history, checkpoint),
then :func:`summarize` makes the :class:`~r2gen.records.TrainSummary` and :func:`ship` writes the
model and the metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

import r2gen
from r2gen import fp8_stats, fp8_table, layout
from r2gen import precision as prec
from r2gen.checkpoint import save_model
from r2gen.config import TrainSpec
from r2gen.data.batches import StudyBatches
from r2gen.data.images import PreparedSplit, check_prepared, load_prepared
from r2gen.distributed import World, sync_batch_norms
from r2gen.errors import ConfigError, R2GenError
from r2gen.io import write_json
from r2gen.model.r2gen import R2Gen
from r2gen.model.visual import feature_map_side
from r2gen.records import TrainSummary
from r2gen.tokenizer import Tokenizer
from r2gen.training.batchsize import BatchChoice, choose_batch
from r2gen.training.live import LiveLogger, NullLogger, monitor_system_on, open_history
from r2gen.training.load import HostLoad
from r2gen.training import mfu
from r2gen.training.mfu import Peak
from r2gen.training.memory import peak_memory, reset_peak, rss_bytes
from r2gen.training.state import (TrainState, Trainables, config_fingerprint, load_resumable, restore_checkpoint,
                                  save_checkpoint, seed_everything)
from r2gen.training.step import StepResult, build_optimizer, train_step
from r2gen.validation import evaluate_loss

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"  # in TrainPaths.checkpoint_dir; removed when the run completes
# What torch requires of cuBLAS under torch.use_deterministic_algorithms (read at its first call).
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass(frozen=True)
class TrainPaths:
    prepared: Path
    tokenizer: Path
    model_out: Path  # the shipped model file
    checkpoint_dir: Path  # resume state (persisted across killed runs)
    live_dir: Path  # dvclive history
    metrics: Path  # summary JSON gated in CI


@dataclass
class Run:
    """What :func:`setup` built for one training process, and the loop's bookkeeping."""

    spec: TrainSpec
    paths: TrainPaths
    world: World
    plan: prec.PrecisionPlan
    ddp_backend: str | None
    fingerprint: str
    tokenizer: Tokenizer
    choice: BatchChoice
    parts: Trainables  # the model unwrapped, with its optimizer, scheduler, scaler and batch stream
    model: torch.nn.Module  # what the steps call: the DDP wrapper of parts.model under DDP
    conversion: dict  # what convert_model swapped (fp8)
    parameters: int
    train_batches: StudyBatches
    val_batches: StudyBatches
    state: TrainState
    resume_step: int | None  # the last history step a resumed run keeps; None for a fresh run
    consecutive_nonfinite: int = 0  # steps without an update in a row (not checkpointed)
    fp8_verified: bool = False  # the first full step of this process was checked to run in FP8
    monitor_system: bool = False  # dvclive samples system metrics (train.common.monitor_system resolved)
    flops_per_sample: float = 0.0  # model FLOPs of one training sample (r2gen.training.mfu)
    peak: Peak | None = None  # what MFU is measured against; None where the run is not a speed measurement
    fp8_layers: dict = field(default_factory=dict)  # name -> converted Linear, observed by the FP8 layer probe
    fp8_rows: list = field(default_factory=list)  # the probe's rows so far (written to fp8_layers.json)
    # Other processes' CPU time while the epochs ran (this process's segment only: not checkpointed).
    load: HostLoad = field(default_factory=HostLoad)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def checkpoint(self) -> Path:
        return self.paths.checkpoint_dir / CHECKPOINT


def train(spec: TrainSpec, paths: TrainPaths) -> TrainSummary:
    """Train R2Gen at ``spec.precision``; writes the model, the summary metrics and the dvclive history.

    Under torchrun (``WORLD_SIZE`` > 1) this is one rank of a DDP run: it joins the process group,
    trains on its slice of every global batch, and only rank 0 logs and writes files.

    Returns the summary (also written to ``paths.metrics``; every rank returns it).
    """
    world = World.from_env()
    device = world.device(prec.select_device(spec.common.device))
    with deterministic_kernels(spec.common.deterministic), world.joined(device) as ddp_backend:
        run = setup(spec, paths, world, device, ddp_backend)
        speed_comparable = run.plan.describe()["speed_comparable"]
        run.monitor_system = monitor_system_on(spec.common.monitor_system, speed_comparable)
        instrument(run, speed_comparable)
        with open_history(paths.live_dir, run.resume_step, system_monitor=run.monitor_system,
                          enabled=world.is_main) as history:
            baseline_rss = rss_bytes()
            run.model.train()
            for epoch in range(run.state.epoch, spec.common.epochs):
                train_loss = run_epoch(run, epoch, history)
                end_epoch(run, epoch, train_loss, history)
            summary = summarize(run, baseline_rss)
            if world.is_main:
                ship(run, summary)
        if world.is_main:
            mark_complete(run)
    return summary


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """``train.common.deterministic`` for the block; the previous settings are restored after it.

    On: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises),
    cuDNN deterministic with benchmark off, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already
    set, as torch requires for cuBLAS. cuDNN's default backward kernels are nondeterministic, so
    only with it is a resumed GPU run bit-equal to an unkilled one; CPU runs are deterministic anyway.
    """
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, os.environ.get(CUBLAS_WORKSPACE[0]))
    os.environ.setdefault(*CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop(CUBLAS_WORKSPACE[0], None)


# ---------------------------------------------------------------------------------------- setup
def setup(spec: TrainSpec, paths: TrainPaths, world: World, device: torch.device, ddp_backend: str | None) -> Run:
    """Resolve the precision plan, load the data, choose the batch, build the model and optimizer, resume."""
    torch.set_num_threads(spec.threads)
    plan = prec.resolve(spec.precision, spec.train.backend, device, spec.train.fp8_recipe)
    prec.set_fp32_numerics(device)
    fingerprint = config_fingerprint(spec, world.size)
    log.info("train %s | backend %s | device %s | threads %d | batch %d%s | config %s",
             spec.precision, plan.backend, device, spec.threads, spec.train.batch_size,
             f" x {world.size} ranks ({ddp_backend})" if world.distributed else "", fingerprint)
    if world.is_main:
        _check_writable([paths.model_out.parent, paths.metrics.parent, paths.checkpoint_dir, paths.live_dir])
        _remove_stale_temp_files(paths)
    tokenizer, train_split, val_split = _load_data(spec, paths)

    # A killed run's checkpoint is read first: a resumed max-batch run keeps the batch it probed.
    ckpt_path = paths.checkpoint_dir / CHECKPOINT
    ckpt = world.broadcast(load_resumable(ckpt_path, fingerprint) if world.is_main else None)
    resumed = TrainState.from_dict(ckpt["state"]) if ckpt is not None else None
    choice = choose_batch(spec, plan, tokenizer.vocab_size, world, len(train_split.ids), resumed)
    reset_peak(device)  # peak_memory_bytes is training's own, never the probe's
    if spec.common.batch_mode == "max":
        log.info("batch_mode max: batch %d | learning rates x %.3g (%s rule from batch %d)", choice.batch,
                 choice.lr_factor, spec.common.lr_scaling, spec.train.batch_size)

    parts, conversion = _build(spec, plan, world, tokenizer.vocab_size, choice)
    shard = {"rank": world.rank, "world": world.size}
    train_batches = StudyBatches(train_split, tokenizer, choice.batch, spec.data.image_size, train=True,
                                 hflip=spec.data.hflip, generator=parts.batch_gen, **shard)
    val_batches = StudyBatches(val_split, tokenizer, choice.batch, spec.data.image_size, train=False, **shard)
    _check_batch_norm_batches(spec, train_batches, world)
    parameters = sum(p.numel() for p in parts.model.parameters())
    log.info("model: %s parameters | vocabulary %d | %d train / %d val studies | %d steps per epoch",
             f"{parameters:,}", tokenizer.vocab_size, len(train_split.ids), len(val_split.ids), len(train_batches))

    # Resume: rank 0 read the checkpoint above and handed it to the others (no shared disk needed).
    state, resume_step = TrainState(batch_size=choice.batch, batch_probe=choice.probe), None
    if ckpt is not None:
        state = restore_checkpoint(ckpt, parts, device, world)
        resume_step = state.step - 1
        log.info("resuming from %s: epoch %d done, step %d", ckpt_path, state.epoch, state.step)
        del ckpt
    model = parts.model
    if world.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(spec=spec, paths=paths, world=world, plan=plan, ddp_backend=ddp_backend, fingerprint=fingerprint,
               tokenizer=tokenizer, choice=choice, parts=parts, model=model, conversion=conversion,
               parameters=parameters, train_batches=train_batches, val_batches=val_batches, state=state,
               resume_step=resume_step)


def _load_data(spec: TrainSpec, paths: TrainPaths) -> tuple[Tokenizer, PreparedSplit, PreparedSplit]:
    tokenizer = Tokenizer.load(paths.tokenizer)
    train_split = load_prepared(paths.prepared, "train")
    val_split = load_prepared(paths.prepared, "val")
    check_prepared(paths.prepared, spec.data)  # dataset (so the view count) and image size agree with params
    return tokenizer, train_split, val_split


def _build(spec: TrainSpec, plan: prec.PrecisionPlan, world: World, vocab_size: int,
           choice: BatchChoice) -> tuple[Trainables, dict]:
    """The seeded model (converted for fp8, BatchNorm synced under DDP), its optimizer, scheduler and scaler."""
    seed_everything(spec.seed)
    model = R2Gen(spec.model, vocab_size).to(plan.device)
    conversion = prec.convert_model(model, plan)
    if world.distributed:
        synced = sync_batch_norms(model)  # BatchNorm over the global batch: as one process would compute it
        log.info("DDP: %d ranks | %d BatchNorm2d layers synced over ranks | global batch %d",
                 world.size, synced, world.size * choice.batch)
        torch.manual_seed(spec.seed + world.rank)  # own dropout masks per rank; rank 0 keeps the 1-process stream
    optimizer, scheduler = build_optimizer(model, spec.common, choice.lr_factor)
    scaler = plan.grad_scaler()
    batch_gen = torch.Generator().manual_seed(spec.seed)
    return Trainables(model, optimizer, scheduler, scaler, batch_gen), conversion


def instrument(run: Run, speed_comparable: bool) -> None:
    """Count the model FLOPs, measure the peak (speed measurements only), and arm the FP8 layer probe."""
    spec = run.spec
    run.flops_per_sample = mfu.model_flops_per_sample(spec.model, run.tokenizer.vocab_size, spec.data.views,
                                                      spec.data.image_size, mfu.median_length(run.train_batches.labels))
    if speed_comparable:
        run.peak = mfu.measure_peak(run.plan, run.plan.describe()["device_name"])
    log.info("model FLOPs: %.3g per training sample%s", run.flops_per_sample,
             f" | peak {run.peak.tflops:.3g} TFLOP/s {run.peak.dtype} ({run.peak.source})"
             if run.peak and run.peak.tflops else "")
    if run.plan.precision != "fp8":
        return
    run.fp8_layers = {name: run.parts.model.get_submodule(name) for name in run.conversion["converted"]}
    path = layout.fp8_layers(run.paths.live_dir)
    if run.resume_step is None or not path.exists():
        path.unlink(missing_ok=True)
    else:  # a resumed run keeps the rows of the epochs it finished
        run.fp8_rows = [r for r in fp8_table.read_table(path)["rows"] if r["epoch"] <= run.state.epoch]


def record_fp8_layers(run: Run, epoch: int, probe: fp8_stats.Fp8LayerProbe) -> None:
    """Append the probed step's rows and rewrite ``fp8_layers.json`` (rank 0)."""
    run.fp8_rows += [{"epoch": epoch + 1, "step": run.state.step, **row} for row in probe.rows()]
    if run.world.is_main:
        fp8_table.write_table(layout.fp8_layers(run.paths.live_dir), run.fp8_rows, run.plan.describe())


# ---------------------------------------------------------------------------------------- the loop
def run_epoch(run: Run, epoch: int, history: LiveLogger | NullLogger) -> float:
    """One pass over the training batches; returns the epoch's sample-weighted mean train loss."""
    common = run.spec.common
    epoch_loss, epoch_n = 0.0, 0
    bar = tqdm(run.train_batches, desc=f"{run.spec.precision} epoch {epoch + 1}/{common.epochs}", leave=False,
               mininterval=5, disable=None if run.world.is_main else True)
    run.load.start()
    t0 = time.perf_counter()  # a step's time includes assembling its batch
    probe_epoch = bool(run.fp8_layers) and epoch in fp8_stats.probe_epochs(common.epochs)
    for i, (images, labels) in enumerate(bar):
        probe = fp8_stats.Fp8LayerProbe(run.fp8_layers, run.plan.fp8_recipe) if probe_epoch and i == 0 else None
        with probe or contextlib.nullcontext():
            result = train_step(run.model, images, labels, run.parts.optimizer, run.parts.scaler, run.plan,
                                common.grad_clip_value, world=run.world)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        t1 = time.perf_counter()
        dt, t0 = t1 - t0, t1
        _count_step(run, result, dt, timed=probe is None)  # the probed step's hooks cost time: not timed
        if probe is not None:
            record_fp8_layers(run, epoch, probe)
        if result.finite:
            epoch_loss += result.loss * result.samples
            epoch_n += result.samples
        _log_step(run, result, dt, history)
    run.load.stop()
    bar.close()
    return epoch_loss / max(epoch_n, 1)


def _count_step(run: Run, result: StepResult, dt: float, timed: bool = True) -> None:
    """Update the counters with one step; too many steps in a row without an update stop the run."""
    common, state = run.spec.common, run.state
    state.step += 1
    if result.finite and not run.fp8_verified:  # the first full step of this process really ran in FP8
        prec.verify_fp8(run.parts.model, run.plan)
        run.fp8_verified = True
    if timed and state.step > common.warmup_steps:
        state.timed_samples += result.samples  # global samples: the whole DDP step
        state.timed_seconds += dt
    state.wall_seconds += dt
    state.samples += result.samples
    if not result.finite:
        state.nonfinite_steps += 1
    if result.skipped:
        state.skipped_steps += 1
    run.consecutive_nonfinite = 0 if result.stepped else run.consecutive_nonfinite + 1
    if run.consecutive_nonfinite >= common.max_nonfinite_steps:
        raise R2GenError(
            f"{run.spec.precision}: {run.consecutive_nonfinite} consecutive non-finite steps (last loss "
            f"{result.loss:.4g}); the last good checkpoint is kept in {run.paths.checkpoint_dir}. Lower the "
            "learning rate or use a wider precision (bf16/fp32)"
        )


def _log_step(run: Run, result: StepResult, dt: float, history: LiveLogger | NullLogger) -> None:
    """One row per step: loss, lr, loss scale, GradScaler's skipped steps so far, and the pre-clip
    gradient norm where it is finite (an overflowed fp16 step has none: it shows as a skipped step)."""
    scaler = run.parts.scaler
    lr = run.parts.optimizer.param_groups[1]["lr"]
    metrics = {"train/loss": result.loss, "train/lr": lr,
               "train/loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0}
    if result.finite_grad_norm is not None:
        metrics["train/grad_norm"] = result.finite_grad_norm
    metrics["train/skipped_steps"] = run.state.skipped_steps  # 0 throughout without a GradScaler
    history.log_step(metrics)
    if run.state.step % run.spec.common.log_every == 0:
        log.info("step %d | loss %.3f | lr %.1e | %.0f ms/step | %.2f GiB", run.state.step, result.loss, lr,
                 dt * 1000, peak_memory(run.device)[0] / 2**30)


def end_epoch(run: Run, epoch: int, train_loss: float, history: LiveLogger | NullLogger) -> None:
    """Step the scheduler, validate when due, log the epoch and write the checkpoint."""
    common, state = run.spec.common, run.state
    run.parts.scheduler.step()
    state.epoch = epoch + 1
    state.epoch_losses.append(train_loss)
    # Samples and seconds so far: time to quality (r2gen exp-report) reads them beside val_loss.
    metrics = {"epoch/train_loss": train_loss, "epoch/samples": state.samples,
               "epoch/train_seconds": state.wall_seconds}
    if common.validate == "every_epoch" or state.epoch == common.epochs:
        val_loss = validate(run)
        state.val_losses.append(val_loss)
        metrics["epoch/val_loss"] = val_loss
    log.info("epoch %d/%d | train loss %.4f%s", state.epoch, common.epochs, train_loss,
             f" | val loss {metrics['epoch/val_loss']:.4f}" if "epoch/val_loss" in metrics else "")
    history.log(metrics)
    save_checkpoint(run.checkpoint, run.fingerprint, run.parts, state, run.device, run.world)


def validate(run: Run) -> float:
    """The val loss over every rank's shard (teacher-forced, eval mode)."""
    return evaluate_loss(run.parts.model, run.val_batches, run.plan, run.world)


# ---------------------------------------------------------------------------------------- results
def summarize(run: Run, baseline_rss: int) -> TrainSummary:
    """The training summary: the precision plan and environment, then what training did and measured."""
    spec, state, world, scaler = run.spec, run.state, run.world, run.parts.scaler
    common, choice = spec.common, run.choice
    peak, total, peak_kind = peak_memory(run.device)
    environment = {k: v for k, v in run.plan.describe().items() if k != "precision"}
    samples_per_s = state.timed_samples / state.timed_seconds if state.timed_seconds else None
    return TrainSummary(
        precision=spec.precision,
        **environment,
        fp8_linear_converted=run.conversion.get("linear_converted", 0),
        fp8_linear_total=run.conversion.get("linear_total", 0),
        grad_scaler_final_scale=scaler.get_scale() if scaler.is_enabled() else None,
        grad_scaler_skipped_steps=state.skipped_steps,
        nonfinite_steps=state.nonfinite_steps,
        batch_mode=common.batch_mode,
        batch_size=choice.batch,
        batch_probe=choice.probe,
        lr_scaling=common.lr_scaling if common.batch_mode == "max" else None,
        lr_ve=common.lr_ve * choice.lr_factor,
        lr_ed=common.lr_ed * choice.lr_factor,
        world_size=world.size,
        global_batch_size=choice.batch * world.size,
        ddp_backend=run.ddp_backend,
        epochs=common.epochs,
        steps=state.step,
        threads=spec.threads,
        monitor_system=run.monitor_system,
        deterministic=common.deterministic,
        train_loss=state.epoch_losses[-1],
        val_loss=state.val_losses[-1] if state.val_losses else None,
        samples_per_s=samples_per_s,
        train_seconds=state.wall_seconds,
        # Under DDP the other ranks are other processes too: the share would read as load, so none is recorded.
        other_cpu_share=None if world.distributed else run.load.other_share,
        **mfu.utilisation(run.flops_per_sample, samples_per_s, run.peak, environment["speed_comparable"],
                          environment["note"]),
        peak_memory_bytes=peak,
        peak_memory_fraction=peak / total,
        peak_memory_kind=peak_kind + (f" (rank 0 of {world.size})" if world.distributed else ""),
        baseline_rss_bytes=baseline_rss if run.device.type == "cpu" else None,
        parameters=run.parameters,
        r2gen_version=r2gen.__version__,
    )


def ship(run: Run, summary: TrainSummary) -> None:
    """Write the model file (fp32 weights, fp8 bookkeeping stripped) and the summary metrics (rank 0)."""
    spec = run.spec
    save_model(
        run.paths.model_out, model_config=spec.model, vocab_size=run.tokenizer.vocab_size,
        tokenizer=run.tokenizer.to_dict(), state_dict=prec.plain_state_dict(run.parts.model.state_dict()),
        data={"dataset": spec.data.dataset, "views": spec.data.views, "image_size": spec.data.image_size},
        info={"train": summary.to_json(), "fingerprint": run.fingerprint},
    )
    write_json(run.paths.metrics, summary.to_json())


def mark_complete(run: Run) -> None:
    """Mark the run complete and drop its checkpoint: a later run with the same config trains afresh.

    Otherwise it would "resume" a finished run (e.g. `dvc repro --force`). The folder stays, as the
    stage's declared output.
    """
    write_json(run.paths.checkpoint_dir / "status.json", {"complete": True, "fingerprint": run.fingerprint,
                                                          "epochs": run.state.epoch, "steps": run.state.step})
    run.checkpoint.unlink(missing_ok=True)


def _check_batch_norm_batches(spec: TrainSpec, batches: StudyBatches, world: World) -> None:
    """Refuse a run whose BatchNorm would see one value per channel (a 1x1 map and a 1-study batch).

    Under DDP the BatchNorms are synced over the ranks (SyncedBatchNorm2d), so a step's statistics
    are over its global batch, which StudyBatches keeps at one study per rank at least: never one.
    """
    side, smallest = feature_map_side(spec.data.image_size), batches.smallest_batch()
    if world.distributed or side > 1 or smallest != 1:
        return
    raise ConfigError(
        f"params.yaml: data.image_size {spec.data.image_size} leaves the ResNet a 1x1 feature map and "
        f"training a batch of 1 study ({len(batches.labels)} training studies at batch {batches.batch_size}), "
        f"so BatchNorm would see one value per channel: set data.image_size above 32 or a batch size "
        f"that leaves no 1-study batch")


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
