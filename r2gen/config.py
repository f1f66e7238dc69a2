"""Typed configuration: one frozen dataclass per params.yaml section.

The library receives these objects, never the raw YAML. ``Params.from_dict`` rejects unknown keys
with the closest valid key (``unknown key 'train.common.epoch' in params.yaml; did you mean
'epochs'?``) so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from r2gen.errors import ConfigError, R2GenError
from r2gen.io import shorten

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8")
DATASETS: tuple[str, ...] = ("iu_xray", "mimic_cxr")
BACKENDS: tuple[str, ...] = ("auto", "native", "te", "torchao", "emulated")
FP8_RECIPES: tuple[str, ...] = ("delayed", "current")
BATCH_MODES: tuple[str, ...] = ("configured", "equal", "max")
LR_SCALING: tuple[str, ...] = ("sqrt", "linear", "none")
REFERENCES: tuple[str, ...] = ("truncated", "full")  # evaluate.references
MONITOR_SYSTEM: tuple[str, ...] = ("auto", "on", "off")
VISUAL_EXTRACTORS: tuple[str, ...] = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Views per study in each dataset layout (R2Gen: IU X-Ray stacks frontal + lateral, MIMIC uses one).
VIEWS: dict[str, int] = {"iu_xray": 2, "mimic_cxr": 1}

MAX_REPORT_TOKENS = 1024  # the decoder's positional table (r2gen/model/transformer.py): no report is longer


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric param: ``lo``..``hi``, either end open; ``why`` says what a bound protects."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def holds(self, value: float) -> bool:
        return (value > self.lo if self.lo_open else value >= self.lo) and \
            (value < self.hi if self.hi_open else value <= self.hi)

    def text(self) -> str:
        lo, hi = _number(self.lo), _number(self.hi)
        if not self.lo_open and not self.hi_open:
            return f"from {lo} to {hi}"
        return f"{'>' if self.lo_open else '>='} {lo} and {'<' if self.hi_open else '<='} {hi}"


def _number(x: float) -> str:
    if not float(x).is_integer() or abs(x) >= 1e18:
        return f"{x:g}"
    return f"{int(x):,}" if abs(x) >= 10**5 else str(int(x))


# Every numeric field of every section below has its range here (tests/test_hostile_config.py checks
# that none is missing): a value outside it, and NaN or infinity, is a ConfigError naming the key.
# Upper bounds are far above any useful value; they stop a typo (an extra digit, 1e9) from becoming a
# multi-gigabyte allocation or an overflow deep in torch.
RANGES: dict[str, dict[str, Range]] = {
    "Params": {
        "seed": Range(0, 2**32 - 1, why="numpy's seed range"),
        "threads": Range(1, 1024),
    },
    "DataConfig": {
        "image_size": Range(8, 2048, why="2048 px is already 9x the paper's 224"),
        "train_max_aspect": Range(1.0, 10.0, why="1.0 is the central square; longer views are centre-cropped to it"),
    },
    "TokenizerConfig": {
        "threshold": Range(1, 10**6),
        "max_seq_length": Range(3, MAX_REPORT_TOKENS, why="BOS + a token + EOS; the decoder's positional table"),
    },
    "ModelConfig": {
        "visual_width": Range(1, 1024),
        "d_model": Range(1, 16384),
        "d_ff": Range(1, 65536),
        "num_heads": Range(1, 256),
        "num_layers": Range(1, 64),
        "dropout": Range(0, 1, hi_open=True, why="a probability; 1 drops everything"),
        "drop_prob_lm": Range(0, 1, hi_open=True, why="a probability; 1 drops everything"),
        "use_bn": Range(0, 2),
        "rm_num_slots": Range(1, 256),
        "rm_num_heads": Range(1, 256),
        "rm_d_model": Range(1, 16384),
        "visual_recompute": Range(0, 5),
    },
    "TrainCommon": {
        "epochs": Range(1, 10**5),
        "lr_ve": Range(0, 1, lo_open=True),
        "lr_ed": Range(0, 1, lo_open=True),
        "weight_decay": Range(0, 1),
        "lr_step_size": Range(1, 10**6),
        "lr_gamma": Range(0, 1, lo_open=True),
        "grad_clip_value": Range(0, 1e6, lo_open=True, why="clip_grad_value_ clips each gradient to +-this"),
        "log_every": Range(1, 10**9),
        "warmup_steps": Range(0, 10**9),
        "max_nonfinite_steps": Range(1, 10**9, why="the number of non-finite steps in a row that stops a run; "
                                     "1 stops at the first"),
        "memory_budget_gb": Range(0, 10**6, lo_open=True),
    },
    "TrainPrecision": {
        "batch_size": Range(1, 65536),
        "nproc": Range(1, 1024),
    },
    "EvaluateConfig": {
        "num_beams": Range(1, 64),
        "max_new_tokens": Range(1, MAX_REPORT_TOKENS, why="the decoder's positional table, as `r2gen generate` caps it"),
        "batch_size": Range(1, 65536),
    },
    "ExpReportConfig": {
        "ttq_relative": Range(0, 100, lo_open=True),
        "ttq_absolute": Range(-1e30, 1e30),
    },
}


def check_ranges(obj: Any, prefix: str) -> None:
    """ConfigError naming ``prefix + field`` for the first numeric field of ``obj`` outside its range."""
    for name, rng in RANGES.get(type(obj).__name__, {}).items():
        check_range(f"{prefix}{name}", getattr(obj, name), rng)


def check_range(key: str, value: Any, rng: Range) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # types are checked where the YAML is read
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if not rng.holds(value):
        why = f" ({rng.why})" if rng.why else ""
        raise ConfigError(f"{key} must be {rng.text()}{why}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "iu_xray"  # layout of data root: iu_xray (2 views/study) | mimic_cxr (1 view)
    root: str = "data/iu_xray_sample"  # folder holding annotation.json and images/
    image_size: int = 224  # model input side in px (R2Gen: 224)
    train_crop: bool = True  # R2Gen: train images resized to 256/224*size then randomly cropped
    # Train cache (train_crop): each view keeps its aspect ratio up to this long:short ratio, so the
    # random crop reaches every position R2Gen's Resize(256) + RandomCrop(224) reaches; a longer
    # view is centre-cropped to the bound along its long side. 1.0: the central square only.
    train_max_aspect: float = 1.5
    hflip: bool = False  # R2Gen flips train images, swapping anatomical left/right but not the words
    on_invalid: str = "error"  # a bad study (missing image, empty report, ...): error | drop (logged)

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.on_invalid", self.on_invalid, ("error", "drop"))
        _positive("data.image_size", self.image_size)
        check_ranges(self, "data.")

    @property
    def views(self) -> int:
        return VIEWS[self.dataset]

    @property
    def stored_size(self) -> int:
        """Side of the cached training images (before the random crop)."""
        return round(self.image_size * 256 / 224) if self.train_crop else self.image_size

    @property
    def stored_long(self) -> int:
        """Bound on the long side of the cached training images (``stored_size`` x ``train_max_aspect``)."""
        return int(self.stored_size * self.train_max_aspect) if self.train_crop else self.image_size


@dataclass(frozen=True)
class TokenizerConfig:
    threshold: int = 3  # min count of a token in the train split (R2Gen: 3 IU X-Ray, 10 MIMIC-CXR)
    max_seq_length: int = 60  # BOS + tokens + EOS, truncated (R2Gen: 60 IU, 100 MIMIC)
    fixes: tuple[str, ...] = ()  # opt-in fixes of the public cleaning quirks; see r2gen.tokenizer.FIXES

    def __post_init__(self) -> None:
        _positive("tokenizer.threshold", self.threshold)
        if self.max_seq_length < 3:
            raise ConfigError(f"tokenizer.max_seq_length must be at least 3, got {self.max_seq_length}")
        check_ranges(self, "tokenizer.")


@dataclass(frozen=True)
class ModelConfig:
    visual_extractor: str = "resnet101"  # torchvision ResNet without its last two children
    visual_width: int = 64  # ResNet base width; 64 is torchvision's (needed for ImageNet weights)
    pretrained: str | None = None  # null: random init; "imagenet": torch hub cache only; or a path
    d_model: int = 512
    d_ff: int = 512
    num_heads: int = 8
    num_layers: int = 3
    dropout: float = 0.1
    drop_prob_lm: float = 0.5  # dropout after the visual projection (att_embed)
    use_bn: int = 0  # R2Gen's use_bn: 1 = BatchNorm over visual features before att_embed, 2 = also after
    rm_num_slots: int = 3
    rm_num_heads: int = 8
    rm_d_model: int = 512
    # Training memory for time: the first N stages of the visual trunk (1 = the stem, 2 = + layer1,
    # ... 5 = all four residual stages) keep only each residual block's input and re-run the block
    # in the backward pass. Same values and gradients; one more forward pass of those stages.
    visual_recompute: int = 0

    def __post_init__(self) -> None:
        check_choice("model.visual_extractor", self.visual_extractor, VISUAL_EXTRACTORS)
        if self.visual_recompute not in range(6):
            raise ConfigError(f"model.visual_recompute must be 0 (off) to 5 (the stem and all four stages), "
                              f"got {self.visual_recompute}")
        for name in ("visual_width", "d_model", "d_ff", "num_heads", "num_layers", "rm_num_slots",
                     "rm_num_heads", "rm_d_model"):
            _positive(f"model.{name}", getattr(self, name))
        if self.use_bn not in (0, 1, 2):
            raise ConfigError(f"model.use_bn must be 0, 1 or 2 (R2Gen's option), got {self.use_bn}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        if self.rm_d_model % self.rm_num_heads:
            raise ConfigError(
                f"model.rm_d_model ({self.rm_d_model}) must be divisible by model.rm_num_heads ({self.rm_num_heads})"
            )
        if self.rm_d_model != self.d_model:
            # R2Gen feeds the embedded tokens (d_model) straight into the memory update.
            raise ConfigError(f"model.rm_d_model ({self.rm_d_model}) must equal model.d_model ({self.d_model})")
        check_ranges(self, "model.")


@dataclass(frozen=True)
class TrainCommon:
    epochs: int = 100
    lr_ve: float = 5e-5  # visual extractor learning rate
    lr_ed: float = 1e-4  # encoder-decoder learning rate
    weight_decay: float = 5e-5
    amsgrad: bool = True
    lr_step_size: int = 50  # StepLR, stepped once per epoch
    lr_gamma: float = 0.1
    grad_clip_value: float = 0.1  # clip_grad_value_ as in the public code (after unscale_ under AMP)
    validate: str = "last"  # last | every_epoch: val loss after every epoch or only at the end
    log_every: int = 10  # steps between log lines
    warmup_steps: int = 3  # steps excluded from samples/s
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before the run stops
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    # configured: every precision at its own train.<p>.batch_size; equal: the same, checked to be the
    # same for every precision (same optimizer steps); max: the largest batch within memory_budget_gb,
    # found by a probe (r2gen/training/batchsize.py), learning rates rescaled from train.<p>.batch_size by lr_scaling.
    batch_mode: str = "configured"
    memory_budget_gb: float | None = None  # max mode; null: 90% of the free GPU memory or of the RAM available
    lr_scaling: str = "sqrt"  # max mode: sqrt | linear | none (see r2gen.training.batchsize.scaled_lr)
    # dvclive's system metrics (CPU, RAM, disk, GPU): a sampling thread in the training process that
    # competes for the GIL. auto: on only where samples/s is no speed measurement anyway (emulated
    # fp8, fp16 on CPU); on | off. Recorded in the training summary (r2gen.training.live).
    monitor_system: str = "off"
    # torch.use_deterministic_algorithms + cuDNN deterministic, benchmark off: a resumed GPU run is
    # bit-equal to an unkilled one only with it (CPU runs are deterministic already); slower.
    deterministic: bool = False

    def __post_init__(self) -> None:
        check_choice("train.common.batch_mode", self.batch_mode, BATCH_MODES)
        check_choice("train.common.monitor_system", self.monitor_system, MONITOR_SYSTEM)
        check_choice("train.common.lr_scaling", self.lr_scaling, LR_SCALING)
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ConfigError(f"train.common.memory_budget_gb must be positive or null, got {self.memory_budget_gb}")
        check_choice("train.common.validate", self.validate, ("last", "every_epoch"))
        check_choice("train.common.device", self.device, ("auto", "cpu", "cuda"))
        _positive("train.common.epochs", self.epochs)
        _positive("train.common.lr_step_size", self.lr_step_size)
        check_ranges(self, "train.common.")


@dataclass(frozen=True)
class TrainPrecision:
    batch_size: int = 16
    backend: str = "auto"  # auto | native | te | torchao | emulated (see r2gen.precision)
    fp8_recipe: str = "delayed"  # fp8 only: delayed (DelayedScaling, HYBRID) | current
    nproc: int = 1  # data-parallel processes (torchrun + DDP); batch_size is per process

    def __post_init__(self) -> None:
        _positive("train.<precision>.batch_size", self.batch_size)
        _positive("train.<precision>.nproc", self.nproc)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        check_ranges(self, "train.<precision>.")


@dataclass(frozen=True)
class TrainConfig:
    common: TrainCommon = field(default_factory=TrainCommon)
    fp32: TrainPrecision = field(default_factory=TrainPrecision)
    fp16: TrainPrecision = field(default_factory=TrainPrecision)
    bf16: TrainPrecision = field(default_factory=TrainPrecision)
    fp8: TrainPrecision = field(default_factory=TrainPrecision)

    def __post_init__(self) -> None:
        if self.common.batch_mode == "equal":
            batches = {p: self.for_precision(p).batch_size * self.for_precision(p).nproc for p in PRECISIONS}
            if len(set(batches.values())) > 1:
                listed = ", ".join(f"{p} {b}" for p, b in batches.items())
                raise ConfigError(f"train.common.batch_mode is 'equal' but the global batches differ ({listed}; "
                                  "batch_size x nproc): set train.<precision>.batch_size equal, or use batch_mode: configured or max")

    def for_precision(self, precision: str) -> TrainPrecision:
        check_choice("precision", precision, PRECISIONS)
        return getattr(self, precision)


@dataclass(frozen=True)
class EvaluateConfig:
    precision: str = "fp32"  # generation precision, the same for every trained model
    num_beams: int = 3  # 1: deterministic greedy (the public code samples at random with beam size 1)
    # Longest report in tokens, EOS included; None: the tokenizer's max_seq_length, as the public code
    # generates up to max_seq_length tokens (60 IU X-Ray, 100 MIMIC-CXR).
    max_new_tokens: int | None = None
    block_trigrams: bool = False  # greedy only: the public greedy's trigram penalty (-0.693 * 2 per repeat)
    batch_size: int = 16
    meteor: bool = True  # needs Java; without it METEOR is recorded as null with the reason
    # What reports are scored against (r2gen.evaluation.references): truncated (R2Gen: the report
    # encoded and decoded, <unk> for rare words, cut at max_seq_length) | full (the cleaned report, whole)
    references: str = "truncated"

    def __post_init__(self) -> None:
        check_choice("evaluate.precision", self.precision, PRECISIONS)
        check_choice("evaluate.references", self.references, REFERENCES)
        _positive("evaluate.num_beams", self.num_beams)
        if self.max_new_tokens is not None:
            _positive("evaluate.max_new_tokens", self.max_new_tokens)
        _positive("evaluate.batch_size", self.batch_size)
        check_ranges(self, "evaluate.")
        if self.block_trigrams and self.num_beams != 1:
            raise ConfigError(f"evaluate.block_trigrams applies to greedy decoding only (num_beams: 1), got "
                              f"num_beams: {self.num_beams}; the public beam search does not block trigrams either")

    def max_tokens(self, max_seq_length: int) -> int:
        """The generation length used: ``max_new_tokens``, or the tokenizer's ``max_seq_length``."""
        return self.max_new_tokens if self.max_new_tokens is not None else max_seq_length


