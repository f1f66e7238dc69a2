"""Our incremental beam search vs the public code's full recompute, on one trained model.

    python -m benchmarks.beam models/fp32/model.pt prepared          # after `dvc repro`

Both searches decode the same test studies with R2Gen's beam semantics (beam 3, 60 tokens). The
full-recompute stepper re-runs the memory and the decoder over the whole prefix at every step, as
the public code does, and runs every step (no early exit). Interleaved rounds at a pinned thread
count; reports/s are medians. The sequences must be identical, or the command fails.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from r2gen.checkpoint import build_model, load_model_file
from r2gen.data.images import load_prepared
from r2gen.decoding import beam_search
from r2gen.model.r2gen import FullRecomputeStepper, IncrementalStepper


def compare(model, images: torch.Tensor, num_beams: int = 3, max_len: int = 60, rounds: int = 3) -> dict:
    """Medians of reports/s for both steppers over ``rounds`` interleaved rounds; checks equal output."""
    times: dict[str, list[float]] = {"incremental": [], "full_recompute": []}
    n = images.shape[0]
    model.eval()
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            ours = beam_search(IncrementalStepper(model, model.encode(images), max_len), n, num_beams, max_len)
            times["incremental"].append(time.perf_counter() - start)
            start = time.perf_counter()
            public = beam_search(FullRecomputeStepper(model, model.encode(images)), n, num_beams, max_len,
                                 early_exit=False)
            times["full_recompute"].append(time.perf_counter() - start)
            if ours.tolist() != public.tolist():
                raise AssertionError("incremental and full-recompute beam search gave different sequences")
    rates = {k: n / statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_reports_per_s": r for k, r in rates.items()},
            "speedup": rates["incremental"] / rates["full_recompute"], "studies": n, "num_beams": num_beams,
            "max_len": max_len, "rounds": rounds, "identical": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a trained model file, e.g. models/fp32/model.pt")
    parser.add_argument("prepared", help="the prepared cache, e.g. prepared")
    parser.add_argument("--studies", type=int, default=16, help="test studies decoded per round (default 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(load_model_file(args.model))
    split = load_prepared(args.prepared, "test")
    images = torch.from_numpy(split.images[: args.studies].copy())
    result = compare(model, images, rounds=args.rounds)
    print(f"{result['studies']} test studies, beam {result['num_beams']}, {result['max_len']} tokens, "
          f"{args.threads} thread(s), median of {args.rounds}: incremental "
          f"{result['incremental_reports_per_s']:.1f} reports/s, full recompute "
          f"{result['full_recompute_reports_per_s']:.2f} reports/s ({result['speedup']:.1f}x), identical sequences")


if __name__ == "__main__":
    main()
