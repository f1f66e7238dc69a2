"""Experiments grouped by everything but the seed (in practice: by batch mode)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

from r2gen.compare.derived import samples_per_step
from r2gen.compare.exp_show import BATCH_SIZE, GLOBAL_BATCH_SIZE, STEPS, Experiment

# Not part of a group's identity: the seed is the replicate; `precision` only picks the report's headline.
NOT_GROUPED = ("seed", "precision")


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
        return all(len({(samples_per_step(e.train[p].get(GLOBAL_BATCH_SIZE), e.train[p].get(BATCH_SIZE)),
                         e.train[p].get(STEPS)) for p in precisions}) == 1 for e in self.experiments)


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
