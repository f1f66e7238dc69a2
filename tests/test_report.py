"""Comparison report: tables, emulation marks, ratios, conclusions from the numbers, figures, summary, stage.

The fixture (tests/fixtures/report) is a CPU run: fp16 without native fp16 arithmetic
(``speed_comparable: false``), fp8 emulated, METEOR null (no Java) for fp8 only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from r2gen.config import PRECISIONS
from r2gen.errors import R2GenError
from r2gen.compare.derived import throughput_ratio, time_reduction
from r2gen.compare.runs import load_run
from r2gen.compare.single import build_report, render_markdown

FIXTURE = Path(__file__).parent / "fixtures" / "report"
LABELS = {"fp32": "fp32", "fp16": "fp16 (numerics only)", "bf16": "bf16", "fp8": "fp8 (emulated)"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A writable copy of the fixture run (metrics/, dvclive/train/)."""
    shutil.copytree(FIXTURE, tmp_path / "run")
    return tmp_path / "run"


def patch(root: Path, kind: str, name: str, **changes) -> None:
    """Change keys of metrics/<kind>/<name>.json; a value of ... deletes the key."""
    path = root / "metrics" / kind / f"{name}.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def load(root: Path):
    return load_run(root / "metrics", root / "dvclive" / "train", PRECISIONS)


def markdown(root: Path, headline: str = "bf16") -> str:
    return render_markdown(load(root), headline)


def section(md: str, heading: str) -> str:
    """The text under the heading line that starts with ``heading``, up to the next heading of its level or higher."""
    level = heading.split(" ")[0]
    start = re.search(rf"^{re.escape(heading)}.*$", md, flags=re.M).end()
    nxt = re.search(rf"^#{{1,{len(level)}}} ", md[start:], flags=re.M)
    return md[start : start + nxt.start()] if nxt else md[start:]


def precision_rows(md: str) -> dict[str, list[str]]:
    """First cells of the table rows of each table that lists precisions, keyed by its header line."""
    tables: dict[str, list[str]] = {}
    header = None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        if header is None:
            header = line
            tables[header] = []
        elif not line.startswith("|---"):
            tables[header].append(line.split("|")[1].strip())
    return {h: rows for h, rows in tables.items() if h.startswith("| precision")}


def row(md: str, heading: str, label: str) -> list[str]:
    for line in section(md, heading).splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} under {heading!r}")


def conclusion_lines(md: str) -> list[str]:
    return [ln[2:] for ln in section(md, "## Conclusions").splitlines() if ln.startswith("- ")]


def test_report_has_every_table_and_every_precision_row(work):
    md = markdown(work)
    for heading in ("## Conclusions", "## Environment", "## Training efficiency", "## Memory", "## Quality",
                    "### Losses and numerical stability", "### Gradient norm and loss scale",
                    "### Model FLOPs utilisation", "### FP8 per-layer numerics", "## Figures"):
        assert heading + "\n" in md
    tables = precision_rows(md)
    assert len(tables) == 7  # precision setup, efficiency, MFU, memory, quality, losses, gradients
    for header, rows in tables.items():
        assert [r for r in rows if not r.startswith("image-blind")] == list(LABELS.values()), header
    assert any(r.startswith("image-blind baseline") for r in tables[next(h for h in tables if "BLEU_4" in h)])
    assert "| torch / CUDA / Transformer Engine | 2.14.1+cpu / n/a / n/a |" in md


def test_emulated_and_numerics_only_runs_are_marked_in_every_table(work):
    md = markdown(work)
    for header, rows in precision_rows(md).items():
        assert "fp8" not in rows and "fp16" not in rows, header
        assert "fp8 (emulated)" in rows and "fp16 (numerics only)" in rows, header
    for label in ("fp8 (emulated)", "fp16 (numerics only)"):
        assert row(md, "## Training efficiency", label)[-1] == "numerics only — not a speed measurement"
    assert row(md, "## Training efficiency", "bf16")[-1] == "measured"


