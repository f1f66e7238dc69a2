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


@pytest.mark.parametrize("old,new", [(0.3, None), (None, None)])
def test_a_missing_metric_fails(old, new):
    precisions, rs = rules(BLEU, precisions=("fp32",))
    check = evaluate(diff_of(**{"m/fp32.json": {"BLEU_4": (old, new)}}), precisions, rs)[0]
    assert not check.ok and "missing" in check.note
    # (None, 0.3), a metric the baseline lacks: skipped with the reason (tests/test_instruments.py)


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


# ---------------------------------------------------------------------------------- machine-dependent metrics
SPEED = {"key": "samples_per_s", "file": "metrics/train/{precision}.json", "better": "higher", "relative": True,
         "tolerance": 0.5, "ratio_to": "fp32", "measures": "speed"}
MEMORY = {"key": "peak_memory_bytes", "file": "metrics/train/{precision}.json", "better": "lower", "relative": True,
          "tolerance": 0.2, "measures": "memory"}
AVX2 = ("cpu", "AMD EPYC", "AVX2")
AVX512 = ("cpu", "AMD EPYC", "AVX512_BF16")


def train_diff(values: dict[str, tuple], machines: dict[str, tuple[tuple, tuple]],
               comparable: dict[str, tuple[bool, bool]] | None = None) -> dict:
    """A dvc metrics diff of metrics/train/<p>.json: {p: (old, new)} of ``key``, the machines and speed flags."""
    diff = {}
    for p, (key, old, new) in values.items():
        (o_dev, o_name, o_cpu), (n_dev, n_name, n_cpu) = machines[p]
        flags = (comparable or {}).get(p, (True, True))
        diff[f"metrics/train/{p}.json"] = {key: {"old": old, "new": new}, "device": {"old": o_dev, "new": n_dev},
                                           "device_name": {"old": o_name, "new": n_name},
                                           "cpu_capability": {"old": o_cpu, "new": n_cpu},
                                           "speed_comparable": {"old": flags[0], "new": flags[1]}}
    return diff


def test_speed_on_the_same_machine_is_gated_and_a_real_2x_slowdown_fails():
    precisions, rs = rules(SPEED, precisions=("fp32", "bf16"))
    same = {"fp32": (AVX512, AVX512), "bf16": (AVX512, AVX512)}
    slow = train_diff({"fp32": ("samples_per_s", 90.0, 90.0), "bf16": ("samples_per_s", 120.0, 40.0)}, same)
    (check,) = evaluate(slow, precisions, rs)
    assert not check.ok and not check.skipped and check.name == "bf16 samples_per_s/fp32"
    fine = train_diff({"fp32": ("samples_per_s", 90.0, 60.0), "bf16": ("samples_per_s", 120.0, 80.0)}, same)
    assert evaluate(fine, precisions, rs)[0].ok  # the whole host 1.5x slower: the ratio holds


def test_speed_of_a_numerics_only_run_is_skipped_with_the_reason_not_gated():
    precisions, rs = rules(SPEED, precisions=("fp32", "fp16"))
    same = {"fp32": (AVX2, AVX2), "fp16": (AVX2, AVX2)}
    loaded = train_diff({"fp32": ("samples_per_s", 90.0, 90.0), "fp16": ("samples_per_s", 30.0, 8.6)}, same,
                        {"fp16": (False, False)})
    (check,) = evaluate(loaded, precisions, rs)
    assert check.ok and check.skipped
    assert "fp16 is numerics only in the baseline and the workspace, not a speed measurement" in check.line()
    one_side = train_diff({"fp32": ("samples_per_s", 90.0, 90.0), "fp16": ("samples_per_s", 30.0, 8.6)}, same,
                          {"fp16": (False, True)})
    assert evaluate(one_side, precisions, rs)[0].skipped


def test_speed_and_memory_on_another_kind_of_machine_are_skipped_quality_still_gated():
    precisions, rs = rules(MEMORY, SPEED, BLEU | {"file": "metrics/eval/{precision}.json"}, precisions=("fp32", "bf16"))
    moved = {"fp32": (AVX2, AVX512), "bf16": (AVX2, AVX512)}
    diff = train_diff({"fp32": ("peak_memory_bytes", 100, 100), "bf16": ("peak_memory_bytes", 100, 124)}, moved)
    diff["metrics/train/fp32.json"]["samples_per_s"] = {"old": 90.0, "new": 90.0}
    diff["metrics/train/bf16.json"]["samples_per_s"] = {"old": 30.0, "new": 5.0}
    diff.update(diff_of(**{"metrics/eval/fp32.json": {"BLEU_4": (0.3, 0.3)}, "metrics/eval/bf16.json": {"BLEU_4": (0.3, 0.2)}}))
    checks = {c.name: c for c in evaluate(diff, precisions, rs)}
    for name in ("fp32 peak_memory_bytes", "bf16 peak_memory_bytes", "bf16 samples_per_s/fp32"):
        assert checks[name].skipped, name
    assert "bf16 ran on another kind of machine (AMD EPYC (AVX2) in the baseline, AMD EPYC (AVX512_BF16) here)" \
        in checks["bf16 peak_memory_bytes"].line()
    assert not checks["bf16 BLEU_4"].ok  # quality does not depend on the machine kind: still gated


def test_memory_on_the_same_machine_is_gated():
    precisions, rs = rules(MEMORY, precisions=("fp32",))
    diff = train_diff({"fp32": ("peak_memory_bytes", 100, 130)}, {"fp32": (AVX2, AVX2)})
    assert not evaluate(diff, precisions, rs)[0].ok


def test_a_run_that_records_no_machine_is_compared_not_excused():
    precisions, rs = rules(MEMORY, precisions=("fp32",))
    diff = {"metrics/train/fp32.json": {"peak_memory_bytes": {"old": 100, "new": 130}}}
    assert not evaluate(diff, precisions, rs)[0].ok


@pytest.mark.parametrize("entry", [{**MEMORY, "measures": "time"}, "BLEU_4", {"file": "m.json", "better": "higher",
                                                                              "tolerance": 0.1}])
def test_a_malformed_gate_entry_is_a_config_error(entry):
    with pytest.raises(ConfigError):
        rules(entry)


def test_the_committed_gate_marks_speed_and_memory_as_machine_dependent():
    _, rs = load_rules(yaml.safe_load((REPO / "metrics_gate.yaml").read_text()))
    measures = {r.key: r.measures for r in rs}
    assert measures["samples_per_s"] == "speed" and measures["peak_memory_bytes"] == "memory"
