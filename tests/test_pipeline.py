"""The real DVC commands on a copy of this repository: repro, exp run, exp show, the metrics gate.

These run `dvc` as a user would, in a temporary git repository holding the working tree, with the
sample data pulled from the in-repo remote. Marked `pipeline` (minutes, not seconds).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import TINY, copy_repo, sh

from r2gen.config import PRECISIONS

pytestmark = pytest.mark.pipeline


def declared_outputs(repo: Path) -> list[Path]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return [repo / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("pipeline"), TINY)
    sh(["dvc", "repro"], repo)
    # As in this repository: dvc.lock and the small cache: false outputs are committed, so that
    # `dvc exp run --temp` starts from a commit where the trained stages are up to date.
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "repro"], repo)
    return repo


def test_repro_writes_every_declared_output_and_metric(tiny_repo):
    missing = [p for p in declared_outputs(tiny_repo) if not p.exists()]
    assert missing == []
    status = sh(["dvc", "status", "--json"], tiny_repo).stdout
    assert json.loads(status) == {}
    for p in PRECISIONS:
        train = json.loads((tiny_repo / f"metrics/train/{p}.json").read_text())
        assert {"samples_per_s", "peak_memory_bytes", "backend", "train_loss", "val_loss", "nonfinite_steps",
                "batch_size", "device", "speed_comparable"} <= set(train)
        evaluation = json.loads((tiny_repo / f"metrics/eval/{p}.json").read_text())
        assert {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE_precision", "CE_recall",
                "CE_F1", "test_loss", "reports_per_s"} <= set(evaluation)
        assert evaluation["METEOR"] is None and evaluation["METEOR_error"]  # meteor: false in TINY
        preds = (tiny_repo / f"predictions/{p}.jsonl").read_text().splitlines()
        assert len(preds) == evaluation["test_studies"] and set(json.loads(preds[0])) == {"id", "reference", "generated"}
    assert json.loads((tiny_repo / "metrics/train/fp8.json").read_text())["backend"] == "emulated"
    report = (tiny_repo / "reports/precision_report.md").read_text()
    assert "fp8 (emulated)" in report
    summary = json.loads((tiny_repo / "reports/summary.json").read_text())
    assert summary["precision"] == "fp32"
    assert sorted(p.name for p in (tiny_repo / "reports/figures").glob("*.png"))


def test_exp_run_changes_the_headline_only_and_exp_show_lists_it(tiny_repo):
    out = sh(["dvc", "exp", "run", "--temp", "-S", "precision=fp8"], tiny_repo).stdout
    for stage in ("prepare", "build_tokenizer", "train@fp32", "evaluate@fp8"):
        assert f"Running stage '{stage}'" not in out, stage
    assert "Running stage 'report'" in out
    rows = json.loads(sh(["dvc", "exp", "show", "--json"], tiny_repo).stdout)
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    headlines = []
    for exp in exps:
        for rev in exp.get("revs", []):
            data = rev.get("data") or {}
            summary = (data.get("metrics") or {}).get("reports/summary.json", {}).get("data", {})
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            headlines.append((params.get("precision"), summary.get("precision")))
    assert ("fp8", "fp8") in headlines


def test_a_per_precision_param_invalidates_only_that_branch(tiny_repo, tmp_path):
    repo = tmp_path / "branch"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["fp8"]["batch_size"] = params["train"]["fp8"]["batch_size"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Only the fp8 training is out of date; its evaluation and the report follow once its model changes.
    changed = set(json.loads(sh(["dvc", "status", "--json"], repo).stdout))
    assert changed == {"train@fp8"}


def test_the_gate_passes_unchanged_metrics_and_fails_a_planted_regression(tiny_repo, tmp_path):
    repo = tmp_path / "gate"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    ok = sh(["r2gen", "check-metrics"], repo, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "skip fp32 METEOR" in ok.stdout and "meteor=False" in ok.stdout  # off in TINY: said, not hidden

    metrics_file = repo / "metrics/eval/fp32.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["BLEU_4"] = metrics["BLEU_4"] - 0.2
    metrics_file.write_text(json.dumps(metrics))
    bad = sh(["r2gen", "check-metrics"], repo, check=False)
    assert bad.returncode == 1
    assert any(line.startswith("FAIL fp32 BLEU_4") for line in bad.stdout.splitlines()), bad.stdout

    (repo / "metrics/train/fp16.json").unlink()
    gone = sh(["r2gen", "check-metrics"], repo, check=False)
    assert gone.returncode == 1
    assert "FAIL fp16 val_loss" in gone.stdout and "missing" in gone.stdout


@pytest.mark.slow
def test_default_pipeline_reproduces_the_committed_metrics(tmp_path):
    """The real default pipeline on the sample, then the gate against the committed baseline."""
    repo = copy_repo(tmp_path / "default")
    sh(["dvc", "repro"], repo, timeout=3600)
    gate = sh(["r2gen", "check-metrics"], repo, check=False)
    print(gate.stdout)
    assert gate.returncode == 0, gate.stdout + gate.stderr
