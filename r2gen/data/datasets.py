"""R2Gen's two dataset layouts: read ``annotation.json``, and validate every study before training.

Both layouts keep ``<root>/annotation.json`` as ``{"train"|"val"|"test": [{"id", "report",
"image_path": [...], "split"}, ...]}`` and the images under ``<root>/images/<image_path>``:

- ``iu_xray``: one entry per study, ``image_path`` = ``["<id>/0.png", "<id>/1.png"]`` (frontal, lateral);
- ``mimic_cxr``: one entry per image, ``image_path`` = ``["p10/p10xxxxxx/s5xxxxxxx/<dicom>.jpg"]``;
  extra keys such as ``study_id`` and ``subject_id`` are ignored.

Like R2Gen, only ``id``, ``report`` and ``image_path`` are read; the split is the key an entry is
listed under. :func:`validate_dataset` decodes every image once (in a thread pool: PIL releases the
GIL while decoding) and either stops at the first bad study or drops and lists the bad ones.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from r2gen.config import DATASETS, VIEWS, DataConfig
from r2gen.errors import ConfigError, DataError
from r2gen.tokenizer import check_fixes, clean_report

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
ANNOTATION = "annotation.json"
IMAGES = "images"
# Real chest X-rays are at most ~4300 px a side; a bigger header is corrupt or hostile, and decoding
# it would take gigabytes. Checked on the header, before any pixel is decoded.
MAX_IMAGE_SIDE = 8192
_NAME_MAX = 255  # bytes in one file name, on every common file system
_CHUNK = 1024  # studies submitted to the thread pool at a time, to bound pending futures
_VIEW_NAMES = {"iu_xray": "frontal and lateral", "mimic_cxr": "one image per entry"}
_DROP = "set data.on_invalid: drop to skip invalid studies"

ImageSink = Callable[["Study", int, Image.Image], None]


@dataclass(frozen=True)
class Study:
    """One annotation entry: a report and its image files (``<root>/images/<image_path>``)."""

    id: str
    report: str
    image_paths: tuple[Path, ...]
    split: str
    index: int = 0  # position of the entry in its split of annotation.json


@dataclass
class ValidationResult:
    """The studies that passed every check, per split, and the ones dropped with the reason."""

    annotation_path: Path
    studies: dict[str, list[Study]]
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # (split, id, reason)

    @property
    def counts(self) -> dict[str, int]:
        return {split: len(self.studies[split]) for split in SPLITS}


def read_annotation(root: str | os.PathLike, dataset: str) -> dict[str, list[Study]]:
    """Parse ``<root>/annotation.json`` into studies per split, without touching the images.

    Raises:
        DataError: the file is missing, not UTF-8, not JSON, lacks a split, has an empty split, or
            has an entry without a string ``report``, an ``id`` or a list of ``image_path`` strings.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"unsupported dataset '{dataset}', must be one of: {', '.join(DATASETS)}")
    root = Path(root)
    path = root / ANNOTATION
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise DataError(
            f"{path} must be a JSON object with keys {', '.join(SPLITS)}, got a {type(raw).__name__}; "
            "use R2Gen's annotation.json layout"
        )
    images = root / IMAGES
    studies: dict[str, list[Study]] = {}
    for split in SPLITS:
        if split not in raw:
            found = ", ".join(map(str, raw)) or "none"
            raise DataError(
                f"{path} has no '{split}' split (found: {found}); R2Gen's annotation.json needs "
                f"{', '.join(SPLITS)}"
            )
        entries = raw[split]
        if not isinstance(entries, list):
            raise DataError(f"'{split}' in {path} must be a list of studies, got a {type(entries).__name__}")
        if not entries:
            raise DataError(f"split '{split}' in {path} is empty; every split needs at least one study")
        studies[split] = [_study(entry, split, i, images, path) for i, entry in enumerate(entries)]
    return studies


def _load_json(path: Path) -> object:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        where = "" if path.parent.is_dir() else f" (folder {path.parent} does not exist either)"
        raise DataError(
            f"annotation file not found: {path}{where}; put R2Gen's annotation.json there or point "
            "data.root at the dataset folder"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; check the file and its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; fix or restore the file"
        ) from None
    except ValueError as exc:  # a number over Python's digit limit for int()
        reason = str(exc).split(":")[0]
        raise DataError(f"{path} cannot be read: {reason}; fix or restore the file") from None
    except RecursionError:
        raise DataError(f"{path} cannot be read: its JSON is nested too deeply; fix or restore the file") from None


