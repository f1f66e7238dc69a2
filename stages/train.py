"""Stage `train` (foreach precision): train R2Gen at one precision, resuming a killed run.

    python stages/train.py fp32 prepared artifacts/tokenizer.json models/fp32/model.pt checkpoints/fp32 dvclive/train/fp32 metrics/train/fp32.json

`train.<p>.nproc: N` (or R2GEN_NPROC=N, which overrides it) trains with N data-parallel processes: the
stage re-executes itself through torchrun (`python -m torch.distributed.run --standalone
--nproc-per-node N stages/train.py ...`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from _common import load_params, run, usage

from r2gen.config import TrainSpec
from r2gen.distributed import World, launch_torchrun, requested_nproc
from r2gen.training import TrainPaths, train

log = logging.getLogger("train")


def main(argv: list[str]) -> None:
    precision, prepared, tokenizer, model_out, ckpt_dir, live_dir, metrics = usage(__doc__, argv, 7)
    spec = TrainSpec.of(load_params(), precision)  # the one place the precision is checked
    nproc = requested_nproc(spec.train.nproc)
    if nproc > 1 and not World.from_env().distributed:
        launch_torchrun(nproc, sys.argv)  # does not return: torchrun runs this script on every rank
    paths = TrainPaths(Path(prepared), Path(tokenizer), Path(model_out), Path(ckpt_dir), Path(live_dir), Path(metrics))
    summary = train(spec, paths)
    speed = f"{summary.samples_per_s:.2f} samples/s" if summary.samples_per_s else "n/a samples/s"
    log.info("%s (%s) | train loss %.4f | val loss %s | %s | peak %.2f GiB | %.0f s",
             precision, summary.backend, summary.train_loss,
             f"{summary.val_loss:.4f}" if summary.val_loss is not None else "n/a",
             speed, summary.peak_memory_bytes / 2**30, summary.train_seconds)


if __name__ == "__main__":
    raise SystemExit(run(main))
