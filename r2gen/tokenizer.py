"""R2Gen's report tokenizer: the public cleaning rules, a frequency-threshold vocabulary, encode/decode.

By default every step matches ``modules/tokenizers.py`` of the public R2Gen code bit for bit, quirks
included, because they change the token sequences the model is trained on and the strings BLEU
compares:

- every ``'1. '`` is deleted, even inside a word (``'t11. the'`` becomes ``'t1the'``);
- the punctuation class ``[.,?;*!%^&_+():-\\[\\]{}]`` contains the *range* ``:-\\[`` (``: ; < = > ?
  @ A-Z [``), so ``<``, ``=``, ``>`` and ``@`` are deleted while ``-`` survives;
- sentences that are empty after cleaning are kept (``' .  . no acute disease .'``);
- periods are tokens: sentences are joined with ``' . '`` and the report ends with ``' .'``;
- a report longer than ``max_seq_length`` is cut and loses its EOS.

Each quirk has an opt-in fix, named in :data:`FIXES`. Id 0 is BOS, EOS and PAD at once; the
vocabulary (train reports only, count >= threshold, plus ``<unk>``) is sorted and numbered from 1.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r2gen.config import DATASETS
from r2gen.errors import ConfigError, R2GenError
from r2gen.io import write_json

FIXES: dict[str, str] = {
    "numbering": "delete the list marker '1. ' only where it stands alone (the public code deletes every "
    "'1. ', so 't11. the' becomes 't1the')",
    "punct_range": "strip ':', '-' and '[' literally (the public class ':-\\[' is a range that strips "
    "'< = > ? @' and keeps '-')",
    "drop_empty_sentences": "drop sentences that are empty after cleaning (the public filter compares a "
    "string with [] and keeps them, giving ' .  . ')",
    "keep_eos_on_truncation": "a report longer than max_seq_length keeps its EOS as last id (the public "
    "dataset slice drops it)",
}

UNK = "<unk>"
# Id 0 is BOS, EOS and PAD at once (R2Gen's bos_idx = eos_idx = pad_idx = 0).
ZERO_ID = 0
ZERO_TOKEN = "<eos>"  # how id 0 is shown by batch_decode(skip_special_tokens=False)
FORMAT = "r2gen-tokenizer"
FORMAT_VERSION = 1

# The public class, character for character: ':-\[' is a range (':' to '['), so '-' is kept.
_PUBLIC_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_INTENDED_PUNCT = re.compile(r"[.,?;*!%^&_+():\-\[\]{}]")
# A '1. ' list marker that is not the tail of a longer number or word (the 'numbering' fix).
_STANDALONE_ONE = re.compile(r"(?<![\w.])1\. ")


def check_fixes(fixes: Iterable[str]) -> tuple[str, ...]:
    """Return ``fixes`` as a tuple; an unknown name raises ConfigError listing the valid ones."""
    fixes = tuple(fixes)
    for name in fixes:
        if name not in FIXES:
            raise ConfigError(
                f"unknown tokenizer fix '{name}' in tokenizer.fixes, must be one of: {', '.join(FIXES)}"
            )
    return fixes


def clean_report(report: str, dataset: str, fixes: tuple[str, ...] = ()) -> str:
    """Clean one report with R2Gen's rules for ``dataset`` (iu_xray | mimic_cxr).

    Returns space-separated lowercase tokens, periods included, ending in ``' .'``; an empty report
    gives ``' .'``.
    """
    fixes = check_fixes(fixes)
    if dataset not in DATASETS:
        raise ConfigError(f"unsupported dataset '{dataset}', must be one of: {', '.join(DATASETS)}")
    text = report
    if dataset == "mimic_cxr":
        # The public code repeats each replace a fixed number of times rather than looping to a
        # fixed point; longer runs therefore survive partly, and so they do here.
        text = text.replace("\n", " ")
        text = _replace_times(text, "__", "_", 7)
        text = _replace_times(text, "  ", " ", 6)
        text = _replace_times(text, "..", ".", 8)
    else:
        text = _replace_times(text, "..", ".", 3)
    if "numbering" in fixes:
        text = _STANDALONE_ONE.sub("", text)
    else:
        text = text.replace("1. ", "")
    for n in "2345":
        text = text.replace(f". {n}. ", ". ")
    for n in "2345":
        text = text.replace(f" {n}. ", ". ")
    punct = _INTENDED_PUNCT if "punct_range" in fixes else _PUBLIC_PUNCT
    sentences = [_clean_sentence(s, punct) for s in text.strip().lower().split(". ")]
    if "drop_empty_sentences" in fixes:
        sentences = [s for s in sentences if s.split()]
    return " . ".join(sentences) + " ."


def _replace_times(text: str, old: str, new: str, times: int) -> str:
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _clean_sentence(sentence: str, punct: re.Pattern) -> str:
    for char in "\"/\\'":
        sentence = sentence.replace(char, "")
    return punct.sub("", sentence.strip().lower())


@dataclass(frozen=True)
class Tokenizer:
    """Word-level vocabulary over cleaned reports; ``tokens[i]`` has id ``i + 1``, id 0 is BOS=EOS=PAD."""

    tokens: tuple[str, ...] = field(repr=False)  # sorted, includes <unk>
    dataset: str
    threshold: int
    max_seq_length: int
    fixes: tuple[str, ...] = ()
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_fixes(self.fixes)
        object.__setattr__(self, "_ids", {token: i + 1 for i, token in enumerate(self.tokens)})

    @classmethod
    def build(
        cls,
        reports: Iterable[str],
        dataset: str,
        threshold: int,
        max_seq_length: int,
        fixes: tuple[str, ...] = (),
    ) -> "Tokenizer":
        """Vocabulary of the tokens seen at least ``threshold`` times in ``reports`` (the train split)."""
        fixes = check_fixes(fixes)
        counts = Counter(tok for report in reports for tok in clean_report(report, dataset, fixes).split())
        # A set, so that a literal '<unk>' in a report (possible with the punct_range fix) is not
        # listed twice; with the public cleaning '<' and '>' never survive and this is R2Gen's list.
        tokens = sorted({tok for tok, n in counts.items() if n >= threshold} | {UNK})
        return cls(tuple(tokens), dataset, threshold, max_seq_length, fixes)

    @property
    def vocab_size(self) -> int:
        """Number of model output classes: the tokens, <unk> included, plus id 0."""
        return len(self.tokens) + 1

    def clean(self, report: str) -> str:
        """The report as this tokenizer sees it (R2Gen's cleaning with this tokenizer's fixes)."""
        return clean_report(report, self.dataset, self.fixes)

    def encode(self, report: str) -> list[int]:
        """``[0] + ids + [0]`` cut to ``max_seq_length``, as R2Gen's dataset stores a target."""
        unk = self._ids[UNK]
        ids = [ZERO_ID] + [self._ids.get(tok, unk) for tok in self.clean(report).split()] + [ZERO_ID]
        if len(ids) > self.max_seq_length and "keep_eos_on_truncation" in self.fixes:
            return ids[: self.max_seq_length - 1] + [ZERO_ID]
        return ids[: self.max_seq_length]

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Tokens up to the first 0, joined by spaces (R2Gen's ``decode``).

        A leading 0 (BOS, as in :meth:`encode` output) is skipped first. R2Gen only decodes
        sequences without BOS, where a leading 0 means an empty report and the result is '' either way.
        """
        ids = _as_list(ids)
        if ids and ids[0] == ZERO_ID:
            ids = ids[1:]
        words = []
        for i in ids:
            if i == ZERO_ID:
                break
            words.append(self._token(i))
        return " ".join(words)

    def batch_decode(self, ids_batch: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a (B, T) tensor, array or list of lists.

        ``skip_special_tokens=True`` gives R2Gen's text (see :meth:`decode`); False shows every id,
        0 as ``<eos>``, which helps to inspect padding and truncation.
        """
        rows = _as_list(ids_batch)
        if skip_special_tokens:
            return [self.decode(row) for row in rows]
        return [" ".join(ZERO_TOKEN if i == ZERO_ID else self._token(i) for i in _as_list(row)) for row in rows]

    def _token(self, i: int) -> str:
        if not 0 < i < self.vocab_size:
            raise ValueError(f"token id {i} is out of range for a vocabulary of size {self.vocab_size}")
        return self.tokens[i - 1]

    def to_dict(self) -> dict[str, Any]:
        """The vocabulary and the settings that produced it, JSON-safe (also stored in checkpoints)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dataset": self.dataset,
            "threshold": self.threshold,
            "max_seq_length": self.max_seq_length,
            "fixes": list(self.fixes),
            "tokens": list(self.tokens),
        }

    @classmethod
    def load_dict(cls, raw: Any, source: str, fix: str = "re-create it with `dvc repro`") -> "Tokenizer":
        """Rebuild from :meth:`to_dict` output read from ``source``; invalid content raises R2GenError."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise R2GenError(f"{source} does not hold an r2gen tokenizer; {fix}")
        if raw.get("version") != FORMAT_VERSION:
            raise R2GenError(
                f"the tokenizer in {source} has version {raw.get('version')!r}, this code reads version "
                f"{FORMAT_VERSION}; {fix}"
            )
        tokens = raw.get("tokens")
        fixes = raw.get("fixes")
        valid = (
            isinstance(tokens, list)
            and all(isinstance(t, str) and t for t in tokens)
            and tokens == sorted(set(tokens))
            and UNK in tokens
            and raw.get("dataset") in DATASETS
            and all(isinstance(raw.get(k), int) and raw[k] > 0 for k in ("threshold", "max_seq_length"))
            and isinstance(fixes, list)
        )
        if not valid:
            raise R2GenError(f"the tokenizer in {source} is corrupt (missing or invalid fields); {fix}")
        try:
            return cls(tuple(tokens), raw["dataset"], raw["threshold"], raw["max_seq_length"], tuple(fixes))
        except ConfigError as exc:
            raise R2GenError(f"the tokenizer in {source} is incompatible: {exc}; {fix}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a file written by :meth:`save`; missing, corrupt or incompatible files raise R2GenError."""
        rebuild = "rebuild it with `dvc repro build_tokenizer`"
        try:
            with open(path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except FileNotFoundError:
            raise R2GenError(f"tokenizer file not found: {path}; {rebuild}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise R2GenError(f"tokenizer file {path} is corrupt ({exc}); {rebuild}") from None
        except OSError as exc:
            raise R2GenError(f"cannot read tokenizer file {path}: {exc.strerror}; check its permissions") from None
        return cls.load_dict(raw, source=str(path), fix=rebuild)


def _as_list(ids: Any) -> list:
    """A tensor or array becomes nested Python ints; lists pass through."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)
