"""The training recipe's parts: the one train_step (training, batch probe and benchmarks), TrainState and the
resume checkpoint, the config fingerprint, and a dvclive history that is closed whatever happens."""

from __future__ import annotations

import json
import random

import pytest
import torch

import benchmarks.ours
import r2gen.training.batchsize
import r2gen.training.recipe
from helpers import tiny_params
from r2gen import precision as prec
from r2gen.config import TrainSpec
from r2gen.distributed import World
from r2gen.errors import R2GenError
from r2gen.model.r2gen import R2Gen
from r2gen.records import TrainSummary
from r2gen.training import TrainPaths, train
from r2gen.training import live as live_module
from r2gen.training.batchsize import ProbeSpec, r2gen_step
from r2gen.training.state import (TrainState, Trainables, config_fingerprint, load_resumable, restore_checkpoint,
                                  save_checkpoint)
from r2gen.training.step import build_optimizer, train_step

VOCAB = 30
CPU = torch.device("cpu")


def tiny_model(seed: int = 0, **model) -> tuple[R2Gen, TrainSpec]:
    spec = TrainSpec.of(tiny_params(**{f"model__{k}": v for k, v in model.items()}), "fp32")
    torch.manual_seed(seed)
    return R2Gen(spec.model, VOCAB), spec


def batch(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 2, 32, 32), dtype=torch.uint8, generator=gen)  # (B, V, S, S)
    labels = torch.randint(1, VOCAB, (n, 8), generator=gen)  # (B, T)
    labels[:, 0] = 0
    return images, labels


def paths_in(tmp, data) -> TrainPaths:
    return TrainPaths(data["prepared"], data["tokenizer"], tmp / "model.pt", tmp / "checkpoints", tmp / "dvclive",
                      tmp / "metrics.json")


# ---------------------------------------------------------------------------------------- the step
def test_training_the_batch_probe_and_the_benchmark_take_the_same_step():
    assert r2gen.training.recipe.train_step is train_step
    assert r2gen.training.batchsize.train_step is train_step
    assert benchmarks.ours.train_step is train_step


def test_train_step_is_the_public_recipes_step():
    """forward, zero_grad, scaled backward, unscale_, clip_grad_value_, scaler.step, update: the same weights."""
    plan = prec.resolve("fp32")
    (model, spec), (twin, _) = tiny_model(), tiny_model()
    images, labels = batch()
    optimizer, _ = build_optimizer(model, spec.common)
    torch.manual_seed(7)  # the same dropout masks
    result = train_step(model.train(), images, labels, optimizer, plan.grad_scaler(), plan,
                        spec.common.grad_clip_value)

    twin_optimizer, _ = build_optimizer(twin, spec.common)
    torch.manual_seed(7)
    loss = twin.train()(images, labels).loss
    twin_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_value_(twin.parameters(), spec.common.grad_clip_value)
    twin_optimizer.step()

    assert result.loss == float(loss.detach()) and result.samples == 3 and result.stepped
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_a_nonfinite_loss_skips_the_update_in_training_but_not_in_a_measurement(monkeypatch):
    plan = prec.resolve("fp32")
    monkeypatch.setattr(R2Gen, "loss", classmethod(lambda cls, logprobs, labels: logprobs.sum() * float("nan")))
    for skip, updated in ((True, False), (False, True)):
        model, spec = tiny_model()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}  # BatchNorm statistics move anyway
        optimizer, _ = build_optimizer(model, spec.common)
        result = train_step(model.train(), *batch(), optimizer, plan.grad_scaler(), plan, 0.1, skip_nonfinite=skip)
        assert not result.finite and not result.stepped
        changed = any(not torch.equal(before[k], v) for k, v in model.named_parameters())
        assert changed is updated, skip


def test_the_probe_runs_its_steps_through_train_step(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["skip_nonfinite"])
        return train_step(*args, **kwargs)

    monkeypatch.setattr(r2gen.training.batchsize, "train_step", counting)
    spec = ProbeSpec.of(TrainSpec.of(tiny_params(), "bf16"))
    r2gen_step(spec, VOCAB, spec.plan("cpu"), steps=2)(3)
    assert calls == [False, False]  # a probe measures full steps


def test_the_probe_request_holds_only_the_sections_a_step_reads():
    spec = ProbeSpec.of(TrainSpec.of(tiny_params(), "fp8"))
    raw = json.loads(json.dumps(spec.to_dict()))
    assert set(raw) == {"precision", "seed", "threads", "views", "image_size", "max_seq_length", "model", "common",
                        "train", "ddp"}
    assert ProbeSpec.from_dict(raw) == spec


# ---------------------------------------------------------------------------------------- state
def test_config_fingerprint_is_unchanged_for_the_same_params():
    """Checkpoints of earlier versions resume: the hashed dict is the one training.py hashed.

    Changed on purpose with data.train_max_aspect (issue 15): the crop range changed on non-square
    data, so a checkpoint of a killed run from before is ignored (logged) rather than resumed. Changed
    again with train.common.monitor_system and deterministic (issue 13): every train.common key is hashed.
    """
    params = tiny_params("data/tiny")
    assert config_fingerprint(TrainSpec.of(params, "fp32")) == "cb3bee9d65dbb1c4"
    assert config_fingerprint(TrainSpec.of(params, "fp32"), world_size=2) == "8a838c87f530beed"
    assert config_fingerprint(TrainSpec.of(params, "fp8")) == "6e9e92f019c5fdfb"


