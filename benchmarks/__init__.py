"""Speed and memory benchmarks of our R2Gen against the public R2Gen code.

``python -m benchmarks.run --profile sample`` (or ``make bench``) measures training samples/s,
generation reports/s, peak memory, achieved GFLOP/s and the machine's matmul peak, prints a table
and writes ``bench-results/<profile>.json``. See ``benchmarks/run.py`` for the protocol.

Modules: ``measure`` (profiles and measurement helpers, no r2gen import), ``ours`` and ``reference``
(one timed run of each implementation), ``worker`` (runs one of them in a fresh process), ``run``
(the command: data, interleaved rounds, medians, table, JSON). Two focused ones: ``beam``
(incremental vs full-recompute search on a trained model) and ``trunk`` (the ResNet alone: layout,
BatchNorm folding, torch.compile, and where a training step's time goes).
"""
