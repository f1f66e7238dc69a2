"""The training loop: outputs, determinism, resume after a crash or a kill mid-write, full disks and unwritable
outputs, non-finite handling (fp32 losses, fp16 GradScaler overflows), precisions."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import pytest
import torch
from dvclive.plots.metric import Metric

from helpers import paths_in, step_losses, tiny_params
from r2gen.checkpoint import build_model, load_model_file, load_torch
from r2gen.errors import R2GenError
from r2gen.model.r2gen import R2Gen
from r2gen.training import TrainPaths, TrainSpec, train


def test_training_writes_model_metrics_and_history(tmp_path, tiny_data):
    params = tiny_params(tiny_data["root"])
    paths = paths_in(tmp_path, tiny_data)
    summary = train(TrainSpec.of(params, "fp32"), paths)

    assert json.loads(paths.metrics.read_text()) == summary.to_json()
    assert summary.backend == "native" and summary.precision == "fp32"
    assert summary.steps == 2 * 3  # 11 train studies, batch 4 -> 3 steps per epoch
    assert summary.samples_per_s > 0 and summary.peak_memory_bytes > 0
    assert summary.nonfinite_steps == 0 and summary.val_loss is not None
    assert [s for s, _ in step_losses(paths.live_dir)] == list(range(6))
    ckpt = load_model_file(paths.model_out)
    assert ckpt["info"]["train"]["train_loss"] == summary.train_loss
    model = build_model(ckpt)
    assert model.generate(torch.zeros(1, 2, 32, 32, dtype=torch.uint8), num_beams=2, max_new_tokens=5).shape[0] == 1
    assert not (paths.checkpoint_dir / "last.pt").exists()  # a finished run is not resumed


def test_same_seed_gives_identical_fp32_training(tmp_path, tiny_data):
    params = tiny_params(tiny_data["root"])
    a = train(TrainSpec.of(params, "fp32"), paths_in(tmp_path / "a", tiny_data))
    b = train(TrainSpec.of(params, "fp32"), paths_in(tmp_path / "b", tiny_data))
    assert step_losses(tmp_path / "a" / "dvclive" / "fp32") == step_losses(tmp_path / "b" / "dvclive" / "fp32")
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss


def test_rerun_after_a_crash_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__epochs=3)
    reference = train(TrainSpec.of(params, "fp32"), paths_in(tmp_path / "ref", tiny_data))

    crashed = paths_in(tmp_path / "crash", tiny_data)
    calls = {"n": 0}
    original = R2Gen.forward

    def crash_in_epoch_two(self, images, labels):
        if images.device.type == "meta":  # the run's model-FLOP count (r2gen.training.mfu), not a step
            return original(self, images, labels)
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 1 = 3 steps + val batches; this is inside epoch 2
            raise RuntimeError("simulated crash")
        return original(self, images, labels)

    monkeypatch.setattr(R2Gen, "forward", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainSpec.of(params, "fp32"), crashed)
    assert (crashed.checkpoint_dir / "last.pt").exists() and not crashed.model_out.exists()
    monkeypatch.setattr(R2Gen, "forward", original)

    resumed = train(TrainSpec.of(params, "fp32"), crashed)
    assert step_losses(crashed.live_dir) == step_losses(tmp_path / "ref" / "dvclive" / "fp32")
    for key in ("train_loss", "val_loss", "steps", "nonfinite_steps"):
        assert getattr(resumed, key) == getattr(reference, key), key
    a = load_model_file(crashed.model_out)["state_dict"]
    b = load_model_file(tmp_path / "ref" / "models" / "fp32" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path, tiny_data, monkeypatch):
    paths = paths_in(tmp_path, tiny_data)
    params = tiny_params(tiny_data["root"])
    original = R2Gen.forward
    calls = {"n": 0}

    def crash(self, images, labels):
        if images.device.type == "meta":  # the run's model-FLOP count (r2gen.training.mfu), not a step
            return original(self, images, labels)
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original(self, images, labels)

    monkeypatch.setattr(R2Gen, "forward", crash)
    with pytest.raises(RuntimeError):
        train(TrainSpec.of(params, "fp32"), paths)
    monkeypatch.setattr(R2Gen, "forward", original)
    other = train(TrainSpec.of(tiny_params(tiny_data["root"], train__common__lr_ed=5e-4), "fp32"), paths)
    assert other.steps == 6  # trained from scratch, not from the stale checkpoint


def test_consecutive_nonfinite_losses_stop_with_a_clear_error(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__max_nonfinite_steps=2)
    monkeypatch.setattr(R2Gen, "loss", classmethod(lambda cls, logprobs, labels: logprobs.sum() * float("nan")))
    with pytest.raises(R2GenError, match="2 consecutive non-finite steps"):
        train(TrainSpec.of(params, "fp32"), paths_in(tmp_path, tiny_data))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp8"])
def test_lower_precisions_train_and_record_what_ran(tmp_path, tiny_data, precision):
    params = tiny_params(tiny_data["root"], train__common__epochs=1)
    summary = train(TrainSpec.of(params, precision), paths_in(tmp_path, tiny_data, precision))
    assert summary.precision == precision
    assert summary.nonfinite_steps == 0
    if precision == "fp16":
        assert summary.grad_scaler_final_scale is not None
    if precision == "fp8":
        assert summary.backend == "emulated"  # no GPU with Transformer Engine here
        # one encoder layer (4 attention + 2 FFN) and one decoder layer (8 attention + 2 FFN)
        assert summary.fp8_linear_converted == 16 < summary.fp8_linear_total
    # the shipped weights are plain fp32 weights that load into an unconverted model
    model = build_model(load_model_file(paths_in(tmp_path, tiny_data, precision).model_out))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_and_emulated_fp8_losses_track_fp32_over_30_steps(tmp_path, tiny_data):
    # 11 train studies, batch 4: 3 steps per epoch, 10 epochs = 30 steps; same seed, same batches.
    params = tiny_params(tiny_data["root"], train__common__epochs=10, train__common__validate="last")
    curves = {}
    for precision in ("fp32", "bf16", "fp8"):
        train(TrainSpec.of(params, precision), paths_in(tmp_path, tiny_data, precision))
        curves[precision] = [loss for _, loss in step_losses(tmp_path / "dvclive" / precision)]
    assert len(curves["fp32"]) == 30
    assert curves["fp32"][-1] < curves["fp32"][0] - 0.5  # it learns
    for precision in ("bf16", "fp8"):
        worst = max(abs(a - b) for a, b in zip(curves[precision], curves["fp32"]))
        assert worst < TRACKING_TOLERANCE, (precision, worst)


TRACKING_TOLERANCE = 0.15  # absolute loss difference at any of the 30 steps (losses start near 4.2)


# ---------------------------------------------------------------------------------------- crash safety
def crash_at_call(n: int, original):
    """R2Gen.forward that raises on its n-th call (epoch 1 = 3 steps + val batches; call 5 is in epoch 2)."""
    calls = {"n": 0}

    def forward(self, images, labels):
        if images.device.type == "meta":  # the run's model-FLOP count (r2gen.training.mfu), not a step
            return original(self, images, labels)
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return original(self, images, labels)

    return forward


def test_a_history_cut_mid_write_by_a_kill_is_repaired_on_resume(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__epochs=3)
    train(TrainSpec.of(params, "fp32"), paths_in(tmp_path / "ref", tiny_data))
    crashed = paths_in(tmp_path / "crash", tiny_data)
    monkeypatch.setattr(R2Gen, "forward", crash_at_call(9, R2Gen.forward))  # inside epoch 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainSpec.of(params, "fp32"), crashed)
    monkeypatch.undo()
    # A SIGKILL can land inside dvclive's writes: half a history row, an emptied summary file.
    with open(crashed.live_dir / "plots" / "metrics" / "train" / "loss.tsv", "a") as fh:
        fh.write("7\t4.")
    (crashed.live_dir / "metrics.json").write_text("")

    train(TrainSpec.of(params, "fp32"), crashed)
    ref_live = tmp_path / "ref" / "dvclive" / "fp32"
    assert step_losses(crashed.live_dir) == step_losses(ref_live)
    summary = json.loads((crashed.live_dir / "metrics.json").read_text())
    reference = json.loads((ref_live / "metrics.json").read_text())
    for logged in (summary, reference):  # wall-clock seconds so far: the one entry no rerun reproduces
        assert logged["epoch"].pop("train_seconds") > 0
    assert summary == reference


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__epochs=3)
    paths = paths_in(tmp_path, tiny_data)
    real_save = torch.save
    saves = {"n": 0}

    def save_until_the_disk_fills(obj, fh, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the checkpoint of epoch 2: half written, then ENOSPC
            fh.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(R2GenError, match=r"could not write .*last\.pt: No space left on device; check free disk space"):
        train(TrainSpec.of(params, "fp32"), paths)
    monkeypatch.undo()
    assert load_torch(paths.checkpoint_dir / "last.pt")["state"]["epoch"] == 1  # the epoch-1 checkpoint, intact
    assert sorted(p.name for p in paths.checkpoint_dir.iterdir()) == ["last.pt"]  # no half-written temp file
    assert not paths.model_out.exists() and not paths.metrics.exists()
    assert train(TrainSpec.of(params, "fp32"), paths).steps == 9  # space freed: the rerun resumes and finishes


def test_disk_full_while_logging_is_a_clear_error_and_the_rerun_resumes(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"])
    paths = paths_in(tmp_path, tiny_data)
    real_dump = Metric.dump
    dumps = {"n": 0}

    def dump_until_the_disk_fills(self, *args, **kwargs):
        dumps["n"] += 1
        if dumps["n"] == 16:  # epoch 2 (an epoch logs 3 x 3 step metrics + 4 epoch metrics)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dump(self, *args, **kwargs)

    monkeypatch.setattr(Metric, "dump", dump_until_the_disk_fills)
    with pytest.raises(R2GenError, match="could not write the training history in .*: No space left on device"):
        train(TrainSpec.of(params, "fp32"), paths)
    monkeypatch.undo()
    assert train(TrainSpec.of(params, "fp32"), paths).steps == 6
    assert [s for s, _ in step_losses(paths.live_dir)] == list(range(6))


def test_an_unwritable_output_directory_fails_before_training(tmp_path, tiny_data):
    (tmp_path / "models").write_text("a file where the model folder should be")
    paths = paths_in(tmp_path, tiny_data)
    with pytest.raises(R2GenError, match=r"cannot write to output directory .*models/fp32"):
        train(TrainSpec.of(tiny_params(tiny_data["root"]), "fp32"), paths)
    assert not paths.checkpoint_dir.exists() and not paths.live_dir.exists()  # failed before any work


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, inf gradient backward: an fp16 overflow in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def loss_spoiled_at(steps: set[int], spoil):
    """R2Gen.loss passed through ``spoil`` at the given (1-based) training steps; validation untouched."""
    real_loss = R2Gen.loss
    calls = {"n": 0}

    def loss(cls, logprobs, labels):
        value = real_loss(logprobs, labels)
        if not torch.is_grad_enabled() or logprobs.device.type == "meta":  # meta: the model-FLOP count
            return value
        calls["n"] += 1
        return spoil(value) if calls["n"] in steps else value

    return classmethod(loss)


def test_a_stopped_run_keeps_the_last_good_checkpoint_and_writes_no_outputs(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__max_nonfinite_steps=2)
    paths = paths_in(tmp_path, tiny_data)
    monkeypatch.setattr(R2Gen, "loss", loss_spoiled_at({5, 6}, lambda loss: loss * float("nan")))  # epoch 2
    with pytest.raises(R2GenError, match="2 consecutive non-finite steps .* last good checkpoint is kept"):
        train(TrainSpec.of(params, "fp32"), paths)
    assert load_torch(paths.checkpoint_dir / "last.pt")["state"]["epoch"] == 1
    assert not paths.model_out.exists() and not paths.metrics.exists()


def test_fp16_grad_scaler_skips_overflowing_steps_and_counts_them(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__epochs=1)
    monkeypatch.setattr(R2Gen, "loss", loss_spoiled_at({1, 2}, InfiniteGradient.apply))
    summary = train(TrainSpec.of(params, "fp16"), paths_in(tmp_path, tiny_data, "fp16"))
    assert summary.grad_scaler_skipped_steps == 2
    assert summary.nonfinite_steps == 0  # the losses were finite; their gradients were not
    assert summary.grad_scaler_final_scale == 2.0**16 * 0.5**2  # halved at each skipped step
    tsv = tmp_path / "dvclive" / "fp16" / "plots" / "metrics" / "train" / "loss_scale.tsv"
    scales = [float(r["loss_scale"]) for r in csv.DictReader(tsv.read_text().splitlines(), delimiter="\t")]
    assert scales == [2.0**15, 2.0**14, 2.0**14]
    train_dir = tsv.parent
    skipped = [int(float(r["skipped_steps"])) for r in
               csv.DictReader((train_dir / "skipped_steps.tsv").read_text().splitlines(), delimiter="\t")]
    assert skipped == [1, 2, 2]  # GradScaler's skipped steps so far, per step
    norms = list(csv.DictReader((train_dir / "grad_norm.tsv").read_text().splitlines(), delimiter="\t"))
    assert [r["step"] for r in norms] == ["2"] and float(norms[0]["grad_norm"]) > 0  # the overflowed steps have none


def test_fp16_consecutive_overflows_stop_the_run_with_a_clear_error(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__max_nonfinite_steps=3)
    paths = paths_in(tmp_path, tiny_data, "fp16")
    monkeypatch.setattr(R2Gen, "loss", loss_spoiled_at(set(range(4, 100)), InfiniteGradient.apply))  # epoch 2 on
    with pytest.raises(R2GenError, match="fp16: 3 consecutive non-finite steps"):
        train(TrainSpec.of(params, "fp16"), paths)
    assert load_torch(paths.checkpoint_dir / "last.pt")["state"]["epoch"] == 1
    assert not paths.model_out.exists()
