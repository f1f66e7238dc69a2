"""The dvclive training history: one folder per run, repaired before a resume, always closed.

:func:`open_history` is a context manager: the ``Live`` it opens is ended when the block exits,
also when training raises (a failure to end it then is logged, never raised over the real error).
dvclive is imported lazily: only the process that writes the history needs it.

System metrics (``train.common.monitor_system``, :func:`monitor_system_on`): dvclive samples them
in a non-daemon thread that loops until ``Live.end()``; the interpreter waits for that thread at
exit, so a run whose ``Live`` is not ended never exits (an error after training started would hang
``dvc repro`` and torchrun). :meth:`LiveLogger.end` therefore stops the thread in a ``finally``,
even when ending the history fails. It samples at dvclive's slowest rate (every 0.1 s, one row per
2 s), but a Python thread still competes with training for the GIL: ``auto`` turns it on only where
samples/s measures no speed anyway.
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

MONITOR_INTERVAL_S = 0.1  # the longest interval dvclive accepts
MONITOR_SAMPLES = 20  # samples averaged into one row: a row every 2 s


def monitor_system_on(setting: str, speed_comparable: bool) -> bool:
    """Whether dvclive samples system metrics for ``train.common.monitor_system`` (auto | on | off).

    ``auto`` is on only where the run's samples/s is not a speed measurement (the plan's
    ``speed_comparable`` is false: emulated fp8, fp16 on CPU), so the sampling thread never biases a
    speed that is compared.
    """
    if setting == "auto":
        return not speed_comparable
    return setting == "on"  # the config checked it is one of auto | on | off


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
                         save_dvc_exp=False, monitor_system=False)
        if system_monitor:
            _skip_gpus_without_nvml()
            self.live.monitor_system(interval=MONITOR_INTERVAL_S, num_samples=MONITOR_SAMPLES)
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
        """End the history; the system-monitor thread is stopped whatever ending raises."""
        try:
            with self._writing():
                self.live.end()
        finally:
            self._stop_system_monitor()

    def _stop_system_monitor(self) -> None:
        # dvclive has no public call that only stops its thread; Live.end() stops it midway (3.x)
        # and would leave it running when something before that point raises (or a second Ctrl-C
        # lands). _SystemMonitor.end() only sets its shutdown event: safe to call twice.
        # tests/test_gpu_defects.py pins this against the installed dvclive.
        monitor = getattr(self.live, "_system_monitor", None)
        if monitor is not None:
            monitor.end()

    @contextlib.contextmanager
    def _writing(self):
        """dvclive appends in place: a full disk is a one-line error (a rerun repairs the history)."""
        try:
            yield
        except OSError as exc:
            raise R2GenError(f"could not write the training history in {self.live.dir}: {exc.strerror or exc}; "
                             "check free disk space and permissions, then rerun to resume") from None


def _skip_gpus_without_nvml() -> None:
    """dvclive samples GPUs through NVML whenever pynvml imports; without the NVML library (a CPU host)
    every sample fails, CPU, RAM and disk included, with a logged traceback. GPU sampling is then off."""
    from dvclive import monitor_system as dvclive_monitor

    if not dvclive_monitor.GPU_AVAILABLE:
        return
    try:
        dvclive_monitor.nvmlInit()
        dvclive_monitor.nvmlShutdown()
    except dvclive_monitor.NVMLError as exc:
        log.info("system monitor: CPU, RAM and disk only (NVML: %s)", exc)
        dvclive_monitor.GPU_AVAILABLE = False


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

