"""Multi-seed comparison: t distribution, Welch's test, `dvc exp show --json` parsing, grouping by batch
mode, what survives at equal batch, speed claims, time to quality, and the written report.

tests/fixtures/experiments/exp_show.json is a 3-seed x {equal, max} grid with planted effects (see
make_fixture.py next to it); exp_show_dvc3.67.json is real `dvc exp show --json` output of a tiny repo;
dvclive/ there is one run's history in dvclive's own format.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest

from r2gen.config import PRECISIONS
from r2gen.compare.analysis import METRICS, RATIOS, SPEED, Metric, analyse
from r2gen.compare.dvclive import History, load_history
from r2gen.compare.exp_show import parse_exp_show
from r2gen.compare.grid import build_report, render_markdown
from r2gen.compare.grid_findings import conclusions
from r2gen.compare.grouping import group_experiments
from r2gen.compare.labels import SPEED_FLAG
from r2gen.compare.stats import betainc, detectable_difference, one_sample_test, t_critical, t_two_sided_p, welch_test
from r2gen.compare.ttq import QualityTarget, time_to_quality
from r2gen.errors import R2GenError
from r2gen.records import EvalSummary, TrainSummary

FIXTURE = Path(__file__).parent / "fixtures" / "experiments"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fixture_rows() -> list:
    return json.loads((FIXTURE / "exp_show.json").read_text())


def fixture_histories(experiments) -> dict:
    """(rev, precision) -> History, read through the same path-based reader the CLI uses on git."""
    stored = json.loads((FIXTURE / "histories.json").read_text())

    def reader(rev: str, p: str):
        prefix = f"dvclive/train/{p}/plots/metrics/epoch/"
        return lambda path: stored[rev][p].get(path.removeprefix(prefix).removesuffix(".tsv"))

    return {(e.rev, p): load_history(reader(e.rev, p), f"dvclive/train/{p}", "val_loss")
            for e in experiments for p in PRECISIONS}


@pytest.fixture(scope="module")
def grid():
    experiments, skipped = parse_exp_show(fixture_rows())
    return analyse(experiments, fixture_histories(experiments), skipped=skipped)


def group(analysis, mode: str):
    return next(r for r in analysis.groups if r.group.label == f"batch_mode={mode}")


def exp_row(name: str, seed: int, losses: dict[str, float], state: str = "success", **params) -> dict:
    """One experiment as `dvc exp show --json` lists it, with test_loss (and speed) per precision."""
    metrics = {}
    for p, loss in losses.items():
        metrics[f"metrics/train/{p}.json"] = {"data": {"precision": p, "backend": "native", "batch_size": 16,
                                                       "steps": 100, "samples_per_s": 10.0, "train_seconds": 50.0}}
        metrics[f"metrics/eval/{p}.json"] = {"data": {"precision": p, "test_loss": loss}}
    rev = hashlib.sha1(f"{name} {seed}".encode()).hexdigest()
    return {"revs": [{"rev": rev, "name": name, "error": None, "experiments": None,
                      "data": {"rev": rev, "params": {"params.yaml": {"data": {"seed": seed, **params}}},
                               "metrics": metrics}}],
            "executor": {"state": state, "name": "dvc-task", "local": None}, "name": name}


def exp_show(*experiments: dict) -> list:
    return [{"rev": "workspace", "name": None, "error": None, "experiments": None, "data": {}},
            {"rev": "b" * 40, "name": "main", "error": None, "experiments": list(experiments), "data": {}}]


# ---------------------------------------------------------------------------------------- t distribution
def test_t_distribution_matches_the_tables():
    assert t_critical(1) == pytest.approx(12.706205, abs=1e-5)
    assert t_critical(2) == pytest.approx(4.302653, abs=1e-5)
    assert t_critical(4) == pytest.approx(2.776445, abs=1e-5)
    assert t_critical(30) == pytest.approx(2.042272, abs=1e-5)
    assert t_critical(1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| > 1) = 1/2
    assert t_two_sided_p(0.0, 3) == pytest.approx(1.0)


def test_incomplete_beta_matches_the_binomial_identity():
    # I_x(a, b) = P(Binomial(a + b - 1, x) >= a) for integer a, b
    for a, b, x in [(2, 3, 0.4), (1, 1, 0.7), (5, 2, 0.9), (3, 7, 0.05)]:
        n = a + b - 1
        exact = sum(math.comb(n, k) * x**k * (1 - x) ** (n - k) for k in range(a, n + 1))
        assert betainc(a, b, x) == pytest.approx(exact, rel=1e-12)


def test_welch_matches_published_examples():
    # The two worked examples of the Wikipedia article "Welch's t-test":
    # t -2.46, df 24.9, p 0.021 and t -1.57, df 9.9, p 0.149
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    d = welch_test(a1, a2)
    assert (round(d.df, 1), round(d.p_value, 3)) == (25.0, 0.021) and d.exceeds
    assert d.ci[0] < d.diff < d.ci[1] < 0
    b1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
    b2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5,
          23.5, 21.5, 21.8]
    d = welch_test(b1, b2)
    assert (round(d.df, 1), round(d.p_value, 3)) == (9.9, 0.149) and not d.exceeds
    assert d.ci[0] < 0 < d.ci[1]


def test_noise_alone_is_rarely_flagged_and_a_large_planted_difference_always_is():
    rng = random.Random(0)
    trials = 2000
    noise = sum(welch_test([rng.gauss(0, 1) for _ in range(3)], [rng.gauss(0, 1) for _ in range(3)]).exceeds
                for _ in range(trials))
    assert 0.015 * trials < noise < 0.06 * trials  # Welch at n=3 is a little conservative (about 3%)
    planted = sum(welch_test([rng.gauss(10, 1) for _ in range(3)], [rng.gauss(0, 1) for _ in range(3)]).exceeds
                  for _ in range(200))
    assert planted == 200


def test_degenerate_spreads_and_single_seeds():
    assert welch_test([1.0], [1.0, 2.0]) is None  # one seed: no spread to compare with
    assert welch_test([2.0, 2.0], [1.0, 1.0]).p_value == 0.0  # deterministic and different
    assert welch_test([1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    d = one_sample_test([1.8, 1.9, 1.7], 1.0)
    assert d.diff == pytest.approx(0.8) and d.exceeds and d.df == 2
    assert detectable_difference(3) == pytest.approx(2.776445 * math.sqrt(2 / 3), rel=1e-6)
    assert detectable_difference(1) is None


def test_every_metric_names_a_field_of_the_record_it_is_read_from():
    records = {"train": TrainSummary, "eval": EvalSummary}
    for m in METRICS:
        if m.source == "ratio":
            assert m.key in RATIOS and RATIOS[m.key][1] in TrainSummary.keys(), m.key
        else:
            assert m.key in records[m.source].keys(), m.key
    assert {m.key for m in SPEED if m.source == "ratio"} == set(RATIOS)
    with pytest.raises(KeyError, match="'samples_per_sec'"):  # a renamed field breaks the table at import
        Metric("samples_per_sec", "training samples/s", "train", "higher")
    with pytest.raises(KeyError, match="not a key of the training summary"):
        TrainSummary.key("samples_per_sec")


# ---------------------------------------------------------------------------------------- dvc exp show
def test_only_finished_experiments_are_read_and_the_rest_are_listed(grid):
    experiments, skipped = parse_exp_show(fixture_rows())
    assert len(experiments) == 6 and {e.seed for e in experiments} == {1, 2, 3}
    assert skipped == ["grid-8: queued", "grid-7: failed"]
    assert "workspace" not in {e.rev for e in experiments}  # the committed run is not a grid seed
    assert {e.params["train.common.batch_mode"] for e in experiments} == {"equal", "max"}
    assert experiments[0].train["bf16"]["backend"] == "native" and "BLEU_4" in experiments[0].eval["fp8"]


def test_real_dvc_output_of_experiments_run_in_the_workspace_is_read():
    # Recorded with DVC 3.67.1: `dvc exp run -S seed=.. -S train.common.batch_mode=..` four times in a tiny
    # repo training fp32 and fp16; workspace runs have no executor, the baseline commit has no metrics.
    rows = json.loads((FIXTURE / "exp_show_dvc3.67.json").read_text())
    experiments, skipped = parse_exp_show(rows, ("fp32", "fp16"))
    assert skipped == [] and len(experiments) == 4
    assert sorted((e.params["train.common.batch_mode"], e.seed) for e in experiments) == \
        [("equal", 1), ("equal", 2), ("max", 1), ("max", 2)]
    groups = group_experiments(experiments)
    assert [(g.label, g.seeds, g.equal_batch(("fp32", "fp16"))) for g in groups] == \
        [("batch_mode=equal", [1, 2], True), ("batch_mode=max", [1, 2], False)]


def test_an_experiment_missing_a_metrics_file_is_left_out_with_a_note():
    rows = fixture_rows()
    first = rows[1]["experiments"][1]["revs"][0]
    del first["data"]["metrics"]["metrics/eval/fp16.json"]
    experiments, skipped = parse_exp_show(rows)
    assert len(experiments) == 5
    assert f"{first['name']}: missing metrics/eval/fp16.json" in skipped


@pytest.mark.parametrize("not_exp_show", [{"rev": "workspace"}, [1, 2], "text"])
def test_input_that_is_not_exp_show_json_is_a_clear_error(not_exp_show):
    with pytest.raises(R2GenError, match="dvc exp show --json"):
        parse_exp_show(not_exp_show)


def test_grid_groups_by_batch_mode_and_checks_equal_batches_from_the_metrics(grid):
    assert [r.group.label for r in grid.groups] == ["batch_mode=equal", "batch_mode=max"]
    assert [r.equal_batch for r in grid.groups] == [True, False]
    assert group(grid, "max").group.seeds == [1, 2, 3]


def test_a_repeated_seed_counts_once_and_other_settings_make_their_own_group():
    losses = {"fp32": 1.0, "fp16": 1.0}
    rows = exp_show(exp_row("again", 1, losses, lr=1), exp_row("a", 1, losses, lr=1), exp_row("b", 2, losses, lr=1),
                    exp_row("c", 1, losses, lr=2))
    groups = group_experiments(parse_exp_show(rows, ("fp32", "fp16"))[0])
    assert [(g.label, g.seeds, g.duplicates) for g in groups] == [("lr=1", [1, 2], ("a",)), ("lr=2", [1], ())]


# ---------------------------------------------------------------------------------------- statistics
def test_planted_difference_is_flagged_and_noise_is_not():
    fp32, noisy, shifted = [1.00, 1.01, 0.99], [1.005, 0.995, 1.0], [1.10, 1.11, 1.09]
    rows = exp_show(*(exp_row(f"s{i}", i, {"fp32": fp32[i], "fp16": noisy[i], "fp8": shifted[i]}) for i in range(3)))
    experiments, _ = parse_exp_show(rows, ("fp32", "fp16", "fp8"))
    analysis = analyse(experiments, {}, precisions=("fp32", "fp16", "fp8"))
    cells = analysis.groups[0].cells["test_loss"]
    assert cells["fp32"].stat.mean == pytest.approx(1.0) and cells["fp32"].stat.std == pytest.approx(0.01)
    assert cells["fp32"].difference is None
    assert not cells["fp16"].difference.exceeds
    shifted_diff = cells["fp8"].difference
    assert shifted_diff.exceeds and shifted_diff.diff == pytest.approx(0.1)
    assert shifted_diff.ci[0] > 0 and shifted_diff.relative == pytest.approx(0.1)
    text = conclusions(analysis)
    assert any("fp8 test loss: +0.1 vs fp32" in c for c in text)
    assert not any("fp16 test loss" in c for c in text)


def test_one_seed_has_no_test_and_the_report_says_so():
    experiments, _ = parse_exp_show(exp_show(exp_row("s1", 1, {"fp32": 1.0, "fp16": 1.3})), ("fp32", "fp16"))
    analysis = analyse(experiments, {}, precisions=("fp32", "fp16"))
    assert analysis.groups[0].cells["test_loss"]["fp16"].difference is None
    assert conclusions(analysis)[0].startswith("Fewer than 2 seeds per group")


def test_max_batch_loss_gaps_do_not_survive_at_equal_batch_but_fp8s_own_gap_does(grid):
    text = "\n".join(conclusions(grid))
    for p in ("fp16 (numerics only)", "bf16"):
        assert f"[batch_mode=max] (batch or steps differ) {p} train loss (last epoch)" in text
        line = next(c for c in conclusions(grid) if c.startswith(f"[batch_mode=max] (batch or steps differ) {p} "
                                                                  "train loss"))
        assert "does not survive at equal batch" in line
    fp8 = next(c for c in conclusions(grid) if "max] (batch or steps differ) fp8 (emulated) train loss" in c)
    assert "survives at equal batch" in fp8 and "not survive" not in fp8
    equal = group(grid, "equal")
    assert equal.cells["train_loss"]["fp8"].difference.exceeds
    assert equal.cells["BLEU_4"]["fp8"].difference.diff < -0.03 and equal.cells["BLEU_4"]["fp8"].difference.exceeds
    assert not equal.cells["train_loss"]["fp16"].difference.exceeds
    assert not equal.cells["train_loss"]["bf16"].difference.exceeds


def test_throughput_ratio_is_measured_within_each_run(grid):
    equal = group(grid, "equal")
    expected = [e.train["bf16"]["samples_per_s"] / e.train["fp32"]["samples_per_s"] for e in equal.group.experiments]
    cell = equal.cells["throughput_ratio_vs_fp32"]["bf16"]
    assert list(cell.stat.values) == pytest.approx(expected)
    assert cell.difference.test == "one-sample" and cell.difference.exceeds
    # absolute speeds of different experiments also carry the machine's load: shown, never tested
    assert equal.cells["samples_per_s"]["bf16"].stat.n == 3 and equal.cells["samples_per_s"]["bf16"].difference is None
    reduction = equal.cells["time_reduction_vs_fp32"]["bf16"].stat
    assert reduction.mean == pytest.approx(0.43, abs=0.03)  # 1.76x the throughput is ~43% less time, not 76%


def test_runs_that_are_not_speed_measurements_carry_no_speed_numbers(grid):
    md = render_markdown(grid)
    for r in grid.groups:
        for p in ("fp16", "fp8"):
            for key in ("samples_per_s", "throughput_ratio_vs_fp32", "train_seconds", "time_reduction_vs_fp32"):
                assert r.cells[key][p].stat is None and r.cells[key][p].note == SPEED_FLAG
            assert r.ttq[p].seconds is None and r.ttq[p].reduction is None
        assert r.cells["peak_memory_bytes"]["fp8"].stat is not None  # memory is reported, labelled (emulated)
    assert "| training samples/s | fp8 (emulated) | numerics only — not a speed measurement |" in md
    assert "fp16 (numerics only), fp8 (emulated): numerics only" in md


# ---------------------------------------------------------------------------------------- time to quality
def dvclive_reader(*missing: str):
    """Reads the fixture's dvclive folder; files named in ``missing`` do not exist."""
    def read(path: str):
        file = FIXTURE / path
        return None if file.name in missing or not file.exists() else file.read_text()

    return read


