"""The multi-seed comparison: precisions over a DVC experiment grid, against seed-to-seed noise.

Input is the JSON of ``dvc exp show --json`` after a grid such as
``dvc exp run --queue -S seed=1,2,3 -S train.common.batch_mode=equal,max``: every experiment trains
all precisions with one seed, so its ``metrics/train/<p>.json`` and ``metrics/eval/<p>.json`` hold
one replicate of every precision. Experiments are grouped by everything but the seed (in practice:
by batch mode); within a group, per precision and metric, this module gives

- mean ± std over seeds (sample standard deviation, n − 1),
- the difference from fp32 with its 95% confidence interval, and whether it exceeds the
  seed-to-seed spread: a two-sided **Welch's t-test** (unequal variances) of the precision's
  per-seed values against fp32's, p < 0.05. Ratio metrics, which are computed against fp32 inside
  each experiment, get a one-sample t-test against their no-difference value (ratio 1, reduction 0).
  The t distribution is computed here (regularized incomplete beta), so scipy is not needed.
- time to quality (MLPerf style): the samples and the training seconds a run took until its
  validation metric first reached a target (e.g. 1.05 × fp32's mean final val loss), read from
  the dvclive history of each experiment.

Speed is reported only as measured: throughput ratios are samples/s over fp32's samples/s *in the
same experiment* (same machine, same hour), time reductions are labelled as such (1.8× the
throughput is 44.4% less time), and runs that are not speed measurements (emulated fp8; fp16 on a
CPU without fp16 arithmetic) carry no speed number at all.

With 3 seeds per side, Welch's test has about 4 degrees of freedom at best: a real difference of
about 2.3 seed standard deviations is flagged only half the time. The report says so; "not
flagged" means "not shown with this many seeds", never "equal".
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from matplotlib.figure import Figure

from r2gen.config import PRECISIONS
from r2gen.errors import R2GenError
from r2gen.io import atomic_dir, write_json, write_text

ALPHA = 0.05
PARAMS_FILE = "params.yaml"
TRAIN_FILE = "metrics/train/{precision}.json"
EVAL_FILE = "metrics/eval/{precision}.json"
LIVE_DIR = "dvclive/train/{precision}"
# Not part of a group's identity: the seed is the replicate; `precision` only picks the report's headline.
NOT_GROUPED = ("seed", "precision")
SPEED_FLAG = "numerics only — not a speed measurement"
COLORS = {"fp32": "tab:blue", "fp16": "tab:orange", "bf16": "tab:green", "fp8": "tab:red"}
FIGURE_METRICS = ("test_loss", "BLEU_4", "CE_F1", "train_loss")
GROUP_HATCHES = (None, "..", "//", "xx")  # tells the groups (batch modes) apart in the figures


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    source: str  # train | eval (metrics/<source>/<p>.json) | ratio (vs fp32 in the same experiment)
    better: str  # higher | lower
    speed: bool = False  # a speed claim: none for runs that are not speed measurements
    unit: str = ""  # bytes | ratio | fraction | "" (plain number)
    untested: str = ""  # why it is not tested against fp32 (empty: it is)

    @property
    def null(self) -> float | None:
        """The value that means "no difference from fp32" for a ratio metric."""
        return {"throughput_ratio_vs_fp32": 1.0, "time_reduction_vs_fp32": 0.0}.get(self.key)


QUALITY = (
    Metric("train_loss", "train loss (last epoch)", "train", "lower"),
    Metric("val_loss", "val loss", "train", "lower"),
    Metric("test_loss", "test loss", "eval", "lower"),
    *(Metric(k, k, "eval", "higher") for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")),
    *(Metric(k, k.replace("_", " "), "eval", "higher") for k in ("CE_precision", "CE_recall", "CE_F1")),
)
# Absolute speeds of different experiments also differ with the machine's load at the time; only the
# ratios to fp32 measured in the same experiment are compared.
SAME_RUN = "compared as the same-run ratio to fp32"
SPEED = (
    Metric("samples_per_s", "training samples/s", "train", "higher", speed=True, untested=SAME_RUN),
    Metric("throughput_ratio_vs_fp32", "throughput ratio vs fp32 (same run)", "ratio", "higher", True, "ratio"),
    Metric("train_seconds", "train time (s)", "train", "lower", speed=True, untested=SAME_RUN),
    Metric("time_reduction_vs_fp32", "time reduction vs fp32 (same run)", "ratio", "higher", True, "fraction"),
    Metric("peak_memory_bytes", "peak memory", "train", "lower", unit="bytes"),
    # Generation runs at evaluate.precision for every model: a speed measurement, but not of p.
    Metric("reports_per_s", "generation reports/s (at the eval precision)", "eval", "higher",
           untested="every model generates at the same precision"),
)
METRICS = QUALITY + SPEED


# ---------------------------------------------------------------------------------------- t distribution
def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (``df`` need not be an integer)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_critical(df: float, alpha: float = ALPHA) -> float:
    """The two-sided critical value: P(|T| >= t) = alpha (bisection on :func:`t_two_sided_p`)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        hi *= 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """Per-seed values of one metric for one precision in one group."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n − 1); None for a single value."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


@dataclass(frozen=True)
class Difference:
    """A precision's difference from fp32 and whether it exceeds the seed-to-seed spread."""

    test: str  # "Welch" | "one-sample"
    diff: float  # mean of p − mean of fp32 (ratio metrics: mean − the no-difference value)
    relative: float | None  # diff / |fp32 mean|
    ci: tuple[float, float]  # 95% confidence interval of diff
    p_value: float
    df: float | None  # None when both sides have no spread at all

    @property
    def exceeds(self) -> bool:
        return self.p_value < ALPHA


