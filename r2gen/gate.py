"""The metrics gate: compare workspace metrics with a committed baseline, per-metric tolerances.

Input is the JSON of ``dvc metrics diff --all --json [REV]`` (``{file: {key: {old, new, diff}}}``)
and the rules of ``metrics_gate.yaml``. A metric fails when it moved in its bad direction by more
than its tolerance, and also when either side is missing: ``dvc metrics diff`` exits 0 when it
cannot load a file, so a deleted or unreadable metric must not pass silently. The one exception: a
metric that has no value on either side and whose workspace file says why (``<key>_error``, e.g.
METEOR switched off or without Java) is reported as ``skip`` with that reason. Throughput is gated
only as a ratio to fp32 measured in the same run, never as an absolute time.

Speed and memory depend on the machine as much as on the code (``measures: speed|memory``): they are
compared only when the baseline and the workspace ran on the same kind of machine (device, device name
and CPU capability of the training runs involved), and speed only where it is a speed measurement on
both sides (``speed_comparable``: not emulated, not autocast without native kernels). Otherwise the
check is a visible ``skip`` with the reason, never a pass or a failure by accident of the hardware.
Speed is also skipped when either side was timed on a busy host (``other_cpu_share`` over
``BUSY_HOST``): a loaded runner then neither fails the gate nor passes it by luck.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2gen import layout
from r2gen.compare.derived import known
from r2gen.compare.fmt import table
from r2gen.errors import ConfigError
from r2gen.records import TrainSummary

DIRECTIONS = ("higher", "lower")
MEASURES = ("speed", "memory")  # machine-dependent metrics: see the module docstring
# What a training run records of its machine (TrainSummary fields) that must agree across the two sides.
MACHINE_KEYS = ("device", "device_name", "cpu_capability")
# A training run timed while other processes used more than this share of the host's CPUs
# (TrainSummary.other_cpu_share, r2gen/training/load.py) is no speed measurement: on a 2-core host one
# other busy process is 0.5. A run that recorded no share (older files, DDP) is compared.
BUSY_HOST = 0.25
LOAD_KEY = TrainSummary.key("other_cpu_share")


@dataclass(frozen=True)
class Rule:
    key: str
    file: str  # may contain {precision}
    better: str  # higher | lower
    tolerance: dict[str, float]  # precision -> allowed move in the bad direction ("default" for others)
    relative: bool = False  # tolerance as a fraction of the baseline value
    ratio_to: str | None = None  # gate value_p / value_<ratio_to> (same run) instead of value_p
    measures: str | None = None  # speed | memory: compared only on the same kind of machine (speed: where comparable)

    def allowed(self, precision: str) -> float:
        return self.tolerance.get(precision, self.tolerance["default"])

    def path(self, precision: str) -> str:
        """The metrics file of ``precision``, as ``dvc metrics diff`` names it (e.g. metrics/eval/fp16.json)."""
        return self.file.format(precision=precision)


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "fp16 BLEU_4" or "fp8 samples_per_s/fp32"
    ok: bool
    old: float | None
    new: float | None
    limit: str  # human-readable tolerance
    note: str = ""
    skipped: bool = False  # not compared, for the reason in note
    precision: str = ""  # the precision and metric of the name, apart (the markdown table's columns)
    metric: str = ""

    @property
    def verdict(self) -> str:
        return "skip" if self.skipped else "ok" if self.ok else "FAIL"

    def line(self) -> str:
        return (f"{self.verdict:<4} {self.name}: {_fmt(self.old)} -> {_fmt(self.new)} ({self.limit})"
                f"{' ' + self.note if self.note else ''}")


def load_rules(raw: dict[str, Any], source: str = "metrics_gate.yaml") -> tuple[list[str], list[Rule]]:
    """Parse the gate file into (precisions, rules); malformed entries raise ConfigError."""
    if not isinstance(raw, dict) or not isinstance(raw.get("precisions"), list) or not isinstance(raw.get("metrics"), list):
        raise ConfigError(f"{source} must have a 'precisions' list and a 'metrics' list")
    if not raw["precisions"] or not all(isinstance(p, str) for p in raw["precisions"]):
        raise ConfigError(f"{source}: 'precisions' must be a non-empty list of names (e.g. [fp32, fp16, bf16, fp8])")
    unknown_top = set(raw) - {"precisions", "metrics"}
    if unknown_top:
        raise ConfigError(f"{source} has unknown top-level key(s) {sorted(map(str, unknown_top))[:5]}; "
                          "it holds only 'precisions' and 'metrics'")
    rules = []
    for i, entry in enumerate(raw["metrics"]):
        where = f"{source}: metrics[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not isinstance(entry.get("file"), str):
            raise ConfigError(f"{where} must be a mapping with a 'key' and a 'file' (strings)")
        unknown = set(entry) - {"key", "file", "better", "tolerance", "relative", "ratio_to", "measures"}
        if unknown:
            raise ConfigError(f"{where} has unknown field(s) {sorted(map(str, unknown))[:5]}; valid: key, file, better, "
                              "tolerance, relative, ratio_to, measures")
        if entry.get("better") not in DIRECTIONS:
            raise ConfigError(f"{where}: 'better' must be one of {DIRECTIONS}")
        tol = entry.get("tolerance")
        tol = {"default": tol} if isinstance(tol, (int, float)) else tol
        if not isinstance(tol, dict) or "default" not in tol or not all(known(v) and v >= 0 for v in tol.values()):
            # .inf would make the rule pass whatever happens, .nan would make it fail whatever happens
            raise ConfigError(f"{where}: 'tolerance' must be a finite number >= 0 or a mapping with a 'default' "
                              "(an infinite tolerance gates nothing: delete the rule instead)")
        if entry.get("relative", False) not in (True, False):
            raise ConfigError(f"{where}: 'relative' must be true or false")
        if entry.get("ratio_to") is not None and entry.get("ratio_to") not in raw["precisions"]:
            raise ConfigError(f"{where}: 'ratio_to' must be one of the precisions {raw['precisions']} (or left out)")
        if entry.get("measures") not in (None, *MEASURES):
            raise ConfigError(f"{where}: 'measures' must be one of {MEASURES} (or left out)")
        rules.append(Rule(entry["key"], entry["file"], entry["better"], {k: float(v) for k, v in tol.items()},
                          bool(entry.get("relative", False)), entry.get("ratio_to"), entry.get("measures")))
    return list(raw["precisions"]), rules


def evaluate(diff: dict[str, dict], precisions: list[str], rules: list[Rule],
             reasons: dict[str, dict[str, str]] | None = None) -> list[Check]:
    """One Check per rule and precision (ratio rules skip the reference precision itself).

    ``reasons`` maps a workspace metrics file to ``{key: why it has no value}`` (its ``<key>_error``
    fields); a metric absent on both sides with a reason is skipped, not failed. A metric that has a
    workspace value but none in the baseline (a key this change adds, e.g. before a re-baseline) is
    skipped with that reason: nothing to compare with is no regression. The reverse, a baseline value
    that is gone from the workspace, fails.
    """
    reasons = reasons or {}
    checks = []
    for rule in rules:
        for p in precisions:
            if rule.ratio_to == p:
                continue
            metric = rule.key + (f"/{rule.ratio_to}" if rule.ratio_to else "")
            name = f"{p} {metric}"
            tol = rule.allowed(p)
            limit = f"{'-' if rule.better == 'higher' else '+'}{tol:.0%}" if rule.relative else \
                f"{'-' if rule.better == 'higher' else '+'}{tol:g}"
            incomparable = not_comparable(diff, rule, p)
            if incomparable:
                old, new, _ = _values(diff, rule, p)
                checks.append(Check(name, True, old, new, limit, f"not compared: {incomparable}", True, p, metric))
                continue
            old, new, missing = _values(diff, rule, p)
            added = _added(diff, rule, p)
            if added:
                checks.append(Check(name, True, old, new, limit, f"not compared: {added}", True, p, metric))
                continue
            if rule.ratio_to and not missing:
                ref_old, ref_new, ref_missing = _values(diff, rule, rule.ratio_to)
                missing = ref_missing
                if not missing:
                    old = old / ref_old if ref_old else None
                    new = new / ref_new if ref_new else None
                    missing = [] if old is not None and new is not None else [f"{rule.ratio_to} {rule.key} is 0"]
            why = reasons.get(rule.path(p), {}).get(rule.key)
            if missing and why and not known(old) and not known(new):
                checks.append(Check(name, True, old, new, limit, f"no value on either side: {why}", True, p, metric))
                continue
            if missing:
                checks.append(Check(name, False, old, new, limit, "missing: " + "; ".join(missing)
                                    + (f" ({why})" if why else ""), False, p, metric))
                continue
            allowed = tol * abs(old) if rule.relative else tol
            worse_by = (old - new) if rule.better == "higher" else (new - old)
            ok = worse_by <= allowed + 1e-12
            checks.append(Check(name, ok, old, new, limit, "" if ok else f"worse by {worse_by:.4g}", False, p, metric))
    return checks


def _added(diff: dict[str, dict], rule: Rule, precision: str) -> str | None:
    """Why a metric has a workspace value but no baseline one (for it or the ratio's reference), or None."""
    for p in dict.fromkeys([precision, *([rule.ratio_to] if rule.ratio_to else [])]):
        old, new, _ = _values(diff, rule, p)
        if not known(old) and known(new):
            return (f"{rule.path(p)}:{rule.key} has no value in the baseline (a metric this change adds?); "
                    "it is gated once the baseline records it (re-baseline: commit the new metrics)")
    return None


def summary_line(checks: list[Check], base: str) -> str:
    """``40/44 metrics within tolerance of HEAD; 4 skipped (...); 1 FAILED``: the verdict in one line."""
    failed = sum(not c.ok for c in checks)
    skipped = sum(c.skipped for c in checks)
    return (f"{len(checks) - failed - skipped}/{len(checks)} metrics within tolerance of {base}"
            + (f"; {skipped} skipped (reason on each line)" if skipped else "")
            + (f"; {failed} FAILED" if failed else ""))


def not_comparable(diff: dict[str, dict], rule: Rule, precision: str) -> str | None:
    """Why a speed or memory metric of ``precision`` cannot be compared across the two sides, or None.

    The training runs involved (``precision`` and, for a ratio, ``rule.ratio_to``) must have run on the
    same kind of machine on both sides; a speed metric must also be a speed measurement on both sides.
    A run whose record lacks these fields is not excused: its metric is compared (and fails if missing).
    """
    if rule.measures is None:
        return None
    for p in dict.fromkeys([precision, *([rule.ratio_to] if rule.ratio_to else [])]):
        train = diff.get(layout.train_summary(p).as_posix(), {})
        sides = {side: tuple(train.get(k, {}).get(side) for k in MACHINE_KEYS) for side in ("old", "new")}
        if None not in sides["old"] and None not in sides["new"] and sides["old"] != sides["new"]:
            return (f"{p} ran on another kind of machine ({_machine(sides['old'])} in the baseline, "
                    f"{_machine(sides['new'])} here); {rule.measures} is not comparable across machines")
        if rule.measures == "speed":
            flags = {side: train.get("speed_comparable", {}).get(side) for side in ("old", "new")}
            off = [side for side, flag in flags.items() if flag is False]
            if off:
                return f"{p} is numerics only in {_sides(off)}, not a speed measurement"
            busy = {side: share for side in ("old", "new")
                    if known(share := train.get(LOAD_KEY, {}).get(side)) and share > BUSY_HOST}
            if busy:
                shares = " and ".join(f"{share:.0%} of the host's CPUs in {_sides([side])}" for side, share in busy.items())
                return (f"{p} was timed on a busy host (other processes used {shares}, over the {BUSY_HOST:.0%} "
                        "limit); speed is compared only between quiet runs: rerun on a quiet host")
    return None


def _sides(sides: list[str]) -> str:
    return " and ".join({"old": "the baseline", "new": "the workspace"}[s] for s in sides)


def _machine(values: tuple) -> str:
    device, name, cpu = values
    return f"{name} ({cpu})" if str(device).startswith("cpu") else f"{name} ({device})"


def _values(diff: dict[str, dict], rule: Rule, precision: str) -> tuple[Any, Any, list[str]]:
    path = rule.path(precision)
    entry = diff.get(path, {}).get(rule.key)
    if entry is None:
        return None, None, [f"{path}:{rule.key} in neither the baseline nor the workspace"]
    old, new = entry.get("old"), entry.get("new")
    missing = []
    if not known(old):
        missing.append(f"no baseline value in {path}")
    if not known(new):
        missing.append(f"no workspace value in {path} (file missing or unreadable?)")
    return old, new, missing


def _fmt(x: Any) -> str:
    if not known(x):
        return "missing"
    return f"{x:.4g}"


def render_markdown(checks: list[Check], base: str, loss_diff: str = "") -> str:
    """The verdict as a pull-request comment: the summary line, a table (failures first), ``loss_diff``.

    One row per check: metric, precision, baseline, workspace, change (absolute and relative), and
    the verdict with its tolerance and reason. The same checks as the terminal lines, nothing dropped.
    """
    failed = [c for c in checks if not c.ok]
    rows = [[f"`{c.metric or c.name}`", c.precision or "—", _fmt(c.old), _fmt(c.new), _change(c.old, c.new),
             _verdict(c)] for c in failed + [c for c in checks if c.ok]]
    title = f"### {'❌ Metrics gate failed' if failed else '✅ Metrics gate passed'} (baseline `{base}`)"
    parts = [title, summary_line(checks, base) + ".",
             table(["metric", "precision", "baseline", "workspace", "change", "verdict"], rows)]
    return "\n\n".join(parts + ([loss_diff] if loss_diff else [])) + "\n"


def _change(old: Any, new: Any) -> str:
    if not (known(old) and known(new)):
        return "n/a"
    rel = f" ({(new - old) / abs(old):+.1%})" if old else ""
    return f"{new - old:+.4g}{rel}"


def _verdict(check: Check) -> str:
    head = {"skip": "skip", "ok": "ok", "FAIL": "**FAIL**"}[check.verdict]
    return f"{head} (tolerance {check.limit})" + (f": {check.note}" if check.note else "")


def stated_reasons(rules: list[Rule], precisions: list[str]) -> dict[str, dict[str, str]]:
    """{workspace metrics file: {key: its `<key>_error` text}} for the gated keys that state one.

    The files are read from the working directory (the repository root); one that is missing or
    unreadable states nothing (its metrics then fail as missing).
    """
    reasons: dict[str, dict[str, str]] = {}
    files: dict[str, object] = {}  # each metrics file read once, however many rules it serves
    for rule in rules:
        for p in precisions:
            path = rule.path(p)
            if path not in files:
                try:
                    files[path] = json.loads(Path(path).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    files[path] = None
            data = files[path]
            why = data.get(f"{rule.key}_error") if isinstance(data, dict) else None
            if isinstance(why, str) and why:
                reasons.setdefault(path, {})[rule.key] = why
    return reasons