def test_time_to_quality_from_a_logged_dvclive_history():
    history = load_history(dvclive_reader(), "dvclive/train/fp32", "val_loss")
    assert history.steps == (13, 27, 41, 55, 69, 83) and history.values[-1] == 0.489
    reached = time_to_quality(history, 0.52, QualityTarget(), summary={})
    assert (reached.step, reached.samples, reached.seconds, reached.estimated) == (69, 1120, 20.71, False)


def test_time_to_quality_is_estimated_from_the_summary_when_not_logged_per_epoch():
    history = load_history(dvclive_reader("train_seconds.tsv", "samples.tsv"), "dvclive/train/fp32", "val_loss")
    summary = {"steps": 84, "global_batch_size": 16, "batch_size": 16, "train_seconds": 25.2}
    reached = time_to_quality(history, 0.52, QualityTarget(), summary)
    assert reached.step == 69 and reached.estimated
    assert reached.samples == 70 * 16  # optimizer steps done x batch
    assert reached.seconds == pytest.approx(25.2 * 70 / 84)


def test_logged_samples_are_used_even_when_seconds_must_be_estimated():
    history = load_history(dvclive_reader("train_seconds.tsv"), "dvclive/train/fp32", "val_loss")
    reached = time_to_quality(history, 0.52, QualityTarget(), {"steps": 84, "batch_size": 16, "train_seconds": 25.2})
    assert reached.samples == 1120 and reached.seconds == pytest.approx(25.2 * 70 / 84) and reached.estimated


