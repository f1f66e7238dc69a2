"""The dvclive training history: one folder per run, repaired before a resume, always closed.

:func:`open_history` is a context manager: the ``Live`` it opens is ended when the block exits,
also when training raises (a failure to end it then is logged, never raised over the real error).
dvclive is imported lazily: only the process that writes the history needs it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path
from typing import Iterator

from r2gen.errors import R2GenError
from r2gen.io import write_json, write_text

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_history(live_dir: Path, resume_step: int | None, system_monitor: bool,
                 enabled: bool = True) -> Iterator["LiveLogger | NullLogger"]:
    """The history of a run for the block: a :class:`LiveLogger`, or a :class:`NullLogger` where
    ``enabled`` is False (DDP ranks other than 0). ``resume_step``: the last step a killed run
    logged that the checkpoint covers (None: a fresh run, the folder is emptied)."""
    if not enabled:
        yield NullLogger()
        return
    logger = LiveLogger(live_dir, resume_step, system_monitor)
    try:
        yield logger
    except BaseException:
        try:
            logger.end()
        except Exception as exc:  # noqa: BLE001 - the error that ended training is the one to report
            log.warning("could not close the training history in %s: %s", live_dir, exc)
        raise
    logger.end()


class NullLogger:
    """The history of a rank that does not write one."""

    def log_step(self, metrics: dict[str, float]) -> None:
        pass

    def log(self, metrics: dict[str, float]) -> None:
        pass


class LiveLogger:
    """dvclive, configured for a DVC pipeline: no dvc.yaml rewrite, no experiment commit."""

    def __init__(self, live_dir: Path, resume_step: int | None, system_monitor: bool):
        from dvclive import Live

        if resume_step is None:
            shutil.rmtree(live_dir, ignore_errors=True)
        else:
            _truncate_history(live_dir, resume_step)
        self.live = Live(str(live_dir), resume=resume_step is not None, dvcyaml=False,
                         save_dvc_exp=False, monitor_system=system_monitor)
        self._started = resume_step is not None
        if self._started:
            self.live.step = resume_step

    def log_step(self, metrics: dict[str, float]) -> None:
        """Metrics of a new training step (dvclive step = optimizer steps so far - 1)."""
        with self._writing():
            if self._started:
                self.live.next_step()
            self._started = True
            self.log(metrics)

    def log(self, metrics: dict[str, float]) -> None:
        """Metrics at the current step (epoch metrics share the step of the epoch's last step)."""
        with self._writing():
            for name, value in metrics.items():
                self.live.log_metric(name, value)

    def end(self) -> None:
        with self._writing():
            self.live.end()

    @contextlib.contextmanager
    def _writing(self):
        """dvclive appends in place: a full disk is a one-line error (a rerun repairs the history)."""
        try:
            yield
        except OSError as exc:
            raise R2GenError(f"could not write the training history in {self.live.dir}: {exc.strerror or exc}; "
                             "check free disk space and permissions, then rerun to resume") from None


def _truncate_history(live_dir: Path, step: int) -> None:
    """Make the history end at ``step`` before resuming: what a killed run logged after it is dropped.

    The kill may also have cut a row or dvclive's summary (``metrics.json``) mid-write: rows that do
    not parse are dropped, and the summary is rebuilt from the last row of every metric, as dvclive
    itself would have written it at ``step``. Each file is replaced atomically.
    """
    live_dir = Path(live_dir)
    plots = live_dir / "plots" / "metrics"
    summary: dict = {}
    for tsv in sorted(plots.glob("**/*.tsv")):
        lines = tsv.read_text(encoding="utf-8", errors="replace").splitlines()
        header = lines[0].split("\t") if lines else []
        if "step" not in header:
            tsv.unlink()  # cut before its header was complete: nothing in it to keep
            continue
        rows = [row for row in (ln.split("\t") for ln in lines[1:]) if _row_step(row, header) <= step]
        write_text(tsv, "".join("\t".join(r) + "\n" for r in [header, *rows]))
        if rows:
            node = summary
            *parents, name = tsv.relative_to(plots).with_suffix("").parts
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = float(rows[-1][header.index(name)])
    write_json(live_dir / "metrics.json", {**summary, "step": step}, indent=4)


def _row_step(row: list[str], header: list[str]) -> float:
    """The step of a history row; infinity for a row cut by a kill (so that it is dropped)."""
    if len(row) != len(header):
        return math.inf
    try:
        float(row[-1])  # the value column, last in dvclive's rows
        return int(row[header.index("step")])
    except ValueError:
        return math.inf