def test_train_state_saves_as_the_checkpoints_plain_dict():
    state = TrainState(epoch=2, step=6, samples=22, epoch_losses=[3.0, 2.5], val_losses=[2.9], batch_size=4)
    raw = state.to_dict()
    assert list(raw) == ["epoch", "step", "samples", "timed_samples", "timed_seconds", "wall_seconds",
                         "nonfinite_steps", "skipped_steps", "epoch_losses", "val_losses", "batch_size", "batch_probe"]
    assert TrainState.from_dict(raw) == state


def test_checkpoint_round_trip_restores_weights_optimizer_and_every_rng_stream(tmp_path):
    plan = prec.resolve("fp32")

    def parts() -> Trainables:
        model, spec = tiny_model()
        optimizer, scheduler = build_optimizer(model, spec.common)
        return Trainables(model, optimizer, scheduler, plan.grad_scaler(), torch.Generator().manual_seed(5))

    saved = parts()
    train_step(saved.model.train(), *batch(), saved.optimizer, saved.scaler, plan, 0.1)
    saved.scheduler.step()
    torch.randperm(7, generator=saved.batch_gen)
    state = TrainState(epoch=1, step=1, samples=3, epoch_losses=[2.0], batch_size=3)
    path = tmp_path / "last.pt"
    save_checkpoint(path, "abc", saved, state, CPU, World())
    after = draws(saved.batch_gen)

    restored = parts()
    ckpt = load_resumable(path, "abc")
    assert load_resumable(path, "another config") is None
    assert restore_checkpoint(ckpt, restored, CPU, World()) == state
    again = draws(restored.batch_gen)
    assert torch.equal(again[0], after[0]) and torch.equal(again[1], after[1]) and again[2] == after[2]
    assert all(torch.equal(a, b) for a, b in zip(saved.model.state_dict().values(),
                                                  restored.model.state_dict().values()))
    assert restored.optimizer.state_dict()["state"].keys() == saved.optimizer.state_dict()["state"].keys()
    assert restored.scheduler.last_epoch == 1


def draws(batch_gen: torch.Generator) -> tuple:
    """The next numbers of the dropout, batch and Python streams."""
    return torch.rand(3), torch.rand(3, generator=batch_gen), random.random()


# ---------------------------------------------------------------------------------------- history
class FakeLive:
    """dvclive.Live's surface that LiveLogger uses, recording end()."""

    instances: list["FakeLive"] = []

    def __init__(self, directory, **kwargs):
        self.dir, self.step, self.ended = directory, 0, 0
        FakeLive.instances.append(self)

    def next_step(self):
        self.step += 1

    def log_metric(self, name, value):
        pass

    def end(self):
        self.ended += 1


@pytest.fixture
def fake_live(monkeypatch):
    import dvclive

    FakeLive.instances = []
    monkeypatch.setattr(dvclive, "Live", FakeLive)
    return FakeLive.instances


def test_the_history_is_closed_when_the_block_raises_and_its_own_failure_does_not_hide_the_error(tmp_path,
                                                                                                 fake_live,
                                                                                                 monkeypatch):
    with pytest.raises(RuntimeError, match="boom"):
        with live_module.open_history(tmp_path / "live", None, system_monitor=False) as history:
            history.log_step({"train/loss": 1.0})
            raise RuntimeError("boom")
    assert [live.ended for live in fake_live] == [1]

    monkeypatch.setattr(FakeLive, "end", lambda self: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(RuntimeError, match="boom"):
        with live_module.open_history(tmp_path / "live", None, system_monitor=False):
            raise RuntimeError("boom")


def test_a_rank_without_history_writes_nothing(tmp_path, fake_live):
    with live_module.open_history(tmp_path / "live", None, system_monitor=False, enabled=False) as history:
        history.log_step({"train/loss": 1.0})
        history.log({"epoch/train_loss": 1.0})
    assert fake_live == [] and not (tmp_path / "live").exists()


def test_a_training_run_that_fails_still_ends_its_dvclive_history(tmp_path, tiny_data, monkeypatch):
    ended = []
    original_end = live_module.LiveLogger.end
    monkeypatch.setattr(live_module.LiveLogger, "end", lambda self: (ended.append(self), original_end(self)))
    params = tiny_params(tiny_data["root"], train__common__max_nonfinite_steps=2)
    original = R2Gen.loss
    monkeypatch.setattr(R2Gen, "loss", classmethod(lambda cls, logprobs, labels: logprobs.sum() * float("nan")))
    with pytest.raises(R2GenError, match="2 consecutive non-finite steps"):
        train(TrainSpec.of(params, "fp32"), paths_in(tmp_path, tiny_data))
    assert len(ended) == 1
    monkeypatch.setattr(R2Gen, "loss", original)
    summary = train(TrainSpec.of(params, "fp32"), paths_in(tmp_path, tiny_data))
    assert len(ended) == 2 and isinstance(summary, TrainSummary)
    text = (tmp_path / "metrics.json").read_text()
    assert list(json.loads(text)) == list(TrainSummary.keys())  # keys in the record's order
    assert TrainSummary.load(tmp_path / "metrics.json") == summary
