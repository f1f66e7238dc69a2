"""The training side of issue 13: GPU-path defects found by reading dvclive, Transformer Engine and torch,
tested on CPU with the mechanism reproduced (a real dvclive monitor thread, real child processes) or
with CUDA mocked where it is missing.

Defect -> tests: 1 (a hang after an error) ``test_an_error_after_training_started_exits_promptly_...``,
``test_ending_the_history_stops_dvclives_monitor_thread_even_when_end_fails``; 3 (the DDP probe's
collectives) ``test_ddp_cuda_batch_probe_runs_in_a_child_process_...``; 4 (the probe's peak)
``test_setup_resets_the_peak_after_choosing_the_batch``, ``test_reset_peak_on_cuda_...``; 5 (the probe
under-estimates) ``test_cuda_budget_...``, ``test_cuda_probe_counts_reserved_memory_...``,
``test_a_ddp_probe_trains_with_synced_batch_norm_...``; 8 ``test_generate_sets_fp32_numerics_...``;
9 ``test_monitor_system_...``, ``test_deterministic_...``, ``test_local_rank_beyond_the_gpus_...``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist

from helpers import REPO, paths_in, tiny_params
from r2gen import precision as prec
from r2gen.checkpoint import save_model
from r2gen.cli import main as cli_main
from r2gen.config import Params, TrainCommon, to_dict
from r2gen.distributed import SyncedBatchNorm2d, World
from r2gen.errors import ConfigError, R2GenError
from r2gen.model.r2gen import R2Gen
from r2gen.tokenizer import Tokenizer
from r2gen.training import TrainSpec, batchsize, live as live_module, memory, recipe, train
from r2gen.training.batchsize import (NCCL_RESERVE_BYTES, Probe, ProbeResult, ProbeSpec, budget_bytes,
                                      choose_batch, cuda_try_batch, ddp_overhead_bytes, r2gen_step)

GIB = 2**30


# ---------------------------------------------------------------------------------------- defect 1
FAILING_RUN = r'''
import json, sys, threading
from pathlib import Path
sys.path.insert(0, "stages")
from _common import run
import dvclive
from r2gen.config import Params
from r2gen.errors import R2GenError
from r2gen.training import TrainPaths, TrainSpec, recipe

kind, raw, paths = sys.argv[1], json.loads(sys.argv[2]), [Path(p) for p in json.loads(sys.argv[3])]
if kind == "end-fails":  # ending the history fails before dvclive reaches its monitor thread
    def end(self):
        raise OSError(28, "No space left on device")
    dvclive.Live.end = end

def fail(*args, **kwargs):  # the first epoch's steps ran: training started
    monitors = sum("_monitoring_loop" in t.name and t.is_alive() for t in threading.enumerate())
    print(f"monitor threads running: {monitors}", file=sys.stderr, flush=True)
    if kind == "exit":
        raise SystemExit(2)
    if kind == "interrupt":
        raise KeyboardInterrupt
    raise R2GenError("simulated failure after training started; rerun to resume")

recipe.end_epoch = fail
raise SystemExit(run(lambda argv: recipe.train(TrainSpec.of(Params.from_dict(raw), "fp32"), TrainPaths(*paths)) and None))
'''


@pytest.mark.parametrize("kind, code, last_line", [
    ("error", 2, "error: simulated failure after training started; rerun to resume"),
    ("end-fails", 2, "error: simulated failure after training started; rerun to resume"),
    ("exit", 2, None),
    ("interrupt", 130, "error: interrupted (Ctrl-C or SIGTERM)"),
])
def test_an_error_after_training_started_exits_promptly_with_the_system_monitor_on(tmp_path, tiny_data, kind, code,
                                                                                   last_line):
    """dvclive's monitor is a non-daemon thread looping until Live.end(): at a1b3307 end() ran on success
    only, so each of these printed its error and then never exited (here: the timeout)."""
    params = tiny_params(tiny_data["root"], train__common__monitor_system="on", train__common__epochs=1)
    paths = paths_in(tmp_path, tiny_data)
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, str(script), kind, json.dumps(to_dict(params)), json.dumps([str(p) for p in paths.__dict__.values()])]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert "monitor threads running: 1" in proc.stderr, proc.stderr[-2000:]  # the real thread was running
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    if last_line is not None:
        assert lines[-1].startswith(last_line) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - start < 240


def test_ending_the_history_stops_dvclives_monitor_thread_even_when_end_fails(tmp_path, monkeypatch):
    """Pins the private attribute LiveLogger stops against the installed dvclive: the real thread ends."""
    import dvclive

    def before_the_monitor(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dvclive.Live, "end", before_the_monitor)
    logger = live_module.LiveLogger(tmp_path / "live", None, system_monitor=True)
    monitors = [t for t in threading.enumerate() if "_monitoring_loop" in t.name and t.is_alive()]
    assert len(monitors) == 1 and not monitors[0].daemon  # what would keep the interpreter alive
    with pytest.raises(R2GenError, match="No space left on device"):
        logger.end()
    monitors[0].join(timeout=10)
    assert not monitors[0].is_alive()


# ---------------------------------------------------------------------------------------- defect 3
@dataclass(frozen=True)
class TwoRanks(World):
    """A rank of a two-process world whose broadcast hands rank 0's object to rank 1 (ranks run in order)."""

    box: ClassVar[list] = []

    def broadcast(self, obj: Any) -> Any:
        if self.is_main:
            TwoRanks.box[:] = [obj]
        return TwoRanks.box[0]


