"""The prepared image cache: every image decoded and resized once, stored as uint8 arrays per split.

``prepare_dataset`` writes ``<out_dir>/``:

- ``<split>.npy``: uint8 ``(N, V, H, W)`` grayscale, V views per study. Train images keep R2Gen's
  scale and aspect ratio, as torchvision's ``Resize(S)`` gives them (R2Gen: ``Resize(256)``): short
  side ``S = cfg.stored_size``, long side ``int(S * long / short)``, truncated like torchvision's.
  The long side is bounded by ``cfg.stored_long`` (``S x data.train_max_aspect``); a longer view is
  centre-cropped to the bound along its long side (torchvision's CenterCrop offset). Each view is
  stored long side first, a landscape view transposed, so one ``(L, S)`` shape holds both
  orientations; L is the longest side stored (S when every view is square). Training takes its
  random ``cfg.image_size`` crop anywhere in the resized view (r2gen.data.batches). Val/test images
  are squashed to ``cfg.image_size`` square like R2Gen's ``Resize((224, 224))``; with
  ``train_crop: false`` train images are squashed too. PIL bilinear resizing of the 'L' image; for
  grayscale X-rays that equals R2Gen's resize of the RGB copy, channel by channel.
- ``<split>.sizes.npy``: int32 ``(N, V, 2)``, each view's (height, width) as resized, before the
  transposition; the pixels beyond it are padding (0).
- ``<split>.jsonl``: one ``{"id", "report", "image_path"}`` line per row, the report as written in
  annotation.json (the tokenizer cleans it).
- ``summary.json``: counts, dropped studies with the reason, sizes, shapes, views cut to the aspect
  bound, bytes, seconds.

Arrays are streamed into ``np.lib.format.open_memmap`` files (MIMIC-CXR at 256 px is ~25 GB), and the
folder appears only when complete (``r2gen.io.atomic_dir``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from r2gen.config import DataConfig
from r2gen.data.datasets import IMAGES, SPLITS, Study, open_image, read_annotation, shown, validate_dataset
from r2gen.errors import DataError
from r2gen.io import atomic_dir, write_json

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
_COPY_ROWS = 256  # rows moved at a time when dropped studies are squeezed out of an array
_RERUN = "run `dvc repro prepare`"


def prepare_dataset(cfg: DataConfig, out_dir: str | os.PathLike, fixes: tuple[str, ...] = ()) -> dict:
    """Validate ``cfg.root`` and write the prepared cache to ``out_dir``, replacing it atomically.

    Every image is decoded once: validation hands each decoded image to the resizer. Rows are
    first written at the study's position in annotation.json; if studies were dropped, the good
    rows are then copied into a compact array.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        DataError: as :func:`r2gen.data.datasets.validate_dataset`; ``out_dir`` is then untouched;
            another prepare is writing ``out_dir`` (:func:`output_lock`).
    """
    with output_lock(out_dir):
        return _prepare(cfg, out_dir, fixes)


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<parent>/.<name>.lock`` (flock) while ``out_dir`` is written, and clean up first.

    A second prepare of the same folder fails at once with one line instead of racing the first
    (two renames of one folder end in ENOTEMPTY). Under the lock, temporaries that a killed
    prepare left (``.<name>.*.tmp``, ``.<name>.old``: ~25 GB for MIMIC-CXR) are removed.
    """
    out_dir = Path(out_dir)
    lock = out_dir.with_name(f".{out_dir.name}.lock")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, out_dir)
    except OSError as exc:
        raise DataError(f"cannot lock {shown(lock)}: {exc.strerror or exc}; check the output folder and its "
                        "permissions") from None
    try:
        _remove_stale(out_dir)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before the unlock: a waiter then sees a new file (checked in _acquire)
        os.close(fd)


