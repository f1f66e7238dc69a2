"""Comparison of the precisions: the single-run precision report and the multi-seed experiment report.

Both reports read the same things the same way and differ only in what they format:

- inputs: :mod:`~r2gen.compare.runs` (one run: the typed records of :mod:`r2gen.records` and the
  dvclive loss histories), :mod:`~r2gen.compare.exp_show` (the experiments of ``dvc exp show
  --json``), :mod:`~r2gen.compare.dvclive` (the one TSV reader); paths from :mod:`r2gen.layout`
- numbers: :mod:`~r2gen.compare.derived` (ratios to fp32, time reduction, relative test loss,
  batch multiplier, CE F1 over the baseline: computed there and nowhere else),
  :mod:`~r2gen.compare.stats` (t distribution, Welch and one-sample tests, noise rules),
  :mod:`~r2gen.compare.grouping`, :mod:`~r2gen.compare.ttq`, :mod:`~r2gen.compare.analysis`
  (the multi-seed statistics per group)
- presentation: :mod:`~r2gen.compare.labels` (emulated / numerics only: never shown as speed),
  :mod:`~r2gen.compare.fmt` (numbers, markdown tables), :mod:`~r2gen.compare.figures`
- the reports: :mod:`~r2gen.compare.single` + :mod:`~r2gen.compare.single_findings` (stage
  `report`), :mod:`~r2gen.compare.grid` + :mod:`~r2gen.compare.grid_findings` (``r2gen exp-report``),
  :mod:`~r2gen.compare.loss_diff` (the loss-curve part of ``r2gen check-metrics --md``)
"""