def test_ddp_cuda_batch_probe_runs_in_a_child_process_without_collectives_or_fp8_state_in_training(monkeypatch):
    """At a1b3307 rank 0 built and stepped the probe model in the training process (after init_process_group,
    under TE's autocast): TE registered its FP8 tensors in its process-wide amax buffer and all-reduced
    amaxes over the world group while rank 1 waited in broadcast_object_list."""
    parent: list[str] = []  # what happened in the training process

    def fake_te_probe(*args, **kwargs):  # a probe model whose fp8 step does what TE's delayed scaling does
        def step(batch: int) -> None:
            parent.append("TE FP8GlobalStateManager amax registration")
            dist.all_reduce(torch.zeros(1))  # TE's amax reduction over the world group
        return step

    monkeypatch.setattr(batchsize, "r2gen_step", fake_te_probe)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):  # an in-process CUDA probe's calls
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: GIB)
    for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "barrier"):
        monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: parent.append(f"collective {_name}"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=16 * GIB))
    for var, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(var, value)
    children = []

    def fake_child(cmd, input, capture_output, text, env):  # what the probe process would answer
        children.append({"cmd": cmd, "request": json.loads(input), "env": env})
        result = ProbeResult(24, 9 * GIB, 8, (Probe(4, GIB, True), Probe(24, 8 * GIB, True)))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(result.to_dict()) + "\n", stderr="")

    monkeypatch.setattr(batchsize.subprocess, "run", fake_child)
    params = tiny_params(train__common__batch_mode="max", train__common__memory_budget_gb=None,
                         train__fp8__backend="te", train__fp8__fp8_recipe="delayed")
    spec = TrainSpec.of(params, "fp8")
    plan = SimpleNamespace(device=torch.device("cuda", 0))
    choices = [choose_batch(spec, plan, 30, TwoRanks(rank, rank, 2), 100, None) for rank in (0, 1)]

    assert parent == []  # no collective, no TE state in the training process during the probe
    assert len(children) == 1  # rank 0's one probe process; rank 1 only receives the batch
    assert "_cuda_probe_child" in children[0]["cmd"][-1]
    request = children[0]["request"]
    assert request["device"] == "cuda:0" and request["budget_bytes"] == int(0.9 * 10 * GIB)
    assert ProbeSpec.from_dict(request["spec"]) == ProbeSpec.of(spec, ddp=True)
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(children[0]["env"])
    assert choices[0] == choices[1] and choices[0].batch == 24  # every rank trains at the same batch


def test_a_probe_process_error_is_a_one_line_error_in_training(monkeypatch):
    message = "batch-size probe: even batch 4 needs 9.50 GiB, over the memory budget of 9.00 GiB; raise ..."
    monkeypatch.setattr(batchsize.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, stdout=json.dumps({"error": message}) + "\n", stderr=""))
    spec = ProbeSpec.of(TrainSpec.of(tiny_params(), "bf16"))
    with pytest.raises(R2GenError) as err:
        batchsize.cuda_probe_in_child(spec, 30, torch.device("cuda", 0), 9 * GIB, 4, 64)
    assert str(err.value) == message


@pytest.mark.parametrize("device, selected", [("cuda", []), ("cuda:1", [torch.device("cuda", 1)])])
def test_the_cuda_probe_process_searches_with_reserved_memory_and_ddp_overhead(monkeypatch, capsys, device,
                                                                               selected):
    """The body of the probe process, in this process with CUDA mocked: request in, ProbeResult out."""
    calls, peaks = [], {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: peaks["now"])
    model = torch.nn.Linear(4, 4)  # 20 parameters: 80 gradient bytes in DDP's buckets
    monkeypatch.setattr(batchsize, "r2gen_step", lambda spec, vocab, plan: batchsize.ProbeStep(
        model, lambda batch: peaks.update(now=batch * GIB)))
    monkeypatch.setattr(ProbeSpec, "plan", lambda self, d: SimpleNamespace(device=torch.device(d)))
    spec = ProbeSpec.of(TrainSpec.of(tiny_params(), "bf16"), ddp=True)
    request = {"spec": spec.to_dict(), "vocab_size": 30, "device": device, "budget_bytes": 20 * GIB, "start": 4,
               "limit": 64}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(request)))
    batchsize._cuda_probe_child()
    result = ProbeResult.from_dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert calls == selected
    assert result.peaks[4] == 4 * GIB + 80 + NCCL_RESERVE_BYTES
    assert result.batch == 16 and result.budget_bytes == 20 * GIB  # 16 GiB + overhead fits, 24 does not