def _acquire(lock: Path, out_dir: Path) -> int:
    for _ in range(10):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise DataError(
                f"another prepare (pid {shown(holder, 20)}) is writing {shown(out_dir)} (lock {shown(lock)}); "
                "wait for it to finish or stop it, then rerun"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # not a file the previous holder just removed
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise DataError(f"cannot lock {shown(lock)}: it keeps being replaced; check for other prepares")


def _remove_stale(out_dir: Path) -> None:
    name = out_dir.name
    for entry in os.listdir(out_dir.parent):  # not glob: the name may hold [ or *
        stale = out_dir.parent / entry
        if not (entry.startswith(f".{name}.") and (entry.endswith(".tmp") or entry == f".{name}.old")):
            continue
        if stale.is_dir() and not stale.is_symlink():
            size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(stale, ignore_errors=True)
            log.warning("removed %s (%.1f MiB) left by an interrupted prepare", shown(stale), size / 2**20)


def _prepare(cfg: DataConfig, out_dir: str | os.PathLike, fixes: tuple[str, ...]) -> dict:
    start = time.perf_counter()
    annotation = read_annotation(cfg.root, cfg.dataset)  # raises before any output for file-level problems
    sizes = {split: cfg.stored_size if split == "train" else cfg.image_size for split in SPLITS}
    crop = {split: split == "train" and cfg.train_crop for split in SPLITS}
    # (long, short) bound of each split's stored views: (L, S) for the crop's train cache, else square.
    bound = {split: (cfg.stored_long if crop[split] else sizes[split], sizes[split]) for split in SPLITS}
    with atomic_dir(out_dir) as tmp:
        full = {split: _allocate(tmp / f"{split}.npy", (len(annotation[split]), cfg.views, *bound[split]))
                for split in SPLITS}  # (N entries, V, L, S) each
        view_sizes = {split: np.zeros((len(annotation[split]), cfg.views, 2), dtype=np.int32) for split in SPLITS}
        clipped = np.zeros((len(annotation["train"]), cfg.views), dtype=bool)  # cut to the aspect bound

        def store(study: Study, view: int, image: Image.Image) -> None:  # from worker threads: one element each
            split = study.split
            pixels = resize(image, sizes[split], crop[split], max_long=bound[split][0])
            if crop[split]:
                clipped[study.index, view] = max(resized_size(*image.size, sizes[split])) > bound[split][0]
            view_sizes[split][study.index, view] = pixels.shape
            stored = pixels.T if pixels.shape[1] > pixels.shape[0] else pixels  # long side first
            full[split][study.index, view, : stored.shape[0], : stored.shape[1]] = stored

        result = validate_dataset(cfg, fixes, on_image=store, studies=annotation)

        shapes = {}
        for split in SPLITS:
            rows = [study.index for study in result.studies[split]]
            kept = view_sizes[split][rows]  # (n, V, 2)
            long = int(kept.max()) if crop[split] and len(rows) else bound[split][0]
            shapes[split] = [long, bound[split][1]]
            _compact(tmp / f"{split}.npy", full.pop(split), rows, long)
            np.save(tmp / f"{split}.sizes.npy", kept)
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for study in result.studies[split]:
                    paths = [p.relative_to(Path(cfg.root) / IMAGES).as_posix() for p in study.image_paths]
                    fh.write(json.dumps({"id": study.id, "report": study.report, "image_path": paths}) + "\n")

        summary = {
            "dataset": cfg.dataset,
            "root": str(cfg.root),
            "views": cfg.views,
            "image_size": cfg.image_size,
            "sizes": sizes,
            "shapes": shapes,
            "train_resize": (
                f"short side to {sizes['train']}, aspect ratio kept up to {cfg.train_max_aspect}:1 (long side at "
                f"most {cfg.stored_long}, longer views centre-cropped to it), stored long side first"
                if cfg.train_crop else f"squashed to {sizes['train']}x{sizes['train']}"
            ),
            "train_views_clipped": int(clipped[[study.index for study in result.studies["train"]]].sum()),
            "eval_resize": f"squashed to {cfg.image_size}x{cfg.image_size}",
            "fixes": list(fixes),
            "counts": result.counts,
            "dropped": [{"split": split, "id": sid, "reason": reason} for split, sid, reason in result.dropped],
            "bytes": sum((tmp / f"{split}.npy").stat().st_size for split in SPLITS),
            "seconds": round(time.perf_counter() - start, 3),
        }
        # Last, so that a folder with summary.json is a complete one.
        write_json(tmp / SUMMARY, summary)
    return summary


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of torchvision's ``Resize(size)`` output: short side ``size``, the long side
    ``int(size * long / short)``, truncated as in torchvision's ``_compute_resized_output_size``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(image: Image.Image, size: int, crop: bool, max_long: int | None = None) -> np.ndarray:
    """A uint8 grayscale array of ``image`` resized as R2Gen's transforms do.

    ``crop=False``: squashed to (size, size) (``Resize((224, 224))``). ``crop=True``: torchvision's
    ``Resize(size)`` (H, W), min(H, W) == ``size``, its long side centre-cropped to ``max_long``
    (default ``size``: the central square) with torchvision's CenterCrop offset (round half to
    even), so the part kept is centred as R2Gen's crops are.
    """
    gray = image.convert("L")
    if not crop:
        return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR))  # (size, size)
    new = resized_size(*gray.size, size)
    pixels = np.asarray(gray.resize(new, Image.Resampling.BILINEAR))  # (H, W)
    long, max_long = max(new), size if max_long is None else max_long
    if long <= max_long:
        return pixels
    start = int(round((long - max_long) / 2.0))
    return pixels[start : start + max_long] if new[1] >= new[0] else pixels[:, start : start + max_long]