def test_throughput_ratio_and_time_reduction_match_a_hand_checked_example(work):
    assert throughput_ratio(18.0, 10.0) == pytest.approx(1.8)
    assert time_reduction(100 / 1.8, 100.0) == pytest.approx(0.4444, abs=1e-4)  # 1.8x throughput: 44.4% less time
    assert time_reduction(150.0, 100.0) == pytest.approx(-0.5)
    assert throughput_ratio(None, 10.0) is None and time_reduction(50.0, 0.0) is None
    patch(work, "train", "fp32", samples_per_s=10.0, train_seconds=100.0)
    patch(work, "train", "bf16", samples_per_s=18.0, train_seconds=55.56)
    md = markdown(work)
    cells = row(md, "## Training efficiency", "bf16")
    assert cells[7:9] == ["1.80×", "44.4%"]
    assert row(md, "## Training efficiency", "fp32")[7:9] == ["1.00×", "0.0%"]
    assert "**bf16 is the fastest** precision here: 18.00 samples/s, 1.80× fp32's throughput and 44.4% less " \
           "training time." in conclusion_lines(md)
    assert "faster" not in " ".join(conclusion_lines(md)).replace("fastest", "")


def test_emulated_run_is_never_named_fastest(work):
    patch(work, "train", "fp8", samples_per_s=100.0, train_seconds=10.0)
    patch(work, "train", "fp16", samples_per_s=50.0, train_seconds=20.0)
    lines = conclusion_lines(markdown(work))
    fastest = [ln for ln in lines if "is the fastest" in ln]
    assert len(fastest) == 1 and fastest[0].startswith("**bf16 is the fastest**")
    assert not any(("fp8" in ln or "fp16" in ln) and "throughput" in ln for ln in lines)
    assert any(ln.startswith("fp16 (numerics only), fp8 (emulated): numerics only — not a speed measurement")
               for ln in lines)


def test_conclusions_change_when_the_fastest_precision_changes(work):
    before = conclusion_lines(markdown(work))
    patch(work, "train", "fp32", samples_per_s=9.94, train_seconds=67.8)
    patch(work, "train", "bf16", samples_per_s=6.21, train_seconds=106.3)
    after = conclusion_lines(markdown(work))
    assert before[0].startswith("**bf16 is the fastest**")
    assert after[0].startswith("**fp32 is the fastest**")
    assert "bf16: 0.62× fp32's throughput, 56.8% more training time." in after


def test_quality_conclusions_follow_the_numbers(work):
    lines = conclusion_lines(markdown(work))
    assert any(ln.startswith("bf16 vs fp32:") and "all within what a single seed can tell" in ln for ln in lines)
    assert any(ln.startswith("fp8 (emulated) vs fp32:") and "beyond single-seed noise: test loss higher" in ln
               for ln in lines)
    assert any(ln.startswith("Single seed, 32 test studies: score differences below 0.177") for ln in lines)
    patch(work, "eval", "bf16", CE_F1=0.150)  # below fp32 by 0.263 and below the baseline (0.221)
    lines = conclusion_lines(markdown(work))
    assert any(ln.startswith("bf16 vs fp32:") and "beyond single-seed noise: CE_F1 lower" in ln for ln in lines)
    assert any(ln.startswith("At or below the image-blind baseline: bf16;") for ln in lines)
    assert row(markdown(work), "### Report quality", "bf16")[-1] == "-0.071"


def test_meteor_null_shows_na_with_the_recorded_reason(work):
    md = markdown(work)
    quality = section(md, "### Report quality on the test split (32 studies)")
    assert row(md, "### Report quality", "fp8 (emulated)")[5] == "n/a [1]"
    assert row(md, "### Report quality", "fp32")[5] == "0.141"
    assert "[1] METEOR n/a for fp8 (emulated): java not found on PATH (METEOR 1.5 needs Java 8+)" in quality
    patch(work, "eval", "fp8", METEOR_error=...)
    assert "[1] METEOR n/a for fp8 (emulated): no reason recorded" in markdown(work)


@pytest.mark.parametrize("missing", ["metrics/eval/bf16.json", "metrics/train/fp8.json", "metrics/eval/baseline.json",
                                     "dvclive/train/fp16/plots/metrics/train/loss.tsv"])