def test_a_probe_result_survives_the_json_a_probe_process_answers_with():
    result = ProbeResult(24, 9 * GIB, 64, (Probe(4, GIB, True), Probe(64, None, False, "CUDA out of memory"),
                                           Probe(24, 8 * GIB, True)))
    assert ProbeResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


# ---------------------------------------------------------------------------------------- defect 4
def test_setup_resets_the_peak_after_choosing_the_batch(tmp_path, tiny_data, monkeypatch):
    """At a1b3307 nothing reset the CUDA peak after the probe: peak_memory_bytes could be the probe's."""
    calls = []
    original = recipe.choose_batch
    monkeypatch.setattr(recipe, "choose_batch", lambda *a, **k: (calls.append("choose_batch"), original(*a, **k))[1])
    monkeypatch.setattr(recipe, "reset_peak", lambda device: calls.append(("reset_peak", device)))

    def build(*args, **kwargs):
        calls.append("build the model")
        raise RuntimeError("stop after the batch")

    monkeypatch.setattr(recipe, "_build", build)
    spec = TrainSpec.of(tiny_params(tiny_data["root"]), "fp32")
    with pytest.raises(RuntimeError, match="stop after the batch"):
        recipe.setup(spec, paths_in(tmp_path, tiny_data), World(), torch.device("cpu"), None)
    assert calls == ["choose_batch", ("reset_peak", torch.device("cpu")), "build the model"]


def test_reset_peak_on_cuda_resets_the_allocators_peak_and_cache(monkeypatch):
    calls = []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name: calls.append((_name, *a)))
    device = torch.device("cuda", 1)
    memory.reset_peak(device)
    assert calls == [("synchronize", device), ("empty_cache",), ("reset_peak_memory_stats", device)]
    calls.clear()
    memory.reset_peak(torch.device("cpu"))
    assert calls == []


# ---------------------------------------------------------------------------------------- defect 5
def test_cuda_budget_is_90_percent_of_the_free_memory_and_caps_a_configured_budget(monkeypatch):
    """At a1b3307 the budget was 90% of the device's total: 14.4 of 16 GiB with 6 GiB already in use."""
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (asked.append(device), (10 * GIB, 16 * GIB))[1])
    cuda = torch.device("cuda", 0)
    assert budget_bytes(None, cuda) == int(0.9 * 10 * GIB)
    assert budget_bytes(12.0, cuda) == int(0.9 * 10 * GIB)  # more than is free: capped
    assert budget_bytes(4.0, cuda) == 4 * GIB
    assert asked == [cuda] * 3  # the training process's device, whose context is already counted as used
    assert budget_bytes(0.5, "cpu", ranks=2) == GIB // 2  # a configured budget is per process