def test_a_target_never_reached_and_a_score_target_reached_from_below():
    history = History((9, 19, 29), (0.9, 0.7, 0.6))
    never = time_to_quality(history, 0.5, QualityTarget(), {})
    assert never.step is None and never.samples is None
    score = QualityTarget(metric="val_BLEU_4", relative=0.95)
    assert not score.lower_is_better
    rising = History((9, 19, 29), (0.1, 0.25, 0.31))
    assert time_to_quality(rising, 0.24, score, {"steps": 30, "batch_size": 8, "train_seconds": 3.0}).step == 19


def test_target_is_relative_to_fp32s_final_value_at_equal_batch_or_absolute(grid):
    equal = group(grid, "equal")
    finals = [equal.group.experiments[i].train["fp32"]["val_loss"] for i in range(3)]
    assert grid.target_value == pytest.approx(1.05 * sum(finals) / 3)
    assert "1.05 × fp32's mean final val_loss" in grid.target_text and "batch_mode=equal" in grid.target_text
    experiments, _ = parse_exp_show(fixture_rows())
    fixed = analyse(experiments, fixture_histories(experiments), QualityTarget(absolute=0.6))
    assert fixed.target_value == 0.6 and "(absolute)" in fixed.target_text


def test_time_to_quality_per_group_counts_who_reached_it(grid):
    equal, maxed = group(grid, "equal"), group(grid, "max")
    assert [(equal.ttq[p].reached, equal.ttq[p].runs) for p in PRECISIONS] == [(3, 3), (3, 3), (3, 3), (0, 3)]
    assert not equal.ttq["fp32"].estimated and maxed.ttq["fp32"].estimated  # max runs did not log per epoch
    assert equal.ttq["fp32"].samples.mean == 13 * 224  # epoch 13 of 224 studies, as logged
    assert maxed.ttq["fp32"].samples.mean > equal.ttq["fp32"].samples.mean  # larger batches need more samples
    assert equal.ttq["bf16"].seconds.mean < equal.ttq["fp32"].seconds.mean  # ... and 1.76x throughput, less time
    assert 0.3 < equal.ttq["bf16"].reduction.mean < 0.5