def welch_test(values: Sequence[float], reference: Sequence[float], alpha: float = ALPHA) -> Difference | None:
    """Two-sided Welch's t-test of mean(values) − mean(reference); None with fewer than 2 values a side.

    Without any spread on either side the difference is exact: p is 0 (or 1 when it is 0).
    """
    a, b = Stat(tuple(values)), Stat(tuple(reference))
    if a.n < 2 or b.n < 2:
        return None
    diff = a.mean - b.mean
    relative = diff / abs(b.mean) if b.mean else None
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference("Welch", diff, relative, (diff, diff), 0.0 if diff else 1.0, None)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = t_critical(df, alpha) * se
    return Difference("Welch", diff, relative, (diff - half, diff + half), t_two_sided_p(diff / se, df), df)


def one_sample_test(values: Sequence[float], null: float, alpha: float = ALPHA) -> Difference | None:
    """Two-sided one-sample t-test of mean(values) against ``null``; None with fewer than 2 values."""
    s = Stat(tuple(values))
    if s.n < 2:
        return None
    diff = s.mean - null
    relative = diff / abs(null) if null else None
    se = s.std / math.sqrt(s.n)
    if se == 0:
        return Difference("one-sample", diff, relative, (diff, diff), 0.0 if diff else 1.0, None)
    df = s.n - 1
    half = t_critical(df, alpha) * se
    return Difference("one-sample", diff, relative, (diff - half, diff + half), t_two_sided_p(diff / se, df), df)


def detectable_difference(n: int, alpha: float = ALPHA) -> float | None:
    """The difference, in seed standard deviations, that Welch's test flags half the time with n seeds a side.

    At equal spreads the test flags when |diff| > t_crit × s × sqrt(2/n); a true difference of exactly
    that size is flagged about half the time.
    """
    if n < 2:
        return None
    return t_critical(2 * (n - 1), alpha) * math.sqrt(2 / n)


# ---------------------------------------------------------------------------------------- dvc exp show
@dataclass(frozen=True)
class Experiment:
    """One finished experiment: one seed of every precision."""

    name: str
    rev: str
    baseline: str  # the commit the experiment was run from
    params: dict[str, Any]  # params.yaml, flattened to dotted keys
    train: dict[str, dict]  # precision -> metrics/train/<p>.json
    eval: dict[str, dict]  # precision -> metrics/eval/<p>.json

    @property
    def seed(self) -> Any:
        return self.params.get("seed")

    def speed_comparable(self, p: str) -> bool:
        t = self.train[p]
        return t.get("backend") != "emulated" and t.get("speed_comparable") is not False


def parse_exp_show(rows: Any, precisions: Sequence[str] = PRECISIONS, *, params_file: str = PARAMS_FILE,
                   train_file: str = TRAIN_FILE, eval_file: str = EVAL_FILE) -> tuple[list[Experiment], list[str]]:
    """The finished experiments in ``dvc exp show --json`` output, and why any others were left out.

    The workspace and the baseline commits are not experiments of the grid and are skipped; so are
    queued, running and failed experiments, and those missing a precision's metrics (each with a
    note). The output is a list of baselines, each with ``experiments``: ranges whose first rev is
    the experiment's commit (``dvc/repo/experiments/serialize.py``: ExpState, ExpRange).

    Raises:
        R2GenError: the input is not ``dvc exp show --json`` output.
    """
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "rev" in r for r in rows):
        raise R2GenError("input is not the output of `dvc exp show --json` (a list of revisions); "
                         "run `dvc exp show --json > exps.json` and pass that file")
    experiments, skipped, seen = [], [], set()
    for base in rows:
        for exp_range in base.get("experiments") or []:
            revs = exp_range.get("revs") or [{}]
            head = revs[0]
            name = exp_range.get("name") or head.get("name") or str(head.get("rev", "?"))[:7]
            state = (exp_range.get("executor") or {}).get("state", "success")  # run in the workspace: no executor
            if state != "success":
                skipped.append(f"{name}: {state}")
                continue
            if head.get("rev") in seen:
                continue
            data = head.get("data")
            if head.get("error") or not data:
                skipped.append(f"{name}: {(head.get('error') or {}).get('msg') or 'no data'}")
                continue
            params = _file(data.get("params", {}), params_file)
            train = {p: _file(data.get("metrics", {}), train_file.format(precision=p)) for p in precisions}
            evals = {p: _file(data.get("metrics", {}), eval_file.format(precision=p)) for p in precisions}
            missing = ([params_file] if params is None else []) + \
                [train_file.format(precision=p) for p, d in train.items() if d is None] + \
                [eval_file.format(precision=p) for p, d in evals.items() if d is None]
            if missing:
                skipped.append(f"{name}: missing {', '.join(missing)}")
                continue
            seen.add(head["rev"])
            experiments.append(Experiment(name, head["rev"], base["rev"], flatten(params), train, evals))
    return experiments, skipped


