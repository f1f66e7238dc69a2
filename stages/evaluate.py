"""Stage `evaluate` (foreach precision): test loss, beam-search reports and their scores.

    python stages/evaluate.py fp32 prepared models/fp32/model.pt predictions/fp32.jsonl metrics/eval/fp32.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from _common import load_params, run, usage

from r2gen.evaluation import evaluate_model
from r2gen.io import write_json, write_text

log = logging.getLogger("evaluate")


def main(argv: list[str]) -> None:
    precision, prepared, model, predictions_out, metrics_out = usage(__doc__, argv, 5)
    params = load_params()
    torch.manual_seed(params.seed)
    metrics, predictions = evaluate_model(Path(model), Path(prepared), params.evaluate, params.train.common.device,
                                          threads=params.threads)
    write_text(predictions_out, "".join(json.dumps(p) + "\n" for p in predictions))
    write_json(metrics_out, metrics.to_json())
    meteor = f"{metrics.METEOR:.3f}" if metrics.METEOR is not None else f"null ({metrics.METEOR_error})"
    log.info("%s model, generated at %s, %s references | test loss %.4f | BLEU_4 %.3f | METEOR %s | ROUGE_L %.3f | "
             "CIDEr %.3f | CE F1 %.3f | %.2f reports/s", precision, metrics.eval_precision, metrics.references,
             metrics.test_loss, metrics.BLEU_4, meteor, metrics.ROUGE_L, metrics.CIDEr, metrics.CE_F1, metrics.reports_per_s)


if __name__ == "__main__":
    raise SystemExit(run(main))