def test_missing_histories_and_single_validation_points_are_named(grid):
    experiments, skipped = parse_exp_show(fixture_rows())
    histories = fixture_histories(experiments)
    one_point = {k: History(h.steps[-1:], h.values[-1:]) if h else None for k, h in histories.items()}
    one_point[experiments[0].rev, "fp16"] = None
    analysis = analyse(experiments, one_point)
    notes = " ".join(c.note for r in analysis.groups for c in r.ttq.values())
    assert "one validation point per run: set train.common.validate: every_epoch" in notes
    assert "no val_loss history in 1 experiments" in notes


# ---------------------------------------------------------------------------------------- the report
def test_report_shows_both_batch_modes_side_by_side_and_defines_its_test(grid):
    md = render_markdown(grid)
    assert "| metric | precision | batch_mode=equal: mean ± std (n) | batch_mode=equal: Δ vs fp32 [95% CI], p | " \
           "batch_mode=max: mean ± std (n) | batch_mode=max: Δ vs fp32 [95% CI], p |" in md
    assert "Welch's t-test" in md and "p < 0.05" in md and "2.3 seed standard deviations" in md
    assert "Left out: grid-8: queued; grid-7: failed." in md
    assert "1.8× the throughput is 44.4% less time" in md
    assert "| fp32 | 16 | 448 | 0.002 | native | 48 | 160 | 0.003464 | native |" in md  # setup side by side