def _study(entry: object, split: str, index: int, images: Path, path: Path) -> Study:
    where = f"entry {index} of split '{split}' in {path}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object with id, report and image_path; fix the entry")
    study_id = entry.get("id")
    if isinstance(study_id, bool) or not isinstance(study_id, (str, int)) or str(study_id) == "":
        raise DataError(f"{where} has no valid 'id' (got {study_id!r}); give every study a string id")
    report = entry.get("report")
    if not isinstance(report, str):
        raise DataError(f"{where} (study {study_id}) has no 'report' string (got {report!r}); fix the entry")
    image_path = entry.get("image_path")
    if not isinstance(image_path, list) or not all(isinstance(p, str) and p for p in image_path):
        raise DataError(
            f"{where} (study {study_id}) needs 'image_path' as a list of relative paths, got {image_path!r}; "
            "fix the entry"
        )
    # Like a non-string, a path that no file system can hold is a broken entry, not a missing file.
    for p in image_path:
        if "\x00" in p or any(len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX for part in p.split("/")):
            raise DataError(
                f"{where} (study {study_id}) has an impossible image_path {p[:80]!r} (a NUL byte or a name over "
                f"{_NAME_MAX} bytes); fix the entry"
            )
    return Study(str(study_id), report, tuple(images / p for p in image_path), split, index)


def validate_dataset(
    cfg: DataConfig, fixes: tuple[str, ...] = (), on_image: ImageSink | None = None,
    studies: dict[str, list[Study]] | None = None,
) -> ValidationResult:
    """Check every study of ``cfg.root``; keep the good ones and stop at, or drop, the bad ones.

    A study is bad when its id is not unique across splits, it has the wrong number of views, its
    report is empty after R2Gen's cleaning (with ``fixes``) or not valid text, or one of its images
    is missing, leaves ``<root>/images`` (``..`` or a symlink; such files are never opened), has an
    absurd or zero size, or does not decode completely.

    Args:
        cfg: the dataset; ``cfg.on_invalid`` chooses between ``error`` and ``drop``.
        fixes: tokenizer fixes used to decide whether a report is empty after cleaning.
        on_image: called from worker threads as ``on_image(study, view, image)`` with each fully
            decoded image (original mode), so that a caller can resize while the files are read
            once. A study may get calls for some views and then fail on a later one.
        studies: ``read_annotation(cfg.root, cfg.dataset)`` when the caller has read it already.

    Raises:
        DataError: a problem with annotation.json or the images folder; with ``on_invalid: error``
            the first bad study (the message says how many others are bad); any split left empty.
    """
    fixes = check_fixes(fixes)
    if studies is None:
        studies = read_annotation(cfg.root, cfg.dataset)
    annotation = Path(cfg.root) / ANNOTATION
    images = Path(cfg.root) / IMAGES
    if not images.is_dir():
        raise DataError(
            f"image folder not found: {images}; R2Gen's layout keeps the images under <root>/{IMAGES}/ "
            f"next to {annotation}"
        )

    problems = _study_problems(studies, cfg, fixes)  # (split, index) -> (problem, fix)
    to_decode = [s for split in SPLITS for s in studies[split] if (split, s.index) not in problems]
    images_real = Path(os.path.realpath(images))
    with ThreadPoolExecutor() as pool, tqdm(
        total=len(to_decode), desc="validate images", unit="study", disable=None, leave=False
    ) as bar:
        for start in range(0, len(to_decode), _CHUNK):
            chunk = to_decode[start : start + _CHUNK]
            found = pool.map(lambda study: _image_problems(study, images, images_real, on_image), chunk)
            for study, problem in zip(chunk, found):
                if problem:
                    problems[(study.split, study.index)] = problem
            bar.update(len(chunk))

    bad = sorted(problems, key=lambda key: (SPLITS.index(key[0]), key[1]))
    if bad and cfg.on_invalid == "error":
        split, index = bad[0]
        problem, fix = problems[bad[0]]
        others = f"; {len(bad) - 1} other studies are invalid too" if len(bad) > 1 else ""
        raise DataError(f"{problem} (study {studies[split][index].id} in {annotation}){others}; {fix} or {_DROP}")

    result = ValidationResult(annotation, {split: [] for split in SPLITS})
    for split in SPLITS:
        for study in studies[split]:
            if (split, study.index) in problems:
                result.dropped.append((split, study.id, problems[(split, study.index)][0]))
            else:
                result.studies[split].append(study)
        if not result.studies[split]:
            first = problems[(split, 0)][0]
            raise DataError(
                f"all {len(studies[split])} studies of split '{split}' in {annotation} are invalid "
                f"(first: {first}); fix them, a split cannot be empty"
            )
    if result.dropped:
        log.warning(
            "dropped %d invalid studies of %d in %s (%s), e.g. %s",
            len(result.dropped), sum(len(v) for v in studies.values()), annotation,
            ", ".join(f"{split} {n}" for split, n in _count_by_split(result.dropped).items()),
            result.dropped[0][2],
        )
    return result


