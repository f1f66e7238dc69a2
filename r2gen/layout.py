"""Where the pipeline's outputs live, for the readers that find them by precision.

``dvc.yaml`` is where each stage's paths are written (the stage scripts take them from argv); this
module is the one place that the readers (the precision report, the multi-seed report, ``r2gen
check-metrics`` and ``r2gen exp-report``) derive a file of one precision from its folder:

    metrics/train/<p>.json                          training summary (r2gen.records.TrainSummary)
    metrics/eval/<p>.json                           evaluation summary (r2gen.records.EvalSummary)
    metrics/eval/baseline.json                      image-blind baseline (r2gen.records.BaselineSummary)
    dvclive/train/<p>/plots/metrics/train/<m>.tsv   per optimizer step (train/loss, lr, loss_scale, skipped_steps,
                                                    grad_norm: the pre-clip norm, on steps where it is finite)
    dvclive/train/<p>/plots/metrics/epoch/<m>.tsv   per validated epoch (epoch/val_loss, samples, ...)
    dvclive/train/fp8/fp8_layers.json               FP8 per-layer numerics at the probed epochs (r2gen.fp8_stats)
    models/<p>/model.pt, models/release/model.pt    the trained models, the one `r2gen generate` ships
    reports/precision_report.md, summary.json, figures/     figures/grad_norm.png, loss_scale.png, fp8_layers.png: when logged
    metrics_diff.md, metrics_diff_loss.png          `r2gen check-metrics --md` (a PR comment; any PATH)
    reports/experiments/experiments_report.md, experiments.json, figures/

Every function takes the folder (as the stage got it from argv; the repository-relative default
otherwise) and returns a :class:`~pathlib.Path`; ``.as_posix()`` gives the key that ``dvc exp
show --json`` and ``git show REV:PATH`` use.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = "params.yaml"
GATE = "metrics_gate.yaml"
METRICS = "metrics"
LIVE = "dvclive/train"
MODELS = "models"
REPORTS = "reports"
EXPERIMENTS = "reports/experiments"
PRECISION_REPORT = "precision_report.md"
SUMMARY = "summary.json"
EXPERIMENTS_REPORT = "experiments_report.md"
EXPERIMENTS_JSON = "experiments.json"
FIGURES = "figures"
METRICS_DIFF = "metrics_diff.md"  # `r2gen check-metrics --md` default: a PR comment, not a pipeline output


def train_summary(precision: str, metrics: str | Path = METRICS) -> Path:
    """``metrics/train/<p>.json``."""
    return Path(metrics, "train", f"{precision}.json")


def eval_summary(precision: str, metrics: str | Path = METRICS) -> Path:
    """``metrics/eval/<p>.json``."""
    return Path(metrics, "eval", f"{precision}.json")


def baseline_summary(metrics: str | Path = METRICS) -> Path:
    """``metrics/eval/baseline.json``."""
    return Path(metrics, "eval", "baseline.json")


def live_run(precision: str, live: str | Path = LIVE) -> Path:
    """``dvclive/train/<p>``: one training run's dvclive folder."""
    return Path(live, precision)


def fp8_layers(run: str | Path) -> Path:
    """``<run>/fp8_layers.json``: the FP8 layer probe's table of one (fp8) training run."""
    return Path(run, "fp8_layers.json")


def step_history(run: str | Path, metric: str) -> Path:
    """``<run>/plots/metrics/train/<metric>.tsv``: a metric logged per optimizer step."""
    return Path(run, "plots", "metrics", "train", f"{metric}.tsv")


def epoch_history(run: str | Path, metric: str) -> Path:
    """``<run>/plots/metrics/epoch/<metric>.tsv``: a metric logged per validated epoch."""
    return Path(run, "plots", "metrics", "epoch", f"{metric}.tsv")


def model(precision: str, models: str | Path = MODELS) -> Path:
    """``models/<p>/model.pt``: the model file trained at ``precision``."""
    return Path(models, precision, "model.pt")


def release_model(models: str | Path = MODELS) -> Path:
    """``models/release/model.pt``: the copy of the headline model that is shipped."""
    return Path(models, "release", "model.pt")


def metrics_diff_figure(markdown: str | Path) -> Path:
    """``<dir>/<stem>_loss.png`` beside the ``check-metrics --md`` file: its loss-curve diff figure."""
    markdown = Path(markdown)
    return markdown.with_name(f"{markdown.stem}_loss.png")