def test_cuda_probe_counts_reserved_memory_plus_what_ddp_allocates_beside_the_step(monkeypatch):
    """At a1b3307 a probe measured max_memory_allocated alone: fragmentation, DDP's buckets and NCCL left out."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 6 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 7 * GIB)
    overhead = ddp_overhead_bytes(GIB // 2, "cuda")
    assert overhead == GIB // 2 + NCCL_RESERVE_BYTES and ddp_overhead_bytes(GIB // 2, "cpu") == GIB // 2
    assert cuda_try_batch(lambda batch: None, "cuda", extra_bytes=overhead)(8) == 7 * GIB + overhead
    # 6 GiB allocated would fit a 6.5 GiB budget; the 7 GiB the allocator reserved does not
    with pytest.raises(R2GenError, match="even batch 8 needs 7.00 GiB, over the memory budget of 6.50 GiB"):
        batchsize.find_max_batch(cuda_try_batch(lambda batch: None, "cuda"), int(6.5 * GIB), 8, 8)


def test_a_ddp_probe_trains_with_synced_batch_norm_and_counts_the_gradient_buckets():
    """At a1b3307 the probe trained plain BatchNorm2d while DDP training uses SyncedBatchNorm2d (an fp32 copy)."""
    assert not (dist.is_available() and dist.is_initialized())  # a probe has no process group
    spec = ProbeSpec.of(TrainSpec.of(tiny_params(), "bf16"), ddp=True)
    step = r2gen_step(spec, 30, spec.plan("cpu"), steps=1)
    norms = [m for m in step.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(type(m) is SyncedBatchNorm2d and not m.collective for m in norms)
    step(2)  # trains without a process group
    assert step.gradient_bytes == sum(p.numel() * 4 for p in step.model.parameters())
    plain = r2gen_step(ProbeSpec.of(TrainSpec.of(tiny_params(), "bf16")), 30, spec.plan("cpu"), steps=1)
    assert not any(isinstance(m, SyncedBatchNorm2d) for m in plain.model.modules())


# ---------------------------------------------------------------------------------------- defect 8
@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_data) -> Path:
    """An untrained tiny model file (generate's numerics do not depend on the weights)."""
    params = tiny_data["params"]
    tokenizer = Tokenizer.load(tiny_data["tokenizer"])
    model = R2Gen(params.model, tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("gen") / "model.pt"
    save_model(path, model_config=params.model, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.to_dict(),
               state_dict=model.state_dict(), data={"dataset": "iu_xray", "views": 2, "image_size": 32},
               info={"train": {}, "fingerprint": "test"})
    return path


class Stop(Exception):
    pass


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_generate_sets_fp32_numerics_for_the_device_it_runs_on(capsys, model_file, tiny_data, monkeypatch, device):
    """At a1b3307 `r2gen generate` never called set_fp32_numerics: torch's cuDNN convs ran in TF32 on CUDA."""
    seen = []
    real = prec.set_fp32_numerics

    def record(dev):
        seen.append(torch.device(dev))
        if torch.device(dev).type == "cuda":
            raise Stop  # this machine has no GPU to generate on: the call is what is checked
        real(dev)

    monkeypatch.setattr(prec, "set_fp32_numerics", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    study = sorted((tiny_data["root"] / "images").iterdir())[0]
    argv = ["generate", "--checkpoint", str(model_file), "--study", str(study), "--device", device, "--num-beams", "1",
            "--max-new-tokens", "5"]
    if device == "cuda":
        with pytest.raises(Stop):
            cli_main(argv)
    else:
        assert cli_main(argv) == 0, capsys.readouterr().err
    assert seen == [torch.device(device)]


# ---------------------------------------------------------------------------------------- defect 9
def test_monitor_system_auto_is_on_only_where_speed_is_not_measured():
    assert live_module.monitor_system_on("auto", speed_comparable=False)
    assert not live_module.monitor_system_on("auto", speed_comparable=True)
    assert live_module.monitor_system_on("on", True) and not live_module.monitor_system_on("off", False)
    assert TrainCommon().monitor_system == "off" and TrainCommon().deterministic is False


@pytest.mark.parametrize("value, fragments", [
    ("sometimes", ["unsupported train.common.monitor_system 'sometimes'", "auto, on, off"]),
    (True, ["'train.common.monitor_system' must be a string, got True"]),
])
def test_monitor_system_param_is_checked_with_a_one_line_error(value, fragments):
    raw = to_dict(tiny_params())
    raw["train"]["common"]["monitor_system"] = value
    with pytest.raises(ConfigError) as err:
        Params.from_dict(raw)
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)


def test_deterministic_training_sets_and_restores_deterministic_kernels_and_both_params_are_recorded(
        tmp_path, tiny_data, monkeypatch):
    during = []
    original = recipe.run_epoch

    def run_epoch(*args):
        during.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                       torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return original(*args)

    monkeypatch.setattr(recipe, "run_epoch", run_epoch)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    params = tiny_params(tiny_data["root"], train__common__epochs=1, train__common__deterministic=True,
                         train__common__monitor_system="on")
    paths = paths_in(tmp_path, tiny_data)
    summary = train(TrainSpec.of(params, "fp32"), paths)
    assert during == [(True, True, False, ":4096:8")]
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    assert after == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    recorded = json.loads(paths.metrics.read_text())
    assert recorded["deterministic"] is True and recorded["monitor_system"] is True
    assert summary.deterministic and summary.monitor_system


def test_local_rank_beyond_the_gpus_is_a_one_line_error_naming_the_fix(monkeypatch):
    """At a1b3307 torch raised a raw "invalid device ordinal" at the first CUDA call."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert World(1, 1, 2).device(torch.device("cuda")) == torch.device("cuda", 1)
    with pytest.raises(ConfigError) as err:
        World(2, 2, 3).device(torch.device("cuda"))
    message = str(err.value)
    assert "\n" not in message and "LOCAL_RANK=2" in message and "device_count() is 2" in message
    assert "at most 2 processes per node" in message and "nproc" in message
    assert World(2, 2, 3).device(torch.device("cpu")) == torch.device("cpu")  # gloo ranks need no GPU