def _study_problems(
    studies: dict[str, list[Study]], cfg: DataConfig, fixes: tuple[str, ...]
) -> dict[tuple[str, int], tuple[str, str]]:
    """The checks that need no image: unique ids, number of views, report text."""
    where: dict[str, list[str]] = defaultdict(list)
    for split in SPLITS:
        for study in studies[split]:
            where[study.id].append(split)
    problems = {}
    for split in SPLITS:
        for study in studies[split]:
            key = (split, study.index)
            if len(where[study.id]) > 1:
                # Every copy goes: keeping one would still leave the choice (and a possible
                # train/test leak) to the order of the file.
                splits = " and ".join(sorted(set(where[study.id])))
                problems[key] = (
                    f"duplicate study id {study.id} ({len(where[study.id])} entries, in {splits})",
                    "give every study a unique id",
                )
            elif len(study.image_paths) != cfg.views:
                problems[key] = (
                    f"study has {len(study.image_paths)} image_path entries, {cfg.dataset} needs {cfg.views} "
                    f"({_VIEW_NAMES[cfg.dataset]})",
                    f"list {cfg.views} image path(s) for it",
                )
            elif (bad_char := _invalid_char(study.report)) is not None:
                problems[key] = (f"report is not valid text (contains {bad_char!r})", "fix the report text")
            elif all(token == "." for token in clean_report(study.report, cfg.dataset, fixes).split()):
                problems[key] = ("report is empty after cleaning", "write the report text")
    return problems


def _invalid_char(text: str) -> str | None:
    """A control character or lone surrogate (JSON allows both), else None."""
    for char in text:
        if (ord(char) < 32 and char not in "\t\n\r") or "\ud800" <= char <= "\udfff":
            return char
    return None


def _image_problems(
    study: Study, images: Path, images_real: Path, on_image: ImageSink | None
) -> tuple[str, str] | None:
    for view, path in enumerate(study.image_paths):
        checked = open_image(path, images, images_real)
        if isinstance(checked, tuple):
            return checked
        # Outside the decode error handling: a failing sink is a bug, not a bad image.
        if on_image is not None:
            on_image(study, view, checked)
    return None


_warnings_lock = threading.Lock()  # see open_image


def open_image(path: Path, images: Path, images_real: Path) -> Image.Image | tuple[str, str]:
    """The fully decoded image, or (problem, fix) when it is missing, outside ``images`` or broken.

    ``images_real`` is ``images`` with symlinks resolved; a path is never opened unless both it and
    its resolved target lie inside. Only PNG and JPEG are decoded, R2Gen's two formats: PIL would
    hand some others to external programs (EPS to Ghostscript).
    """
    if not _inside(Path(os.path.abspath(path)), Path(os.path.abspath(images))):
        return f"image path leaves {images}: {path}", "make image_path relative to the images folder"
    try:
        real = Path(os.path.realpath(path))
        if not _inside(real, images_real):
            return f"image {path} is a symlink to {real}, outside {images}", "copy the file into the images folder"
        if not real.exists():
            return f"image not found: {path}", "restore the file"
        if not real.is_file():
            return f"image {path} is not a file", "replace it with the image file"
        if real.stat().st_size == 0:
            return f"image {path} is an empty file (0 bytes)", "restore the file"
    except ValueError as exc:  # a NUL byte in the path
        return f"image path {str(path)!r} is not a valid file name ({exc})", "fix the file name"
    except OSError as exc:  # e.g. a file name over the system's limit
        return f"cannot check image {path}: {exc.strerror or exc}", "fix the file name"
    fix = "re-export or restore the file"
    try:
        with _warnings_lock, warnings.catch_warnings():
            # PIL warns about headers over ~89M pixels; the side limit below refuses them with a
            # clear message instead. The lock: catch_warnings swaps process-wide state, and this
            # runs in a thread pool (only the header is read here, the decoding runs unlocked).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(real, formats=("PNG", "JPEG"))
        with image:
            width, height = image.size
            if width == 0 or height == 0:
                return f"image {path} has zero size ({width}x{height} px)", fix
            if max(width, height) > MAX_IMAGE_SIDE:
                return f"image {path} claims {width}x{height} px, over the {MAX_IMAGE_SIDE} px limit", fix
            image.load()
            return image
    except Image.DecompressionBombError:
        return f"image {path} claims an absurd size (over {Image.MAX_IMAGE_PIXELS * 2} pixels)", fix
    except UnidentifiedImageError:
        return (
            f"cannot decode image {path}: not a known image format (only PNG and JPEG are read) or a broken header",
            "re-export it as PNG or JPEG, or restore the file",
        )
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib errors, ...
        return f"cannot decode image {path}: {exc}", fix


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _count_by_split(dropped: list[tuple[str, str, str]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for split, _, _ in dropped:
        counts[split] += 1
    return dict(counts)
