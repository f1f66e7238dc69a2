"""Hostile data, round two (issue 14, the data side): files that hang or exhaust memory, reads outside the
dataset root, silent pixel changes, forged one-line errors, interrupted or racing prepares, unbounded work.

Every test runs under a pytest-timeout deadline and every child process under a subprocess timeout, so
a regression shows as a failure, not as a hung suite. Datasets are drawn here: 16 px PNGs, 4 studies.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, png_chunk
from PIL import Image

from r2gen.cli import _folder_study, main, order_views
from r2gen.config import DataConfig
from r2gen.data.datasets import (
    MAX_ANNOTATION_BYTES, MAX_IMAGE_BYTES, SHOWN_CHARS, SPLITS, open_image, shown, validate_dataset,
)
from r2gen.data.images import check_prepared, load_prepared, load_view, prepare_dataset
from r2gen.errors import DataError

pytestmark = pytest.mark.timeout(60)

SIZE = 16  # image side of the drawn datasets = data.image_size: val/test images are stored unresized
LINE_LIMIT = 4000  # characters of one error line, whatever the input


def draw(root: Path, ids: list[str] | None = None) -> dict:
    """An IU X-Ray dataset of 5 studies (train 3, val 1, test 1) of two 16 px gray views each."""
    ids = ids or [f"CXR{n}" for n in range(5)]
    ann = {split: [] for split in SPLITS}
    for n, (sid, split) in enumerate(zip(ids, ["train", "train", "train", "val", "test"])):
        folder = f"s{n}"
        for view in range(2):
            save(root / "images" / folder / f"{view}.png", np.full((SIZE, SIZE), 40 + 10 * n + view, np.uint8))
        ann[split].append({"id": sid, "report": "The heart is normal.", "image_path": [f"{folder}/0.png",
                                                                                      f"{folder}/1.png"]})
    (root / "annotation.json").write_text(json.dumps(ann))
    return ann


def save(path: Path, pixels: np.ndarray | Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(path, **kw)
    return path


def cfg(root: Path, on_invalid: str = "error", **kw) -> DataConfig:
    return DataConfig(dataset="iu_xray", root=str(root), image_size=SIZE, on_invalid=on_invalid, **kw)


def check_data(capsys, *argv) -> tuple[int, list[str], list[str]]:
    code = main(["check-data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(keepends=True), err.splitlines(keepends=True)


def one_line_error(capsys, *argv) -> str:
    code, out, err = check_data(capsys, *argv)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("error: "), (code, out, err)
    assert len(err[0]) < LINE_LIMIT and err[0][:-1].isprintable(), err[0][:300]
    return err[0]


# --- family 1: files that hang or exhaust memory ------------------------------------------------------


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "is not a regular file (a FIFO)"


def _dev_zero_link(path: Path) -> str:
    path.symlink_to("/dev/zero")
    return "is a symlink to /dev/zero, outside the dataset root"


def _sparse_3_gb(path: Path) -> str:
    with open(path, "wb") as fh:
        fh.truncate(3 << 30)  # no disk used, 3 GB to a naive read
    return f"is 3.0 GiB, over the {MAX_ANNOTATION_BYTES >> 30} GiB limit"


def _folder(path: Path) -> str:
    path.mkdir()
    return "is not a regular file (a folder)"


def _etc_passwd_link(path: Path) -> str:
    path.symlink_to("/etc/passwd")
    return "is a symlink to /etc/passwd, outside the dataset root"


def _valid_copy_outside(path: Path) -> str:
    outside = path.parent.parent / "elsewhere.json"
    outside.write_text(path.with_name("annotation.bak").read_text())
    path.symlink_to(outside)
    return f"is a symlink to {outside}, outside the dataset root"


@pytest.mark.parametrize("make", [_fifo, _dev_zero_link, _sparse_3_gb, _folder, _etc_passwd_link, _valid_copy_outside],
                         ids=lambda f: f.__name__.strip("_"))
def test_annotation_that_is_not_a_bounded_regular_file_in_the_root_is_refused_unread(capsys, tmp_path, make):
    root = tmp_path / "iu"
    draw(root)
    annotation = root / "annotation.json"
    annotation.rename(root / "annotation.bak")
    message = make(annotation)
    err = one_line_error(capsys, root)
    assert message in err and str(annotation) in err


def test_fifo_annotation_does_not_hang_check_data_in_a_child_process(tmp_path):
    root = tmp_path / "iu"
    draw(root)
    (root / "annotation.json").unlink()
    os.mkfifo(root / "annotation.json")
    proc = subprocess.run([sys.executable, "-m", "r2gen.cli", "check-data", str(root)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "(a FIFO)" in proc.stderr, proc.stderr


def test_image_over_the_size_bound_is_refused_before_decoding(capsys, tmp_path):
    root = tmp_path / "iu"
    ann = draw(root)
    image = root / "images" / ann["val"][0]["image_path"][0]
    with open(image, "r+b") as fh:  # a valid PNG followed by a sparse hole: over the bound, no disk used
        fh.truncate(MAX_IMAGE_BYTES + 1)
    err = one_line_error(capsys, root)
    assert f"image {image} is 256 MiB, over the {MAX_IMAGE_BYTES >> 20} MiB limit" in err


# --- family 2: reads outside the root --------------------------------------------------------------


def _audit_opens():
    opened: list[str] = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and recording:
            opened.append(os.fsdecode(args[0]))

    recording = True
    sys.addaudithook(hook)  # cannot be removed; only records while this test's list is alive
    return opened


def test_linked_images_folder_leaving_the_root_is_refused_and_nothing_outside_is_opened(capsys, tmp_path):
    root = tmp_path / "iu"
    draw(root)
    outside = tmp_path / "elsewhere"
    (root / "images").rename(outside)  # the very same images: their PNGs would decode fine
    (root / "images").symlink_to(outside)
    check_data(capsys, tmp_path)  # warm-up: lazy imports open files too
    opened = _audit_opens()
    err = one_line_error(capsys, root)
    assert f"image folder {root / 'images'} is a symlink to {outside}, outside the dataset root {root}" in err
    assert not [p for p in opened if Path(os.path.realpath(p)).is_relative_to(outside)], opened
    opened.clear()

    (root / "images").unlink()  # `images -> /`: every PNG of the machine
    (root / "images").symlink_to("/")
    assert "is a symlink to /, outside the dataset root" in one_line_error(capsys, root)


def test_linked_root_and_links_inside_the_root_are_followed(capsys, tmp_path):
    real = tmp_path / "disk" / "iu"
    draw(real)
    (real / "images").rename(real / "images-v2")
    (real / "images").symlink_to("images-v2")  # a link that stays inside the root
    (tmp_path / "iu").symlink_to(real)  # data.root itself is a link: datasets live on other disks
    code, out, err = check_data(capsys, tmp_path / "iu")
    assert code == 0 and out[-1].startswith("ok: "), err


def test_study_folder_linked_outside_the_images_folder_is_dropped_not_read(tmp_path):
    root = tmp_path / "iu"
    ann = draw(root)
    outside = tmp_path / "outside"
    (root / "images" / "s0").rename(outside)
    (root / "images" / "s0").symlink_to(outside)
    result = validate_dataset(cfg(root, on_invalid="drop"))
    assert [(split, sid) for split, sid, _ in result.dropped] == [("train", ann["train"][0]["id"])]
    assert f"is a symlink to {outside / '0.png'}, outside" in result.dropped[0][2]


# --- family 3: no silent pixel change ----------------------------------------------------------------

RAMP = np.arange(256, dtype=np.int64).reshape(SIZE, SIZE)  # (16, 16): every 8-bit value once


def with_sbit(png: bytes, bits: int) -> bytes:
    """``png`` with an sBIT chunk after IHDR (PIL cannot write one)."""
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + png_chunk(b"sBIT", bytes([bits])) + png[end_of_ihdr:]


def encode(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def u16(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint16))  # mode I;16


def with_depth_16_rgb(gray: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of the gray values ``gray`` (PIL cannot write one)."""
    rows = b"".join(b"\0" + np.repeat(row.astype(">u2"), 3).tobytes() for row in gray)  # filter 0, R=G=B
    ihdr = struct.pack(">IIBBBBB", gray.shape[1], gray.shape[0], 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def rgba(alpha: int) -> Image.Image:
    image = Image.fromarray(RAMP.astype(np.uint8)).convert("RGBA")
    image.putalpha(Image.new("L", image.size, 255))
    if alpha < 255:
        image.putpixel((3, 3), (10, 10, 10, alpha))
    return image


def palette(transparent: bool) -> Image.Image:
    image = Image.fromarray(RAMP.astype(np.uint8)).convert("P")
    if transparent:
        image.info["transparency"] = 7
    return image


# name: (PNG bytes, expected uint8 ramp or None when refused, message when refused)
PIXEL_CASES = {
    "8_bit_gray": (encode(Image.fromarray(RAMP.astype(np.uint8))), RAMP, None),
    "16_bit_full_range": (encode(u16(RAMP * 257)), RAMP, None),
    "16_bit_full_range_sbit_16": (with_sbit(encode(u16(RAMP * 257)), 16), RAMP, None),
    "12_bit_in_16_bit_container": (encode(u16(np.round(RAMP * 4095 / 255))), RAMP, None),
    "12_bit_with_sbit_12": (with_sbit(encode(u16(np.round(RAMP * 4095 / 255))), 12), RAMP, None),
    "10_bit_with_sbit_10": (with_sbit(encode(u16(np.round(RAMP * 1023 / 255))), 10), RAMP, None),
    "14_bit_with_sbit_14": (with_sbit(encode(u16(np.round(RAMP * 16383 / 255))), 14), RAMP, None),
    "16_bit_over_its_sbit_8": (with_sbit(encode(u16(RAMP * 257)), 8), None, "declares 8 significant bits (sBIT)"),
    "16_bit_holding_8_bit_values": (encode(u16(RAMP)), None, "bit depth cannot be told"),
    "4_bit_gray": (encode(Image.fromarray((RAMP // 17 * 17).astype(np.uint8)), bits=4), RAMP // 17 * 17, None),
    "palette_gray": (encode(palette(False)), RAMP, None),
    "palette_with_transparency": (encode(palette(True)), None, "has transparent pixels"),
    "rgb_gray": (encode(Image.fromarray(RAMP.astype(np.uint8)).convert("RGB")), RAMP, None),
    "rgba_opaque": (encode(rgba(255)), RAMP, None),
    "rgba_one_transparent_pixel": (encode(rgba(0)), None, "has transparent pixels (mode RGBA)"),
    "la_opaque": (encode(Image.fromarray(RAMP.astype(np.uint8)).convert("LA")), RAMP, None),
    "rgb_48_bit": (with_depth_16_rgb(RAMP * 257), RAMP, None),
    "rgb_48_bit_holding_12_bit_values": (with_depth_16_rgb(np.round(RAMP * 4095 / 255)), None, "only under 4096"),
}


@pytest.mark.parametrize("name", PIXEL_CASES)
def test_prepared_pixels_follow_the_bit_depth_or_the_image_is_refused(tmp_path, name):
    data, expected, message = PIXEL_CASES[name]
    root = tmp_path / "iu"
    ann = draw(root)
    path = root / "images" / ann["val"][0]["image_path"][0]  # val: stored at 16 px, i.e. unresized
    path.write_bytes(data)
    if expected is None:
        with pytest.raises(DataError, match=re.escape(message)) as info:
            prepare_dataset(cfg(root), tmp_path / "prepared")
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        return
    prepare_dataset(cfg(root), tmp_path / "prepared")
    got = load_prepared(tmp_path / "prepared", "val").images[0, 0].astype(np.int64)  # (16, 16)
    assert np.abs(got - expected).max() <= 1, f"max error {np.abs(got - expected).max()}"
    assert got.max() >= 254 and got.min() <= 1  # the whole range survives: nothing clipped or darkened
    assert np.array_equal(load_view(path, SIZE).astype(np.int64), got)  # `r2gen generate` sees the same


def test_full_range_16_bit_ramp_is_not_97_percent_white(tmp_path):
    # Round one's convert("L") clipped every value over 255 to white.
    path = tmp_path / "0.png"
    path.write_bytes(encode(u16(np.linspace(0, 65535, 256 * 64).reshape(64, 256))))
    view = load_view(path, 64)
    assert (view == 255).mean() < 0.01 and abs(view.mean() - 127.5) < 1


# --- family 4: forged one-line errors ---------------------------------------------------------------

HOSTILE_TEXT = ["\n", "\r", "\x1b[2J", "\x1b[32m", "\nok: all good (4 studies)\n", "\u2028", "\u202e", "\x00",
                "\ud800", "\x7f", "\t", "é", "中文", "🩻", "'", '"', "\\", "%s", "{}", " "]


def hostile_text(rng: random.Random) -> str:
    parts = [rng.choice(HOSTILE_TEXT) + "x" * rng.randrange(3) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.15:
        parts.append("y" * rng.choice([10_000, 1_000_000]))
    return "".join(parts)


def test_generated_ids_and_paths_give_exactly_one_bounded_line_and_exit_2(capsys, tmp_path):
    rng = random.Random(14)
    root = tmp_path / "iu"
    for case in range(40):
        ids = [hostile_text(rng) + str(n) for n in range(5)]
        ann = draw(root, ids)
        split, index = "train", rng.choice([0, 2])  # val and test hold one study: dropping it is an error
        what = rng.choice(["missing_path", "broken_file", "empty_report", "duplicate"])
        entry = ann[split][index]
        if what == "missing_path":
            entry["image_path"][1] = hostile_text(rng)[:200].replace("\x00", "") + ".png"
        elif what == "broken_file":
            name = ("v" + hostile_text(rng)[:100]).replace("\x00", "").replace("/", "") + ".png"
            try:
                (root / "images" / name).write_bytes(b"\x89PNG broken")
            except (OSError, UnicodeEncodeError):  # a lone surrogate cannot be a file name here
                name = "broken.png"
                (root / "images" / name).write_bytes(b"\x89PNG broken")
            entry["image_path"][0] = name
        elif what == "empty_report":
            entry["report"] = " . "
        else:
            ann["train"][1]["id"] = ann["train"][0]["id"]
        (root / "annotation.json").write_text(json.dumps(ann))
        err = one_line_error(capsys, root)
        assert "\x1b" not in err and "\u2028" not in err, (case, err[:300])

        code, out, err = check_data(capsys, root, "--on-invalid", "drop")
        dropped = 2 if what == "duplicate" else 1
        assert code == 0 and len(out) == 3 + dropped + 1, (case, what, out, err)  # counts, one line per drop, ok
        assert all(line[:-1].isprintable() and len(line) < LINE_LIMIT for line in out + err), (case, out, err)
        assert sum(line.startswith("dropped ") for line in out) == dropped and out[-1].startswith("ok: ")


def test_ten_megabyte_id_gives_a_short_line(capsys, tmp_path):
    root = tmp_path / "iu"
    ann = draw(root, ["i" * 10_000_000, "CXR1", "CXR2", "CXR3", "CXR4"])
    ann["train"][0]["report"] = ""
    (root / "annotation.json").write_text(json.dumps(ann))
    err = one_line_error(capsys, root)
    assert f"...[{10_000_000:,} chars]" in err and len(err) < 1000


def test_root_path_with_control_characters_is_shown_escaped(capsys, tmp_path):
    root = tmp_path / "data\n\x1b[31mok"
    draw(root)
    code, out, err = check_data(capsys, root)
    assert code == 0 and len(out) == 4 and out[-1].startswith(f"ok: {tmp_path}/data\\n\\x1b[31mok is a valid")


def test_shown_escapes_like_repr_and_bounds_the_length():
    assert shown("a\nb\x1b[0m\u202e\ud800é中") == "a\\nb\\x1b[0m\\u202e\\ud800é中"
    long = shown("x" * 10**7)
    assert len(long) == SHOWN_CHARS and long.endswith(f"...[{10**7:,} chars]")
    assert shown(Path("/data/iu/images/CXR1/0.png")) == "/data/iu/images/CXR1/0.png"


# --- weak answers: interrupted and racing prepares ---------------------------------------------------


def stage_env(tmp_path: Path, root: Path) -> Path:
    """A folder with the repository's params.yaml pointing at ``root``: the cwd of a `prepare` stage."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"root": str(root), "image_size": SIZE, "on_invalid": "error"})
    cwd = tmp_path / "stage"
    cwd.mkdir()
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return cwd


SLOW_PREPARE = """
import os, runpy, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as `python stages/prepare.py` has it
import r2gen.data.images as images
real = images.resize
images.resize = lambda *a, **k: (time.sleep(0.05), real(*a, **k))[1]  # a long prepare, to be interrupted
sys.argv = [sys.argv[1], "prepared"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_slow_prepare(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(REPO / "stages" / "prepare.py")], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_temporary(cwd: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not list(cwd.glob(".prepared.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=10)
        time.sleep(0.05)
    time.sleep(0.3)  # well into the image loop


def many_studies(root: Path) -> None:
    draw(root)
    ann = json.loads((root / "annotation.json").read_text())
    ann["train"] = [dict(ann["train"][n % 2], id=f"T{n}") for n in range(200)]  # 400 views at 50 ms: 20 s
    (root / "annotation.json").write_text(json.dumps(ann))


def test_sigterm_during_prepare_is_one_line_and_leaves_no_temporary(tmp_path):
    many_studies(tmp_path / "iu")
    cwd = stage_env(tmp_path, tmp_path / "iu")
    proc = start_slow_prepare(cwd)
    wait_for_temporary(cwd, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: interrupted (Ctrl-C or SIGTERM); no output was left half-written"), err
    assert sorted(os.listdir(cwd)) == ["params.yaml"]


def test_temporaries_of_a_killed_prepare_are_removed_by_the_next_run(tmp_path):
    many_studies(tmp_path / "iu")
    cwd = stage_env(tmp_path, tmp_path / "iu")
    proc = start_slow_prepare(cwd)
    wait_for_temporary(cwd, proc)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=30)
    (cwd / ".prepared.old").mkdir()  # what a rename race of round one left
    assert {p.name.split(".")[-1] for p in cwd.glob(".prepared.*")} >= {"tmp", "old", "lock"}
    draw(tmp_path / "iu")  # a quick dataset for the rerun
    prepare_dataset(cfg(tmp_path / "iu"), cwd / "prepared")
    assert sorted(os.listdir(cwd)) == ["params.yaml", "prepared"]


def test_second_prepare_while_one_holds_the_lock_fails_with_one_line(tmp_path):
    draw(tmp_path / "iu")
    out = tmp_path / "prepared"
    fd = os.open(tmp_path / ".prepared.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        held = r"another prepare \(pid 4242\) is writing .*prepared \(lock .*\.prepared\.lock\); wait for it"
        with pytest.raises(DataError, match=held):
            prepare_dataset(cfg(tmp_path / "iu"), out)
    finally:
        os.close(fd)
    assert not out.exists()
    prepare_dataset(cfg(tmp_path / "iu"), out)  # once released, it runs
    assert sorted(os.listdir(tmp_path)) == ["iu", "prepared"]


def test_two_racing_prepare_stages_end_cleanly(tmp_path):
    draw(tmp_path / "iu")
    cwd = stage_env(tmp_path, tmp_path / "iu")
    cmd = [sys.executable, str(REPO / "stages" / "prepare.py"), "prepared"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:  # each one either wrote the cache or refused with one line
        assert code == 0 or (code == 2 and err.splitlines()[-1].startswith("error: another prepare")), err
        assert "Traceback" not in err
    assert sorted(os.listdir(cwd)) == ["params.yaml", "prepared"]
    assert load_prepared(cwd / "prepared", "train").images.shape == (3, 2, 18, 18)


# --- weak answers: unbounded work, tiny images, a stale cache, view order ----------------------------


@pytest.mark.parametrize("size, message", [
    ((8192, 1), "under the 16 px minimum side"),
    ((1, 1), "under the 16 px minimum side"),
    ((3, 3), "under the 16 px minimum side"),
    ((4000, 100), "more elongated than 10:1"),
    ((16, 161), "more elongated than 10:1"),
])
def test_strips_and_tiny_images_are_refused_with_the_file_named(tmp_path, size, message):
    path = save(tmp_path / "images" / "0.png", Image.new("L", size, 100))
    start = time.perf_counter()
    problem, _ = open_image(path, tmp_path / "images", tmp_path / "images")
    assert message in problem and str(path) in problem and time.perf_counter() - start < 1


def test_train_refuses_a_cache_prepared_at_another_image_size(tmp_path, tiny_data):
    from helpers import paths_in, tiny_params

    from r2gen.errors import R2GenError
    from r2gen.training import TrainSpec, train

    check_prepared(tiny_data["prepared"], tiny_data["params"].data)  # the matching params pass
    with pytest.raises(DataError, match=r"was prepared with data.image_size 32 but params say 48; run `dvc repro"):
        check_prepared(tiny_data["prepared"], DataConfig(root=str(tiny_data["root"]), image_size=48))
    spec = TrainSpec.of(tiny_params(tiny_data["root"], data__image_size=48), "fp32")
    with pytest.raises(R2GenError, match="data.image_size 32 but params say 48"):
        train(spec, paths_in(tmp_path, tiny_data))


@pytest.mark.parametrize("names, order, known", [
    (["LAT.png", "PA.png"], ["PA.png", "LAT.png"], True),
    (["0.png", "1.png"], ["0.png", "1.png"], True),
    (["lateral.png", "frontal.png"], ["frontal.png", "lateral.png"], True),
    (["study_AP.jpg", "study_LL.jpg"], ["study_AP.jpg", "study_LL.jpg"], True),
    (["CXR1_lat.png", "CXR1_pa.png"], ["CXR1_pa.png", "CXR1_lat.png"], True),
    (["a.png", "b.png"], ["a.png", "b.png"], False),
    (["PA.png", "PA_2.png"], ["PA.png", "PA_2.png"], False),
    (["only.png"], ["only.png"], True),
])
def test_study_views_are_ordered_frontal_first_by_name(names, order, known):
    assert order_views([Path(n) for n in names]) == ([Path(n) for n in order], known)


def test_study_folder_whose_names_do_not_tell_the_views_warns(capsys, tmp_path):
    for name in ("LAT.png", "PA.png"):
        save(tmp_path / "named" / name, Image.new("L", (SIZE, SIZE)))
    for name in ("x.png", "y.png"):
        save(tmp_path / "unnamed" / name, Image.new("L", (SIZE, SIZE)))
    assert [p.name for p in _folder_study(tmp_path / "named")[1]] == ["PA.png", "LAT.png"]
    assert capsys.readouterr().err == ""
    assert [p.name for p in _folder_study(tmp_path / "unnamed")[1]] == ["x.png", "y.png"]
    err = capsys.readouterr().err
    assert err.startswith("warning: cannot tell the frontal from the lateral view") and err.count("\n") == 1
