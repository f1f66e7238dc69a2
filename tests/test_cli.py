"""The `r2gen` command as a user runs it: generate, info, check-data, sample-data.

Most cases call ``r2gen.cli.main`` in-process; one runs the command in a fresh interpreter. The model
is the tiny one of conftest, trained once for this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, tiny_params
from r2gen.checkpoint import FORMAT, build_model, load_model_file
from r2gen.cli import main
from r2gen.data.images import load_view
from r2gen.tokenizer import Tokenizer
from r2gen.training import TrainPaths, TrainSpec, train


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_data) -> dict:
    """A model file trained for ten epochs on the tiny dataset (enough to write words), with its metrics."""
    out = tmp_path_factory.mktemp("cli_model")
    paths = TrainPaths(tiny_data["prepared"], tiny_data["tokenizer"], out / "model.pt", out / "checkpoints",
                       out / "dvclive", out / "metrics.json")
    summary = train(TrainSpec.of(tiny_params(tiny_data["root"], train__common__epochs=10), "fp32"), paths)
    return {"path": paths.model_out, "summary": summary.to_json(), "tokenizer": Tokenizer.load(tiny_data["tokenizer"])}


@pytest.fixture(scope="module")
def studies(tiny_data) -> list[Path]:
    """Three study folders of the tiny IU X-Ray dataset (0.png frontal, 1.png lateral)."""
    return sorted((tiny_data["root"] / "images").iterdir())[:3]


def r2gen(capsys, *argv) -> tuple[int, str, str]:
    """Run the command in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def assert_vocabulary_words(report: str, tokenizer: Tokenizer) -> None:
    assert report.split(), "empty report"
    assert set(report.split()) <= set(tokenizer.tokens)


# --- generate --------------------------------------------------------------------------------------


def test_generate_writes_one_report_for_the_views_of_a_study(capsys, model, studies):
    study = studies[0]
    code, out, err = r2gen(capsys, "generate", "--checkpoint", model["path"], study / "0.png", study / "1.png",
                           "--max-new-tokens", 12)
    assert code == 0, err
    name, report = out.rstrip("\n").split(": ", 1)
    assert out.count("\n") == 1 and name == study.name
    assert_vocabulary_words(report, model["tokenizer"])
    assert len(report.split()) <= 12


def test_generate_jsonl_gives_one_object_per_study_folder(capsys, model, studies):
    argv = [a for study in studies for a in ("--study", study)]
    code, out, err = r2gen(capsys, "generate", "--checkpoint", model["path"], *argv, "--format", "jsonl",
                           "--max-new-tokens", 12)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [sorted(row) for row in rows] == [["images", "report", "study"]] * len(studies)
    assert [row["study"] for row in rows] == [study.name for study in studies]
    assert [row["images"] for row in rows] == [[str(study / "0.png"), str(study / "1.png")] for study in studies]
    for row in rows:
        assert_vocabulary_words(row["report"], model["tokenizer"])


def test_generate_greedy_matches_the_library_on_the_same_views(capsys, model, studies):
    code, out, err = r2gen(capsys, "generate", "--checkpoint", model["path"], "--study", studies[1],
                           "--num-beams", 1, "--max-new-tokens", 12, "--format", "jsonl")
    assert code == 0, err
    ckpt = load_model_file(model["path"])
    images = torch.from_numpy(np.stack([load_view(studies[1] / f"{v}.png", 32) for v in range(2)]))[None]
    ids = build_model(ckpt).generate(images, num_beams=1, max_new_tokens=12)
    assert json.loads(out)["report"] == model["tokenizer"].batch_decode(ids)[0]


def test_generate_defaults_to_the_tokenizers_length_and_blocks_trigrams_on_request(capsys, model, studies):
    code, out, err = r2gen(capsys, "generate", "--checkpoint", model["path"], "--study", studies[1],
                           "--num-beams", 1, "--block-trigrams", "--format", "jsonl")
    assert code == 0, err
    ckpt = load_model_file(model["path"])
    images = torch.from_numpy(np.stack([load_view(studies[1] / f"{v}.png", 32) for v in range(2)]))[None]
    ids = build_model(ckpt).generate(images, num_beams=1, max_new_tokens=model["tokenizer"].max_seq_length,
                                     block_trigrams=True)
    assert json.loads(out)["report"] == model["tokenizer"].batch_decode(ids)[0]


def test_generate_reports_do_not_depend_on_the_batch_size(capsys, model, studies):
    argv = ["generate", "--checkpoint", model["path"], *[a for s in studies for a in ("--study", s)],
            "--num-beams", 2, "--max-new-tokens", 12]
    one_by_one = r2gen(capsys, *argv, "--batch-size", 1)
    together = r2gen(capsys, *argv, "--batch-size", 3)
    assert one_by_one[0] == together[0] == 0
    assert one_by_one[1] == together[1] and one_by_one[1].count("\n") == 3


