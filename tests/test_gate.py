"""The metrics gate's rules: directions, tolerances, missing metrics, ratios to fp32."""

from __future__ import annotations


import pytest
import yaml

from helpers import REPO
from r2gen import layout
from r2gen.errors import ConfigError
from r2gen.gate import evaluate, load_rules, stated_reasons
from r2gen.records import EvalSummary, TrainSummary



def rules(*entries, precisions=("fp32", "fp16")):
    return load_rules({"precisions": list(precisions), "metrics": list(entries)})


def diff_of(**files):
    return {path: {k: {"old": o, "new": n} for k, (o, n) in keys.items()} for path, keys in files.items()}


BLEU = {"key": "BLEU_4", "file": "m/{precision}.json", "better": "higher", "tolerance": {"fp32": 0.02, "default": 0.05}}


def test_within_tolerance_passes_and_beyond_fails_per_precision():
    precisions, rs = rules(BLEU)
    diff = diff_of(**{"m/fp32.json": {"BLEU_4": (0.30, 0.285)}, "m/fp16.json": {"BLEU_4": (0.30, 0.24)}})
    checks = {c.name: c for c in evaluate(diff, precisions, rs)}
    assert checks["fp32 BLEU_4"].ok  # -0.015 within 0.02
    assert not checks["fp16 BLEU_4"].ok  # -0.06 beyond 0.05
    assert checks["fp16 BLEU_4"].line().startswith("FAIL fp16 BLEU_4: 0.3 -> 0.24")


def test_improvements_always_pass_and_direction_matters():
    precisions, rs = rules({"key": "test_loss", "file": "m/{precision}.json", "better": "lower", "relative": True,
                            "tolerance": 0.05}, precisions=("fp32",))
    assert evaluate(diff_of(**{"m/fp32.json": {"test_loss": (1.0, 0.5)}}), precisions, rs)[0].ok
    assert evaluate(diff_of(**{"m/fp32.json": {"test_loss": (1.0, 1.04)}}), precisions, rs)[0].ok
    assert not evaluate(diff_of(**{"m/fp32.json": {"test_loss": (1.0, 1.06)}}), precisions, rs)[0].ok


@pytest.mark.parametrize("old,new", [(0.3, None), (None, 0.3)])
def test_a_missing_metric_fails(old, new):
    precisions, rs = rules(BLEU, precisions=("fp32",))
    check = evaluate(diff_of(**{"m/fp32.json": {"BLEU_4": (old, new)}}), precisions, rs)[0]
    assert not check.ok and "missing" in check.note


def test_a_metric_absent_from_the_diff_fails():
    precisions, rs = rules(BLEU, precisions=("fp32",))
    assert not evaluate({}, precisions, rs)[0].ok


def test_a_metric_absent_on_both_sides_with_a_stated_reason_is_skipped_not_passed_silently():
    precisions, rs = rules(BLEU)
    reasons = {"m/fp32.json": {"BLEU_4": "METEOR not computed (meteor=False)"}}
    checks = {c.name: c for c in evaluate({}, precisions, rs, reasons)}
    assert checks["fp32 BLEU_4"].skipped and checks["fp32 BLEU_4"].ok
    assert checks["fp32 BLEU_4"].line().startswith("skip fp32 BLEU_4") and "meteor=False" in checks["fp32 BLEU_4"].line()
    assert not checks["fp16 BLEU_4"].ok  # no reason given: still a failure
    # A baseline value that disappears fails even with a reason: the gate cannot vouch for it.
    lost = evaluate(diff_of(**{"m/fp32.json": {"BLEU_4": (0.3, None)}}), precisions, rs, reasons)[0]
    assert not lost.ok and not lost.skipped and "meteor=False" in lost.line()


def test_throughput_is_gated_as_a_ratio_to_fp32():
    precisions, rs = rules({"key": "samples_per_s", "file": "m/{precision}.json", "better": "higher",
                            "relative": True, "tolerance": 0.5, "ratio_to": "fp32"})
    # The whole machine got 3x slower: ratios unchanged, the gate passes.
    slow = diff_of(**{"m/fp32.json": {"samples_per_s": (60, 20)}, "m/fp16.json": {"samples_per_s": (15, 5)}})
    (check,) = evaluate(slow, precisions, rs)
    assert check.name == "fp16 samples_per_s/fp32" and check.ok
    # fp16 alone collapsed to a tenth: fails.
    broken = diff_of(**{"m/fp32.json": {"samples_per_s": (60, 60)}, "m/fp16.json": {"samples_per_s": (15, 1.5)}})
    assert not evaluate(broken, precisions, rs)[0].ok


def test_malformed_gate_file_is_a_config_error():
    with pytest.raises(ConfigError, match="better"):
        rules({"key": "x", "file": "f", "better": "up", "tolerance": 1})
    with pytest.raises(ConfigError, match="unknown field"):
        rules({"key": "x", "file": "f", "better": "higher", "tolerance": 1, "tolerence": 2})


def test_the_committed_gate_file_parses_and_covers_every_issue_metric():
    precisions, rs = load_rules(yaml.safe_load((REPO / "metrics_gate.yaml").read_text()))
    assert precisions == ["fp32", "fp16", "bf16", "fp8"]
    keys = {r.key for r in rs}
    assert {"BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE_F1", "test_loss", "peak_memory_bytes",
            "nonfinite_steps", "samples_per_s"} <= keys
    for r in rs:  # lower precisions never gated tighter than fp32
        assert r.allowed("fp16") >= r.allowed("fp32") and r.allowed("fp8") >= r.allowed("fp32")


def test_the_committed_gate_file_names_the_layouts_files_and_their_records_keys():
    precisions, rs = load_rules(yaml.safe_load((REPO / "metrics_gate.yaml").read_text()))
    for r in rs:
        for p in precisions:
            record = {layout.train_summary(p).as_posix(): TrainSummary,
                      layout.eval_summary(p).as_posix(): EvalSummary}.get(r.path(p))
            assert record is not None, f"{r.key}: {r.path(p)} is not a metrics file of the layout"
            assert r.key in record.keys(), f"{r.key} is not a key of {record.__name__}"


def test_stated_reasons_come_from_the_workspace_files_error_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m/fp32.json").write_text('{"METEOR": null, "METEOR_error": "java not found"}')
    (tmp_path / "m/fp16.json").write_text("not json")
    precisions, rs = rules({**BLEU, "key": "METEOR"}, BLEU)
    assert stated_reasons(rs, precisions) == {"m/fp32.json": {"METEOR": "java not found"}}