def _file(results: dict, path: str) -> dict | None:
    """The parsed content of one params/metrics file in a ``dvc exp show`` entry, or None."""
    entry = results.get(path) or results.get(path.replace("/", "\\"))
    data = entry.get("data") if isinstance(entry, dict) else None
    return data if isinstance(data, dict) else None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"common": {"epochs": 3}}}`` -> ``{"train.common.epochs": 3}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class Group:
    """Experiments that differ only in their seed."""

    label: str  # the settings that tell this group from the others, e.g. "batch_mode=max"
    settings: dict[str, str]  # those settings: key -> value as JSON ("@baseline": the commit)
    experiments: tuple[Experiment, ...]
    duplicates: tuple[str, ...] = ()  # experiments left out: a seed already in the group

    @property
    def seeds(self) -> list:
        return [e.seed for e in self.experiments]

    def equal_batch(self, precisions: Sequence[str]) -> bool:
        """True when, in every experiment, all precisions ran the same batch and number of steps."""
        return all(len({(e.train[p].get("global_batch_size") or e.train[p].get("batch_size"), e.train[p].get("steps"))
                        for p in precisions}) == 1 for e in self.experiments)


def group_experiments(experiments: Iterable[Experiment]) -> list[Group]:
    """Groups of experiments with identical params (but the seed) and baseline commit, by label.

    A seed that appears twice in a group is kept once (the newest experiment, which ``dvc exp show``
    lists first): a repeated seed is a repeated run, not a new replicate.
    """
    def identity(e: Experiment) -> tuple:
        return (("@baseline", e.baseline),) + tuple(
            sorted((k, json.dumps(v, sort_keys=True)) for k, v in e.params.items() if k not in NOT_GROUPED))

    groups: dict[tuple, list[Experiment]] = {}
    for e in experiments:
        groups.setdefault(identity(e), []).append(e)
    all_settings = [dict(key) for key in groups]
    keys = sorted(set().union(*all_settings)) if all_settings else []
    varying = [k for k in keys if len({s.get(k) for s in all_settings}) > 1]
    # Labels name a setting by its last part (batch_mode) unless two varying settings share it.
    last = [k.rsplit(".", 1)[-1] for k in varying]
    short = {k: name if last.count(name) == 1 else k for k, name in zip(varying, last)}
    out = []
    for members, settings in zip(groups.values(), all_settings):
        mine = {k: settings.get(k, "unset") for k in varying}
        parts = [f"{short[k]}={json.loads(v) if v != 'unset' else v}" for k, v in mine.items() if k != "@baseline"]
        if "@baseline" in mine:
            parts.append(f"commit {mine['@baseline'][:7]}")
        kept, dups, seeds = [], [], set()
        for e in members:
            (dups if e.seed in seeds else kept).append(e)
            seeds.add(e.seed)
        kept.sort(key=lambda e: (str(type(e.seed)), e.seed))
        out.append(Group(", ".join(parts) or "all experiments", mine, tuple(kept), tuple(d.name for d in dups)))
    return sorted(out, key=lambda g: g.label)


# ---------------------------------------------------------------------------------------- per-group numbers
@dataclass(frozen=True)
class Cell:
    """One metric of one precision in one group."""

    stat: Stat | None
    difference: Difference | None  # vs fp32; None for fp32 itself and with fewer than 2 seeds
    note: str = ""


def metric_values(group: Group, metric: Metric, p: str) -> tuple[list[float], str]:
    """The per-seed values of ``metric`` for ``p`` in ``group``, and a note on any left out."""
    values, missing = [], 0
    for e in group.experiments:
        if metric.speed and not (e.speed_comparable(p) and e.speed_comparable("fp32")):
            return [], SPEED_FLAG
        if metric.source == "ratio":
            value = _ratio(metric.key, e.train[p], e.train["fp32"])
        else:
            value = (e.train if metric.source == "train" else e.eval)[p].get(metric.key)
        if _known(value):
            values.append(float(value))
        else:
            missing += 1
    return values, f"missing in {missing} of {len(group.experiments)} experiments" if missing else ""


def _ratio(key: str, t: dict, fp32: dict) -> float | None:
    if key == "throughput_ratio_vs_fp32":
        sps, ref = t.get("samples_per_s"), fp32.get("samples_per_s")
        return sps / ref if _known(sps) and _known(ref) and ref else None
    seconds, ref = t.get("train_seconds"), fp32.get("train_seconds")
    return 1.0 - seconds / ref if _known(seconds) and _known(ref) and ref else None


def compare(group: Group, metric: Metric, precisions: Sequence[str]) -> dict[str, Cell]:
    """Mean ± std of ``metric`` per precision, each non-fp32 precision tested against fp32."""
    reference, _ = metric_values(group, metric, "fp32")
    cells = {}
    for p in precisions:
        values, note = metric_values(group, metric, p)
        stat = Stat(tuple(values)) if values else None
        difference = None
        if stat is not None and p != "fp32" and not metric.untested:
            difference = (one_sample_test(values, metric.null) if metric.null is not None
                          else welch_test(values, reference))
        cells[p] = Cell(stat, difference, note)
    return cells


# ---------------------------------------------------------------------------------------- time to quality
@dataclass(frozen=True)
class History:
    """A validation metric at the dvclive steps it was logged (step = optimizer steps done − 1)."""

    steps: tuple[int, ...]
    values: tuple[float, ...]
    seconds: dict[int, float] = field(default_factory=dict)  # step -> training seconds so far (logged)
    samples: dict[int, float] = field(default_factory=dict)  # step -> training samples so far (logged)


