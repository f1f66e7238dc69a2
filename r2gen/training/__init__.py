"""Training R2Gen at one precision: the recipe and its parts.

- :mod:`~r2gen.training.recipe`: :func:`train` (setup, epochs, validation, summary, shipping) and :class:`TrainPaths`
- :mod:`~r2gen.training.step`: R2Gen's optimizer and the one training step (also the probe's and the benchmarks')
- :mod:`~r2gen.training.state`: :class:`TrainState`, the resume checkpoint and its config fingerprint
- :mod:`~r2gen.training.batchsize`: the batch of ``batch_mode`` (the max-batch probe) and learning-rate scaling
- :mod:`~r2gen.training.live`: the dvclive history, always closed
- :mod:`~r2gen.training.memory`: RSS and peak-memory measurements
- :mod:`~r2gen.training.load`: the other processes' CPU share while the run was timed (a busy host)

The stage resolves params.yaml once into a :class:`~r2gen.config.TrainSpec`::

    summary = train(TrainSpec.of(params, "bf16"), paths)  # a TrainSummary, also written to paths.metrics
"""

from r2gen.config import TrainSpec
from r2gen.training.recipe import TrainPaths, train

__all__ = ["TrainPaths", "TrainSpec", "train"]
