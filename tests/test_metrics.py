"""NLG metrics as R2Gen computes them, METEOR's failure paths, the labeler and clinical efficacy."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from r2gen import metrics
from r2gen.data.synthetic import generate_sample
from r2gen.metrics import (
    CHEXPERT_LABELS,
    NLG_KEYS,
    clinical_efficacy,
    compute_nlg,
    findings_to_chexpert,
    label_report,
)
from r2gen.tokenizer import clean_report

# One fixed set of cleaned reports and its scores, computed once with pycocoevalcap 1.2 (METEOR:
# its own Meteor class gave the same 0.35227315089284345). Change only on purpose.
GOLDEN_REFERENCES = [
    "the heart is normal in size . the mediastinum is unremarkable . the lungs are clear . "
    "no pleural effusion or pneumothorax . xxxx are intact .",
    "the heart is enlarged . there is a small left pleural effusion . no pneumothorax .",
    "calcified granuloma in the right upper lobe . no focal consolidation . no pleural effusion or pneumothorax .",
]
GOLDEN_HYPOTHESES = [
    "the heart is normal in size . the lungs are clear . no pneumothorax or pleural effusion .",
    "the heart is enlarged . no pleural effusion or pneumothorax .",
    "the heart is normal in size . no focal consolidation . no pleural effusion or pneumothorax .",
]
GOLDEN = {
    "BLEU_1": 0.6432921609323866,
    "BLEU_2": 0.5691433243290221,
    "BLEU_3": 0.512268663978877,
    "BLEU_4": 0.47245110662852674,
    "ROUGE_L": 0.671226689464406,
    "CIDEr": 2.8930667692296854,
}
GOLDEN_METEOR = 0.35227315089284345

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs a Java runtime")


def test_identical_texts_score_one():
    texts = ["the heart is normal in size . the lungs are clear .", "no pleural effusion or pneumothorax ."]
    scores = compute_nlg(texts, texts, meteor=False)
    assert scores["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["BLEU_1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == 1.0
    assert set(NLG_KEYS) <= set(scores)


def test_nlg_scores_match_golden_values():
    scores = compute_nlg(GOLDEN_REFERENCES, GOLDEN_HYPOTHESES, meteor=False)
    assert {k: scores[k] for k in GOLDEN} == pytest.approx(GOLDEN, rel=1e-12)
    assert scores["METEOR"] is None and "meteor=False" in scores["METEOR_error"]
    json.dumps(scores)  # plain floats, ready for a metrics file


@pytest.mark.slow
@needs_java
def test_meteor_matches_pycocoevalcap_and_leaves_no_jvm():
    scores = compute_nlg(GOLDEN_REFERENCES, GOLDEN_HYPOTHESES)
    assert scores["METEOR"] == pytest.approx(GOLDEN_METEOR, rel=1e-12)
    assert "METEOR_error" not in scores
    assert _child_processes() == []


def _child_processes() -> list[str]:
    """Command lines of this process's children (Linux /proc), to catch a leaked JVM.

    multiprocessing's resource tracker, started once by an earlier test in this process (the DDP
    tests), lives as long as the process and is not ours to count.
    """
    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            status = (entry / "status").read_text()
            if f"\nPPid:\t{os.getpid()}\n" in status:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "multiprocessing.resource_tracker" not in cmdline:
                    children.append(cmdline)
        except OSError:  # the process ended while we looked
            continue
    return children


def test_meteor_is_none_with_a_reason_when_java_is_missing(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    scores = compute_nlg(GOLDEN_REFERENCES, GOLDEN_HYPOTHESES)
    assert scores["METEOR"] is None
    assert "java not found" in scores["METEOR_error"] and "\n" not in scores["METEOR_error"]
    assert scores["BLEU_4"] == pytest.approx(GOLDEN["BLEU_4"])


def _fake_java(tmp_path, monkeypatch, body: str) -> None:
    script = tmp_path / "java"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_meteor_subprocess_failure_is_reported_not_raised(tmp_path, monkeypatch):
    _fake_java(tmp_path, monkeypatch, 'echo "Error: Unable to access jarfile meteor-1.5.jar" >&2; exit 1')
    scores = compute_nlg(GOLDEN_REFERENCES, GOLDEN_HYPOTHESES)
    assert scores["METEOR"] is None
    assert scores["METEOR_error"] == "METEOR subprocess failed: Error: Unable to access jarfile meteor-1.5.jar"
    assert _child_processes() == []


def test_a_stuck_meteor_process_is_killed(tmp_path, monkeypatch):
    _fake_java(tmp_path, monkeypatch, f"exec {shutil.which('sleep')} 60")
    monkeypatch.setattr(metrics, "_METEOR_TIMEOUT_S", 1.0)
    start = time.monotonic()
    scores = compute_nlg(GOLDEN_REFERENCES, GOLDEN_HYPOTHESES)
    assert time.monotonic() - start < 15
    assert scores["METEOR"] is None and "no answer within 1 s" in scores["METEOR_error"]
    assert _child_processes() == []


def test_mismatched_or_empty_inputs_raise():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        compute_nlg(["a .", "b ."], ["a ."])
    with pytest.raises(ValueError, match="no reports"):
        clinical_efficacy([], [])


def _mentioned(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if v is not None}


# (report, every label that is not None). Raw and R2Gen-cleaned text must give the same labels.
LABELER_CASES = [
    ("The heart is enlarged. No pleural effusion or pneumothorax.",
     {"Cardiomegaly": 1, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("Heart size is within normal limits. XXXX are intact.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("Normal heart size.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("Enlarged cardiac silhouette.", {"Cardiomegaly": 1}),
    ("Heart size and mediastinal contours are within normal limits.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1}),
    ("The cardiomediastinal silhouette is within normal limits.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1}),
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": 1}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": -1}),
    ("Heart size is top normal.", {"Cardiomegaly": -1}),
    ("There is no focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("The lungs are clear without focal consolidation.", {"Consolidation": 0, "No Finding": 1}),
    ("Lungs are free of consolidation. Negative for pneumothorax.",
     {"Consolidation": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("No evidence of pneumonia.", {"Pneumonia": 0, "No Finding": 1}),
    ("The previously seen pneumothorax has resolved.", {"Pneumothorax": 0, "No Finding": 1}),
    ("No pleural effusion. Pneumothorax is not seen.", {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("Left basilar opacity may represent atelectasis or pneumonia.",
     {"Lung Opacity": 1, "Atelectasis": -1, "Pneumonia": -1}),
    ("Possible small left pleural effusion.", {"Pleural Effusion": -1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("Cannot exclude a small pneumothorax.", {"Pneumothorax": -1}),
    ("Questionable right upper lobe nodule.", {"Lung Lesion": -1}),
    ("Findings suggestive of pulmonary edema.", {"Edema": -1}),
    ("Likely right lower lobe atelectasis.", {"Atelectasis": -1}),
    ("No change in the small left pleural effusion.", {"Pleural Effusion": 1}),
    ("No pneumothorax, but there is a small right pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("Blunting of the right costophrenic angle.", {"Pleural Effusion": 1}),
    ("The costophrenic angles are sharp.", {"Pleural Effusion": 0, "No Finding": 1}),
    ("Calcified granuloma in the right upper lobe.", {"Lung Lesion": 1}),
    ("Stable mild cardiomegaly with pulmonary vascular congestion.", {"Cardiomegaly": 1, "Edema": 1}),
    ("Mild pleural thickening at the left apex. No acute fracture.", {"Pleural Other": 1, "Fracture": 0}),
    ("Pacemaker in place. The lungs are clear.", {"Support Devices": 1, "No Finding": 1}),
    ("1. No acute cardiopulmonary abnormality. 2. Stable 1.5 cm nodule.", {"Lung Lesion": 1}),
    ("", {"No Finding": 1}),
]


@pytest.mark.parametrize("report, expected", LABELER_CASES, ids=[c[0][:40] or "empty" for c in LABELER_CASES])
def test_labeler_handles_negation_and_uncertainty(report, expected):
    assert _mentioned(label_report(report)) == expected
    assert _mentioned(label_report(clean_report(report, "iu_xray"))) == expected


def test_labeler_reads_r2gen_cleaned_text():
    cleaned = "the heart is enlarged . no pleural effusion or pneumothorax . xxxx are intact ."
    assert _mentioned(label_report(cleaned)) == {"Cardiomegaly": 1, "Pleural Effusion": 0, "Pneumothorax": 0}
    # without punctuation a new "there is" still ends the negation's scope
    assert _mentioned(label_report("no pneumothorax there is a small right pleural effusion .")) == {
        "Pneumothorax": 0, "Pleural Effusion": 1}
    assert list(label_report(cleaned)) == list(CHEXPERT_LABELS)


def test_clinical_efficacy_micro_scores_match_a_hand_computed_example():
    references = [
        "The heart is enlarged. Small left pleural effusion.",  # Cardiomegaly, Pleural Effusion
        "The lungs are clear.",  # No Finding
        "Right pneumothorax.",  # Pneumothorax
    ]
    hypotheses = [
        "Cardiomegaly. No pleural effusion.",  # Cardiomegaly: TP; effusion: FN
        "Possible right pneumothorax.",  # uncertain counts as negative: No Finding FN, nothing predicted
        "Right pneumothorax. Small left pleural effusion.",  # Pneumothorax: TP; effusion: FP
    ]
    ce = clinical_efficacy(references, hypotheses)  # TP 2, FP 1, FN 2
    assert ce["CE_precision"] == pytest.approx(2 / 3)
    assert ce["CE_recall"] == pytest.approx(2 / 4)
    assert ce["CE_F1"] == pytest.approx(4 / 7)
    per = ce["CE_per_label"]
    assert per["Cardiomegaly"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per["Pleural Effusion"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per["No Finding"]["support"] == 1 and per["No Finding"]["recall"] == 0.0
    assert per["Edema"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert list(per) == list(CHEXPERT_LABELS)


def test_findings_to_chexpert_maps_each_drawn_kind():
    normal = {"cardiomegaly": False, "effusion": None, "consolidation": None, "nodule": None, "pneumothorax": None}
    assert {k for k, v in findings_to_chexpert(normal).items() if v == 1} == {"No Finding"}
    sick = {**normal, "cardiomegaly": True, "effusion": {"side": "left", "size": "small"},
            "consolidation": {"side": "right", "zone": "upper"}, "nodule": {"side": "left", "zone": "lower"},
            "pneumothorax": {"side": "right"}}
    labels = findings_to_chexpert(sick)
    assert {k for k, v in labels.items() if v == 1} == {
        "Cardiomegaly", "Pleural Effusion", "Consolidation", "Lung Lesion", "Pneumothorax"}
    assert all(v in (0, 1) for v in labels.values())


def test_labeler_agrees_with_synthetic_ground_truth(tmp_path):
    """Acceptance: on 300 generated studies, raw and cleaned reports label as their findings say."""
    generate_sample(tmp_path / "s", studies=300, seed=3, image_size=32)
    annotation = json.loads((tmp_path / "s" / "annotation.json").read_text())
    truth = json.loads((tmp_path / "s" / "findings.json").read_text())
    studies = [e for split in annotation.values() for e in split]
    agree = {"raw": 0, "cleaned": 0}
    for entry in studies:
        expected = findings_to_chexpert(truth[entry["id"]])
        for form, text in (("raw", entry["report"]), ("cleaned", clean_report(entry["report"], "iu_xray"))):
            labels = label_report(text)
            # positives exactly as drawn, nothing uncertain, and no label contradicting the ground truth
            agree[form] += all((labels[k] == 1) == (expected[k] == 1) and labels[k] in (None, expected[k])
                               for k in CHEXPERT_LABELS)
    assert len(studies) == 300
    assert agree["raw"] / 300 >= 0.99 and agree["cleaned"] / 300 >= 0.99, agree
