"""Run one measurement described by a JSON spec and write its record: ``python -m benchmarks.worker SPEC OUT``.

Each measurement gets a fresh process, so its peak RSS is its own and no state (allocator caches,
compiled kernels, a previous run's r2gen) carries over. The spec names the implementation:
``ours`` (the r2gen importable from ``spec["src"]``, default the current checkout), ``reference``
(the public code at ``spec["src"]``), or ``matmul`` (the machine's GEMM peak).
"""

from __future__ import annotations

import json
import sys


def run_spec(spec: dict) -> dict:
    """The record of one measurement (``spec["phase"]``: train | generate | flops | matmul)."""
    if spec["impl"] == "matmul":
        import torch

        from benchmarks.measure import matmul_peak, set_threads

        set_threads(spec["threads"])
        device = "cuda" if spec["device"] == "cuda" else "cpu"
        return {dtype: matmul_peak(getattr(torch, dtype), spec["profile"]["matmul_n"], device=device)
                for dtype in spec["dtypes"]}
    if spec["impl"] == "reference":
        from benchmarks import reference as impl
    else:
        if spec.get("src"):
            sys.path.insert(0, spec["src"])  # that checkout's r2gen, imported for the first time below
        from benchmarks import ours as impl
    return getattr(impl, f"{spec['phase'].removesuffix('_early_exit')}_run")(spec)


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    record = run_spec(spec)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
