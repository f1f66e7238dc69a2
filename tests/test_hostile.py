"""Hostile and malformed inputs: fuzzed images, annotation.json and model files, enormous reports, files
that hang or exhaust memory when read naively, and checkpoints that would run code.

Every outcome must be success or a one-line R2GenError (never another exception), nothing outside
the dataset root is opened, and nothing hangs: each case runs under a SIGALRM deadline, which also
interrupts a blocking open() of a FIFO. The single-input cases of the loaders live in
test_datasets.py; here are the fuzz loops and the same inputs through `r2gen generate`/`check-data`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from helpers import REPO, png_header, tiny_params
from r2gen.checkpoint import FORMAT, build_model, load_model_file
from r2gen.cli import main
from r2gen.config import DataConfig
from r2gen.data import images as images_module
from r2gen.data.datasets import validate_dataset
from r2gen.data.images import load_view
from r2gen.errors import R2GenError
from r2gen.tokenizer import UNK, Tokenizer
from r2gen.training import TrainPaths, TrainSpec, train


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` instead of hanging."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_opened: list[str] | None = None  # paths passed to open()/os.open() while recording
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


@contextlib.contextmanager
def opened_files():
    """Every file opened inside the block, by any code (an audit hook, so not only PIL's opens)."""
    global _opened, _hooked
    if not _hooked:  # a hook cannot be removed: install it once, it records only inside this block
        sys.addaudithook(_audit)
        _hooked = True
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def assert_inside(paths: list[str], root: Path) -> None:
    real_root = Path(os.path.realpath(root))
    outside = [p for p in paths if not Path(os.path.realpath(p)).is_relative_to(real_root)]
    assert not outside, f"opened outside {root}: {outside[:3]}"


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 random edits: flip a bit, truncate, insert random bytes, delete a run."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.choice(["flip", "truncate", "insert", "delete"]), rng.randrange(max(len(data), 1))
        if op == "flip" and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            del data[pos : pos + rng.randint(1, 16)]
    return bytes(data)


def run_fuzz(cases, attempt) -> dict[str, int]:
    """Run ``attempt(case)`` for each case: counts of outcomes; anything but R2GenError fails, listed."""
    outcomes: dict[str, int] = {"ok": 0, "error": 0}
    crashes = []
    for i, case in enumerate(cases):
        try:
            with deadline(10):
                attempt(case)
            outcomes["ok"] += 1
        except R2GenError as exc:
            assert "\n" not in str(exc), str(exc)
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            crashes.append(f"case {i}: {type(exc).__name__}: {str(exc)[:100]}")
    assert not crashes, f"{len(crashes)} of {len(cases)} inputs crashed instead of an R2GenError: {crashes[:8]}"
    return outcomes


def encoded(mode: str, fmt: str, **save) -> bytes:
    pixels = (np.arange(40 * 32) * 7 % 256).astype(np.uint8).reshape(40, 32)  # (H, W) texture
    image = Image.fromarray(pixels).convert(mode) if mode != "I;16" else Image.fromarray(pixels.astype(np.uint16) * 257)
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


# --- fuzzed images ---------------------------------------------------------------------------------


def test_mutated_png_and_jpeg_files_decode_or_raise_one_line_errors(tmp_path):
    seeds = [(".png", encoded("L", "PNG")), (".png", encoded("RGB", "PNG")), (".png", encoded("I;16", "PNG")),
             (".png", encoded("P", "PNG")), (".jpg", encoded("L", "JPEG", quality=90)),
             (".jpg", encoded("RGB", "JPEG", quality=90, progressive=True))]
    rng = random.Random(0)
    cases = []
    for i in range(200):
        suffix, data = seeds[i % len(seeds)]
        cases.append((tmp_path / f"{i}{suffix}", mutate(data, rng)))

    def attempt(case):
        path, data = case
        path.write_bytes(data)
        view = load_view(path, 16)
        assert view.shape == (16, 16) and view.dtype == np.uint8

    outcomes = run_fuzz(cases, attempt)
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes  # the fuzz reaches both outcomes


# PIL warns on open about 89M-179M pixel headers before our side limit refuses them (reported).
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_headers_with_valid_checksums_are_refused_before_decoding_huge_sizes(tmp_path):
    # Values a bit flip cannot reach past the CRC: sizes up to 2^32-1, every bit depth and colour type.
    rng = random.Random(1)
    sides = [0, 1, 32, 8192, 8193, 20000, 2**31 - 1]
    cases = []
    for i in range(200):
        width, height = (rng.choice(sides + [rng.randrange(2**32)]) for _ in range(2))
        idat = rng.choice([zlib.compress(b"\0" * 4096), rng.randbytes(64), zlib.compress(rng.randbytes(64))])
        data = png_header(width, height, rng.choice([1, 2, 4, 8, 16, rng.randrange(256)]),
                          rng.choice([0, 2, 3, 4, 6, rng.randrange(256)]), rng.choice([0, 1, 7]), idat)
        cases.append((tmp_path / f"{i}.png", data, max(width, height)))

    def attempt(case):
        path, data, side = case
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            load_view(path, 16)
        finally:
            assert time.perf_counter() - start < 2, f"{side} px header took long: decoded?"
        assert side <= 8192, f"a {side} px image was accepted"

    outcomes = run_fuzz(cases, attempt)
    assert outcomes["error"] > 150, outcomes


# --- fuzzed annotation.json ------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path, tiny_data) -> Path:
    """A private copy of the tiny IU X-Ray dataset, next to a decodable 'secret' image outside it."""
    root = tmp_path / "data" / "iu"
    shutil.copytree(tiny_data["root"], root)
    secret = tmp_path / "secret" / "0.png"
    secret.parent.mkdir()
    shutil.copy(next((root / "images").iterdir()) / "0.png", secret)
    return root


def test_mutated_annotation_bytes_load_or_raise_and_never_open_files_outside_the_root(dataset):
    original = (dataset / "annotation.json").read_bytes()
    rng = random.Random(2)
    cases = [mutate(original, rng) for _ in range(150)]
    cfg = DataConfig(dataset="iu_xray", root=str(dataset), image_size=16, on_invalid="drop")
    validate_dataset(cfg)  # imports of PIL plugins and friends happen before recording

    def attempt(data):
        (dataset / "annotation.json").write_bytes(data)
        validate_dataset(cfg)

    with opened_files() as opened:
        outcomes = run_fuzz(cases, attempt)
    assert outcomes["ok"] > 5 and outcomes["error"] > 100, outcomes
    assert_inside(opened, dataset)


HOSTILE_VALUES = [
    None, True, -1, 2.5, 10**30, "", " ", "..", ".", "/", "../../secret/0.png", "/etc/passwd",
    "images/../../annotation.json", "CXR1/../../../secret/0.png", "\ud800", "\x07", "x" * 200, [], {}, [""],
    ["../../secret/0.png", "../../secret/0.png"], ["/etc/passwd"], [["nested"]], {"0": "0.png"},
]


def test_hostile_annotation_values_are_refused_or_dropped_without_reading_outside_the_root(dataset):
    annotation = json.loads((dataset / "annotation.json").read_text())
    rng = random.Random(3)
    cases = []
    for _ in range(150):
        mutated = json.loads(json.dumps(annotation))
        for _ in range(rng.randint(1, 3)):
            split = rng.choice(list(mutated))
            entries = mutated[split]
            if rng.random() < 0.1:
                mutated[split] = rng.choice(HOSTILE_VALUES)
            elif isinstance(entries, list) and entries:
                entry = rng.choice(entries)
                key = rng.choice(["id", "report", "image_path", "image_path", "split", "extra"])
                if not isinstance(entry, dict) or rng.random() < 0.05:
                    entries[entries.index(entry)] = rng.choice(HOSTILE_VALUES)
                elif key == "image_path" and isinstance(entry.get(key), list) and entry[key] and rng.random() < 0.7:
                    entry[key][rng.randrange(len(entry[key]))] = rng.choice(HOSTILE_VALUES)
                elif rng.random() < 0.15:
                    entry.pop(key, None)
                else:
                    entry[key] = rng.choice(HOSTILE_VALUES)
        cases.append(json.dumps(mutated))
    cfg = DataConfig(dataset="iu_xray", root=str(dataset), image_size=16, on_invalid="drop")
    validate_dataset(cfg)

    def attempt(text):
        (dataset / "annotation.json").write_text(text)
        validate_dataset(cfg)

    with opened_files() as opened:
        outcomes = run_fuzz(cases, attempt)
    assert outcomes["ok"] > 10 and outcomes["error"] > 10, outcomes
    assert_inside(opened, dataset)


def _set_image_path(value: str):
    def edit(annotation: dict) -> str:
        annotation["train"][0]["image_path"][0] = value
        return json.dumps(annotation)
    return edit


@pytest.mark.parametrize("edit", [
    _set_image_path("CXR1/0\x00.png"),  # ValueError: embedded null byte, from os.path.realpath
    _set_image_path("x" * 300 + ".png"),  # OSError ENAMETOOLONG, from Path.exists
    lambda annotation: json.dumps(annotation).replace('"id": "', '"id": ' + "1" * 5000 + ', "x": "', 1),  # ValueError
    lambda annotation: "[" * 100_000 + "]" * 100_000,  # RecursionError from json.loads
], ids=["nul_in_image_path", "file_name_too_long", "5000_digit_id", "deeply_nested_json"])
def test_annotation_that_crashes_the_loader_is_a_data_error(dataset, edit):
    annotation = json.loads((dataset / "annotation.json").read_text())
    (dataset / "annotation.json").write_text(edit(annotation))
    with pytest.raises(R2GenError):
        validate_dataset(DataConfig(dataset="iu_xray", root=str(dataset), image_size=16, on_invalid="drop"))


def _with_report(root: Path, report: str) -> DataConfig:
    annotation = json.loads((root / "annotation.json").read_text())
    annotation["train"][0]["report"] = report
    (root / "annotation.json").write_text(json.dumps(annotation))
    return DataConfig(dataset="iu_xray", root=str(root), image_size=16)


def test_enormous_report_is_accepted_fast_and_truncated_by_the_tokenizer(dataset):
    report = "The heart is normal. " * 250_000  # 5.2 MB in one study
    cfg = _with_report(dataset, report)
    tokenizer = Tokenizer.build(["the heart is normal ."], "iu_xray", threshold=1, max_seq_length=60)
    with deadline(30):
        result = validate_dataset(cfg)
        ids = tokenizer.encode(result.studies["train"][0].report)
    assert result.studies["train"][0].report == report and len(ids) == 60


def test_memory_for_a_long_report_grows_linearly_with_its_length(dataset):
    # tracemalloc slows the cleaning ~5x, so this one measures a 1 MB report.
    report = "The heart is normal. " * 50_000
    cfg = _with_report(dataset, report)
    validate_dataset(cfg)  # imports and caches first
    tracemalloc.start()
    try:
        validate_dataset(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * len(report), f"peak {peak / 2**20:.0f} MiB for a {len(report) / 2**20:.1f} MiB report"


# --- hostile datasets through `r2gen check-data` ---------------------------------------------------


def _non_utf8(root: Path) -> Path:
    path = root / "annotation.json"
    path.write_bytes(path.read_bytes().replace(b"normal", "normal \u00e9".encode("latin-1"), 1))
    return path


def _traversal(root: Path) -> Path:
    annotation = json.loads((root / "annotation.json").read_text())
    annotation["train"][0]["image_path"][0] = "../../../secret/0.png"
    (root / "annotation.json").write_text(json.dumps(annotation))
    return root / "images" / "../../../secret/0.png"


def _symlink_out(root: Path) -> Path:
    annotation = json.loads((root / "annotation.json").read_text())
    path = root / "images" / annotation["val"][0]["image_path"][1]
    path.unlink()
    path.symlink_to(root.parent.parent / "secret" / "0.png")
    return path


@pytest.mark.parametrize("breakage, message", [
    (_non_utf8, "is not valid UTF-8 (byte 0xe9 at offset"),
    (_traversal, "image path leaves"),
    (_symlink_out, "is a symlink to"),
], ids=["non_utf8_annotation", "path_traversal_to_a_real_image", "symlink_to_a_real_image"])
def test_check_data_refuses_hostile_dataset_without_reading_outside(capsys, dataset, breakage, message):
    path = breakage(dataset)
    main(["check-data", str(dataset)])  # warm-up: lazy imports open files too
    capsys.readouterr()
    with opened_files() as opened, deadline(20):
        code = main(["check-data", str(dataset)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err and str(path) in err
    assert_inside(opened, dataset)


def test_check_data_with_a_fifo_as_image_does_not_hang(dataset):
    # In a child process: validation opens images in worker threads, which a deadline cannot interrupt.
    annotation = json.loads((dataset / "annotation.json").read_text())
    fifo = dataset / "images" / annotation["test"][0]["image_path"][0]
    fifo.unlink()
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "r2gen.cli", "check-data", str(dataset)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: image {fifo} is not a file") and proc.stderr.count("\n") == 1


# --- hostile images through `r2gen generate` -------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("hostile_model")
    paths = TrainPaths(tiny_data["prepared"], tiny_data["tokenizer"], out / "model.pt", out / "checkpoints",
                       out / "dvclive", out / "metrics.json")
    train(TrainSpec.of(tiny_params(tiny_data["root"], train__common__epochs=1), "fp32"), paths)
    return paths.model_out


def generate(capsys, model: Path, *images, seconds: float = 20) -> tuple[int, str]:
    """``r2gen generate`` on ``images`` under a deadline: (exit status, stderr)."""
    with deadline(seconds):
        code = main(["generate", "--checkpoint", str(model), *map(str, images), "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    if code == 2:
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    return code, err


HOSTILE_IMAGES = {
    "huge_header_20000px": (lambda tmp: _write(tmp / "0.png", png_header(20000, 20000)), "claims an absurd size"),
    "large_header_9000px": (lambda tmp: _write(tmp / "0.png", png_header(9000, 9000)), "over the 8192 px limit"),
    "zero_width_header": (lambda tmp: _write(tmp / "0.png", png_header(0, 32)), "cannot decode image"),
    "random_bytes": (lambda tmp: _write(tmp / "0.png", random.Random(4).randbytes(5000)), "not a known image format"),
    "zero_bytes": (lambda tmp: _write(tmp / "0.png", b""), "is an empty file (0 bytes)"),
    "truncated_png": (lambda tmp: _write(tmp / "0.png", encoded("L", "PNG")[:60]), "cannot decode image"),
    "directory": (lambda tmp: _mkdir(tmp / "0.png"), "is a folder; pass it as --study"),
    "fifo": (lambda tmp: _mkfifo(tmp / "0.png"), "is not a file"),
    "dev_zero": (lambda tmp: Path("/dev/zero"), "image /dev/zero is not a file"),
    "dev_urandom": (lambda tmp: Path("/dev/urandom"), "image /dev/urandom is not a file"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", HOSTILE_IMAGES)
def test_generate_refuses_hostile_image_with_one_line_error(capsys, tmp_path, model_file, tiny_data, name):
    make, message = HOSTILE_IMAGES[name]
    hostile = make(tmp_path)
    lateral = next((tiny_data["root"] / "images").iterdir()) / "1.png"
    code, err = generate(capsys, model_file, hostile, lateral)
    assert code == 2 and message in err and str(hostile) in err, err


@pytest.mark.parametrize("target", ["/dev/zero", "/etc/passwd"])
def test_generate_refuses_study_folder_links_to_files_elsewhere(capsys, tmp_path, model_file, target):
    study = tmp_path / "study"
    study.mkdir()
    (study / "0.png").symlink_to(target)
    _write(study / "1.png", encoded("L", "PNG"))
    with opened_files() as opened:
        code, err = generate(capsys, model_file, "--study", study)
    assert code == 2 and f"image {study / '0.png'} is a symlink to {target}, outside {study}" in err
    assert str(study / "0.png") not in opened and target not in opened


def test_eps_file_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")  # as on a machine with Ghostscript installed
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, *a, **k: started.append(cmd))
    path = _write(tmp_path / "0.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n")
    with pytest.raises(R2GenError):
        load_view(path, 16)
    assert started == []


# --- hostile model files ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["generate", "info"])
def test_model_file_with_non_finite_weights_is_refused(capsys, tmp_path, model_file, tiny_data, value, command):
    ckpt = load_model_file(model_file)
    key = "encoder.layers.0.feed_forward.w_1.weight"
    ckpt["state_dict"][key][0, 0] = value
    torch.save(ckpt, tmp_path / "model.pt")
    study = next((tiny_data["root"] / "images").iterdir())
    argv = ["generate", "--checkpoint", tmp_path / "model.pt", "--study", study] if command == "generate" else \
        ["info", tmp_path / "model.pt"]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (f"error: {tmp_path / 'model.pt'} holds NaN/Inf values in '{key}'; "
                   "the model diverged or the file is corrupt\n")


class _Payload:
    """Unpickling this runs os.system: what a hostile 'checkpoint' does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# torch warns about the raw pickle's protocol before refusing it (reported).
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_model_file_that_would_run_code_is_refused_and_runs_nothing(capsys, tmp_path, model_file, container):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "model.pt"
    obj = {**load_model_file(model_file), "extra": _Payload(marker)}
    if container == "torch_zip":
        torch.save(obj, hostile)
    else:
        hostile.write_bytes(pickle.dumps(obj))
    # The file is live: an unrestricted unpickler runs the payload.
    if container == "torch_zip":
        torch.load(hostile, weights_only=False)
    else:
        pickle.loads(hostile.read_bytes())
    assert marker.exists()
    marker.unlink()

    for argv in (["generate", "--checkpoint", str(hostile), "img0.png", "img1.png"], ["info", str(hostile)]):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1
        assert err.startswith(f"error: {hostile} was refused by the safe loader (weights_only=True)")
    assert not marker.exists()


def test_refusal_of_a_code_running_model_file_names_the_blocked_call(tmp_path):
    hostile = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "extra": _Payload(tmp_path / "pwned")}, hostile)
    with pytest.raises(R2GenError, match="posix.system"):
        load_model_file(hostile)


def test_model_file_with_mutated_pickle_loads_or_raises_one_line_error(tmp_path, model_file):
    archive = zipfile.ZipFile(io.BytesIO(model_file.read_bytes()))
    names = archive.namelist()
    pickled = next(n for n in names if n.endswith("/data.pkl"))
    rng = random.Random(5)
    cases = []
    for i in range(60):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
            for name in names:
                data = archive.read(name)
                out.writestr(name, mutate(data, rng) if name == pickled else data)
        cases.append((tmp_path / f"{i}.pt", buf.getvalue()))

    def attempt(case):
        path, data = case
        path.write_bytes(data)
        ckpt = load_model_file(path)
        Tokenizer.load_dict(ckpt["tokenizer"], str(path))
        build_model(ckpt, path)

    run_fuzz(cases, attempt)


def _edited(edit):
    def make(model_file: Path, tmp: Path) -> Path:
        ckpt = load_model_file(model_file)
        edit(ckpt)
        torch.save(ckpt, tmp / "model.pt")
        return tmp / "model.pt"
    return make


def _drop_tokens(ckpt: dict) -> None:
    ckpt["tokenizer"]["tokens"] = [UNK]  # a valid tokenizer of 2 ids for a model that writes more


def _text_file(model_file: Path, tmp: Path) -> Path:
    return _write(tmp / "model.pt", b"hello\n")


@pytest.mark.parametrize("make", [
    pytest.param(_edited(lambda c: c.pop("state_dict")), id="no_state_dict"),
    pytest.param(_edited(lambda c: c.__setitem__("state_dict", "weights")), id="state_dict_not_a_dict"),
    pytest.param(_edited(lambda c: c.pop("tokenizer")), id="no_tokenizer"),
    pytest.param(_edited(lambda c: c.__setitem__("vocab_size", c["vocab_size"] + 7)), id="vocab_size_of_other_weights"),
    pytest.param(_edited(_drop_tokens), id="tokenizer_smaller_than_the_model"),
    pytest.param(_edited(lambda c: c["data"].pop("image_size")), id="no_image_size"),
    pytest.param(_edited(lambda c: c["data"].__setitem__("image_size", 100_000)), id="image_size_100000px"),
    pytest.param(_edited(lambda c: c["model_config"].__setitem__("d_model", "big")), id="config_value_of_wrong_type"),
    pytest.param(_edited(lambda c: c.__setitem__("format", "r2gen-precision/model/0")), id="another_version"),
    pytest.param(_text_file, id="text_file"),
])
def test_model_file_with_invalid_content_is_a_one_line_error(capsys, tmp_path, model_file, tiny_data, make,
                                                             monkeypatch):
    path = make(model_file, tmp_path)
    real_load_view = load_view

    def bounded_load_view(image, size):
        # A 100000 px square would take 10 GB: fail here instead of letting the machine swap.
        assert size <= 8192, f"asked to decode at {size} px"
        return real_load_view(image, size)

    monkeypatch.setattr(images_module, "load_view", bounded_load_view)
    study = next((tiny_data["root"] / "images").iterdir())
    code, err = generate(capsys, path, "--study", study)
    assert code == 2 and str(path) in err
