"""``make gpu-check DEVICE=cpu``: the device check's script at its tiny size, its JSON and markdown, and its skip paths."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from benchmarks import gpu_check, gpu_e2e
from benchmarks.gpu_table import render

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), proc.stdout)


@pytest.mark.slow
def test_cpu_check_measures_every_precision_consistently(cpu_check):
    record, _, stdout = cpu_check
    assert "not a GPU measurement" in record["label"]
    assert stdout.splitlines()[0].startswith("imports")  # the one line that names what to carry
    bench = record["benchmark"]
    assert bench["ran"] and not bench["errors"] and list(bench["rows"]) == list(PRECISIONS)
    assert bench["flops_per_sample"] > 0
    fp32 = bench["rows"]["fp32"]["equal"]
    for p, row in bench["rows"].items():
        equal = row["equal"]
        assert equal["batch"] == fp32["batch"] and len(equal["losses"]) == equal["timed_steps"]
        assert all(math.isfinite(v) for v in equal["losses"])
        assert equal["samples_per_s"] == pytest.approx(equal["batch"] * equal["timed_steps"] / equal["seconds"])
        assert equal["ratio_vs_fp32"] == pytest.approx(equal["samples_per_s"] / fp32["samples_per_s"])
        assert equal["loss_minus_fp32"] == pytest.approx(equal["final_loss"] - fp32["final_loss"])
        assert equal["model_tflops"] == pytest.approx(equal["samples_per_s"] * bench["flops_per_sample"] / 1e12)
        assert row["max"]["ran"] and row["max"]["batch"] >= equal["batch"]
        assert row["profile"]["top_operators"] and "not a GPU measurement" in row["profile"]["clock"]
        assert {q["name"] for q in row["profile"]["forward_parts"]} >= {"visual", "encoder", "rm"}
    assert bench["rows"]["fp32"]["equal"]["ratio_vs_fp32"] == 1.0
    fp8 = bench["rows"]["fp8"]
    assert fp8["plan"]["backend"] != "te" and fp8["plan"]["backend_reason"] and fp8["fp8_layers"]["linear_converted"] > 0
    assert fp8["plan"]["speed_comparable"] is False  # an emulated/CPU fp8 row is never FP8 speed
    assert record["machine"]["datasheet_peak_tflops"] is None  # no GPU, no peak: MFU vs datasheet is n/a
    assert all(row["equal"]["mfu_datasheet"] is None for row in bench["rows"].values())


@pytest.mark.slow
def test_cpu_check_runs_the_whole_pipeline(cpu_check):
    record, markdown, _ = cpu_check
    e2e = record["e2e"]
    stages = [name for name, _, _ in gpu_e2e.expand_stages(yaml.safe_load((REPO / "dvc.yaml").read_text()),
                                                           yaml.safe_load((REPO / "params.yaml").read_text()))]
    assert e2e["complete"] and not e2e["skipped"] and e2e["report_written"]
    assert [s["stage"] for s in e2e["stages"]] == stages and all(s["rc"] == 0 for s in e2e["stages"])
    assert set(e2e["trained"]) == set(PRECISIONS) and all(t["device"] == "cpu" for t in e2e["trained"].values())
    assert "numerics only: not a GPU measurement" in markdown
    for p in PRECISIONS:
        assert markdown.count(f"\n| {p} | ") == 2  # one row at the equal batch, one at the largest
    assert "| report | 0 |" in markdown and "Where the time goes: fp8" in markdown


def test_dvc_yaml_stages_expand_in_order_with_interpolation():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = gpu_e2e.expand_stages(yaml.safe_load((REPO / "dvc.yaml").read_text()), params)
    names = [name for name, _, _ in stages]
    assert names[:3] == ["prepare", "build_tokenizer", "baseline"] and names[-1] == "report"
    assert names[3:7] == [f"train@{p}" for p in PRECISIONS] and names[7:11] == [f"evaluate@{p}" for p in PRECISIONS]
    cmd = dict((n, c) for n, _, c in stages)["train@fp8"]
    assert cmd.startswith("python stages/train.py fp8 prepared") and "${" not in cmd and "models/fp8/model.pt" in cmd
    assert gpu_e2e.expand_stages({"stages": {"s": {"cmd": "echo ${data.root}"}}}, params) == [
        ("s", "s", f"echo {params['data']['root']}")]


def test_a_missing_module_skips_its_stage_and_everything_after_it_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu_e2e.STAGE_IMPORTS, "prepare", ("no_such_module_r2gen",))
    record = gpu_e2e.run_pipeline("cpu", 1, True, float("inf"), tmp_path)
    assert not record["ran"] and not record["complete"] and record["stages"] == []
    first, *rest = record["skipped"]
    assert first == {"stage": "prepare", "why": "missing Python modules: no_such_module_r2gen "
                                                "(carry the wheels: make gpu-wheels)"}
    assert rest and all(s["why"] == "after prepare, which did not complete" for s in rest)
    table = render({"label": "x", "imports": {"line": "imports: all present", "modules": {}},
                    "machine": {"device_name": "cpu", "device": "cpu", "compute_capability": None, "torch": "2",
                                "cuda": None, "cudnn": None, "python": "3", "transformer_engine": None,
                                "transformer_engine_error": "absent", "datasheet_peak_source": "none"},
                    "benchmark": {"ran": False, "why": "--skip-e2e"}, "e2e": record})
    assert "| prepare | not run: missing Python modules: no_such_module_r2gen" in table
    assert "complete: **no**" in table


def test_import_check_names_the_missing_modules_in_one_line(monkeypatch):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name: None if name in ("dvclive", "pycocoevalcap") else real(name))
    found = gpu_check.import_check()
    assert found["missing"] == {"benchmark": [], "e2e": ["dvclive", "pycocoevalcap"]}
    assert found["line"].startswith("imports missing: e2e: dvclive, pycocoevalcap (carry .gpu-wheels")
    assert "\n" not in found["line"]


def test_a_cpu_run_never_writes_into_reports_gpu(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert str(gpu_check.default_out("cpu")) == "bench-results/gpu-check-cpu"
    assert str(gpu_check.default_out("cuda")) == "reports/gpu"
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert str(gpu_check.default_out("cuda")) == "/tmp/device-out"


def test_cuda_without_a_gpu_is_one_line_and_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cuda", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu-check: --device cuda but torch")
