"""The training loop: outputs, determinism, resume after a crash, non-finite handling, precisions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from r2gen.checkpoint import build_model, load_model_file
from r2gen.errors import R2GenError
from r2gen.model.r2gen import R2Gen
from r2gen.training import TrainPaths, train


def paths_in(tmp: Path, data: dict, precision: str = "fp32") -> TrainPaths:
    return TrainPaths(data["prepared"], data["tokenizer"], tmp / "models" / precision / "model.pt",
                      tmp / "checkpoints" / precision, tmp / "dvclive" / precision, tmp / "metrics" / f"{precision}.json")


def step_losses(live_dir: Path) -> list[tuple[int, float]]:
    with open(live_dir / "plots" / "metrics" / "train" / "loss.tsv") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh, delimiter="\t")]


def test_training_writes_model_metrics_and_history(tmp_path, tiny_data):
    params = tiny_params(tiny_data["root"])
    paths = paths_in(tmp_path, tiny_data)
    summary = train(params, "fp32", paths)

    assert json.loads(paths.metrics.read_text()) == summary
    assert summary["backend"] == "native" and summary["precision"] == "fp32"
    assert summary["steps"] == 2 * 3  # 11 train studies, batch 4 -> 3 steps per epoch
    assert summary["samples_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["nonfinite_steps"] == 0 and summary["val_loss"] is not None
    assert [s for s, _ in step_losses(paths.live_dir)] == list(range(6))
    ckpt = load_model_file(paths.model_out)
    assert ckpt["info"]["train"]["train_loss"] == summary["train_loss"]
    model = build_model(ckpt)
    assert model.generate(torch.zeros(1, 2, 32, 32, dtype=torch.uint8), num_beams=2, max_new_tokens=5).shape[0] == 1
    assert not (paths.checkpoint_dir / "last.pt").exists()  # a finished run is not resumed


def test_same_seed_gives_identical_fp32_training(tmp_path, tiny_data):
    params = tiny_params(tiny_data["root"])
    a = train(params, "fp32", paths_in(tmp_path / "a", tiny_data))
    b = train(params, "fp32", paths_in(tmp_path / "b", tiny_data))
    assert step_losses(tmp_path / "a" / "dvclive" / "fp32") == step_losses(tmp_path / "b" / "dvclive" / "fp32")
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


def test_rerun_after_a_crash_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__epochs=3)
    reference = train(params, "fp32", paths_in(tmp_path / "ref", tiny_data))

    crashed = paths_in(tmp_path / "crash", tiny_data)
    calls = {"n": 0}
    original = R2Gen.forward

    def crash_in_epoch_two(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 1 = 3 steps + val batches; this is inside epoch 2
            raise RuntimeError("simulated crash")
        return original(self, images, labels)

    monkeypatch.setattr(R2Gen, "forward", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(params, "fp32", crashed)
    assert (crashed.checkpoint_dir / "last.pt").exists() and not crashed.model_out.exists()
    monkeypatch.setattr(R2Gen, "forward", original)

    resumed = train(params, "fp32", crashed)
    assert step_losses(crashed.live_dir) == step_losses(tmp_path / "ref" / "dvclive" / "fp32")
    for key in ("train_loss", "val_loss", "steps", "nonfinite_steps"):
        assert resumed[key] == reference[key], key
    a = load_model_file(crashed.model_out)["state_dict"]
    b = load_model_file(tmp_path / "ref" / "models" / "fp32" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path, tiny_data, monkeypatch):
    paths = paths_in(tmp_path, tiny_data)
    params = tiny_params(tiny_data["root"])
    original = R2Gen.forward
    calls = {"n": 0}

    def crash(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original(self, images, labels)

    monkeypatch.setattr(R2Gen, "forward", crash)
    with pytest.raises(RuntimeError):
        train(params, "fp32", paths)
    monkeypatch.setattr(R2Gen, "forward", original)
    other = train(tiny_params(tiny_data["root"], train__common__lr_ed=5e-4), "fp32", paths)
    assert other["steps"] == 6  # trained from scratch, not from the stale checkpoint


def test_consecutive_nonfinite_losses_stop_with_a_clear_error(tmp_path, tiny_data, monkeypatch):
    params = tiny_params(tiny_data["root"], train__common__max_nonfinite_steps=2)
    monkeypatch.setattr(R2Gen, "loss", classmethod(lambda cls, logprobs, labels: logprobs.sum() * float("nan")))
    with pytest.raises(R2GenError, match="2 consecutive non-finite steps"):
        train(params, "fp32", paths_in(tmp_path, tiny_data))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp8"])
def test_lower_precisions_train_and_record_what_ran(tmp_path, tiny_data, precision):
    params = tiny_params(tiny_data["root"], train__common__epochs=1)
    summary = train(params, precision, paths_in(tmp_path, tiny_data, precision))
    assert summary["precision"] == precision
    assert summary["nonfinite_steps"] == 0
    if precision == "fp16":
        assert summary["grad_scaler_final_scale"] is not None
    if precision == "fp8":
        assert summary["backend"] == "emulated"  # no GPU with Transformer Engine here
        # one encoder layer (4 attention + 2 FFN) and one decoder layer (8 attention + 2 FFN)
        assert summary["fp8_linear_converted"] == 16 < summary["fp8_linear_total"]
    # the shipped weights are plain fp32 weights that load into an unconverted model
    model = build_model(load_model_file(paths_in(tmp_path, tiny_data, precision).model_out))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_and_emulated_fp8_losses_track_fp32_over_30_steps(tmp_path, tiny_data):
    # 11 train studies, batch 4: 3 steps per epoch, 10 epochs = 30 steps; same seed, same batches.
    params = tiny_params(tiny_data["root"], train__common__epochs=10, train__common__validate="last")
    curves = {}
    for precision in ("fp32", "bf16", "fp8"):
        train(params, precision, paths_in(tmp_path, tiny_data, precision))
        curves[precision] = [loss for _, loss in step_losses(tmp_path / "dvclive" / precision)]
    assert len(curves["fp32"]) == 30
    assert curves["fp32"][-1] < curves["fp32"][0] - 0.5  # it learns
    for precision in ("bf16", "fp8"):
        worst = max(abs(a - b) for a, b in zip(curves[precision], curves["fp32"]))
        assert worst < TRACKING_TOLERANCE, (precision, worst)


TRACKING_TOLERANCE = 0.15  # absolute loss difference at any of the 30 steps (losses start near 4.2)
