"""Stage `baseline`: scores of an image-blind model (the most frequent training report) on the test split.

    python stages/baseline.py prepared artifacts/tokenizer.json metrics/eval/baseline.json
"""

from __future__ import annotations

import logging
from pathlib import Path

from _common import load_params, run, usage

from r2gen.evaluation import image_blind_baseline
from r2gen.io import write_json
from r2gen.tokenizer import Tokenizer

log = logging.getLogger("baseline")


def main(argv: list[str]) -> None:
    prepared, tokenizer, out = usage(__doc__, argv, 3)
    params = load_params()
    metrics = image_blind_baseline(Path(prepared), Tokenizer.load(tokenizer), params.evaluate.meteor,
                                   params.evaluate.references)
    write_json(out, metrics.to_json())
    log.info("image-blind baseline (%.0f%% of train reports) | BLEU_4 %.3f | CE F1 %.3f",
             100 * metrics.train_frequency, metrics.BLEU_4, metrics.CE_F1)


if __name__ == "__main__":
    raise SystemExit(run(main))