def test_missing_input_file_raises_an_error_naming_it(work, missing):
    (work / missing).unlink()
    with pytest.raises(R2GenError, match=re.escape(str(work / missing)) + r" not found; run `dvc repro`"):
        load(work)


def test_metrics_of_another_precision_are_refused(work):
    patch(work, "eval", "bf16", precision="fp16")
    with pytest.raises(R2GenError, match=r"bf16\.json holds results of precision 'fp16', not 'bf16'"):
        load(work)


def test_unrecorded_values_show_na_and_invent_nothing(work):
    # A value that was not recorded is null in the record (a missing key is an error: the next test).
    patch(work, "train", "bf16", speed_comparable=None, note=None, transformer_engine=None, peak_memory_fraction=None,
          samples_per_s=None, baseline_rss_bytes=None)
    patch(work, "eval", "fp16", CIDEr=None, test_studies=None, reports_per_s=None)
    (work / "dvclive/train/bf16/plots/metrics/epoch/val_loss.tsv").unlink()  # validation is optional
    md = markdown(work)
    eff = row(md, "## Training efficiency", "bf16")
    assert eff[6:9] == ["n/a", "n/a", "36.2%"]  # no samples/s: no ratio; the time is still known
    assert row(md, "### Report quality", "fp16 (numerics only)")[7] == "n/a"
    assert row(md, "## Memory", "bf16")[3] == "n/a"
    assert "bf16: n/a" in md  # the setup's note and the machine table's differing device memory
    assert not any("bf16 is the fastest" in ln for ln in conclusion_lines(md))
    assert conclusion_lines(md)[0].startswith("**fp32 (")  # the only speed measurement left


@pytest.mark.parametrize("kind,name,changes,problem", [
    ("train", "bf16", {"samples_per_s": ...}, "missing keys samples_per_s"),
    ("eval", "fp16", {"CIDEr": ..., "cider": 0.3}, "missing keys CIDEr; unknown keys cider"),
    ("eval", "baseline", {"CE_F1": ...}, "missing keys CE_F1"),
])
def test_a_missing_or_renamed_key_is_an_error_naming_the_file_never_a_blank_column(work, kind, name, changes, problem):
    patch(work, kind, name, **changes)
    with pytest.raises(R2GenError, match=re.escape(f"{work}/metrics/{kind}/{name}.json: not the ") + ".*"
                       + re.escape(f"({problem}); rerun `dvc repro`")):
        load(work)