def test_build_report_writes_markdown_numbers_and_figures(grid, tmp_path):
    numbers = build_report(grid, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "experiments_report.md").read_text() == render_markdown(grid)
    assert json.loads((out / "experiments.json").read_text()) == numbers
    for name in ("seed_quality.png", "seed_throughput.png", "time_to_quality.png"):
        assert (out / "figures" / name).read_bytes().startswith(PNG_SIGNATURE)
    bf16 = numbers["groups"][0]["metrics"]["throughput_ratio_vs_fp32"]["bf16"]
    assert bf16["vs_fp32"]["exceeds_seed_spread"] and len(bf16["stat"]["values"]) == 3
    assert numbers["groups"][1]["metrics"]["samples_per_s"]["fp8"] == {"stat": None, "vs_fp32": None,
                                                                       "note": SPEED_FLAG}


def test_no_finished_experiment_is_a_clear_error():
    rows = exp_show(exp_row("q", 1, {}, state="queued"))
    experiments, skipped = parse_exp_show(rows)
    with pytest.raises(R2GenError, match=r"no finished experiments .*left out: q: queued.*dvc queue start"):
        analyse(experiments, {}, skipped=skipped)


def test_fixture_is_what_its_generator_writes(tmp_path, monkeypatch):
    """The fixture files are reproducible: rerunning make_fixture.py rewrites them unchanged."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for name in ("exp_show.json", "histories.json"):
        assert (tmp_path / name).read_text() == (FIXTURE / name).read_text()
