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
import stat
import struct
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
# PIL's decompression-bomb limit, set explicitly: warning over this many pixels, error over twice it.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
# Smaller images carry no diagnostic detail (R2Gen's are 224 px and up) and would be upscaled
# into flat squares that train silently; longer strips would cost gigabytes once resized.
MIN_IMAGE_SIDE = 16
MAX_ASPECT_RATIO = 10
# File sizes read at most: MIMIC-CXR's annotation.json is ~150 MB, a 16-bit 4300 px PNG ~40 MB. A
# bigger file (a sparse file, a link to /dev/zero was refused earlier) is refused before reading.
MAX_ANNOTATION_BYTES = 1 << 30
MAX_IMAGE_BYTES = 256 << 20
# Longest field (id, file name, value) shown in a message; longer ones are cut, with their length.
SHOWN_CHARS = 200
SHOWN_PATH_CHARS = 500
_NAME_MAX = 255  # bytes in one file name, on every common file system
_CHUNK = 1024  # studies submitted to the thread pool at a time, to bound pending futures
_VIEW_NAMES = {"iu_xray": "frontal and lateral", "mimic_cxr": "one image per entry"}
_DROP = "set data.on_invalid: drop to skip invalid studies"

ImageSink = Callable[["Study", int, Image.Image], None]


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` as text safe inside a one-line message: non-printable characters (newlines, ANSI
    escapes, bidi controls, lone surrogates) escaped as ``repr`` does, at most ``limit`` characters.

    Every id, path and value of the user's data goes through here before it is printed, so a crafted
    name can neither split an error into two lines, draw a fake line, nor make a line of megabytes.
    """
    text = str(value)
    head = text[: limit + 1]  # bounds the work on a 10 MB id too
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    if len(out) > limit or len(text) > len(head):
        cut = f"...[{len(text):,} chars]"
        out = out[: max(limit - len(cut), 0)] + cut
    return out


def _sp(path: object) -> str:
    return shown(path, SHOWN_PATH_CHARS)


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
            f"{_sp(path)} must be a JSON object with keys {', '.join(SPLITS)}, got a {type(raw).__name__}; "
            "use R2Gen's annotation.json layout"
        )
    images = root / IMAGES
    studies: dict[str, list[Study]] = {}
    for split in SPLITS:
        if split not in raw:
            found = shown(", ".join(map(str, raw)) or "none")
            raise DataError(
                f"{_sp(path)} has no '{split}' split (found: {found}); R2Gen's annotation.json needs "
                f"{', '.join(SPLITS)}"
            )
        entries = raw[split]
        if not isinstance(entries, list):
            raise DataError(f"'{split}' in {_sp(path)} must be a list of studies, got a {type(entries).__name__}")
        if not entries:
            raise DataError(f"split '{split}' in {_sp(path)} is empty; every split needs at least one study")
        studies[split] = [_study(entry, split, i, images, path) for i, entry in enumerate(entries)]
    return studies


def _load_json(path: Path) -> object:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{_sp(path)} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{_sp(path)} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; fix or restore the file"
        ) from None
    except ValueError as exc:  # a number over Python's digit limit for int()
        reason = str(exc).split(":")[0]
        raise DataError(f"{_sp(path)} cannot be read: {reason}; fix or restore the file") from None
    except RecursionError:
        raise DataError(f"{_sp(path)} cannot be read: its JSON is nested too deeply; fix or restore the file") from None


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, a regular file inside its folder of at most MAX_ANNOTATION_BYTES.

    The type and size are checked on the opened descriptor (opened non-blocking, so a FIFO cannot
    hang the open): the file that is read is the file that was checked.
    """
    root = Path(os.path.realpath(path.parent))
    try:
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(root) and real.exists():
            raise DataError(
                f"{_sp(path)} is a symlink to {_sp(real)}, outside the dataset root {_sp(path.parent)}; "
                "copy the file into the dataset folder"
            )
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        where = "" if path.parent.is_dir() else f" (folder {_sp(path.parent)} does not exist either)"
        raise DataError(
            f"annotation file not found: {_sp(path)}{where}; put R2Gen's annotation.json there or point "
            "data.root at the dataset folder"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {_sp(path)}: {exc.strerror}; check the file and its permissions") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ANNOTATION_BYTES:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{_sp(path)} is not a regular file ({_file_kind(info.st_mode)}); put R2Gen's "
                            "annotation.json there")
        raise DataError(
            f"{_sp(path)} is {info.st_size / 2**30:.1f} GiB, over the {MAX_ANNOTATION_BYTES / 2**30:.0f} GiB "
            "limit for an annotation file (MIMIC-CXR's is ~150 MB); check that it is the right file"
        )
    with open(fd, "rb", closefd=True) as fh:
        try:
            data = fh.read(info.st_size + 1)  # one more byte: a file that grows after the check
        except OSError as exc:
            raise DataError(f"cannot read {_sp(path)}: {exc.strerror}; check the file") from None
    if len(data) > info.st_size:
        raise DataError(f"{_sp(path)} grew while it was read; wait until it is written, then rerun")
    return data


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _study(entry: object, split: str, index: int, images: Path, path: Path) -> Study:
    where = f"entry {index} of split '{split}' in {_sp(path)}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object with id, report and image_path; fix the entry")
    study_id = entry.get("id")
    if isinstance(study_id, bool) or not isinstance(study_id, (str, int)) or str(study_id) == "":
        raise DataError(f"{where} has no valid 'id' (got {shown(repr(study_id))}); give every study a string id")
    study = shown(study_id)
    report = entry.get("report")
    if not isinstance(report, str):
        raise DataError(f"{where} (study {study}) has no 'report' string (got {shown(repr(report))}); fix the entry")
    image_path = entry.get("image_path")
    if not isinstance(image_path, list) or not all(isinstance(p, str) and p for p in image_path):
        raise DataError(
            f"{where} (study {study}) needs 'image_path' as a list of relative paths, got {shown(repr(image_path))}; "
            "fix the entry"
        )
    # Like a non-string, a path that no file system can hold is a broken entry, not a missing file.
    for p in image_path:
        if "\x00" in p or any(len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX for part in p.split("/")):
            raise DataError(
                f"{where} (study {study}) has an impossible image_path {shown(repr(p[:80]))} (a NUL byte or a "
                f"name over {_NAME_MAX} bytes); fix the entry"
            )
    return Study(str(study_id), report, tuple(images / p for p in image_path), split, index)


def validate_dataset(
    cfg: DataConfig, fixes: tuple[str, ...] = (), on_image: ImageSink | None = None,
    studies: dict[str, list[Study]] | None = None,
) -> ValidationResult:
    """Check every study of ``cfg.root``; keep the good ones and stop at, or drop, the bad ones.

    A study is bad when its id is not unique across splits, it has the wrong number of views, its
    report is empty after R2Gen's cleaning (with ``fixes``) or not valid text, or one of its images
    is missing, leaves ``<root>/images`` (``..`` or a symlink; such files are never opened), is not a
    regular file, is too big, too small or too elongated, does not decode completely, has
    transparent pixels, or has a bit depth that cannot be told (see :func:`open_image`).

    ``cfg.root`` may itself be a symlink (datasets often live on another disk): it is resolved once,
    and ``annotation.json``, ``images/`` and every folder and file below must resolve inside it.

    Args:
        cfg: the dataset; ``cfg.on_invalid`` chooses between ``error`` and ``drop``.
        fixes: tokenizer fixes used to decide whether a report is empty after cleaning.
        on_image: called from worker threads as ``on_image(study, view, image)`` with each fully
            decoded image (mode 'L', 8 bits, see :func:`open_image`), so that a caller can resize
            while the files are read once. A study may get calls for some views and then fail on a later one.
        studies: ``read_annotation(cfg.root, cfg.dataset)`` when the caller has read it already.

    Raises:
        DataError: a problem with annotation.json or the images folder; with ``on_invalid: error``
            the first bad study (the message says how many others are bad); any split left empty.
    """
    fixes = check_fixes(fixes)
    if studies is None:
        studies = read_annotation(cfg.root, cfg.dataset)
    annotation = Path(cfg.root) / ANNOTATION
    images, images_real = _images_folder(Path(cfg.root))

    problems = _study_problems(studies, cfg, fixes)  # (split, index) -> (problem, fix)
    to_decode = [s for split in SPLITS for s in studies[split] if (split, s.index) not in problems]
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
        raise DataError(
            f"{problem} (study {shown(studies[split][index].id)} in {_sp(annotation)}){others}; {fix} or {_DROP}"
        )

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
                f"all {len(studies[split])} studies of split '{split}' in {_sp(annotation)} are invalid "
                f"(first: {first}); fix them, a split cannot be empty"
            )
    if result.dropped:
        log.warning(
            "dropped %d invalid studies of %d in %s (%s), e.g. %s",
            len(result.dropped), sum(len(v) for v in studies.values()), _sp(annotation),
            ", ".join(f"{split} {n}" for split, n in _count_by_split(result.dropped).items()),
            result.dropped[0][2],
        )
    return result


def _images_folder(root: Path) -> tuple[Path, Path]:
    """``<root>/images`` and its resolved path, which must lie inside the resolved root."""
    images = root / IMAGES
    if not images.is_dir():
        raise DataError(
            f"image folder not found: {_sp(images)}; R2Gen's layout keeps the images under <root>/{IMAGES}/ "
            f"next to {_sp(root / ANNOTATION)}"
        )
    images_real = Path(os.path.realpath(images))
    if not _inside(images_real, Path(os.path.realpath(root))):
        raise DataError(
            f"image folder {_sp(images)} is a symlink to {_sp(images_real)}, outside the dataset root "
            f"{_sp(root)}; move the images into the root (data.root itself may be a symlink)"
        )
    return images, images_real


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
                    f"duplicate study id {shown(study.id)} ({len(where[study.id])} entries, in {splits})",
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
    """The fully decoded image as 8-bit grayscale ('L'), or (problem, fix) when it cannot be used.

    ``images_real`` is ``images`` with symlinks resolved; a path is never opened unless both it and
    its resolved target lie inside. Only regular files of at most MAX_IMAGE_BYTES are opened, and
    only PNG and JPEG are decoded, R2Gen's two formats: PIL would hand some others to external
    programs (EPS to Ghostscript). Sizes are checked on the header, before any pixel is decoded:
    each side MIN_IMAGE_SIDE to MAX_IMAGE_SIDE px, aspect ratio at most MAX_ASPECT_RATIO.
    Pixel values are converted without clipping, see :func:`to_gray`.
    """
    if not _inside(Path(os.path.abspath(path)), Path(os.path.abspath(images))):
        return f"image path leaves {_sp(images)}: {_sp(path)}", "make image_path relative to the images folder"
    try:
        real = Path(os.path.realpath(path))
        if not _inside(real, images_real):
            return (f"image {_sp(path)} is a symlink to {_sp(real)}, outside {_sp(images)}",
                    "copy the file into the images folder")
        if not real.exists():
            return f"image not found: {_sp(path)}", "restore the file"
        # Non-blocking, and the type and size checked on the descriptor that is read: a FIFO cannot
        # hang, and a file swapped for one after a check is not read either.
        fh = open(real, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK | os.O_NOFOLLOW))
    except IsADirectoryError:
        return f"image {_sp(path)} is not a file (a folder)", "replace it with the image file"
    except ValueError as exc:  # a NUL byte in the path
        return f"image path {shown(repr(str(path)))} is not a valid file name ({exc})", "fix the file name"
    except OSError as exc:  # e.g. a file name over the system's limit
        return f"cannot check image {_sp(path)}: {exc.strerror or exc}", "fix the file name"
    with fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            return f"image {_sp(path)} is not a file ({_file_kind(info.st_mode)})", "replace it with the image file"
        if info.st_size == 0:
            return f"image {_sp(path)} is an empty file (0 bytes)", "restore the file"
        if info.st_size > MAX_IMAGE_BYTES:
            return (f"image {_sp(path)} is {info.st_size / 2**20:,.0f} MiB, over the {MAX_IMAGE_BYTES >> 20} MiB "
                    "limit for one image", "check the file; re-export it as PNG or JPEG")
        return _decode(fh, path)


def _decode(fh, path: Path) -> Image.Image | tuple[str, str]:
    fix = "re-export or restore the file"
    try:
        depth, significant = _png_depth_and_significant_bits(fh)
        with _warnings_lock, warnings.catch_warnings():
            # PIL warns about headers over MAX_IMAGE_PIXELS; the side limit below refuses them with a
            # clear message instead. The lock: catch_warnings swaps process-wide state, and this
            # runs in a thread pool (only the header is read here, the decoding runs unlocked).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fh, formats=("PNG", "JPEG"))
        with image:
            width, height = image.size
            if width == 0 or height == 0:
                return f"image {_sp(path)} has zero size ({width}x{height} px)", fix
            if max(width, height) > MAX_IMAGE_SIDE:
                return f"image {_sp(path)} claims {width}x{height} px, over the {MAX_IMAGE_SIDE} px limit", fix
            if min(width, height) < MIN_IMAGE_SIDE:
                return (f"image {_sp(path)} is {width}x{height} px, under the {MIN_IMAGE_SIDE} px minimum side",
                        "use the full-resolution image")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                return (f"image {_sp(path)} is {width}x{height} px, more elongated than {MAX_ASPECT_RATIO}:1",
                        "crop or re-export the radiograph")
            image.load()
            if depth == 16 and image.mode not in _HIGH_DEPTH and _colour_max(image) < 16:
                # 16-bit colour or gray+alpha: PIL keeps the high bytes, so 12-bit data would turn black.
                return (f"image {_sp(path)} is a 16-bit {image.mode} PNG holding values only under 4096 "
                        "(12-bit data?), which would turn near-black at 8 bits",
                        "re-export it as 16-bit grayscale without alpha")
            return to_gray(image, path, significant)
    except Image.DecompressionBombError:
        return f"image {_sp(path)} claims an absurd size (over {Image.MAX_IMAGE_PIXELS * 2} pixels)", fix
    except UnidentifiedImageError:
        return (
            f"cannot decode image {_sp(path)}: not a known image format (only PNG and JPEG are read) or a "
            "broken header",
            "re-export it as PNG or JPEG, or restore the file",
        )
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib errors, ...
        return f"cannot decode image {_sp(path)}: {shown(exc)}", fix


def _colour_max(image: Image.Image) -> int:
    """The largest value of the image's bands other than alpha."""
    extrema = image.getextrema()
    if len(image.getbands()) == 1:
        return extrema[1]
    return max(high for (_, high), band in zip(extrema, image.getbands()) if band != "A")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_depth_and_significant_bits(fh) -> tuple[int | None, int | None]:
    """A PNG's bit depth (IHDR) and the grayscale significant bits of its sBIT chunk (PIL reads
    neither), each None when absent or not a PNG.

    sBIT precedes the image data; at most 64 chunk headers are read, the file is rewound.
    """
    depth = None
    try:
        if fh.read(8) != _PNG_SIGNATURE:
            return None, None
        for _ in range(64):
            header = fh.read(8)
            if len(header) < 8:
                break
            length, kind = struct.unpack(">I4s", header)
            data = fh.read(min(length, 13)) if kind in (b"IHDR", b"sBIT") else b""
            if kind == b"IHDR" and len(data) == 13:
                depth = data[8]
            elif kind == b"sBIT":
                return depth, (data[0] if data and length in (1, 2) else None)  # colour types 0, 4: gray bits
            elif kind in (b"IDAT", b"IEND", b"PLTE"):
                break
            fh.seek(length - len(data) + 4, os.SEEK_CUR)  # the rest of the data, and the CRC
        return depth, None
    finally:
        fh.seek(0)


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_gray(image: Image.Image, path: Path, significant: int | None = None) -> Image.Image | tuple[str, str]:
    """``image`` as 8-bit grayscale ('L'), scaled by its bit depth; or (problem, fix) when that is not safe.

    - 8-bit gray, RGB and palette images: PIL's conversion (ITU-R 601 luma for colour, exact for gray);
      1/2/4-bit gray is already expanded to 0..255 by PIL.
    - 16-bit gray ('I;16', 'I'): scaled to 0..255 by the depth of the data, never clipped: the PNG
      sBIT chunk when present (values over it are refused); else 16 bits when the maximum is 4096 or
      more, 12 bits (DICOM's usual BitsStored, in a 16-bit container) when it is 256..4095. A maximum
      under 256 is ambiguous (8-bit data in a 16-bit file, or a near-black image) and refused.
    - An alpha channel (RGBA, LA, palette transparency) is dropped when fully opaque; any
      transparent pixel is refused, since what lies under it is not part of the radiograph.
    """
    mode = image.mode
    if mode in _HIGH_DEPTH:
        values = np.asarray(image)  # (H, W) uint16 or int32
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            return (f"image {_sp(path)} holds values {low}..{high}, outside 16-bit grayscale",
                    "re-export it as 8- or 16-bit grayscale PNG")
        if significant is not None and 1 <= significant <= 16:
            bits = significant
            if high > 2**bits - 1:
                return (f"image {_sp(path)} declares {bits} significant bits (sBIT) but holds values up to {high}",
                        "re-export it with a correct sBIT chunk or none")
        elif high >= 4096:
            bits = 16
        elif high >= 256:
            bits = 12
        else:
            return (f"image {_sp(path)} is 16-bit but holds values only up to {high}: its bit depth cannot be told "
                    "(8-bit data in a 16-bit file, or a near-black image)",
                    "re-export it as 8-bit, or with an sBIT chunk naming its significant bits")
        top = 2**bits - 1
        scaled = (values.astype(np.int64) * 255 + top // 2) // top  # round half up, 0..top -> 0..255
        return Image.fromarray(scaled.astype(np.uint8))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = image.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return (f"image {_sp(path)} has transparent pixels (mode {mode})",
                    "flatten it onto an opaque background and re-export it without alpha")
        image = image.convert("RGB" if mode in ("RGBA", "RGBa", "PA") else "L")
    if mode not in ("L", "1", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa", "CMYK", "YCbCr"):
        return f"image {_sp(path)} has an unsupported pixel format (mode {mode})", "re-export it as grayscale PNG"
    return image.convert("L")


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _count_by_split(dropped: list[tuple[str, str, str]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for split, _, _ in dropped:
        counts[split] += 1
    return dict(counts)