@dataclass(frozen=True)
class QualityTarget:
    """When a run has reached "quality": its validation metric at ``relative`` × a reference, or ``absolute``.

    The reference is fp32's mean final value over the seeds of the equal-batch group, so every run
    of every precision and batch mode chases the same number (as MLPerf's fixed targets).
    """

    metric: str = "val_loss"  # a dvclive epoch metric: <live dir>/plots/metrics/epoch/<metric>.tsv
    relative: float = 1.05  # loss: within 5% of fp32's final; a score: e.g. 0.95 for 95% of it
    absolute: float | None = None  # a fixed target instead of the relative one

    @property
    def lower_is_better(self) -> bool:
        return "loss" in self.metric

    def reached(self, value: float, target: float) -> bool:
        return value <= target if self.lower_is_better else value >= target


@dataclass(frozen=True)
class Reached:
    """When one run first reached the target (all None when it never did)."""

    step: int | None
    samples: float | None
    seconds: float | None
    estimated: bool  # samples/seconds derived from the summary, not logged per epoch


def parse_tsv(text: str, source: str) -> dict[int, float]:
    """A dvclive history (``[timestamp] step <name>`` columns, tab-separated): step -> value."""
    rows = [r for r in csv.reader(text.splitlines(), delimiter="\t") if r]
    try:
        col = rows[0].index("step")
        return {int(r[col]): float(r[-1]) for r in rows[1:]}
    except (IndexError, ValueError):
        raise R2GenError(f"{source} is not a dvclive history (step and value columns); rerun the experiment") from None


def load_history(read: Callable[[str], str | None], live_dir: str, metric: str) -> History | None:
    """The ``metric`` history under ``live_dir`` (with logged seconds and samples when present).

    ``read(path)`` returns a file's text or None when the file does not exist (a path in the
    workspace, or in an experiment's commit).
    """
    epoch = f"{live_dir}/plots/metrics/epoch"
    text = read(f"{epoch}/{metric}.tsv")
    if text is None:
        return None
    values = parse_tsv(text, f"{epoch}/{metric}.tsv")
    extra = {}
    for name in ("train_seconds", "samples"):
        extra_text = read(f"{epoch}/{name}.tsv")
        extra[name] = parse_tsv(extra_text, f"{epoch}/{name}.tsv") if extra_text is not None else {}
    steps = tuple(sorted(values))
    return History(steps, tuple(values[s] for s in steps), extra["train_seconds"], extra["samples"])


def time_to_quality(history: History, target: float, spec: QualityTarget, summary: dict) -> Reached:
    """Samples and training seconds until the metric first reached ``target``.

    Logged per-epoch totals (``epoch/samples``, ``epoch/train_seconds``) are used where the history
    has them. Otherwise each is estimated from the training summary: samples = optimizer steps ×
    global batch size (an overestimate by the short last batch of each epoch) and seconds =
    ``train_seconds`` × steps / total steps (as if every step took as long).
    """
    for step, value in zip(history.steps, history.values):
        if not spec.reached(value, target):
            continue
        done, total = step + 1, summary.get("steps")
        batch = summary.get("global_batch_size") or summary.get("batch_size")
        train_seconds = summary.get("train_seconds")
        samples, seconds = history.samples.get(step), history.seconds.get(step)
        estimated = samples is None or seconds is None
        if samples is None and _known(batch):
            samples = done * batch
        if seconds is None and _known(train_seconds) and _known(total) and total:
            seconds = train_seconds * done / total
        return Reached(step, samples, seconds, estimated)
    return Reached(None, None, None, estimated=False)


@dataclass(frozen=True)
class TTQCell:
    """Time to quality of one precision in one group."""

    runs: int  # experiments with a history
    reached: int  # of those, how many reached the target
    samples: Stat | None  # over the runs that reached it
    seconds: Stat | None  # None for runs that are not speed measurements
    reduction: Stat | None  # 1 − seconds / fp32's seconds in the same experiment (both reached)
    estimated: bool
    note: str = ""


def resolve_target(spec: QualityTarget, groups: Sequence[Group], histories: dict[tuple[str, str], History | None],
                   precisions: Sequence[str]) -> tuple[float | None, str]:
    """The target value and a sentence saying where it comes from (None: no fp32 history to base it on)."""
    if spec.absolute is not None:
        return spec.absolute, f"{spec.metric} {'≤' if spec.lower_is_better else '≥'} {spec.absolute:g} (absolute)"
    ref = next((g for g in groups if g.equal_batch(precisions)), groups[0] if groups else None)
    finals = [h.values[-1] for e in (ref.experiments if ref else ()) if (h := histories.get((e.rev, "fp32")))
              and h.values and math.isfinite(h.values[-1])]
    if not finals:
        return None, f"no fp32 {spec.metric} history to base the target on"
    mean = sum(finals) / len(finals)
    target = spec.relative * mean
    return target, (f"{spec.metric} {'≤' if spec.lower_is_better else '≥'} {_plain(target)} = {spec.relative:g} × "
                    f"fp32's mean final {spec.metric} ({_plain(mean)}, {len(finals)} seeds, group: {ref.label})")


