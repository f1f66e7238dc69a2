"""The synthetic sample: R2Gen's layouts exactly, determinism, reports that match the drawn findings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r2gen.data.synthetic import (
    FINDINGS,
    PREVALENCE,
    draw_study,
    generate_sample,
    is_normal,
    sample_findings,
    write_report,
)
from r2gen.errors import R2GenError
from r2gen.tokenizer import clean_report

NORMAL = {"cardiomegaly": False, "effusion": None, "consolidation": None, "nodule": None, "pneumothorax": None}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _draws(n: int, seed: int = 0) -> list[tuple[dict, str]]:
    """Findings and reports of n studies, drawn as generate_sample draws them (without images)."""
    out = []
    for i in range(n):
        findings = sample_findings(np.random.default_rng([seed, i, 0]))
        out.append((findings, write_report(findings, np.random.default_rng([seed, i, 2]))))
    return out


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    generate_sample(tmp_path / "a", studies=5, seed=11, image_size=48)
    generate_sample(tmp_path / "b", studies=5, seed=11, image_size=48)
    generate_sample(tmp_path / "c", studies=5, seed=12, image_size=48)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert (tmp_path / "a" / "annotation.json").read_bytes() != (tmp_path / "c" / "annotation.json").read_bytes()
    images = lambda files: sorted(v for k, v in files.items() if k.endswith(".png"))  # noqa: E731
    assert not set(images(a)) & set(images(c))


def test_iu_xray_layout_matches_r2gen_release(tmp_path):
    summary = generate_sample(tmp_path / "iu", studies=3, seed=0, image_size=40)
    root = tmp_path / "iu"
    annotation = json.loads((root / "annotation.json").read_text())
    findings = json.loads((root / "findings.json").read_text())
    assert list(annotation) == ["train", "val", "test"]
    assert all(len(annotation[split]) == 1 for split in annotation)  # every split non-empty at N=3
    assert summary["splits"] == {"train": 1, "val": 1, "test": 1}
    for split, entries in annotation.items():
        for entry in entries:
            assert list(entry) == ["id", "report", "image_path", "split"]
            assert entry["split"] == split
            assert re.fullmatch(r"CXR\d+_IM-\d{4}", entry["id"])
            assert entry["image_path"] == [f"{entry['id']}/0.png", f"{entry['id']}/1.png"]
            for path in entry["image_path"]:
                with Image.open(root / "images" / path) as image:
                    assert (image.format, image.mode, image.size) == ("PNG", "L", (40, 40))
            assert set(findings[entry["id"]]) == set(FINDINGS)
    assert summary["images"] == 6
    assert summary["bytes"] == sum(len(v) for v in _files(root).values())


def test_mimic_cxr_layout_has_one_frontal_jpeg_per_study(tmp_path):
    generate_sample(tmp_path / "mimic", studies=4, seed=1, layout="mimic_cxr", image_size=40)
    root = tmp_path / "mimic"
    annotation = json.loads((root / "annotation.json").read_text())
    entries = [e for split in ("train", "val", "test") for e in annotation[split]]
    assert len(entries) == 4 and all(annotation[s] for s in ("train", "val", "test"))
    for entry in entries:
        assert list(entry) == ["id", "study_id", "subject_id", "report", "image_path", "split"]
        (path,) = entry["image_path"]
        assert re.fullmatch(r"p10/p10\d{6}/s5\d{7}/[0-9a-f]{8}(-[0-9a-f]{8}){4}\.jpg", path)
        assert path == f"p10/p{entry['subject_id']}/s{entry['study_id']}/{entry['id']}.jpg"
        with Image.open(root / "images" / path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "L", (40, 40))


def test_frontal_view_is_the_same_in_both_layouts(tmp_path):
    generate_sample(tmp_path / "iu", studies=8, seed=5, image_size=40)
    generate_sample(tmp_path / "mimic", studies=8, seed=5, layout="mimic_cxr", image_size=40)
    iu = json.loads((tmp_path / "iu" / "annotation.json").read_text())
    mimic = json.loads((tmp_path / "mimic" / "annotation.json").read_text())
    assert [e["report"].replace("XXXX", "___") for e in iu["train"]] == [e["report"] for e in mimic["train"]]
    first = iu["train"][0]["image_path"][0]
    frontal = np.asarray(Image.open(tmp_path / "iu" / "images" / first), dtype=float)
    jpeg = np.asarray(Image.open(tmp_path / "mimic" / "images" / mimic["train"][0]["image_path"][0]), dtype=float)
    assert np.abs(frontal - jpeg).mean() < 3.0  # the same pixels, up to JPEG loss


@pytest.mark.parametrize("size", [32, 128])
def test_findings_and_reports_do_not_depend_on_image_size(tmp_path, size):
    generate_sample(tmp_path / "s", studies=4, seed=2, image_size=size)
    annotation = json.loads((tmp_path / "s" / "annotation.json").read_text())
    reports = sorted(e["report"] for split in annotation.values() for e in split)
    assert reports == sorted(report for _, report in _draws(4, seed=2))


def test_findings_prevalence_and_normal_share():
    drawn = [f for f, _ in _draws(2000, seed=7)]
    for kind in FINDINGS:
        share = np.mean([bool(f[kind]) for f in drawn])
        assert 0.15 <= share <= 0.35, (kind, share)
        assert abs(share - PREVALENCE[kind]) < 0.05, (kind, share)
    assert 0.25 <= np.mean([is_normal(f) for f in drawn]) <= 0.35


def _side_words(item: dict) -> str:
    return rf"{item['side']}(-sided)?"


def test_every_drawn_finding_has_its_sentence_and_no_contradiction():
    for findings, report in _draws(600, seed=3):
        text = report.lower()
        if findings["cardiomegaly"]:
            assert re.search(r"enlarged|cardiomegaly", text), report
            assert not re.search(r"heart size|normal in size|cardiomediastinal", text), report
        else:
            normal_heart = (r"normal in size|heart size (is )?(within normal limits|normal)|normal heart size|"
                            r"heart size and mediastinal contours are within normal limits|cardiomediastinal")
            assert re.search(normal_heart, text), report
            assert not re.search(r"enlarged|cardiomegaly", text), report

        effusion = findings["effusion"]
        if effusion:
            stated = (rf"{effusion['size']} {_side_words(effusion)} pleural effusion|"
                      rf"blunting of the {effusion['side']} costophrenic angle consistent with a small")
            assert re.search(stated, text), report
            assert not re.search(r"no pleural effusion|angles are sharp", text), report
        else:
            negated = r"no pleural effusion|pleural effusion or|or pleural effusion|angles are sharp"
            assert re.search(negated, text), report
            assert not re.search(r"(small|moderate|large) \w+(-sided)? pleural effusion|blunting", text), report

        pneumothorax = findings["pneumothorax"]
        if pneumothorax:
            assert re.search(rf"{_side_words(pneumothorax)} (apical )?pneumothorax", text), report
            assert not re.search(r"no (evidence of )?pneumothorax|or pneumothorax|pneumothorax or", text), report
        else:
            assert re.search(r"no (evidence of )?pneumothorax|or pneumothorax|pneumothorax or", text), report

        consolidation = findings["consolidation"]
        if consolidation:
            place = f"{consolidation['side']} {consolidation['zone']} lobe"
            assert re.search(rf"{place} consolidation|consolidation in the {place}", text), report
            assert not re.search(r"no focal|lungs are clear", text), report
        else:
            assert re.search(r"lungs are clear|no focal (airspace )?consolidation", text), report

        nodule = findings["nodule"]
        if nodule:
            assert re.search(rf"(granuloma|nodule)( is seen)? in the {nodule['side']} {nodule['zone']} lobe|"
                             rf"{nodule['side']} {nodule['zone']} lobe nodule", text), report
        else:
            assert not re.search(r"granuloma|nodule", text), report


def test_reports_look_like_iu_xray_and_fit_r2gen_max_length():
    reports = [report for _, report in _draws(600, seed=4)]
    words = [len(re.findall(r"[A-Za-z][A-Za-z-]*", r)) for r in reports]
    assert 8 <= min(words) and max(words) <= 45
    tokens = [len(clean_report(r, "iu_xray").split()) for r in reports]
    assert max(tokens) + 2 <= 60  # BOS + cleaned tokens + EOS within R2Gen's max_seq_length
    assert any("XXXX" in r for r in reports)
    assert any(r.startswith("1. ") for r in reports)
    vocabulary = {w for r in reports for w in clean_report(r, "iu_xray").split()}
    assert 80 <= len(vocabulary) <= 150


def _difference(findings: dict, seed: int = 21, size: int = 96) -> list[np.ndarray]:
    """Per view: image with the finding minus the same patient without it (grey levels)."""
    with_finding = draw_study({**NORMAL, **findings}, np.random.default_rng(seed), size)
    without = draw_study(NORMAL, np.random.default_rng(seed), size)
    return [a.astype(float) - b.astype(float) for a, b in zip(with_finding, without)]


def _changed(diff: np.ndarray, sign: int, threshold: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(sign * diff > threshold)
    return ys / diff.shape[0], xs / diff.shape[1]  # fractions of the image height and width


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusion_brightens_the_lower_zone_on_its_side(side):
    frontal, lateral = _difference({"effusion": {"side": side, "size": "moderate"}})
    ys, xs = _changed(frontal, +1)
    assert len(ys) > 60  # a large region at 96 px
    assert ys.min() > 0.4  # lower zone
    # radiological convention: the patient's right is on the image's left
    assert (xs < 0.5).all() if side == "right" else (xs > 0.5).all()
    assert frontal[ys.astype(int), xs.astype(int)].mean() >= 0  # nothing darkened
    lys, lxs = _changed(lateral, +1)
    assert len(lys) > 30 and lys.min() > 0.4 and np.median(lxs) > 0.5  # posterior sulcus


def test_larger_effusions_fill_more_of_the_chest():
    areas = [len(_changed(_difference({"effusion": {"side": "left", "size": s}})[0], +1)[0])
             for s in ("small", "moderate", "large")]
    assert 40 < areas[0] < areas[1] < areas[2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pneumothorax_darkens_the_apex_and_lateral_rim_on_its_side(side):
    frontal, _ = _difference({"pneumothorax": {"side": side}})
    ys, xs = _changed(frontal, -1, threshold=15.0)
    assert len(ys) > 60
    assert np.median(ys) < 0.5
    assert (xs < 0.5).all() if side == "right" else (xs > 0.5).all()


@pytest.mark.parametrize("zone", ["upper", "lower"])
def test_consolidation_is_a_dense_patch_in_its_zone(zone):
    frontal, _ = _difference({"consolidation": {"side": "left", "zone": zone}})
    ys, xs = _changed(frontal, +1, threshold=20.0)
    assert len(ys) > 80 and (xs > 0.5).all()
    assert np.median(ys) < 0.45 if zone == "upper" else np.median(ys) > 0.5


def test_nodule_is_a_small_bright_dot_several_pixels_wide():
    frontal, lateral = _difference({"nodule": {"side": "right", "zone": "upper"}})
    ys, xs = _changed(frontal, +1, threshold=40.0)
    assert 12 <= len(ys) <= 60  # roughly 4-8 px across at 96 px
    assert (xs < 0.5).all() and np.median(ys) < 0.5
    assert frontal.max() > 60
    assert lateral.max() > 60


def test_cardiomegaly_widens_the_heart_on_both_sides_of_the_midline():
    frontal, lateral = _difference({"cardiomegaly": True})
    ys, xs = _changed(frontal, +1, threshold=30.0)
    assert len(ys) > 100
    assert (xs < 0.45).any() and (xs > 0.55).any()
    assert len(_changed(lateral, +1, threshold=20.0)[0]) > 50


def test_patients_differ_even_when_both_are_normal():
    a = draw_study(NORMAL, np.random.default_rng(1), 64)
    b = draw_study(NORMAL, np.random.default_rng(2), 64)
    assert np.abs(a[0].astype(float) - b[0]).mean() > 5.0
    assert a[0].dtype == np.uint8 and a[0].shape == (64, 64) and len(a) == 2


def test_sample_stays_small_on_disk(tmp_path):
    summary = generate_sample(tmp_path / "s", studies=6, seed=0, image_size=128)
    assert summary["bytes"] / 6 < 20_000  # 300 studies stay under 6 MB


def test_existing_sample_is_replaced_but_a_foreign_directory_is_refused(tmp_path):
    generate_sample(tmp_path / "s", studies=3, seed=0, image_size=32)
    generate_sample(tmp_path / "s", studies=4, seed=0, image_size=32)
    assert len(json.loads((tmp_path / "s" / "findings.json").read_text())) == 4
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "annotation.json").write_text("{}")
    with pytest.raises(R2GenError, match="refusing to replace"):
        generate_sample(foreign, studies=3, seed=0)
    assert (foreign / "annotation.json").read_text() == "{}"


@pytest.mark.parametrize("kwargs, message", [
    ({"studies": 2}, "at least 3"),
    ({"layout": "chexpert"}, "must be one of iu_xray, mimic_cxr"),
    ({"image_size": 8}, "too small"),
    ({"split_fractions": (0.5, 0.5, 0.5)}, "summing to 1"),
])
def test_bad_arguments_raise_one_line_errors(tmp_path, kwargs, message):
    args = {"studies": 5, "seed": 0, **kwargs}
    with pytest.raises(R2GenError, match=message):
        generate_sample(tmp_path / "s", **args)
    assert not (tmp_path / "s").exists()
