"""Stage `build_tokenizer`: R2Gen's vocabulary from the cleaned reports of the train split.

    python stages/build_tokenizer.py prepared artifacts/tokenizer.json
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from _common import load_params, run, usage

from r2gen.data.images import load_prepared
from r2gen.errors import ConfigError
from r2gen.tokenizer import Tokenizer

log = logging.getLogger("build_tokenizer")


def main(argv: list[str]) -> None:
    prepared, out = usage(__doc__, argv, 2)
    params = load_params()
    reports = load_prepared(Path(prepared), "train").reports
    cfg = params.tokenizer
    tokenizer = Tokenizer.build(reports, params.data.dataset, cfg.threshold, cfg.max_seq_length, cfg.fixes)
    if len(tokenizer.tokens) <= 1:  # only <unk>: every report would encode to unknowns and train nothing
        counts = Counter(t for r in reports for t in tokenizer.clean(r).split())
        top = max(counts.values(), default=0)
        raise ConfigError(f"tokenizer.threshold {cfg.threshold} in params.yaml keeps no word of the {len(reports)} train "
                          f"reports (the most frequent appears {top} times), so the vocabulary would be only <unk>; "
                          f"lower it to at most {max(top, 1)} (R2Gen: 3 for IU X-Ray, 10 for MIMIC-CXR)")
    tokenizer.save(out)
    lengths = [len(tokenizer.encode(r)) for r in reports]
    truncated = sum(n >= cfg.max_seq_length for n in lengths)
    rare = {t for r in reports for t in tokenizer.clean(r).split()} - set(tokenizer.tokens)
    log.info("vocabulary %d tokens (+ id 0) from %d train reports, threshold %d | longest %d ids, %d truncated at %d | "
             "%d rare words map to <unk>", tokenizer.vocab_size - 1, len(reports), cfg.threshold, max(lengths),
             truncated, cfg.max_seq_length, len(rare))


if __name__ == "__main__":
    raise SystemExit(run(main))