def ttq_cells(group: Group, histories: dict[tuple[str, str], History | None], target: float,
              spec: QualityTarget, precisions: Sequence[str]) -> dict[str, TTQCell]:
    """Time to quality per precision over the group's seeds."""
    reached = {(e.rev, p): time_to_quality(h, target, spec, e.train[p])
               for e in group.experiments for p in precisions if (h := histories.get((e.rev, p))) is not None}
    cells = {}
    for p in precisions:
        runs = [(e, reached[e.rev, p]) for e in group.experiments if (e.rev, p) in reached]
        done = [(e, r) for e, r in runs if r.step is not None]
        notes = []
        if len(runs) < len(group.experiments):
            notes.append(f"no {spec.metric} history in {len(group.experiments) - len(runs)} experiments")
        if any(len(histories[e.rev, p].steps) < 2 for e, _ in runs):
            notes.append("one validation point per run: set train.common.validate: every_epoch")
        speed = all(e.speed_comparable(p) for e, _ in done)
        if not speed:
            notes.append(f"time: {SPEED_FLAG}")
        samples = [r.samples for _, r in done if _known(r.samples)]
        seconds = [r.seconds for _, r in done if _known(r.seconds)] if speed else []
        reductions = []
        if speed and p != "fp32":
            for e, r in done:
                ref = reached.get((e.rev, "fp32"))
                if ref and _known(ref.seconds) and ref.seconds and _known(r.seconds) and e.speed_comparable("fp32"):
                    reductions.append(1.0 - r.seconds / ref.seconds)
        cells[p] = TTQCell(len(runs), len(done), Stat(tuple(samples)) if samples else None,
                           Stat(tuple(seconds)) if seconds else None, Stat(tuple(reductions)) if reductions else None,
                           any(r.estimated for _, r in done), "; ".join(notes))
    return cells


# ---------------------------------------------------------------------------------------- the analysis
@dataclass(frozen=True)
class GroupResult:
    group: Group
    equal_batch: bool
    cells: dict[str, dict[str, Cell]]  # metric key -> precision -> cell
    ttq: dict[str, TTQCell]  # precision -> time to quality (empty without a target)


@dataclass(frozen=True)
class Analysis:
    precisions: tuple[str, ...]
    groups: tuple[GroupResult, ...]
    skipped: tuple[str, ...]  # experiments left out, with the reason
    target: QualityTarget
    target_value: float | None
    target_text: str


def analyse(experiments: Sequence[Experiment], histories: dict[tuple[str, str], History | None],
            target: QualityTarget = QualityTarget(), precisions: Sequence[str] = PRECISIONS,
            skipped: Sequence[str] = ()) -> Analysis:
    """Every group's statistics and time to quality.

    ``histories`` maps (experiment rev, precision) to the run's validation history (None or absent
    when the experiment has none).

    Raises:
        R2GenError: no experiments, or fp32 is not among the precisions (everything is relative to it).
    """
    if "fp32" not in precisions:
        raise R2GenError("the multi-seed comparison is relative to fp32; include fp32 in the precisions")
    groups = group_experiments(experiments)
    if not groups:
        raise R2GenError("no finished experiments in `dvc exp show`"
                         + (f" (left out: {'; '.join(skipped)})" if skipped else "")
                         + "; run the grid first: dvc exp run --queue -S seed=1,2,3 ... && dvc queue start")
    value, text = resolve_target(target, groups, histories, precisions)
    results = []
    for g in groups:
        cells = {m.key: compare(g, m, precisions) for m in METRICS}
        ttq = ttq_cells(g, histories, value, target, precisions) if value is not None else {}
        results.append(GroupResult(g, g.equal_batch(precisions), cells, ttq))
    return Analysis(tuple(precisions), tuple(results), tuple(skipped), target, value, text)


# ---------------------------------------------------------------------------------------- conclusions
def _label(analysis: Analysis, p: str) -> str:
    """``fp8 (emulated)`` / ``fp16 (numerics only)`` when any experiment's run was not a speed measurement."""
    runs = [e.train[p] for r in analysis.groups for e in r.group.experiments]
    if any(t.get("backend") == "emulated" for t in runs):
        return f"{p} (emulated)"
    if any(t.get("speed_comparable") is False for t in runs):
        return f"{p} (numerics only)"
    return p


