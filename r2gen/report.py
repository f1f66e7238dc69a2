"""The precision report's former home, kept because ``dvc.yaml`` lists this file as a dependency of
the `report` stage (a deleted dependency fails `dvc repro`). The code is in :mod:`r2gen.compare`:
:mod:`~r2gen.compare.runs` loads, :mod:`~r2gen.compare.single` writes the report. Delete this file
once the stage's deps name ``r2gen/compare``, ``r2gen/layout.py`` and ``r2gen/records.py``.
"""

from r2gen.compare.runs import RunData, load_run
from r2gen.compare.single import build_report, headline_summary, render_markdown

__all__ = ["RunData", "build_report", "headline_summary", "load_run", "render_markdown"]
