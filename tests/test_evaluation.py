"""Evaluation and the image-blind baseline build their typed records, with the keys the metrics files always had."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import tiny_params
from r2gen.errors import ConfigError, R2GenError
from r2gen.evaluation import evaluate_model, image_blind_baseline
from r2gen.records import BaselineSummary, EvalSummary
from r2gen.tokenizer import Tokenizer
from r2gen.training import TrainPaths, TrainSpec, train


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("eval_model")
    paths = TrainPaths(tiny_data["prepared"], tiny_data["tokenizer"], out / "model.pt", out / "checkpoints",
                       out / "dvclive", out / "metrics.json")
    train(TrainSpec.of(tiny_params(tiny_data["root"], train__common__epochs=1), "fp16"), paths)
    return paths.model_out


def test_evaluation_returns_the_complete_record_threads_included(model_path, tiny_data):
    threads = torch.get_num_threads()
    try:
        summary, predictions = evaluate_model(model_path, tiny_data["prepared"], tiny_params().evaluate, "cpu",
                                              threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert isinstance(summary, EvalSummary)
    assert (summary.precision, summary.eval_precision, summary.threads) == ("fp16", "fp32", 2)
    assert summary.METEOR is None and "meteor=False" in summary.METEOR_error
    assert list(summary.to_json()) == list(EvalSummary.keys())  # METEOR_error after CIDEr, threads last
    assert summary.test_studies == len(predictions) and set(predictions[0]) == {"id", "reference", "generated"}
    assert summary.references == "truncated"


def test_full_references_are_recorded_and_are_what_the_predictions_show(model_path, tiny_data):
    from r2gen.data.images import load_prepared

    cfg = dataclasses.replace(tiny_params().evaluate, references="full")
    summary, predictions = evaluate_model(model_path, tiny_data["prepared"], cfg, "cpu", threads=1)
    tokenizer = Tokenizer.load(tiny_data["tokenizer"])
    test = load_prepared(tiny_data["prepared"], "test")
    assert summary.references == "full" and summary.to_json()["references"] == "full"
    assert [p["reference"] for p in predictions] == [tokenizer.clean(r) for r in test.reports]
    baseline = image_blind_baseline(tiny_data["prepared"], tokenizer, meteor=False, references_kind="full")
    assert baseline.references == "full"


def test_the_baseline_is_a_baseline_record(tiny_data):
    summary = image_blind_baseline(tiny_data["prepared"], Tokenizer.load(tiny_data["tokenizer"]), meteor=False)
    assert isinstance(summary, BaselineSummary) and summary.references == "truncated"
    assert list(summary.to_json()) == list(BaselineSummary.keys())
    assert BaselineSummary.from_json(summary.to_json()) == summary


def test_evaluation_generates_up_to_the_tokenizers_max_seq_length_by_default(model_path, tiny_data):
    """``evaluate.max_new_tokens: null`` is the model's tokenizer's max_seq_length (60 here), recorded as used."""
    cfg = dataclasses.replace(tiny_params().evaluate, max_new_tokens=None, num_beams=1, block_trigrams=True)
    summary, predictions = evaluate_model(model_path, tiny_data["prepared"], cfg, "cpu", threads=1)
    assert summary.max_new_tokens == Tokenizer.load(tiny_data["tokenizer"]).max_seq_length == 60
    assert summary.num_beams == 1 and all(len(p["generated"].split()) <= 60 for p in predictions)


def test_a_generation_length_over_the_positional_table_is_a_one_line_error(model_path, tiny_data):
    with pytest.raises(ConfigError, match="evaluate.max_new_tokens must be from 1 to 1024"):
        dataclasses.replace(tiny_params().evaluate, max_new_tokens=2000)
    cfg = tiny_params().evaluate
    object.__setattr__(cfg, "max_new_tokens", 2000)  # past the params check: the library still refuses it
    with pytest.raises(R2GenError, match="evaluate.max_new_tokens 2000 is over this model's limit of 1024 tokens"):
        evaluate_model(model_path, tiny_data["prepared"], cfg, "cpu", threads=1)