def load_view(path: str | os.PathLike, size: int) -> np.ndarray:
    """One view for inference (`r2gen generate`), checked and squashed like the test split.

    Raises:
        DataError: the file is missing, empty, not an image, truncated or absurdly large.
    """
    path = Path(path)
    checked = open_image(path, path.parent, Path(os.path.realpath(path)).parent)
    if isinstance(checked, tuple):
        problem, fix = checked
        raise DataError(f"{problem}; {fix}")
    with checked:
        return resize(checked, size, crop=False)  # (size, size) uint8


def _allocate(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 .npy memmap of ``shape`` whose disk space is reserved now.

    Writing through a memmap onto a full disk kills the process with SIGBUS; reserving the space
    up front turns that into an error before any work is done.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    size = path.stat().st_size
    try:
        with open(path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DataError(
                f"not enough disk space for {path.name} ({size / 2**30:.1f} GiB) in {path.parent.parent}; "
                "free some space or prepare elsewhere"
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
            raise
    return array


def _compact(path: Path, full: np.memmap, rows: list[int], long: int) -> None:
    """Flush ``full``; if rows were dropped or the long side can shrink to ``long``, rewrite ``path``
    with only ``rows`` (in order) and the first ``long`` pixels of the long side."""
    full.flush()
    if len(rows) == len(full) and long == full.shape[2]:
        del full
        return
    squeezed = path.with_name(f"{path.stem}.compact.npy")
    shape = (len(rows), full.shape[1], long, *full.shape[3:])
    out = np.lib.format.open_memmap(squeezed, mode="w+", dtype=np.uint8, shape=shape)
    for start in range(0, len(rows), _COPY_ROWS):
        out[start : start + _COPY_ROWS] = full[rows[start : start + _COPY_ROWS], :, :long]
    out.flush()
    del out, full
    os.replace(squeezed, path)


@dataclass
class PreparedSplit:
    """One split of the prepared cache.

    ``images`` is a read-only memmap (N, V, L, S) uint8, each view long side first (a landscape view
    transposed) and 0-padded beyond its size; ``sizes`` (N, V, 2) int32 holds each view's (height,
    width) as resized. Val/test (and train without ``train_crop``) are (N, V, S, S) with every size (S, S).
    """

    ids: list[str]
    reports: list[str]
    images: np.ndarray
    sizes: np.ndarray


def load_prepared(prepared_dir: str | os.PathLike, split: str) -> PreparedSplit:
    """Open ``split`` of a cache written by :func:`prepare_dataset`, checking that it is complete.

    Raises:
        DataError: the folder, ``summary.json`` or a split file is missing, unreadable, or the
            array shape disagrees with the summary and the jsonl rows.
    """
    root = Path(prepared_dir)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}', must be one of: {', '.join(SPLITS)}")
    summary_path = root / SUMMARY
    if not summary_path.is_file():
        what = "not found" if not root.exists() else f"incomplete ({SUMMARY} is missing)"
        raise DataError(f"prepared data {root} is {what}; {_RERUN}")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        expected = (summary["counts"][split], summary["views"], *(int(n) for n in summary["shapes"][split]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{summary_path} is corrupt ({exc!r}); {_RERUN}") from None

    npy = root / f"{split}.npy"
    try:
        images = np.load(npy, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"prepared data {root} is incomplete: {npy} is missing; {_RERUN}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{npy} is corrupt ({exc}); {_RERUN}") from None
    if images.dtype != np.uint8 or images.shape != expected:
        raise DataError(
            f"{npy} holds {images.dtype} {images.shape}, {SUMMARY} says uint8 {expected}; {_RERUN}"
        )

    sizes = _load_sizes(root / f"{split}.sizes.npy", images.shape, int(summary["sizes"][split]))

    jsonl = root / f"{split}.jsonl"
    ids, reports = [], []
    try:
        with open(jsonl, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                ids.append(row["id"])
                reports.append(row["report"])
    except FileNotFoundError:
        raise DataError(f"prepared data {root} is incomplete: {jsonl} is missing; {_RERUN}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{jsonl} is corrupt ({exc!r}); {_RERUN}") from None
    if len(ids) != len(images):
        raise DataError(f"{jsonl} has {len(ids)} rows but {npy} has {len(images)}; {_RERUN}")
    return PreparedSplit(ids, reports, images, sizes)


def _load_sizes(path: Path, shape: tuple[int, ...], short: int) -> np.ndarray:
    """The (N, V, 2) view sizes of an (N, V, L, S) array, checked to fit it with short side ``short``."""
    try:
        sizes = np.load(path)
    except FileNotFoundError:
        raise DataError(f"prepared data {path.parent} is incomplete: {path} is missing; {_RERUN}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); {_RERUN}") from None
    if sizes.dtype != np.int32 or sizes.shape != (*shape[:2], 2):
        raise DataError(f"{path} holds {sizes.dtype} {sizes.shape}, expected int32 {(*shape[:2], 2)}; {_RERUN}")
    if len(sizes) and ((sizes.min(axis=-1) != short).any() or sizes.max() > shape[2]):
        raise DataError(f"{path} holds view sizes that do not fit the {shape[2]}x{shape[3]} images "
                        f"(short side {short}); {_RERUN}")
    return sizes


def check_prepared(prepared_dir: str | os.PathLike, cfg: DataConfig) -> None:
    """Refuse a cache prepared with other data params than ``cfg`` (dataset, image size).

    Training reads ``data.image_size`` from params and the images from the cache: without this a
    cache left from another size would train at that size without a word.

    Raises:
        DataError: ``summary.json`` is unreadable or disagrees with ``cfg``.
    """
    summary_path = Path(prepared_dir) / SUMMARY
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        found = {"data.dataset": summary["dataset"], "data.image_size": summary["image_size"]}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{shown(summary_path)} is missing or corrupt ({shown(repr(exc))}); {_RERUN}") from None
    wanted = {"data.dataset": cfg.dataset, "data.image_size": cfg.image_size}
    for key, value in wanted.items():
        if found[key] != value:
            raise DataError(f"{shown(prepared_dir)} was prepared with {key} {shown(found[key])} but params say "
                            f"{value}; {_RERUN}")
