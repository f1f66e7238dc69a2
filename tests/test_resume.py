"""Crash safety under `dvc repro`: SIGKILL the whole process group at random training steps, three
times in a row, then finish; the result must equal an uninterrupted run bit for bit, and no kill may
leave an output that DVC or a later stage would take for complete.

Runs the real `dvc repro train@fp32` in a copy of the repository (see test_pipeline.py). Marked
`slow` (about a minute on 2 cores); it runs in `make test`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r2gen.checkpoint import load_model_file, load_torch
from helpers import TINY, copy_repo, sh

pytestmark = pytest.mark.slow

KILLS = 3
# fp32 only; enough steps per epoch (batch 8) that a random step rarely lands on an epoch end.
PARAMS = {**TINY, "threads": 1, "train": {"common": {"epochs": 4, "validate": "every_epoch"},
                                          "fp32": {"batch_size": 8}}}
OUTS = ("models/fp32/model.pt", "metrics/train/fp32.json", "dvclive/train/fp32", "checkpoints/fp32")
# What the run measured about itself rather than computed: differs between any two runs.
MEASURED = {"samples_per_s", "train_seconds", "peak_memory_bytes", "peak_memory_fraction", "baseline_rss_bytes", "other_cpu_share",
            "achieved_tflops", "peak_tflops", "measured_peak_tflops", "mfu"}  # timings, and the MFU made of them


def repro(repo: Path, *extra: str) -> subprocess.Popen:
    """`dvc repro train@fp32` in its own process group, as a shell or CI job would run it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(["dvc", "repro", *extra, "train@fp32"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def history(repo: Path) -> dict[str, str]:
    """Every dvclive history file; of the wall-clock seconds so far (which no rerun reproduces) the
    steps they were logged at, increasing values checked."""
    live = repo / "dvclive/train/fp32"
    files = {str(p.relative_to(live)): p.read_text() for p in sorted(live.glob("plots/metrics/**/*.tsv"))}
    rows = [r.split("\t") for r in files.pop("plots/metrics/epoch/train_seconds.tsv").splitlines()[1:]]
    seconds = [float(r[-1]) for r in rows]
    assert seconds == sorted(seconds) and seconds[0] > 0
    files["train_seconds steps"] = " ".join(r[-2] for r in rows)
    return files


def last_logged_step(tsv: Path) -> tuple[int, int]:
    """(inode, last step) of a dvclive history file; (-1, -1) while it does not exist."""
    try:
        inode = tsv.stat().st_ino
        rows = tsv.read_text().splitlines()[1:]
        return inode, int(rows[-1].split("\t")[0]) if rows else -1
    except (FileNotFoundError, ValueError, IndexError):
        return -1, -1


def assert_nothing_passes_for_complete(repo: Path) -> None:
    """After a kill: outputs absent or whole, the stage not recorded as done, the checkpoint readable."""
    model = repo / "models/fp32/model.pt"
    if model.exists():  # DVC removes it before running the stage; if present it must be whole
        load_model_file(model)
    metrics = repo / "metrics/train/fp32.json"
    if metrics.exists():
        json.loads(metrics.read_text())
    status = json.loads(sh(["dvc", "status", "--json", "train@fp32"], repo).stdout)
    assert "train@fp32" in status, status  # a later `dvc repro` reruns the stage
    checkpoint = repo / "checkpoints/fp32/last.pt"
    if checkpoint.exists():
        assert load_torch(checkpoint)["state"]["epoch"] >= 1


def test_sigkilled_repro_resumes_and_finishes_with_the_uninterrupted_result(tmp_path):
    repo = copy_repo(tmp_path / "repo", PARAMS)
    start = time.perf_counter()
    sh(["dvc", "repro", "train@fp32"], repo)
    reference = tmp_path / "reference"
    for out in OUTS:
        src, dst = repo / out, reference / out
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    expected = json.loads((repo / "metrics/train/fp32.json").read_text())
    steps, epochs = expected["steps"], expected["epochs"]
    per_epoch = steps // epochs
    seed = int(os.environ.get("R2GEN_KILL_SEED", time.time_ns() % 2**32))  # set it to replay a failure
    rng = random.Random(seed)
    # Steps after which to kill: past the first checkpoint, before the last step, increasing.
    kill_steps = sorted(rng.sample(range(per_epoch + 1, steps - 1), KILLS))
    print(f"reference run {time.perf_counter() - start:.1f} s; {steps} steps; killing after steps {kill_steps} "
          f"(R2GEN_KILL_SEED={seed})")

    loss_tsv = repo / "dvclive/train/fp32/plots/metrics/train/loss.tsv"
    loss_tsv.unlink()  # the first run trains afresh and writes a new one (a resumed run replaces it)
    for i, kill_step in enumerate(kill_steps):
        inode_before, _ = last_logged_step(loss_tsv)
        proc = repro(repo, *(["--force", "--single-item"] if i == 0 else []))
        deadline = time.monotonic() + 300
        while True:
            inode, step = last_logged_step(loss_tsv)
            if inode != inode_before and step >= kill_step:  # rewritten by this run (fresh or resumed)
                break
            assert proc.poll() is None, f"run {i} ended before step {kill_step}:\n{proc.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, f"run {i} did not reach step {kill_step}"
            time.sleep(rng.uniform(0.0, 0.05))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert_nothing_passes_for_complete(repo)

    final = repro(repo)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out[-5000:]
    assert "resuming from" in out
    assert json.loads(sh(["dvc", "status", "--json", "train@fp32"], repo).stdout) == {}

    got = json.loads((repo / "metrics/train/fp32.json").read_text())
    assert list(got) == list(expected)
    assert {k: v for k, v in got.items() if k not in MEASURED} == {
        k: v for k, v in expected.items() if k not in MEASURED}
    a = load_model_file(repo / "models/fp32/model.pt")["state_dict"]
    b = load_model_file(reference / "models/fp32/model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert history(repo) == history(reference)
    live_summary = json.loads((repo / "dvclive/train/fp32/metrics.json").read_text())
    reference_summary = json.loads((reference / "dvclive/train/fp32/metrics.json").read_text())
    for summary in (live_summary, reference_summary):
        summary["epoch"].pop("train_seconds")  # wall-clock
    assert live_summary == reference_summary
    leftovers = [p for out in OUTS for p in (repo / out).parent.rglob(".*.tmp")]
    assert leftovers == []
    print(f"survived {KILLS} kills; test {time.perf_counter() - start:.1f} s")