def _another_version(tmp_path, model, studies):
    path = tmp_path / "old.pt"
    torch.save({**load_model_file(model["path"]), "format": "r2gen-precision/model/0"}, path)
    return ["--checkpoint", path, studies[0] / "0.png", studies[0] / "1.png"], [str(path), "model/0", FORMAT]


def _unreadable_image(tmp_path, model, studies):
    bad = tmp_path / "0.png"
    bad.write_bytes(b"not a png at all" * 20)
    return ["--checkpoint", model["path"], bad, studies[0] / "1.png"], [f"cannot decode image {bad}"]


GENERATE_MISTAKES = {
    "one_view_for_a_two_view_model": lambda tmp, model, studies: (
        ["--checkpoint", model["path"], studies[0] / "0.png"],
        ["1 image(s) given", "reads 2 view(s) per study (frontal, then lateral)"]),
    "unreadable_image": _unreadable_image,
    "missing_image": lambda tmp, model, studies: (
        ["--checkpoint", model["path"], tmp / "nope.png", studies[0] / "1.png"], [f"image not found: {tmp / 'nope.png'}"]),
    "missing_checkpoint": lambda tmp, model, studies: (
        ["--checkpoint", tmp / "missing.pt", "--study", studies[0]], [f"model file not found: {tmp / 'missing.pt'}"]),
    "checkpoint_of_another_version": _another_version,
    "study_folder_that_does_not_exist": lambda tmp, model, studies: (
        ["--checkpoint", model["path"], "--study", tmp / "nowhere"], [f"study folder not found: {tmp / 'nowhere'}"]),
    "study_folder_without_images": lambda tmp, model, studies: (
        ["--checkpoint", model["path"], "--study", tmp], [f"study folder {tmp} holds no images"]),
    "folder_given_as_an_image": lambda tmp, model, studies: (
        ["--checkpoint", model["path"], studies[0]], [f"{studies[0]} is a folder; pass it as --study {studies[0]}"]),
    "no_images": lambda tmp, model, studies: (["--checkpoint", model["path"]], ["no images given"]),
    "too_many_new_tokens": lambda tmp, model, studies: (
        ["--checkpoint", model["path"], "--study", studies[0], "--max-new-tokens", 100_000],
        ["--max-new-tokens 100000 is over this model's limit"]),
    "block_trigrams_with_beam_search": lambda tmp, model, studies: (
        ["--checkpoint", model["path"], "--study", studies[0], "--num-beams", 3, "--block-trigrams"],
        ["--block-trigrams applies to greedy decoding only (--num-beams 1)"]),
}


@pytest.mark.parametrize("mistake", GENERATE_MISTAKES)
def test_generate_mistake_is_a_one_line_error(capsys, tmp_path, model, studies, mistake):
    argv, fragments = GENERATE_MISTAKES[mistake](tmp_path, model, studies)
    assert_one_line_error(*r2gen(capsys, "generate", *argv), *fragments)


