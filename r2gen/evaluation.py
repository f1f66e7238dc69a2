"""Scoring a trained model on the test split, as the public code's test pass does, plus baselines.

Every model is evaluated at one fixed generation precision (``evaluate.precision``, fp32 by default)
so that quality differences reflect the training precision. References (``evaluate.references``)
are by default what R2Gen scores against, ``truncated``: the tokenized report decoded back (cleaned,
``<unk>`` for rare words, cut at ``max_seq_length``); or ``full``: the cleaned report, every word and
no length limit, as papers that score against the ground truth do. The choice is recorded in the
metrics file (``references``) and applies to the image-blind baseline too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from r2gen import precision as prec
from r2gen.checkpoint import build_model, load_model_file
from r2gen.config import REFERENCES, EvaluateConfig, check_choice
from r2gen.data.images import load_prepared
from r2gen.errors import R2GenError
from r2gen.data.batches import StudyBatches
from r2gen.metrics import clinical_efficacy, compute_nlg
from r2gen.records import BaselineSummary, EvalSummary
from r2gen.tokenizer import Tokenizer
from r2gen.validation import evaluate_loss

log = logging.getLogger(__name__)


def references(tokenizer: Tokenizer, reports: list[str], kind: str = "truncated") -> list[str]:
    """The ground truths scored against: ``truncated``, R2Gen's ``decode(encode(report))`` (cleaned,
    <unk>-mapped, cut at ``max_seq_length``), or ``full``, the cleaned report whole."""
    check_choice("evaluate.references", kind, REFERENCES)
    if kind == "full":
        return [tokenizer.clean(r) for r in reports]
    return [tokenizer.decode(tokenizer.encode(r)) for r in reports]


def score(refs: list[str], hyps: list[str], meteor: bool) -> dict:
    """NLG metrics (pycocoevalcap keys) and clinical efficacy of hypotheses against references."""
    ce = clinical_efficacy(refs, hyps)
    return {**compute_nlg(refs, hyps, meteor=meteor), **{k: v for k, v in ce.items() if k != "CE_per_label"},
            "CE_per_label": ce.get("CE_per_label")}


def evaluate_model(model_path: Path, prepared: Path, cfg: EvaluateConfig, device: str = "auto", *,
                   threads: int) -> tuple[EvalSummary, list[dict]]:
    """Test loss, beam-search reports and their scores for one model file, on ``threads`` CPU threads.

    Reports are at most ``cfg.max_new_tokens`` tokens, by default the model's tokenizer's
    ``max_seq_length``; the value used is recorded as ``max_new_tokens``.

    Returns ``(summary, predictions)`` with predictions ``{id, reference, generated}`` per study.
    """
    torch.set_num_threads(threads)
    ckpt = load_model_file(model_path)
    tokenizer = Tokenizer.load_dict(ckpt["tokenizer"], source=str(model_path))
    dev = prec.select_device(device)
    plan = prec.resolve(cfg.precision, "auto", dev)
    prec.set_fp32_numerics(dev)
    model = build_model(ckpt, model_path).to(dev)
    prec.convert_model(model, plan)

    test = load_prepared(prepared, "test")
    size, views = ckpt["data"]["image_size"], ckpt["data"]["views"]
    if tuple(test.images.shape[1:]) != (views, size, size):
        raise R2GenError(
            f"{prepared}/test.npy holds images of shape {tuple(test.images.shape[1:])} but {model_path} expects "
            f"({views}, {size}, {size}); rerun `dvc repro` so both come from the same params"
        )
    max_tokens = cfg.max_tokens(tokenizer.max_seq_length)
    positions = model.embed.pe.shape[0]  # the decoder's positional table bounds the report length
    if max_tokens > positions:
        raise R2GenError(f"evaluate.max_new_tokens {max_tokens} is over this model's limit of {positions} tokens; "
                         f"set evaluate.max_new_tokens to at most {positions}")
    batches = StudyBatches(test, tokenizer, cfg.batch_size, size, train=False)
    test_loss = evaluate_loss(model, batches, plan)

    generated_ids, seconds = [], 0.0
    model.eval()
    for images, _ in tqdm(batches, desc=f"generate ({cfg.precision})", leave=False, mininterval=5, disable=None):
        t0 = time.perf_counter()
        with plan.autocast():
            ids = model.generate(images.to(dev), num_beams=cfg.num_beams, max_new_tokens=max_tokens,
                                 block_trigrams=cfg.block_trigrams)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds += time.perf_counter() - t0
        generated_ids.extend(ids.cpu().tolist())
    hyps = tokenizer.batch_decode(generated_ids)
    refs = references(tokenizer, test.reports, cfg.references)

    summary = EvalSummary(
        precision=ckpt["info"]["train"]["precision"],
        eval_precision=cfg.precision,
        eval_backend=plan.backend,
        test_loss=test_loss,
        references=cfg.references,
        **score(refs, hyps, cfg.meteor),
        reports_per_s=len(hyps) / seconds if seconds else None,
        generation_seconds=seconds,
        num_beams=cfg.num_beams,
        max_new_tokens=max_tokens,
        test_studies=len(hyps),
        distinct_reports=len(set(hyps)),
        threads=threads,
    )
    predictions = [{"id": i, "reference": r, "generated": h} for i, r, h in zip(test.ids, refs, hyps)]
    return summary, predictions


def image_blind_baseline(prepared: Path, tokenizer: Tokenizer, meteor: bool,
                         references_kind: str = "truncated") -> BaselineSummary:
    """Scores of writing the most frequent training report for every test study (no image used).

    The report written is the most frequent one as a model could write it (truncated: R2Gen's
    decoded form); it is scored against ``references_kind`` references like the models are.
    """
    train, test = load_prepared(prepared, "train"), load_prepared(prepared, "test")
    train_refs = references(tokenizer, train.reports)
    most_common, count = Counter(train_refs).most_common(1)[0]
    refs = references(tokenizer, test.reports, references_kind)
    return BaselineSummary(
        baseline="most frequent training report",
        report=most_common,
        train_frequency=count / len(train_refs),
        references=references_kind,
        **score(refs, [most_common] * len(refs), meteor),
        test_studies=len(refs),
    )
