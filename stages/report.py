"""Stage `report`: compare the precisions (markdown, figures, summary) and release the headline model.

    python stages/report.py metrics dvclive/train models reports

Reads metrics/{train,eval}/<p>.json, metrics/eval/baseline.json and dvclive/train/<p>/ for every
precision; writes reports/precision_report.md, reports/figures/*.png, reports/summary.json (the
metrics of the model named by params `precision`) and copies that model to models/release/model.pt.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from _common import load_params, run, usage

from r2gen import layout
from r2gen.compare.runs import load_run
from r2gen.compare.single import build_report
from r2gen.config import PRECISIONS
from r2gen.errors import R2GenError
from r2gen.io import atomic_open, write_json

log = logging.getLogger("report")


def main(argv: list[str]) -> None:
    metrics, live, models, reports = map(Path, usage(__doc__, argv, 4))
    params = load_params()
    headline_model = layout.model(params.precision, models)
    if not headline_model.is_file():
        raise R2GenError(f"{headline_model} not found (params `precision` is {params.precision}); "
                         "run `dvc repro` to train it")
    run_data = load_run(metrics, live, PRECISIONS)
    summary = build_report(run_data, params.precision, reports)
    write_json(reports / layout.SUMMARY, summary)
    release = layout.release_model(models)
    with open(headline_model, "rb") as src, atomic_open(release, "wb") as dst:
        shutil.copyfileobj(src, dst)
    log.info("report: %s | headline %s (%s) | CE F1 %s | %s -> %s", reports / layout.PRECISION_REPORT,
             params.precision, summary["backend"], summary["CE_F1"], headline_model, release)


if __name__ == "__main__":
    raise SystemExit(run(main))