def conclusions(analysis: Analysis) -> list[str]:
    """Findings, each one sentence computed from the numbers."""
    found = []
    n = min((len(r.group.experiments) for r in analysis.groups), default=0)
    k = detectable_difference(n)
    if k is None:
        found.append("Fewer than 2 seeds per group: no difference can be told from seed-to-seed noise here.")
    else:
        found.append(f"{n} seeds per group: Welch's test (p < {ALPHA}) flags a true difference of {k:.1f} seed "
                     "standard deviations only about half the time; \"not flagged\" means not shown with "
                     f"{n} seeds, not equal.")
    others = [p for p in analysis.precisions if p != "fp32"]
    equal = [r for r in analysis.groups if r.equal_batch]
    for r in analysis.groups:
        flagged = [(m, p, r.cells[m.key][p].difference) for m in QUALITY for p in others
                   if (d := r.cells[m.key][p].difference) is not None and d.exceeds]
        where = f"[{r.group.label}]" + (" (equal batch and steps)" if r.equal_batch else " (batch or steps differ)")
        if not flagged:
            found.append(f"{where} No quality metric of any precision differs from fp32 beyond the "
                         "seed-to-seed spread.")
        for m, p, d in flagged:
            sentence = (f"{where} {_label(analysis, p)} {m.label}: {_signed(m, d.diff)} vs fp32 "
                        f"(95% CI {_signed(m, d.ci[0])} to {_signed(m, d.ci[1])}, p = {d.p_value:.3f})")
            if not r.equal_batch and equal:
                # the equal-batch group that differs from this one in the fewest other settings
                ref = max(equal, key=lambda e: len(e.group.settings.items() & r.group.settings.items()))
                d_eq = ref.cells[m.key][p].difference
                if d_eq is not None and d_eq.exceeds and (d_eq.diff > 0) == (d.diff > 0):
                    sentence += (f"; it survives at equal batch ({ref.group.label}: {_signed(m, d_eq.diff)}, "
                                 f"p = {d_eq.p_value:.3f}): at least part of it is a precision effect")
                else:
                    eq = f"{_signed(m, d_eq.diff)}, p = {d_eq.p_value:.3f}" if d_eq is not None else "n/a"
                    sentence += (f"; it does not survive at equal batch ({ref.group.label}: {eq}): here it goes "
                                 "with the batch size and the number of optimizer steps, and is no evidence "
                                 "about the precision")
            found.append(sentence + ".")
    for r in analysis.groups:
        for p in others:
            cell = r.cells["throughput_ratio_vs_fp32"][p]
            if cell.stat is None:
                continue
            red = r.cells["time_reduction_vs_fp32"][p].stat
            d = cell.difference
            verdict = ("beyond the seed-to-seed spread" if d is not None and d.exceeds
                       else "not distinguishable from 1× with these seeds" if d is not None else "one seed")
            found.append(f"[{r.group.label}] {p}: {_ms(cell.stat, 'ratio')} fp32's throughput ({verdict}); "
                         + (f"time reduction {_ms(red, 'fraction')}" if red else "time reduction n/a") + ".")
    excluded = sorted({_label(analysis, p) for r in analysis.groups for p in others
                       if r.cells["samples_per_s"][p].note == SPEED_FLAG})
    if excluded:
        found.append(f"{', '.join(excluded)}: {SPEED_FLAG}; no speed or time-to-quality time is claimed for them.")
    if analysis.target_value is not None:
        for r in analysis.groups:
            parts = []
            for p in analysis.precisions:
                c = r.ttq.get(p)
                if c is None or not c.runs:
                    continue
                what = f"{_label(analysis, p)} {c.reached}/{c.runs}"
                if c.samples:
                    what += f" in {_ms(c.samples, '', 0)} samples"
                if c.seconds:
                    what += f", {_ms(c.seconds, '', 1)} s"
                parts.append(what)
            if parts:
                sign = "≤" if analysis.target.lower_is_better else "≥"
                found.append(f"[{r.group.label}] time to quality ({analysis.target.metric} {sign} "
                             f"{_plain(analysis.target_value)}), runs that reached it: " + "; ".join(parts) + ".")
    return found


