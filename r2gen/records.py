"""Typed records of the metrics files: one frozen dataclass per JSON file the pipeline writes.

The training summary (``metrics/train/<p>.json``), the evaluation summary (``metrics/eval/<p>.json``)
and the image-blind baseline (``metrics/eval/baseline.json``) are written from these records and read
back into them, so a renamed or missing key is an error where it happens, never a blank report
column. The JSON keys and their order are the field names and their order; :meth:`Record.from_json`
rejects unknown and missing keys with a one-line error that names the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from r2gen.errors import R2GenError

R = TypeVar("R", bound="Record")


def optional(doc: str = "") -> Any:
    """A key written only when it has a value (e.g. ``METEOR_error``, present when METEOR is None)."""
    return dataclasses.field(default=None, metadata={"optional": True, "doc": doc})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """Base of the metrics records: exact-key JSON round trip."""

    kind: ClassVar[str] = "metrics record"

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in field order (``json.dumps`` keeps it); an unset optional key is left out."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.metadata.get("optional") and getattr(self, f.name) is None)}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def key(cls, name: str) -> str:
        """``name``, checked to be a key of this record: how a reader of partial dicts (the metrics in
        ``dvc exp show --json``) names the keys it reads, so that renaming a field breaks it loudly."""
        if name not in cls.keys():
            raise KeyError(f"{name!r} is not a key of the {cls.kind} ({cls.__name__})")
        return name

    @classmethod
    def from_json(cls: type[R], data: Any, source: str | Path = "<dict>") -> R:
        """The record of a parsed JSON object; unknown or missing keys are a one-line error."""
        if not isinstance(data, dict):
            raise R2GenError(f"{source}: expected a JSON object ({cls.kind}), got {type(data).__name__}; "
                             "rerun `dvc repro` to rewrite it")
        expected = cls.keys()
        optional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("optional")}
        missing = [k for k in expected if k not in data and k not in optional]
        unknown = sorted(k for k in data if k not in expected)
        if missing or unknown:
            parts = ([f"missing keys {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown keys {', '.join(unknown)}"] if unknown else [])
            raise R2GenError(f"{source}: not the {cls.kind} this version writes ({'; '.join(parts)}); "
                             "rerun `dvc repro` to rewrite it")
        return cls(**{k: data[k] for k in expected if k in data})

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read ``path`` into a record (missing file, bad JSON and bad keys are one-line errors)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise R2GenError(f"{path} not found ({cls.kind}); run `dvc repro` to produce it") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise R2GenError(f"cannot read {path} ({cls.kind}): {exc}; rerun `dvc repro` to rewrite it") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise R2GenError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                             "rerun `dvc repro` to rewrite it") from None
        return cls.from_json(data, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSummary(Record):
    """``metrics/train/<p>.json``: what one training run used and measured."""

    kind: ClassVar[str] = "training summary"

    precision: str
    # -- the precision plan and environment (PrecisionPlan.describe())
    backend: str
    backend_requested: str
    backend_reason: str
    autocast_dtype: str | None
    grad_scaler: bool
    fp8_recipe: str | None
    fp8_format: str | None
    device: str
    device_name: str
    compute_capability: str | None
    cpu_capability: str
    cpu_native_bf16: bool
    cpu_native_fp16: bool
    fp32_precision: dict
    torch: str
    cuda: str | None
    transformer_engine: str | None
    speed_comparable: bool
    note: str
    # -- what training did
    fp8_linear_converted: int
    fp8_linear_total: int
    grad_scaler_final_scale: float | None
    grad_scaler_skipped_steps: int
    nonfinite_steps: int
    batch_mode: str
    batch_size: int
    batch_probe: str | None
    lr_scaling: str | None
    lr_ve: float
    lr_ed: float
    world_size: int
    global_batch_size: int
    ddp_backend: str | None
    epochs: int
    steps: int
    threads: int
    monitor_system: bool  # dvclive sampled system metrics during the run (train.common.monitor_system resolved)
    deterministic: bool  # train.common.deterministic: deterministic kernels (GPU resume bit-exact)
    train_loss: float
    val_loss: float | None
    samples_per_s: float | None  # warm-up steps excluded
    train_seconds: float
    # Other processes' share of the host's CPUs while the epochs ran (r2gen/training/load.py); the gate
    # compares speed only between runs under r2gen.gate.BUSY_HOST. None without /proc/stat and under DDP
    # (the other ranks would count as load).
    other_cpu_share: float | None
    # -- model FLOPs utilisation (r2gen/training/mfu.py): FLOPs always; a peak and MFU only for a speed measurement
    flops_per_sample: float  # forward + backward model FLOPs of one training sample
    achieved_tflops: float | None  # flops_per_sample x samples_per_s
    peak_tflops: float | None  # the peak of peak_dtype on this device (datasheet on CUDA, measured on CPU)
    peak_dtype: str | None
    peak_source: str | None
    measured_peak_tflops: float | None  # the GEMM probe's rate (beside a datasheet peak)
    mfu: float | None  # achieved_tflops / peak_tflops
    mfu_note: str | None  # why there is no MFU
    peak_memory_bytes: int
    peak_memory_fraction: float
    peak_memory_kind: str
    baseline_rss_bytes: int | None
    parameters: int
    r2gen_version: str

    @property
    def emulated(self) -> bool:
        return self.backend == "emulated"


QUALITY_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr",
                "CE_precision", "CE_recall", "CE_F1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSummary(Record):
    """``metrics/eval/<p>.json``: test loss, generation speed and report scores of one model."""

    kind: ClassVar[str] = "evaluation summary"

    precision: str  # the precision the model was trained at
    eval_precision: str
    eval_backend: str
    test_loss: float
    references: str  # scored against: truncated (R2Gen: decode(encode(report))) | full (evaluate.references)
    BLEU_1: float
    BLEU_2: float
    BLEU_3: float
    BLEU_4: float
    METEOR: float | None  # None where Java is missing (evaluate.meteor: auto)
    ROUGE_L: float
    CIDEr: float
    METEOR_error: str | None = optional("why METEOR is None")
    CE_precision: float
    CE_recall: float
    CE_F1: float
    CE_per_label: dict
    reports_per_s: float | None
    generation_seconds: float
    num_beams: int
    max_new_tokens: int  # the generation length used (evaluate.max_new_tokens or the tokenizer's max_seq_length)
    test_studies: int
    distinct_reports: int
    threads: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaselineSummary(Record):
    """``metrics/eval/baseline.json``: the image-blind baseline (most frequent training report)."""

    kind: ClassVar[str] = "baseline summary"

    baseline: str
    report: str
    train_frequency: float
    references: str  # scored against: truncated | full (evaluate.references), as the models are
    BLEU_1: float
    BLEU_2: float
    BLEU_3: float
    BLEU_4: float
    METEOR: float | None
    ROUGE_L: float
    CIDEr: float
    METEOR_error: str | None = optional("why METEOR is None")
    CE_precision: float
    CE_recall: float
    CE_F1: float
    CE_per_label: dict
    test_studies: int
