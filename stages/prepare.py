"""Stage `prepare`: validate every study of data.root and cache its images as uint8 arrays.

    python stages/prepare.py prepared
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from _common import load_params, run, usage

from r2gen.data.datasets import shown
from r2gen.data.images import prepare_dataset

log = logging.getLogger("prepare")


def _interrupt(signum: int, frame: object) -> None:
    # As Ctrl-C: the partial output is removed on the way out and `run` prints one line.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> None:
    (out,) = usage(__doc__, argv, 1)
    signal.signal(signal.SIGTERM, _interrupt)
    params = load_params()
    log.info("prepare %s (%s, %d views) -> %s at %d px", shown(params.data.root), params.data.dataset,
             params.data.views, out, params.data.image_size)
    summary = prepare_dataset(params.data, Path(out), fixes=params.tokenizer.fixes)
    counts = ", ".join(f"{split} {n}" for split, n in summary["counts"].items())
    log.info("prepared %s | dropped %d | %.1f MiB", counts, len(summary["dropped"]), summary["bytes"] / 2**20)


if __name__ == "__main__":
    raise SystemExit(run(main))