@dataclass(frozen=True)
class ExpReportConfig:
    """`r2gen exp-report`'s time-to-quality target (read by the command, no stage depends on it)."""

    ttq_metric: str = "val_loss"  # a dvclive epoch metric of training
    ttq_relative: float = 1.05  # target = this x fp32's mean final value at equal batch
    ttq_absolute: float | None = None  # a fixed target instead

    def __post_init__(self) -> None:
        if not self.ttq_relative > 0:
            raise ConfigError(f"exp_report.ttq_relative must be positive, got {self.ttq_relative}")
        check_ranges(self, "exp_report.")


@dataclass(frozen=True)
class Params:
    precision: str = "fp32"  # the model the report headlines and `r2gen generate` ships
    seed: int = 9223  # R2Gen's run_iu_xray.sh seed
    threads: int = 2  # torch CPU threads, pinned: results differ between thread counts
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    exp_report: ExpReportConfig = field(default_factory=ExpReportConfig)

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        _positive("threads", self.threads)
        check_ranges(self, "")

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "params.yaml") -> "Params":
        """Build from a parsed params.yaml; unknown keys and wrong types raise ConfigError."""
        return from_dict(cls, raw or {}, source=source)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass(frozen=True)
class TrainSpec:
    """One training run, resolved once from params.yaml: its precision and only the sections it reads.

    ``train`` is that precision's ``train.<p>`` section. The stage builds it with :meth:`of`, which
    is where the precision string is checked; everything below takes these typed sections.
    """

    precision: str  # fp32 | fp16 | bf16 | fp8
    seed: int
    threads: int
    data: DataConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    common: TrainCommon  # train.common
    train: TrainPrecision  # train.<precision>

    @classmethod
    def of(cls, params: Params, precision: str) -> "TrainSpec":
        """The spec of training ``precision`` with ``params``; an unknown precision is a ConfigError."""
        return cls(precision, params.seed, params.threads, params.data, params.tokenizer, params.model,
                   params.train.common, params.train.for_precision(precision))