# ---------------------------------------------------------------------------------------- formatting
def _known(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plain(x: float) -> str:
    return f"{x:.4g}"


def _value(x: float, unit: str, digits: int | None = None) -> str:
    if unit == "bytes":
        return f"{x / 2**30:.3f} GiB"
    if unit == "ratio":
        return f"{x:.2f}×"
    if unit == "fraction":
        return f"{100 * x:.1f}%"
    if digits is not None:
        return f"{x:,.{digits}f}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _ms(stat: Stat | None, unit: str, digits: int | None = None) -> str:
    """``mean ± std`` (a lone value without ±)."""
    if stat is None:
        return "n/a"
    if stat.std is None:
        return _value(stat.mean, unit, digits)
    if unit == "ratio":  # the spread of a ratio is not a ratio
        return f"{stat.mean:.2f}× ± {stat.std:.2f}"
    if unit == "fraction":
        return f"{100 * stat.mean:.1f}% ± {100 * stat.std:.1f} pts"
    if unit == "bytes":
        return f"{stat.mean / 2**30:.3f} ± {stat.std / 2**30:.3f} GiB"
    return f"{_value(stat.mean, unit, digits)} ± {_value(stat.std, unit, digits)}"


def _signed(metric: Metric, x: float) -> str:
    if metric.unit == "bytes":
        return f"{x / 2**30:+.3f} GiB"
    if metric.unit == "fraction":
        return f"{100 * x:+.1f} pts"
    return f"{x:+.4g}"


def _diff_cell(metric: Metric, cell: Cell) -> str:
    d = cell.difference
    if d is None:
        return f"— ({metric.untested})" if metric.untested else "—"
    text = f"{_signed(metric, d.diff)} [{_signed(metric, d.ci[0])}, {_signed(metric, d.ci[1])}], p={d.p_value:.3f}"
    return f"**{text} exceeds**" if d.exceeds else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def _metric_table(analysis: Analysis, metrics: Sequence[Metric]) -> str:
    header = ["metric", "precision"]
    for r in analysis.groups:
        header += [f"{r.group.label}: mean ± std (n)", f"{r.group.label}: Δ vs fp32 [95% CI], p"]
    rows = []
    for m in metrics:
        for p in analysis.precisions:
            row = [m.label, _label(analysis, p)]
            for r in analysis.groups:
                c = r.cells[m.key][p]
                if c.stat is None:
                    row += [c.note or "n/a", "—"]
                    continue
                mean = f"{_ms(c.stat, m.unit)} ({c.stat.n})" + (f" ({c.note})" if c.note else "")
                row += [mean, _diff_cell(m, c) if p != "fp32" else "—"]
            rows.append(row)
    return _table(header, rows)


SETUP_KEYS = {"batch_size": "batch size", "steps": "optimizer steps", "lr_ed": "lr (encoder-decoder)",
              "backend": "backend"}


def _setup_table(analysis: Analysis) -> str:
    """What each precision ran with, per group (several values: they differed between seeds)."""
    header = ["precision"] + [f"{r.group.label}: {what}" for r in analysis.groups for what in SETUP_KEYS.values()]
    rows = []
    for p in analysis.precisions:
        row = [_label(analysis, p)]
        for r in analysis.groups:
            for key in SETUP_KEYS:
                values = sorted({e.train[p].get(key) for e in r.group.experiments},
                                key=lambda v: (not _known(v), v if _known(v) else 0, str(v)))
                row.append(" / ".join(_plain(v) if _known(v) else str(v if v is not None else "n/a") for v in values))
        rows.append(row)
    return _table(header, rows)


def _ttq_table(analysis: Analysis) -> str:
    header = ["precision"]
    for r in analysis.groups:
        header += [f"{r.group.label}: {w}" for w in ("reached", "samples to target", "training s to target",
                                                     "time-to-target reduction vs fp32", "samples/s",
                                                     "throughput ratio vs fp32")]
    rows = []
    for p in analysis.precisions:
        row = [_label(analysis, p)]
        for r in analysis.groups:
            c = r.ttq.get(p)
            if c is None:
                row += ["n/a"] * 6
                continue
            est = " (est.)" if c.estimated else ""
            row += [f"{c.reached}/{c.runs}" + (f" ({c.note})" if c.note else ""),
                    _ms(c.samples, "", 0) + est if c.samples else "n/a",
                    _ms(c.seconds, "", 1) + est if c.seconds else "n/a",
                    _ms(c.reduction, "fraction") if c.reduction else ("—" if p == "fp32" else "n/a"),
                    _ms(r.cells["samples_per_s"][p].stat, "", 2),
                    _ms(r.cells["throughput_ratio_vs_fp32"][p].stat, "ratio") if p != "fp32" else "1×"]
        rows.append(row)
    return _table(header, rows)


# ---------------------------------------------------------------------------------------- figures
FIGURES = {
    "seed_quality.png": "Quality per precision and batch mode: mean ± std over seeds (dots: single seeds)",
    "seed_throughput.png": "Throughput ratio vs fp32, measured within each run: mean ± std over seeds",
    "time_to_quality.png": "Time to quality: samples and training seconds until the target, mean ± std",
}


def _grouped_bars(ax, analysis: Analysis, stats: dict[tuple[int, str], Stat | None], ylabel: str,
                  notes: dict[tuple[int, str], str] | None = None) -> None:
    """Bars per precision (x), one per group side by side; error bars = std; dots = seeds; n/a where missing.

    ``notes`` are written above (or instead of) the bars, e.g. how many runs reached a target.
    """
    notes = notes or {}
    groups, precisions = analysis.groups, analysis.precisions
    width = 0.8 / max(len(groups), 1)
    for gi, r in enumerate(groups):
        for pi, p in enumerate(precisions):
            x = pi - 0.4 + width * (gi + 0.5)
            s, note = stats.get((gi, p)), notes.get((gi, p), "")
            if s is None:
                ax.text(x, 0, f"n/a {note}", ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            if note:
                ax.text(x, s.mean + (s.std or 0), note, ha="center", va="bottom", fontsize=6)
            ax.bar(x, s.mean, width, yerr=s.std or 0, capsize=3, color=COLORS.get(p, f"C{pi}"),
                   alpha=0.9 if gi == 0 else 0.5, edgecolor="black", hatch=GROUP_HATCHES[gi % len(GROUP_HATCHES)],
                   label=r.group.label if pi == 0 else None)
            ax.scatter([x] * s.n, s.values, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(precisions)), [_label(analysis, p).replace(" (", "\n(") for p in precisions], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _write_figures(analysis: Analysis, directory: Path) -> None:
    fig = Figure(figsize=(4 * len(FIGURE_METRICS), 4.2), layout="constrained")
    axes = fig.subplots(1, len(FIGURE_METRICS))
    by_key = {m.key: m for m in METRICS}
    for ax, key in zip(axes, FIGURE_METRICS):
        _grouped_bars(ax, analysis, {(gi, p): r.cells[key][p].stat for gi, r in enumerate(analysis.groups)
                                     for p in analysis.precisions}, by_key[key].label)
        ax.set_title(by_key[key].label)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.savefig(directory / "seed_quality.png", dpi=110, metadata={"Software": None})

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _grouped_bars(ax, analysis, {(gi, p): r.cells["throughput_ratio_vs_fp32"][p].stat
                                 for gi, r in enumerate(analysis.groups) for p in analysis.precisions},
                  "samples/s ÷ fp32's in the same run")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_title("Throughput ratio vs fp32 (n/a: not a speed measurement)")
    ax.legend(fontsize=7)
    fig.savefig(directory / "seed_throughput.png", dpi=110, metadata={"Software": None})

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, what, ylabel in ((axes[0], "samples", "training samples to target"),
                             (axes[1], "seconds", "training seconds to target")):
        _grouped_bars(ax, analysis, {(gi, p): getattr(r.ttq[p], what) if p in r.ttq else None
                                     for gi, r in enumerate(analysis.groups) for p in analysis.precisions}, ylabel,
                      {(gi, p): f"{c.reached}/{c.runs} reached" for gi, r in enumerate(analysis.groups)
                       for p, c in r.ttq.items()})
    fig.suptitle(f"Time to quality: {analysis.target_text}", fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:  # no bars at all without a target
        axes[0].legend(fontsize=7)
    fig.savefig(directory / "time_to_quality.png", dpi=110, metadata={"Software": None})


# ---------------------------------------------------------------------------------------- the report
def render_markdown(analysis: Analysis) -> str:
    """The multi-seed report (figures referenced as ``figures/<name>.png``)."""
    group_lines = "\n".join(
        f"- **{r.group.label}**: {len(r.group.experiments)} experiments, seeds "
        f"{', '.join(map(str, r.group.seeds))}; "
        + ("every precision at the same batch and number of optimizer steps" if r.equal_batch
           else "batch size or optimizer steps differ between precisions")
        + (f"; left out as repeated seeds: {', '.join(r.group.duplicates)}" if r.group.duplicates else "")
        for r in analysis.groups)
    tests = sum(1 for r in analysis.groups for m in METRICS for p in analysis.precisions
                if r.cells[m.key][p].difference is not None)
    method = [
        "mean ± std: over the seeds of a group (sample standard deviation, n − 1); (n) = seeds with a value.",
        f"Δ vs fp32: mean of the precision − mean of fp32 in the same group, with its 95% confidence interval. "
        f"**exceeds** = the difference exceeds the seed-to-seed spread: two-sided Welch's t-test (unequal "
        f"variances, Welch–Satterthwaite degrees of freedom) of the per-seed values, p < {ALPHA}. The ratio "
        "metrics are computed against fp32 inside each experiment, so they get a one-sample t-test against "
        "no difference (ratio 1×, reduction 0%).",
        f"{tests} tests in this report: at p < {ALPHA} about {ALPHA * tests:.1f} of them are flagged by chance "
        "alone when nothing differs. No correction for multiple comparisons is applied; read single flags "
        "with that in mind.",
        "Throughput ratio vs fp32 = samples/s ÷ fp32's samples/s in the same experiment (same machine, same "
        "hour); time reduction vs fp32 = 1 − train time ÷ fp32's in the same experiment. 1.8× the "
        "throughput is 44.4% less time, not \"44% faster\".",
        f"Runs that are not speed measurements (emulated fp8; fp16 on a CPU without fp16 arithmetic) show "
        f"\"{SPEED_FLAG}\" instead of any speed or time number.",
        "Time to quality: the first validation point at which a run's metric reached the target; samples "
        "and training seconds (optimizer steps only, validation excluded) up to that point. \"(est.)\": "
        "not logged per epoch, estimated from the training summary (steps × batch size; train time × "
        "steps ÷ total steps). Means are over the runs that reached the target.",
    ]
    parts = [
        f"# Multi-seed precision comparison: {', '.join(analysis.precisions)}",
        "Experiments from `dvc exp show`, grouped by everything but the seed:\n\n" + group_lines
        + (f"\n\nLeft out: {'; '.join(analysis.skipped)}." if analysis.skipped else ""),
        "## Conclusions", "\n".join(f"- {c}" for c in conclusions(analysis)),
        "## Method", "\n".join(f"- {m}" for m in method),
        "## Setup per group", _setup_table(analysis),
        "## Quality", _metric_table(analysis, QUALITY),
        "## Speed and memory", _metric_table(analysis, SPEED),
        f"## Time to quality\n\nTarget: {analysis.target_text}.",
        _ttq_table(analysis) if analysis.target_value is not None else "n/a: no target.",
        "## Figures", "\n\n".join(f"![{caption}](figures/{name})" for name, caption in FIGURES.items()),
    ]
    return "\n\n".join(parts) + "\n"


def to_json(analysis: Analysis) -> dict:
    """The numbers behind the report, JSON-safe (no NaN), for other tools."""
    def stat(s: Stat | None) -> dict | None:
        return None if s is None else {"n": s.n, "mean": s.mean, "std": s.std, "values": list(s.values)}

    def diff(d: Difference | None) -> dict | None:
        return None if d is None else {"test": d.test, "diff": d.diff, "relative": d.relative, "ci95": list(d.ci),
                                       "p_value": d.p_value, "df": d.df, "exceeds_seed_spread": d.exceeds}

    return {
        "alpha": ALPHA,
        "target": {"metric": analysis.target.metric, "value": analysis.target_value, "text": analysis.target_text},
        "skipped": list(analysis.skipped),
        "groups": [{
            "label": r.group.label, "seeds": r.group.seeds, "experiments": [e.name for e in r.group.experiments],
            "equal_batch": r.equal_batch,
            "metrics": {key: {p: {"stat": stat(c.stat), "vs_fp32": diff(c.difference), "note": c.note}
                              for p, c in by_p.items()} for key, by_p in r.cells.items()},
            "time_to_quality": {p: {"runs": c.runs, "reached": c.reached, "samples": stat(c.samples),
                                    "seconds": stat(c.seconds), "time_reduction_vs_fp32": stat(c.reduction),
                                    "estimated": c.estimated, "note": c.note} for p, c in r.ttq.items()},
        } for r in analysis.groups],
    }


def build_report(analysis: Analysis, out_dir: Path) -> dict:
    """Write ``experiments_report.md``, ``experiments.json`` and ``figures/*.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    markdown = render_markdown(analysis)
    numbers = to_json(analysis)
    with atomic_dir(out_dir / "figures") as tmp:
        _write_figures(analysis, tmp)
    write_json(out_dir / "experiments.json", numbers)
    write_text(out_dir / "experiments_report.md", markdown)
    return numbers
