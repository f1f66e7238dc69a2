"""Dataset loading, validation of every kind of bad input, and the prepared image cache.

Each test draws its own tiny dataset (32 px PNGs) in R2Gen's layouts under tmp_path.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import png_header
from PIL import Image

from r2gen.config import DataConfig
from r2gen.data import datasets as datasets_module
from r2gen.data import images as images_module
from r2gen.data.datasets import SHOWN_PATH_CHARS, SPLITS, open_image, read_annotation, shown, validate_dataset
from r2gen.data.images import load_prepared, prepare_dataset
from r2gen.errors import DataError

COUNTS = {"train": 4, "val": 2, "test": 2}


def gray(study: int, view: int) -> int:
    """The constant pixel value drawn for a view, so that cache rows can be traced to their study."""
    return 20 + 10 * study + 5 * view


def png(path: Path, value: int = 128, size: tuple[int, int] = (32, 32), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0]), value, dtype=np.uint8)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode != "L" else image).save(path)


def make_iu(root: Path) -> dict:
    """An IU X-Ray-layout dataset: 2 views per study, ids like CXR<n>_IM-<n>."""
    ann = {}
    n = 0
    for split in SPLITS:
        ann[split] = []
        for _ in range(COUNTS[split]):
            sid = f"CXR{n}_IM-{n:04d}"
            for view in range(2):
                png(root / "images" / sid / f"{view}.png", gray(n, view))
            ann[split].append({"id": sid, "report": f"The heart is normal. Finding {n}.",
                               "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": split})
            n += 1
    write_annotation(root, ann)
    return ann


def make_mimic(root: Path) -> dict:
    """A MIMIC-CXR-layout dataset: 1 JPEG per entry, extra keys that the loader must ignore."""
    ann = {}
    n = 0
    for split in SPLITS:
        ann[split] = []
        for _ in range(COUNTS[split]):
            rel = f"p10/p1000000{n}/s5000000{n}/{n:08x}-dicom.jpg"
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 32), gray(n, 0), np.uint8)).save(path, quality=95)
            ann[split].append({"id": f"{n:08x}-dicom", "study_id": 50000000 + n, "subject_id": 10000000 + n,
                               "report": "No acute process.\nLungs are clear.", "image_path": [rel], "split": split})
            n += 1
    write_annotation(root, ann)
    return ann


def write_annotation(root: Path, ann: dict) -> None:
    (root / "annotation.json").write_text(json.dumps(ann))


def cfg(root: Path, dataset: str = "iu_xray", on_invalid: str = "error", **kw) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), image_size=16, on_invalid=on_invalid, **kw)


def image_file(root: Path, ann: dict, split: str = "train", index: int = 0, view: int = 0) -> Path:
    return root / "images" / ann[split][index]["image_path"][view]


# --- loading ---------------------------------------------------------------------------------------


def test_iu_layout_loads_two_views(tmp_path):
    ann = make_iu(tmp_path)
    studies = read_annotation(tmp_path, "iu_xray")
    assert {s: len(v) for s, v in studies.items()} == COUNTS
    first = studies["train"][0]
    assert first.id == ann["train"][0]["id"] and first.split == "train" and first.index == 0
    assert first.image_paths == (image_file(tmp_path, ann, view=0), image_file(tmp_path, ann, view=1))
    result = validate_dataset(cfg(tmp_path))
    assert result.counts == COUNTS and result.dropped == []


def test_mimic_layout_loads_one_view_and_ignores_extra_keys(tmp_path):
    make_mimic(tmp_path)
    result = validate_dataset(cfg(tmp_path, "mimic_cxr"))
    assert result.counts == COUNTS
    study = result.studies["val"][1]
    assert study.id == "00000005-dicom" and len(study.image_paths) == 1
    assert study.image_paths[0].suffix == ".jpg"


def test_mimic_entry_with_two_images_is_the_wrong_layout(tmp_path):
    ann = make_mimic(tmp_path)
    ann["train"][1]["image_path"].append(ann["train"][0]["image_path"][0])
    write_annotation(tmp_path, ann)
    with pytest.raises(DataError, match="2 image_path entries, mimic_cxr needs 1"):
        validate_dataset(cfg(tmp_path, "mimic_cxr"))


# --- every bad input: DataError naming the file ----------------------------------------------------


def _missing_annotation(root, ann):
    (root / "annotation.json").unlink()
    return root / "annotation.json", "annotation file not found"


def _invalid_json(root, ann):
    (root / "annotation.json").write_text('{"train": [')
    return root / "annotation.json", "not valid JSON"


def _non_utf8_annotation(root, ann):
    ann["train"][0]["report"] = "Herzgr\u00f6\u00dfe normal."
    (root / "annotation.json").write_bytes(json.dumps(ann, ensure_ascii=False).encode("latin-1"))
    return root / "annotation.json", "not valid UTF-8"


def _top_level_list(root, ann):
    (root / "annotation.json").write_text(json.dumps(ann["train"]))
    return root / "annotation.json", "must be a JSON object"


def _number_over_the_digit_limit(root, ann):
    ann["train"][0]["id"] = "ID"
    (root / "annotation.json").write_text(json.dumps(ann).replace('"ID"', "1" * 5000))
    return root / "annotation.json", "cannot be read: Exceeds the limit"


def _deeply_nested_json(root, ann):
    (root / "annotation.json").write_text("[" * 100_000 + "]" * 100_000)
    return root / "annotation.json", "nested too deeply"


def _file_name_too_long(root, ann):
    ann["train"][0]["image_path"][0] = "x" * 300 + ".png"
    write_annotation(root, ann)
    return root / "annotation.json", "impossible image_path 'x{80}' \\(a NUL byte or a name over 255 bytes\\)"


def _path_too_long(root, ann):
    # Every name fits, the whole path does not: the system refuses it (ENAMETOOLONG).
    ann["train"][0]["image_path"][0] = "/".join(["x" * 250] * 20) + ".png"
    write_annotation(root, ann)
    return root / "images" / ann["train"][0]["image_path"][0], "cannot check image .*: File name too long"


def _missing_split(root, ann):
    del ann["val"]
    write_annotation(root, ann)
    return root / "annotation.json", "no 'val' split"


def _empty_split(root, ann):
    ann["test"] = []
    write_annotation(root, ann)
    return root / "annotation.json", "split 'test' .* is empty"


def _null_report(root, ann):
    ann["train"][1]["report"] = None
    write_annotation(root, ann)
    return root / "annotation.json", "has no 'report' string"


def _missing_image(root, ann):
    path = image_file(root, ann, view=1)
    path.unlink()
    return path, "image not found"


def _corrupt_png(root, ann):
    path = image_file(root, ann)
    data = path.read_bytes()
    path.write_bytes(data[:50] + bytes(b ^ 0x5A for b in data[50:-12]) + data[-12:])
    return path, "cannot decode image"


def _truncated_png(root, ann):
    path = image_file(root, ann)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "cannot decode image .*truncated"


def _random_bytes(root, ann):
    path = image_file(root, ann)
    path.write_bytes(np.random.default_rng(0).bytes(300))
    return path, "cannot decode image .*not a known image format"


def _other_image_format(root, ann):
    path = image_file(root, ann)  # a GIF named .png: PIL reads it, R2Gen's data never holds one
    Image.new("L", (32, 32), 128).save(path, format="GIF")
    return path, r"not a known image format \(only PNG and JPEG are read\)"


def _huge_header(root, ann):
    path = image_file(root, ann)
    path.write_bytes(png_header(20000, 20000))
    return path, "absurd size"


def _large_header(root, ann):
    path = image_file(root, ann)
    path.write_bytes(png_header(9000, 9000))
    return path, "claims 9000x9000 px, over the 8192 px limit"


def _empty_file(root, ann):
    path = image_file(root, ann)
    path.write_bytes(b"")
    return path, "empty file"


def _zero_width_header(root, ann):
    path = image_file(root, ann)
    path.write_bytes(png_header(0, 32))
    return path, "cannot decode image"


def _wrong_number_of_views(root, ann):
    ann["train"][0]["image_path"] = ann["train"][0]["image_path"][:1]
    write_annotation(root, ann)
    return root / "annotation.json", "1 image_path entries, iu_xray needs 2"


def _empty_report(root, ann):
    ann["train"][0]["report"] = " .. ; ! "
    write_annotation(root, ann)
    return root / "annotation.json", "report is empty after cleaning"


def _control_characters(root, ann):
    ann["train"][0]["report"] = "Normal\x00heart."
    write_annotation(root, ann)
    return root / "annotation.json", "report is not valid text"


def _duplicate_ids(root, ann):
    ann["test"][0]["id"] = ann["train"][0]["id"]
    write_annotation(root, ann)
    return root / "annotation.json", "duplicate study id .* in test and train"


def _path_traversal(root, ann):
    ann["train"][0]["image_path"][0] = "../../etc/passwd"
    write_annotation(root, ann)
    return root / "images" / "../../etc/passwd", "image path leaves"


def _symlink_outside(root, ann):
    outside = root.parent / f"{root.name}-outside" / "0.png"
    png(outside)
    path = image_file(root, ann)
    path.unlink()
    path.symlink_to(outside)
    return path, "is a symlink to .* outside"


BAD_INPUTS = [
    _missing_annotation, _invalid_json, _non_utf8_annotation, _top_level_list, _number_over_the_digit_limit,
    _deeply_nested_json, _file_name_too_long, _missing_split, _empty_split, _null_report, _missing_image,
    _corrupt_png, _truncated_png, _random_bytes, _other_image_format, _huge_header, _large_header, _empty_file,
    _zero_width_header, _wrong_number_of_views, _empty_report, _control_characters, _duplicate_ids,
    _path_traversal, _symlink_outside, _path_too_long,
]
# Problems of one study (as opposed to the whole file): the message names the study and how to skip it.
STUDY_LEVEL = set(BAD_INPUTS[BAD_INPUTS.index(_missing_image):])


@pytest.mark.parametrize("breakage", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_raises_one_line_error_naming_the_file(tmp_path, breakage):
    root = tmp_path / "iu"
    ann = make_iu(root)
    path, message = breakage(root, ann)
    with pytest.raises(DataError, match=message) as info:
        validate_dataset(cfg(root))
    text = str(info.value)
    assert shown(path, SHOWN_PATH_CHARS) in text and "\n" not in text  # a 5000-char path is shown cut
    if breakage in STUDY_LEVEL:
        assert ann["train"][0]["id"] in text and "set data.on_invalid: drop" in text


def test_nul_byte_in_image_path_is_refused_even_in_drop_mode_and_shown_escaped(tmp_path):
    ann = make_iu(tmp_path)
    ann["train"][0]["image_path"][0] = "CXR0/0\x00.png"
    write_annotation(tmp_path, ann)
    with pytest.raises(DataError, match=r"entry 0 of split 'train' .* impossible image_path 'CXR0/0\\x00\.png'") as e:
        validate_dataset(cfg(tmp_path, on_invalid="drop"))
    assert "\x00" not in str(e.value) and str(tmp_path / "annotation.json") in str(e.value)


def test_open_image_reports_nul_byte_in_path_as_a_problem(tmp_path):
    # Not reachable from annotation.json (refused above) nor argv (cannot hold NUL); open_image is public.
    path = tmp_path / "0\x00.png"
    problem, fix = open_image(path, tmp_path, tmp_path)
    assert problem == f"image path {str(path)!r} is not a valid file name (embedded null byte)"
    assert "\x00" not in problem and fix == "fix the file name"


def test_header_over_pils_pixel_warning_is_refused_by_the_side_limit_without_a_warning(tmp_path):
    # 9500x9500 is over PIL's DecompressionBombWarning threshold (89M pixels), under its error (179M).
    ann = make_iu(tmp_path)
    image_file(tmp_path, ann).write_bytes(png_header(9500, 9500))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DataError, match="over the 8192 px limit"):
        warnings.simplefilter("always")
        validate_dataset(cfg(tmp_path))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_files_outside_the_image_folder_are_never_opened(tmp_path, monkeypatch):
    root = tmp_path / "iu"
    ann = make_iu(root)
    _path_traversal(root, ann)
    _symlink_outside(root, {"train": [ann["train"][1]]})
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp.name)) or real_open(fp, *a, **k))
    result = validate_dataset(cfg(root, on_invalid="drop"))
    assert [d[1] for d in result.dropped] == [ann["train"][0]["id"], ann["train"][1]["id"]]
    images = Path(os.path.realpath(root / "images"))
    assert opened and all(p.is_relative_to(images) for p in opened)


def test_missing_image_folder_is_one_clear_error(tmp_path):
    make_iu(tmp_path)
    (tmp_path / "images").rename(tmp_path / "imgs")
    with pytest.raises(DataError, match=f"image folder not found: {tmp_path / 'images'}"):
        validate_dataset(cfg(tmp_path))


def test_error_counts_the_other_bad_studies(tmp_path):
    ann = make_iu(tmp_path)
    image_file(tmp_path, ann, "train", 1).unlink()
    image_file(tmp_path, ann, "val", 0, view=1).write_bytes(b"garbage")
    ann["test"][1]["report"] = ""
    write_annotation(tmp_path, ann)
    with pytest.raises(DataError) as info:
        validate_dataset(cfg(tmp_path))
    text = str(info.value)
    assert text.startswith(f"image not found: {image_file(tmp_path, ann, 'train', 1)} (study {ann['train'][1]['id']}")
    assert "2 other studies are invalid too" in text


def test_drop_mode_drops_and_lists_every_bad_study(tmp_path):
    root = tmp_path / "iu"
    ann = make_iu(root)
    _missing_image(root, ann)  # train 0
    _corrupt_png(root, {"train": [ann["train"][2]]})  # train 2
    ann["val"][1]["report"] = ""
    ann["test"][0]["image_path"][1] = "../../etc/passwd"
    write_annotation(root, ann)
    result = validate_dataset(cfg(root, on_invalid="drop"))
    assert result.counts == {"train": 2, "val": 1, "test": 1}
    assert [s.id for s in result.studies["train"]] == [ann["train"][1]["id"], ann["train"][3]["id"]]
    dropped = {(split, sid): reason for split, sid, reason in result.dropped}
    assert list(dropped) == [("train", ann["train"][0]["id"]), ("train", ann["train"][2]["id"]),
                             ("val", ann["val"][1]["id"]), ("test", ann["test"][0]["id"])]
    assert dropped[("train", ann["train"][0]["id"])].startswith("image not found")
    assert "cannot decode" in dropped[("train", ann["train"][2]["id"])]
    assert "empty after cleaning" in dropped[("val", ann["val"][1]["id"])]
    assert "leaves" in dropped[("test", ann["test"][0]["id"])]


def test_duplicate_ids_drop_every_copy(tmp_path):
    ann = make_iu(tmp_path)
    ann["test"][0]["id"] = ann["train"][3]["id"]
    write_annotation(tmp_path, ann)
    result = validate_dataset(cfg(tmp_path, on_invalid="drop"))
    assert result.counts == {"train": 3, "val": 2, "test": 1}


def test_split_emptied_by_drop_is_an_error(tmp_path):
    ann = make_iu(tmp_path)
    for study in ann["val"]:
        (tmp_path / "images" / study["image_path"][0]).unlink()
    with pytest.raises(DataError, match=r"all 2 studies of split 'val' .* are invalid \(first: image not found"):
        validate_dataset(cfg(tmp_path, on_invalid="drop"))


def test_report_emptiness_follows_tokenizer_fixes(tmp_path):
    ann = make_iu(tmp_path)
    ann["train"][0]["report"] = "<=>"  # the public punctuation range deletes all of it
    write_annotation(tmp_path, ann)
    with pytest.raises(DataError, match="empty after cleaning"):
        validate_dataset(cfg(tmp_path))
    assert validate_dataset(cfg(tmp_path), fixes=("punct_range",)).counts == COUNTS


# --- prepared cache ------------------------------------------------------------------------------


def test_prepare_writes_arrays_jsonl_and_summary(tmp_path):
    ann = make_iu(tmp_path / "iu")
    out = tmp_path / "prepared"
    summary = prepare_dataset(cfg(tmp_path / "iu"), out)
    assert summary["counts"] == COUNTS and summary["dropped"] == [] and summary["views"] == 2
    assert summary["sizes"] == {"train": 18, "val": 16, "test": 16}  # 16 * 256 / 224 = 18.3
    assert json.loads((out / "summary.json").read_text()) == summary
    n = 0
    for split in SPLITS:
        prepared = load_prepared(out, split)
        side = summary["sizes"][split]
        assert prepared.images.dtype == np.uint8 and prepared.images.shape == (COUNTS[split], 2, side, side)
        assert prepared.ids == [s["id"] for s in ann[split]]
        assert prepared.reports == [s["report"] for s in ann[split]]
        for row in range(COUNTS[split]):
            for view in range(2):
                assert (prepared.images[row, view] == gray(n, view)).all()
            n += 1
    line = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert line == {"id": ann["train"][0]["id"], "report": ann["train"][0]["report"],
                    "image_path": ann["train"][0]["image_path"]}
    assert summary["bytes"] == sum((out / f"{s}.npy").stat().st_size for s in SPLITS)


def test_prepare_parses_annotation_json_once(tmp_path, monkeypatch):
    make_iu(tmp_path / "iu")
    parsed = []
    real = datasets_module._load_json
    monkeypatch.setattr(datasets_module, "_load_json", lambda path: parsed.append(path) or real(path))
    prepare_dataset(cfg(tmp_path / "iu"), tmp_path / "prepared")
    assert parsed == [tmp_path / "iu" / "annotation.json"]


def test_prepare_mimic_has_one_view(tmp_path):
    make_mimic(tmp_path / "mimic")
    prepare_dataset(cfg(tmp_path / "mimic", "mimic_cxr", train_crop=False), tmp_path / "prepared")
    train = load_prepared(tmp_path / "prepared", "train")
    assert train.images.shape == (4, 1, 16, 16)
    assert abs(int(train.images[2].mean()) - gray(2, 0)) <= 1  # JPEG is lossy


def test_dataset_written_by_another_tool_prepares_unchanged(tmp_path):
    """Real IU layout: non-square images of different sizes, RGB and L PNGs, real-looking ids."""
    torchvision = pytest.importorskip("torchvision")
    root = tmp_path / "iu_xray"
    rng = np.random.default_rng(7)
    # (width, height): landscape and portrait, within and beyond the 1.5:1 train bound ((25, 50) and
    # (64, 30): cut to it, (25, 50) at an offset of 4.5 rounded to even)
    shapes = [(40, 26), (30, 35), (25, 50), (64, 30), (30, 30), (50, 21)]
    ann = {split: [] for split in SPLITS}
    for n, split in enumerate(["train", "train", "train", "val", "test", "test"]):
        sid = f"CXR{1000 + n}_IM-{n * 7:04d}-1001"
        for view in range(2):
            pixels = rng.integers(0, 256, size=(*shapes[(n + view) % 6][::-1], 3), dtype=np.uint8)
            path = root / "images" / sid / f"{view}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).convert("RGB" if view == 0 else "L").save(path)
        ann[split].append({"id": sid, "report": "The XXXX are clear. No acute disease. 2. Heart normal size.",
                           "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": split})
    (root / "annotation.json").write_text(json.dumps(ann, indent=4))

    out = tmp_path / "prepared"
    summary = prepare_dataset(cfg(root), out)
    transforms = torchvision.transforms
    bound = int(18 * 1.5)  # data.train_max_aspect 1.5 at short side 18
    clipped = 0
    for split in SPLITS:
        prepared = load_prepared(out, split)
        for row, study in enumerate(ann[split]):
            for view in range(2):
                source = Image.open(root / "images" / study["image_path"][view]).convert("L")
                if split == "train":  # R2Gen's Resize(256) at our scale, its long side cut to the aspect bound
                    resized = transforms.Resize(18)(source)
                    h, w = resized.height, resized.width
                    clipped += max(h, w) > bound
                    expected = np.asarray(transforms.CenterCrop((min(h, bound), min(w, bound)))(resized))
                    stored = np.asarray(prepared.images[row, view])
                    h, w = expected.shape
                    assert tuple(prepared.sizes[row, view]) == (h, w)
                    view_pixels = stored[:w, :h].T if w > h else stored[:h, :w]  # landscape: stored transposed
                    np.testing.assert_array_equal(view_pixels, expected)
                    assert stored.sum() == view_pixels.sum()  # 0 beyond the view
                else:  # R2Gen's Resize((224, 224)) squash
                    expected = np.asarray(source.resize((16, 16), Image.Resampling.BILINEAR))
                    np.testing.assert_array_equal(prepared.images[row, view], expected)
                    assert tuple(prepared.sizes[row, view]) == (16, 16)
    assert summary["train_views_clipped"] == clipped == 3 and summary["shapes"]["train"] == [bound, 18]


def test_prepare_in_drop_mode_keeps_rows_of_the_good_studies_in_order(tmp_path):
    root = tmp_path / "iu"
    ann = make_iu(root)
    image_file(root, ann, "train", 1, view=1).write_bytes(b"not a png")  # view 0 decodes, view 1 does not
    image_file(root, ann, "test", 0).unlink()
    summary = prepare_dataset(cfg(root, on_invalid="drop"), tmp_path / "prepared")
    assert summary["counts"] == {"train": 3, "val": 2, "test": 1}
    assert [d["id"] for d in summary["dropped"]] == [ann["train"][1]["id"], ann["test"][0]["id"]]
    train = load_prepared(tmp_path / "prepared", "train")
    assert train.ids == [ann["train"][i]["id"] for i in (0, 2, 3)]
    assert [int(train.images[row, 1, 0, 0]) for row in range(3)] == [gray(i, 1) for i in (0, 2, 3)]
    test = load_prepared(tmp_path / "prepared", "test")
    assert test.ids == [ann["test"][1]["id"]] and (test.images[0, 0] == gray(7, 0)).all()


def _fail_after(monkeypatch, calls: int) -> None:
    """Make the resizer raise on its ``calls``-th call, as if the process died half-way."""
    real = images_module.resize
    count = {"n": 0}

    def resize(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise RuntimeError("simulated crash half-way")
        return real(*args, **kwargs)

    monkeypatch.setattr(images_module, "resize", resize)


def test_prepare_killed_half_way_leaves_no_output(tmp_path, monkeypatch):
    make_iu(tmp_path / "iu")
    _fail_after(monkeypatch, calls=9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(cfg(tmp_path / "iu"), tmp_path / "out" / "prepared")
    assert os.listdir(tmp_path / "out") == []


def test_prepare_rerun_replaces_previous_output_atomically(tmp_path, monkeypatch):
    root = tmp_path / "iu"
    ann = make_iu(root)
    out = tmp_path / "prepared"
    prepare_dataset(cfg(root), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # A failed rerun (crash, or a data error) leaves the previous complete output as it was.
    _fail_after(monkeypatch, calls=5)
    with pytest.raises(RuntimeError):
        prepare_dataset(cfg(root), out)
    monkeypatch.undo()
    image_file(root, ann, "val", 1).unlink()
    with pytest.raises(DataError):
        prepare_dataset(cfg(root), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # A successful rerun replaces it whole.
    summary = prepare_dataset(cfg(root, on_invalid="drop"), out)
    assert summary["counts"]["val"] == 1 and load_prepared(out, "val").images.shape[0] == 1
    assert sorted(os.listdir(tmp_path)) == ["iu", "prepared"]


def test_load_prepared_rejects_missing_or_incomplete_cache(tmp_path):
    make_iu(tmp_path / "iu")
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match="not found; run `dvc repro prepare`"):
        load_prepared(out, "train")
    prepare_dataset(cfg(tmp_path / "iu"), out)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_prepared(out, "dev")

    lines = (out / "val.jsonl").read_text().splitlines()
    (out / "val.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="val.jsonl has 1 rows but .*val.npy has 2"):
        load_prepared(out, "val")

    np.save(out / "test.npy", np.zeros((2, 2, 8, 8), np.uint8))
    expected = r"test.npy holds uint8 \(2, 2, 8, 8\), summary.json says uint8 \(2, 2, 16, 16\)"
    with pytest.raises(DataError, match=expected):
        load_prepared(out, "test")

    (out / "train.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="train.npy is corrupt"):
        load_prepared(out, "train")

    (out / "summary.json").unlink()
    with pytest.raises(DataError, match="incomplete \\(summary.json is missing\\); run `dvc repro prepare`"):
        load_prepared(out, "val")