def test_build_report_writes_valid_pngs_and_the_headline_summary(work, tmp_path):
    out = tmp_path / "reports"
    summary = build_report(load(work), "bf16", out)
    title = (out / "precision_report.md").read_text().splitlines()[0]
    assert title == "# Precision comparison: R2Gen at fp32, fp16, bf16, fp8"
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["loss_curves.png", "memory.png", "quality.png", "throughput.png"]
    for name in names:
        data = (out / "figures" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 400 and height > 300, name
    bf16_train = json.loads((FIXTURE / "metrics/train/bf16.json").read_text())
    bf16_eval = json.loads((FIXTURE / "metrics/eval/bf16.json").read_text())
    assert summary["precision"] == "bf16" and summary["backend"] == "native" and summary["speed_comparable"]
    for key in ("BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE_F1", "test_loss", "reports_per_s"):
        assert summary[key] == bf16_eval[key], key
    for key in ("samples_per_s", "peak_memory_bytes", "train_loss", "batch_size"):
        assert summary[key] == bf16_train[key], key
    assert summary["throughput_ratio_vs_fp32"] == pytest.approx(9.94 / 6.21)
    assert summary["CE_F1_over_baseline"] == pytest.approx(0.400 - 0.221)
    assert all(not isinstance(v, (dict, list)) for v in summary.values())  # flat for `dvc exp show`
    json.dumps(summary, allow_nan=False)


def test_summary_of_an_emulated_headline_has_no_speed(work):
    summary = build_report(load(work), "fp8", work / "reports")
    assert summary["backend"] == "emulated" and summary["speed_comparable"] is False
    assert summary["samples_per_s"] is None and summary["throughput_ratio_vs_fp32"] is None
    assert summary["METEOR"] is None and summary["BLEU_4"] == 0.097
    with pytest.raises(R2GenError, match="headline precision 'fp64'"):
        build_report(load(work), "fp64", work / "reports")


def test_history_reads_dvclive_files_with_and_without_timestamps(work):
    run = load(work)
    assert "timestamp" in (work / "dvclive/train/fp32/plots/metrics/train/loss.tsv").read_text().splitlines()[0]
    for p in PRECISIONS:
        assert run.step_loss[p].steps == tuple(range(40))
        assert run.val_loss[p].steps == (39,)
    assert run.step_loss["fp32"].values[0] == 5.2814


def test_stage_writes_report_summary_and_release_model(work):
    (work / "params.yaml").write_text("precision: bf16\n")
    (work / "models" / "bf16").mkdir(parents=True)
    (work / "models" / "bf16" / "model.pt").write_bytes(b"bf16 weights")
    cmd = [sys.executable, str(REPO / "stages" / "report.py"), "metrics", "dvclive/train", "models", "reports"]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (work / "models/release/model.pt").read_bytes() == b"bf16 weights"
    assert json.loads((work / "reports/summary.json").read_text())["precision"] == "bf16"
    assert (work / "reports/precision_report.md").exists() and (work / "reports/figures/quality.png").exists()

    (work / "params.yaml").write_text("precision: fp8\n")
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("error: models/fp8/model.pt not found (params `precision` is "
                                                    "fp8); run `dvc repro` to train it")


def test_mfu_rows_claim_utilisation_only_for_speed_measurements(work):
    rows = {r.split(" | ")[0].lstrip("| "): r for r in section(markdown(work), "### Model FLOPs utilisation").splitlines()
            if r.startswith("| ") and not r.startswith("| precision") and not r.startswith("|--")}
    train = {p: json.loads((work / "metrics" / "train" / f"{p}.json").read_text()) for p in LABELS}
    fp32 = train["fp32"]
    assert f"| {100 * fp32['mfu']:.1f}% |" in rows["fp32"]
    assert f"{fp32['flops_per_sample'] / 1e9:.4f}" in rows["fp32"]
    for p in ("fp16", "fp8"):
        assert "| no claim |" in rows[LABELS[p]] and "not a speed measurement" in rows[LABELS[p]]


def test_the_fp8_layer_table_is_listed_worst_first_and_drawn(work, tmp_path):
    from r2gen import layout
    from r2gen.fp8_table import write_table

    fp8 = json.loads((work / "metrics" / "train" / "fp8.json").read_text())
    rows = [{"epoch": e, "step": 1, "layer": name, "gemm_rel_error": err * e, "input_underflow": 0.25,
             "weight_underflow": 0.0, "grad_output_underflow": 0.5, "input_saturation": 0.0,
             "weight_saturation": 0.0, "grad_output_saturation": 0.125}
            for e in (1, 2) for name, err in (("encoder.a", 0.01), ("decoder.b", 0.04), ("decoder.c", 0.02))]
    write_table(layout.fp8_layers(work / "dvclive" / "train" / "fp8"), rows, fp8)
    md = markdown(work)
    fp8_part = section(md, "### FP8 per-layer numerics")
    listed = [ln.split(" | ")[0].lstrip("| ") for ln in fp8_part.splitlines() if ln.startswith("| `")]
    assert listed == ["`decoder.b`", "`decoder.c`", "`encoder.a`"]  # worst first, at the last epoch (2)
    assert "| `decoder.b` | 0.080 | 25.00% | 0.00% | 50.00% | 0.00% | 0.00% | 12.50% |" in fp8_part
    assert "epochs 1, 2" in fp8_part
    assert "Most elements lost at epoch 2: `encoder.a` (grad_output underflow 50.00%)" in fp8_part
    out = tmp_path / "reports"
    build_report(load_run(work / "metrics", work / "dvclive" / "train", list(LABELS)), "fp32", out)
    assert (out / "figures" / "fp8_layers.png").stat().st_size > 1000
