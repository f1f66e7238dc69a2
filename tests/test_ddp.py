"""Data-parallel training on CPU (gloo): batch sharding, global BatchNorm statistics, two ranks against
one process with the global batch, a SIGKILLed DDP run resumed, and no worker outliving its launcher.

The runs go through the train stage as a user starts it (``R2GEN_NPROC=2 python stages/train.py ...``),
which re-executes itself through torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import yaml

from helpers import REPO, paths_in, step_losses, tiny_params
from r2gen.checkpoint import load_model_file, load_torch
from r2gen.config import PRECISIONS, to_dict
from r2gen.data.images import load_prepared
from r2gen.distributed import SyncedBatchNorm2d, World, requested_nproc, sync_batch_norms
from r2gen.errors import ConfigError
from r2gen.tokenizer import Tokenizer
from r2gen.model.r2gen import R2Gen
from r2gen.data.batches import StudyBatches
from r2gen.training import TrainSpec, train
from r2gen.training.step import global_batch_loss

# Two ranks with batch 2 against one process with batch 4, dropout off (each rank draws its own
# dropout masks). What remains is float summation order (all-reduced sums, BatchNorm statistics from
# sums of squares): the first steps agree to 1e-6, but Adam divides each gradient by its own running
# magnitude, so rounding in near-zero gradients turns into full-size updates and the difference
# grows about 3-10x per step from step 6 on. Observed at step 8 (the last): 4e-4 on an AVX2 CPU, 2.4e-3 on
# an AVX-512 one (other kernels, other summation order). Without the token weighting (the bug this test
# is for) the differences are 4e-4 already at step 1 and 1e-2 at step 3 (3e-2 at the end): the first six
# steps, below 2e-5 when it is right, are where it shows.
DDP_TOLERANCE = 1e-2
EARLY_TOLERANCE = 1e-5  # steps 0 and 1: the forward pass and the first update
WEIGHT_TOLERANCE = 2e-2  # final weights, absolute and relative (within 1e-3 on AVX2; 1.2e-2 seen on AVX-512)
FIRST_STEPS_TOLERANCE = 1e-4  # steps 0-5, before the chaotic growth (observed 2e-5 at most; the bug: 1e-2)
GRADIENT_TOLERANCE = 1e-4  # one step's gradients, relative to each tensor's largest entry (observed 2e-5)
EPOCHS = 3  # 11 train studies: 3 global batches of 4, 4, 3 (the last split 2 + 1) per epoch
TIMING_KEYS = {"samples_per_s", "train_seconds", "peak_memory_bytes", "peak_memory_fraction", "peak_memory_kind",
               "baseline_rss_bytes", "world_size", "ddp_backend", "batch_size", "other_cpu_share",
               "achieved_tflops", "peak_tflops", "measured_peak_tflops", "mfu"}


def no_dropout_params(root: Path, batch_size: int):
    return tiny_params(root, model__dropout=0.0, model__drop_prob_lm=0.0, train__common__epochs=EPOCHS,
                       **{f"train__{p}__batch_size": batch_size for p in PRECISIONS})


def stage(workdir: Path, tiny_data: dict, nproc: int, **popen) -> subprocess.Popen:
    """Start the train stage for fp32 in ``workdir`` (which holds params.yaml) with ``nproc`` processes."""
    paths = paths_in(workdir, tiny_data)
    cmd = [sys.executable, str(REPO / "stages" / "train.py"), "fp32", str(paths.prepared), str(paths.tokenizer),
           str(paths.model_out), str(paths.checkpoint_dir), str(paths.live_dir), str(paths.metrics)]
    env = {**os.environ, "R2GEN_NPROC": str(nproc), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def write_params(workdir: Path, params) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return out


# ---------------------------------------------------------------------------------------- units
def test_ranks_take_slices_of_the_global_batch_one_process_would_see(tiny_data):
    tokenizer = Tokenizer.load(tiny_data["tokenizer"])
    split = load_prepared(tiny_data["prepared"], "train")  # 11 studies, stored at 37 px, cropped to 32

    def batches(batch_size, rank=0, world=1):
        gen = torch.Generator().manual_seed(7)
        return list(StudyBatches(split, tokenizer, batch_size, 32, train=True, hflip=True, generator=gen,
                                 rank=rank, world=world))

    whole = batches(4)
    ranks = [batches(2, r, 2) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 3
    assert [len(b[0]) for b in ranks[0]] == [2, 2, 2] and [len(b[0]) for b in ranks[1]] == [2, 2, 1]
    for (images, labels), (im0, lab0), (im1, lab1) in zip(whole, *ranks):
        assert torch.equal(images, torch.cat([im0, im1]))  # same studies, same crops and flips
        parts = [row.tolist() for row in [*lab0, *lab1]]  # each rank pads to its own longest report
        assert [row[: len(p)].tolist() for row, p in zip(labels, parts)] == parts


def test_a_last_batch_smaller_than_the_world_is_skipped(tiny_data):
    tokenizer = Tokenizer.load(tiny_data["tokenizer"])
    split = load_prepared(tiny_data["prepared"], "train")  # 11 studies: global batches of 8, then 3 < 4 ranks
    for rank in range(4):
        shards = StudyBatches(split, tokenizer, 2, 32, train=True, generator=torch.Generator().manual_seed(0),
                              rank=rank, world=4)
        assert len(shards) == 1 and [len(images) for images, _ in shards] == [2]
    evaluation = [StudyBatches(split, tokenizer, 2, 32, train=False, rank=r, world=4) for r in range(4)]
    assert sum(len(images) for shard in evaluation for images, _ in shard) == 11  # evaluation keeps every study


def test_synced_batch_norm_matches_batch_norm_in_values_gradients_and_running_stats(tmp_path):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    synced = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    synced.load_state_dict(reference.state_dict())
    assert sync_batch_norms(synced) == 1 and isinstance(synced[1], SyncedBatchNorm2d)
    x = torch.randn(5, 3, 9, 9) * 3 + 1
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        outputs = []
        for model in (reference, synced):
            for _ in range(3):  # running statistics move over several steps
                y = model(x)
            y.square().mean().backward()
            outputs.append(y)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(reference.named_parameters(), synced.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    reference.eval(), synced.eval()
    torch.testing.assert_close(synced(x), reference(x))


def model_and_batch(tiny_data: dict, batch_size: int, rank: int = 0, world: int = 1):
    """The tiny model (dropout off) and this rank's slice of the epoch's third global batch (3 studies)."""
    params = no_dropout_params(tiny_data["root"], batch_size)
    tokenizer = Tokenizer.load(tiny_data["tokenizer"])
    torch.manual_seed(params.seed)
    model = R2Gen(params.model, tokenizer.vocab_size).train()
    split = load_prepared(tiny_data["prepared"], "train")
    batches = StudyBatches(split, tokenizer, batch_size, 32, train=True, generator=torch.Generator().manual_seed(1),
                           rank=rank, world=world)
    return model, list(batches)[2]


def ddp_gradients(rank: int, store: str, tiny_data: dict, out: str) -> None:
    """One of two gloo ranks: batch slice, synced BatchNorm, DDP, the global-batch loss; rank 0 saves the gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        model, (images, labels) = model_and_batch(tiny_data, 2, rank, 2)
        sync_batch_norms(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss, loss_global, samples = global_batch_loss(ddp(images, labels).loss, labels, World(rank, rank, 2))
        loss.backward()
        if rank == 0:
            grads = {name: p.grad for name, p in model.named_parameters()}
            torch.save({"grads": grads, "loss": loss_global, "samples": samples, "studies": len(images)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_compute_the_gradient_of_the_global_batch(tmp_path, tiny_data):
    model, (images, labels) = model_and_batch(tiny_data, 4)
    loss = model(images, labels).loss
    loss.backward()
    torch.multiprocessing.spawn(ddp_gradients, args=(str(tmp_path / "store"), tiny_data, str(tmp_path / "ddp.pt")),
                                nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")
    assert (ddp["samples"], ddp["studies"], len(images)) == (3, 2, 3)  # ranks hold 2 + 1 studies, unequal tokens
    torch.testing.assert_close(ddp["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    worst = 0.0
    for name, p in model.named_parameters():
        # Per tensor, relative to its largest entry: single entries near zero carry only rounding
        # (e.g. attention key biases, whose true gradient is 0, come out near 1e-9 either way).
        scale = float(p.grad.abs().max())
        diff = float((ddp["grads"][name] - p.grad).abs().max())
        assert diff <= GRADIENT_TOLERANCE * scale + 1e-8, (name, diff, scale)
        if scale > 1e-6:
            worst = max(worst, diff / scale)
    print(f"DDP 2 ranks vs 1 process: gradients agree to {worst:.1e} of each tensor's largest entry")


def test_process_count_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("R2GEN_NPROC", raising=False)
    assert requested_nproc() == 1
    monkeypatch.setenv("R2GEN_NPROC", "4")
    assert requested_nproc() == 4
    monkeypatch.setenv("R2GEN_NPROC", "two")
    with pytest.raises(ConfigError, match="R2GEN_NPROC='two' is not a positive integer"):
        requested_nproc()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert World.from_env() == World(0, 0, 1)


# ---------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_data) -> Path:
    """One process, batch 4, dropout off: the reference of the DDP runs."""
    workdir = tmp_path_factory.mktemp("one")
    train(TrainSpec.of(no_dropout_params(tiny_data["root"], 4), "fp32"), paths_in(workdir, tiny_data))
    return workdir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_data) -> tuple[Path, float]:
    """Two gloo ranks with batch 2 each, through the stage; returns its folder and wall time."""
    workdir = tmp_path_factory.mktemp("ddp")
    write_params(workdir, no_dropout_params(tiny_data["root"], 2))
    start = time.perf_counter()
    out = finish(stage(workdir, tiny_data, 2))
    assert "launching 2 processes" in out and "DDP: 2 ranks" in out
    return workdir, time.perf_counter() - start


@pytest.mark.slow
def test_two_ranks_with_batch_b_train_like_one_process_with_batch_2b(one_process, two_ranks):
    ddp_dir, seconds = two_ranks
    one = step_losses(one_process / "dvclive" / "fp32")
    two = step_losses(ddp_dir / "dvclive" / "fp32")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(3 * EPOCHS))
    diffs = [abs(a - b) for (_, a), (_, b) in zip(one, two)]
    print(f"DDP 2x2 vs 1x4: loss differences {' '.join(f'{d:.0e}' for d in diffs)}; DDP run {seconds:.1f} s")
    assert max(diffs[:2]) < EARLY_TOLERANCE and max(diffs[:6]) < FIRST_STEPS_TOLERANCE
    assert max(diffs) < DDP_TOLERANCE

    m1 = json.loads((one_process / "metrics" / "fp32.json").read_text())
    m2 = json.loads((ddp_dir / "metrics" / "fp32.json").read_text())
    assert list(m2) == list(m1)  # the same structure, key for key
    assert (m2["world_size"], m2["batch_size"], m2["global_batch_size"], m2["ddp_backend"]) == (2, 2, 4, "gloo")
    assert (m1["world_size"], m1["global_batch_size"], m1["ddp_backend"]) == (1, 4, None)
    assert "rank 0 of 2" in m2["peak_memory_kind"] and m2["samples_per_s"] > 0
    for key in set(m1) - TIMING_KEYS:
        if isinstance(m1[key], float):
            assert m2[key] == pytest.approx(m1[key], abs=DDP_TOLERANCE), key
        else:
            assert m2[key] == m1[key], key
    w1 = load_model_file(one_process / "models" / "fp32" / "model.pt")["state_dict"]
    w2 = load_model_file(ddp_dir / "models" / "fp32" / "model.pt")["state_dict"]
    assert w1.keys() == w2.keys()  # synced BatchNorm saves as plain BatchNorm2d
    for key in w1:  # after the drift above: on an AVX-512 CPU BatchNorm running variances differ by up to 1.2%
        torch.testing.assert_close(w2[key], w1[key], atol=WEIGHT_TOLERANCE, rtol=WEIGHT_TOLERANCE,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert not (ddp_dir / "checkpoints" / "fp32" / "last.pt").exists()


def live_workers(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with_marker = any(marker in part for part in (proc.info["cmdline"] or []))
        if with_marker and proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.mark.slow
def test_a_sigkilled_ddp_run_leaves_no_workers_and_resumes_to_the_same_result(tmp_path, tiny_data, two_ranks):
    ddp_dir, _ = two_ranks
    write_params(tmp_path, no_dropout_params(tiny_data["root"], 2))
    checkpoint = paths_in(tmp_path, tiny_data).checkpoint_dir / "last.pt"
    proc = stage(tmp_path, tiny_data, 2, start_new_session=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: torchrun; its workers have their own sessions
    proc.communicate()
    time.sleep(2)  # the workers notice their launcher is gone within half a second
    assert live_workers(str(tmp_path)) == []
    assert not paths_in(tmp_path, tiny_data).model_out.exists(), "a worker outlived its launcher and finished"
    assert load_torch(checkpoint)["state"]["epoch"] >= 1

    out = finish(stage(tmp_path, tiny_data, 2))
    assert "resuming from" in out
    assert step_losses(tmp_path / "dvclive" / "fp32") == step_losses(ddp_dir / "dvclive" / "fp32")
    a = load_model_file(tmp_path / "models" / "fp32" / "model.pt")["state_dict"]
    b = load_model_file(ddp_dir / "models" / "fp32" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
