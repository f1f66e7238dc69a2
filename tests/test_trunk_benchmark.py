"""benchmarks.trunk on a toy ResNet: every figure is there, and the folded eval path is the same function."""

from __future__ import annotations

import json

import pytest

from benchmarks import trunk


def test_trunk_benchmark_reports_layouts_folding_and_the_time_shares(tmp_path, capsys):
    out = tmp_path / "trunk.json"
    assert trunk.main(["--name", "resnet10", "--width", "8", "--size", "32", "--batch", "2", "--rounds", "2",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["seconds"]) == {"train_nchw", "train_channels_last", "eval_modules", "eval_folded"}
    assert all(len(v["runs"]) == 2 and v["median"] > 0 for v in r["seconds"].values())
    assert all(v > 0 for v in r["gflops"].values()) and set(r["ratios"]) == {
        "channels_last/nchw (train)", "folded/modules (eval)"}
    assert r["eval_max_relative_difference"] < 1e-5
    shares = r["train_step_profile"]["shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["convolution"] > 0 and shares["batch_norm"] > 0
    assert r["train_step_profile"]["conv_only_ceiling"] == pytest.approx(1 / shares["convolution"])
    assert "convolutions alone would be" in capsys.readouterr().out