def test_generate_on_cuda_without_a_gpu_says_to_use_the_cpu(capsys, model, studies, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = r2gen(capsys, "generate", "--checkpoint", model["path"], "--study", studies[0], "--device", "cuda")
    assert_one_line_error(*result, "no CUDA device", "use --device cpu")


@pytest.mark.parametrize("option, value", [("--num-beams", "0"), ("--max-new-tokens", "-3"), ("--batch-size", "x")])
def test_generate_rejects_non_positive_counts_before_loading_anything(capsys, option, value, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--checkpoint", str(tmp_path / "never-read.pt"), "img.png", option, value])
    assert info.value.code == 2
    assert f"argument {option}: must be" in capsys.readouterr().err


def test_verbose_shows_the_traceback(capsys, tmp_path):
    code, _, err = r2gen(capsys, "--verbose", "generate", "--checkpoint", tmp_path / "missing.pt", "img.png", "x.png")
    assert code == 2 and "Traceback" in err and err.rstrip().endswith(f"model file not found: {tmp_path / 'missing.pt'}"
                                                                       "; train it first (dvc repro) or check the path")


def test_installed_command_generates_in_a_fresh_process(model, studies):
    # The command in a new interpreter: imports, argv handling and exit status as a shell sees them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "r2gen.cli", "generate", "--checkpoint", str(model["path"]),
                         "--study", str(studies[0]), "--format", "jsonl", "--max-new-tokens", "8"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["study"] == studies[0].name
    assert "Warning" not in ok.stderr  # e.g. torch's non-writable array warning


def test_output_cut_short_by_a_closed_pipe_is_not_a_crash(tmp_path):
    # `r2gen ... | head -1`: the reader has gone before the command writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "r2gen.cli", "sample-data", str(tmp_path / "s"), "--studies", "3",
                           "--image-size", "32"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


# --- info ------------------------------------------------------------------------------------------


def test_info_prints_precision_backend_vocabulary_config_and_metrics(capsys, model):
    code, out, err = r2gen(capsys, "info", model["path"])
    assert code == 0, err
    info = json.loads(out)
    assert info["file"] == str(model["path"]) and info["format"] == FORMAT
    assert (info["precision"], info["backend"]) == ("fp32", "native")
    assert info["vocab_size"] == model["tokenizer"].vocab_size
    assert info["data"] == {"dataset": "iu_xray", "views": 2, "image_size": 32}
    assert info["model_config"]["d_model"] == 32 and info["model_config"]["visual_extractor"] == "resnet10"
    assert info["parameters"] == model["summary"]["parameters"]
    assert info["training"] == model["summary"]  # train/val loss, throughput, memory, versions


def test_info_output_stays_valid_json_when_a_metric_is_not_finite(capsys, tmp_path, model):
    ckpt = load_model_file(model["path"])
    ckpt["info"]["train"]["val_loss"] = float("inf")
    torch.save(ckpt, tmp_path / "model.pt")
    code, out, _ = r2gen(capsys, "info", tmp_path / "model.pt")
    assert code == 0 and json.loads(out)["training"]["val_loss"] is None
    assert "Infinity" not in out


def test_info_on_a_missing_file_is_a_one_line_error(capsys, tmp_path):
    assert_one_line_error(*r2gen(capsys, "info", tmp_path / "model.pt"), f"model file not found: {tmp_path / 'model.pt'}")


# --- check-data and sample-data -------------------------------------------------------------------


def test_check_data_prints_counts_per_split(capsys, tiny_data):
    code, out, err = r2gen(capsys, "check-data", tiny_data["root"])
    assert code == 0, err
    assert out.splitlines() == ["train: 11 studies", "val: 2 studies", "test: 3 studies",
                                f"ok: {tiny_data['root']} is a valid iu_xray dataset (16 studies)"]


@pytest.fixture
def broken_copy(tmp_path, tiny_data) -> tuple[Path, Path]:
    """A copy of the tiny dataset with one undecodable image: (root, the broken file)."""
    root = tmp_path / "iu"
    shutil.copytree(tiny_data["root"], root)
    annotation = json.loads((root / "annotation.json").read_text())
    bad = root / "images" / annotation["val"][0]["image_path"][1]
    bad.write_bytes(bad.read_bytes()[:40])
    return root, bad


def test_check_data_on_a_broken_dataset_names_the_file(capsys, broken_copy):
    root, bad = broken_copy
    assert_one_line_error(*r2gen(capsys, "check-data", root), f"cannot decode image {bad}", str(root / "annotation.json"))


def test_check_data_in_drop_mode_lists_the_dropped_study(capsys, broken_copy):
    root, bad = broken_copy
    code, out, err = r2gen(capsys, "check-data", root, "--on-invalid", "drop")
    assert code == 0, err
    assert "val: 1 study" in out.splitlines()
    assert f"dropped val/{bad.parent.name}: cannot decode image {bad}" in out


@pytest.mark.parametrize("layout, views", [("iu_xray", 2), ("mimic_cxr", 1)])
def test_sample_data_writes_a_dataset_that_check_data_accepts(capsys, tmp_path, layout, views):
    out_dir = tmp_path / layout
    code, out, err = r2gen(capsys, "sample-data", out_dir, "--studies", 6, "--seed", 1, "--image-size", 32,
                           "--layout", layout)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["layout"] == layout and summary["studies"] == 6 and summary["images"] == 6 * views
    annotation = json.loads((out_dir / "annotation.json").read_text())
    assert sum(map(len, annotation.values())) == 6
    code, out, err = r2gen(capsys, "check-data", out_dir, "--dataset", layout)
    assert code == 0, err
    assert out.splitlines()[-1] == f"ok: {out_dir} is a valid {layout} dataset (6 studies)"


def test_check_data_with_the_wrong_layout_says_how_many_views_it_needs(capsys, tmp_path):
    assert r2gen(capsys, "sample-data", tmp_path / "iu", "--studies", 3, "--image-size", 32)[0] == 0
    result = r2gen(capsys, "check-data", tmp_path / "iu", "--dataset", "mimic_cxr")
    assert_one_line_error(*result, "2 image_path entries, mimic_cxr needs 1")


def test_sample_data_refuses_a_foreign_folder_and_too_few_studies(capsys, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    assert_one_line_error(*r2gen(capsys, "sample-data", tmp_path, "--studies", 6), f"refusing to replace {tmp_path}")
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert_one_line_error(*r2gen(capsys, "sample-data", tmp_path / "new", "--studies", 2), "--studies 2 is too small")