def from_dict(cls: type, raw: Any, source: str = "params.yaml", prefix: str = "") -> Any:
    """Recursively build the frozen dataclass ``cls`` from a mapping, rejecting unknown keys."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key)[:100], list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{prefix}{shorten(key)[1:-1] if isinstance(key, str) else shorten(key)}' "
                              f"in {source}{hint}")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # A train.<p> section does not know its precision; here its full key is known.
        raise ConfigError(f"{source}: {str(exc).replace('train.<precision>.', prefix)}") from None


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, source, f"{key}.")
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, key)
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {shorten(value)}")
        return tuple(_coerce(args[0], v, source, key) for v in value)
    if origin is Literal:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {shorten(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {shorten(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {shorten(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {shorten(value)}")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Plain-Python (JSON/YAML-safe) form of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def check_choice(key: str, value: Any, valid: tuple[str, ...], error: type[R2GenError] = ConfigError,
                 where: str = "") -> None:
    """The one check of a named choice (precision, backend, ...): ``error`` naming the valid set.

    ``where`` (e.g. ``" in params.yaml"``) follows the value in the message.
    """
    if value not in valid:
        close = difflib.get_close_matches(str(value)[:100], valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        shown = shorten(value)[1:-1] if isinstance(value, str) else shorten(value)
        raise error(f"unsupported {key} '{shown}'{where}, must be one of: {', '.join(valid)}{hint}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")
