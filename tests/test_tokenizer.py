"""Tokenizer: bit-for-bit parity with the public R2Gen cleaning, vocabulary, encode/decode, save/load.

The expected strings and ids below were produced once by running the public code's
``clean_report_iu_xray``, ``clean_report_mimic_cxr``, ``create_vocabulary`` and ``__call__``
(cuhksz-nlp/R2Gen @ 5a2e63f, modules/tokenizers.py) on these inputs; change them only on purpose.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from r2gen.errors import ConfigError, R2GenError
from r2gen.tokenizer import FIXES, Tokenizer, clean_report

IU_REPORTS = [
    "1. The heart is normal in size. 2. The lungs are clear.",
    "The heart size is normal.. No pneumothorax...  XXXX opacity!",
    "Stable T11. The mediastinum is unremarkable; (no) effusion, focal consolidation?",
    "Heart: normal. Lungs - clear, no <acute> findings = @ 3 views.",
    "Mild degenerative changes 2. 3. Calcified granuloma in the right upper lobe [old].",
    "There are \"small\" bilateral pleural effusions / atelectasis's \\ left 50% {stable}.",
    "  . . No acute disease.  ",
    "Normal chest x-XXXX. Heart size 12.5 cm & aorta_ok + 4. Spine intact.",
    "",
    "..",
]
IU_CLEANED = [
    "the heart is normal in size . the lungs are clear .",
    "the heart size is normal . no pneumothorax . xxxx opacity .",
    "stable t1the mediastinum is unremarkable no effusion focal consolidation .",
    "heart normal . lungs - clear no acute findings   3 views .",
    "mild degenerative changes . calcified granuloma in the right upper lobe old .",
    "there are small bilateral pleural effusions  atelectasiss  left 50 stable .",
    " .  . no acute disease .",
    "normal chest x-xxxx . heart size 125 cm  aortaok  . spine intact .",
    " .",
    " .",
]
MIMIC_REPORTS = [
    "FINDINGS:\n 1. PA and lateral views of the chest.\n 2. No focal consolidation.__ ___ is seen.\n\n",
    "The lungs are clear.  There is no pleural effusion or pneumothorax.\nHeart size is normal...",
    "Compared to ___, the ET tube is 4.5 cm above the carina. 3. Lines in place.",
]
MIMIC_CLEANED = [
    "findings pa and lateral views of the chest . no focal consolidation  is seen .",
    "the lungs are clear . there is no pleural effusion or pneumothorax . heart size is normal .",
    "compared to  the et tube is 45 cm above the carina . lines in place .",
]
# create_vocabulary over IU_REPORTS with threshold 2.
PUBLIC_VOCAB_T2 = [".", "<unk>", "acute", "are", "clear", "heart", "in", "is", "lungs", "no", "normal",
                   "size", "stable", "the"]
# Tokenizer.__call__ on the first three IU reports with that vocabulary.
PUBLIC_IDS_T2 = [
    [0, 14, 6, 8, 11, 7, 12, 1, 14, 9, 4, 5, 1, 0],
    [0, 14, 6, 12, 8, 11, 1, 10, 2, 1, 2, 2, 1, 0],
    [0, 13, 2, 2, 8, 2, 10, 2, 2, 2, 1, 0],
]


@pytest.mark.parametrize("report, expected", list(zip(IU_REPORTS, IU_CLEANED)))
def test_iu_cleaning_matches_public_code(report, expected):
    assert clean_report(report, "iu_xray") == expected


@pytest.mark.parametrize("report, expected", list(zip(MIMIC_REPORTS, MIMIC_CLEANED)))
def test_mimic_cleaning_matches_public_code(report, expected):
    assert clean_report(report, "mimic_cxr") == expected


def test_vocabulary_and_ids_match_public_code():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", threshold=2, max_seq_length=60)
    assert list(tok.tokens) == PUBLIC_VOCAB_T2
    assert tok.vocab_size == len(PUBLIC_VOCAB_T2) + 1
    assert [tok.encode(r) for r in IU_REPORTS[:3]] == PUBLIC_IDS_T2


def test_threshold_keeps_only_tokens_seen_often_enough():
    reports = ["a b c .", "a b .", "a ."]  # cleaned counts: a 3, b 2, c 1, '.' 3 (+ suffix periods)
    assert Tokenizer.build(reports, "iu_xray", 1, 60).tokens == (".", "<unk>", "a", "b", "c")
    assert Tokenizer.build(reports, "iu_xray", 3, 60).tokens == (".", "<unk>", "a")
    assert Tokenizer.build(reports, "iu_xray", 100, 60).tokens == ("<unk>",)


def test_unknown_words_map_to_unk():
    tok = Tokenizer.build(["the heart is normal."] * 3, "iu_xray", 3, 60)
    unk = tok.tokens.index("<unk>") + 1
    assert tok.encode("The liver is normal.")[2] == unk


def test_encode_decode_round_trip_on_vocabulary_text():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", threshold=1, max_seq_length=60)
    text = "the heart size is normal . no pneumothorax . xxxx opacity ."
    ids = tok.encode(text)
    assert ids[0] == 0 and ids[-1] == 0 and 0 not in ids[1:-1]
    assert tok.decode(ids) == text
    assert tok.decode(ids[1:]) == text  # R2Gen decodes targets[:, 1:]


def test_decode_stops_at_first_zero():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", threshold=2, max_seq_length=60)
    assert tok.decode([14, 6, 0, 9, 4]) == "the heart"
    assert tok.decode([0, 0, 0]) == ""


def test_truncated_report_loses_eos_like_r2gen():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", threshold=2, max_seq_length=5)
    assert tok.encode(IU_REPORTS[0]) == PUBLIC_IDS_T2[0][:5]
    assert tok.encode(IU_REPORTS[0])[-1] != 0


def test_keep_eos_fix_ends_a_truncated_report_with_eos():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", 2, 5, fixes=("keep_eos_on_truncation",))
    assert tok.encode(IU_REPORTS[0]) == [0, 14, 6, 8, 0]
    assert tok.encode("the heart") == [0, 14, 6, 1, 0]  # short reports are unchanged


def test_batch_decode_on_padded_tensor():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", threshold=2, max_seq_length=60)
    batch = torch.zeros(2, 8, dtype=torch.long)
    batch[0, :5] = torch.tensor([14, 6, 8, 11, 1])
    batch[1, :2] = torch.tensor([10, 3])
    assert tok.batch_decode(batch) == ["the heart is normal .", "no acute"]
    assert tok.batch_decode(batch.numpy()) == ["the heart is normal .", "no acute"]
    assert tok.batch_decode([[0, 14, 0]], skip_special_tokens=False) == ["<eos> the <eos>"]


def test_decode_rejects_out_of_range_ids():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", threshold=2, max_seq_length=60)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_save_load_round_trip(tmp_path):
    tok = Tokenizer.build(MIMIC_REPORTS, "mimic_cxr", 1, 100, fixes=("punct_range", "drop_empty_sentences"))
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded == tok
    assert loaded.encode(MIMIC_REPORTS[0]) == tok.encode(MIMIC_REPORTS[0])
    raw = json.loads(path.read_text())
    assert raw["dataset"] == "mimic_cxr" and raw["threshold"] == 1 and raw["max_seq_length"] == 100
    assert raw["fixes"] == ["punct_range", "drop_empty_sentences"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"{not json", "corrupt"),
        (b"\xff\xfe\x00", "corrupt"),
        (b'{"format": "something-else"}', "does not hold an r2gen tokenizer"),
        (b'{"format": "r2gen-tokenizer", "version": 99}', "version 99"),
        (b'{"format": "r2gen-tokenizer", "version": 1, "tokens": ["b", "a"]}', "corrupt"),
    ],
)
def test_load_rejects_missing_corrupt_or_incompatible_files(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(R2GenError, match=message) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_rejects_unknown_fix(tmp_path):
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", 2, 60)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    raw = json.loads(path.read_text())
    raw["fixes"] = ["no_such_fix"]
    path.write_text(json.dumps(raw))
    with pytest.raises(R2GenError, match="incompatible.*no_such_fix"):
        Tokenizer.load(path)


def test_unknown_fix_lists_valid_ones():
    with pytest.raises(ConfigError, match="must be one of: " + ", ".join(FIXES)):
        clean_report("a.", "iu_xray", fixes=("punctuation",))
    with pytest.raises(ConfigError):
        Tokenizer.build(["a."], "iu_xray", 1, 60, fixes=("nope",))


def test_numbering_fix_keeps_numbers_ending_in_one():
    report = "1. Stable T11. The lungs are clear. 2. No effusion."
    assert clean_report(report, "iu_xray") == "stable t1the lungs are clear . no effusion ."
    assert clean_report(report, "iu_xray", ("numbering",)) == "stable t11 . the lungs are clear . no effusion ."


def test_punct_range_fix_strips_hyphen_and_keeps_comparison_signs():
    report = "Lungs - clear, no <acute> findings = @ 3 views."
    assert clean_report(report, "iu_xray") == "lungs - clear no acute findings   3 views ."
    assert clean_report(report, "iu_xray", ("punct_range",)) == "lungs  clear no <acute> findings = @ 3 views ."


def test_drop_empty_sentences_fix():
    assert clean_report("  . . No acute disease.  ", "iu_xray", ("drop_empty_sentences",)) == "no acute disease ."
    assert clean_report("", "iu_xray", ("drop_empty_sentences",)) == " ."


def test_every_fix_is_off_by_default():
    for report, expected in zip(IU_REPORTS, IU_CLEANED):
        assert clean_report(report, "iu_xray", ()) == expected
    assert set(FIXES) == {"numbering", "punct_range", "drop_empty_sentences", "keep_eos_on_truncation"}


def test_literal_unk_in_text_does_not_duplicate_vocabulary_entry():
    tok = Tokenizer.build(["<unk> a."] * 3, "iu_xray", 1, 60, fixes=("punct_range",))
    assert tok.tokens.count("<unk>") == 1
    assert len(set(tok.tokens)) == len(tok.tokens) == tok.vocab_size - 1


def test_batch_decode_accepts_numpy_rows():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", threshold=2, max_seq_length=60)
    rows = [np.array([14, 9, 0]), np.array([0, 10, 3, 0])]
    assert tok.batch_decode(rows) == ["the lungs", "no acute"]


def test_dict_round_trip_for_checkpoints():
    tok = Tokenizer.build(IU_REPORTS, "iu_xray", 2, 60, fixes=("numbering",))
    raw = json.loads(json.dumps(tok.to_dict()))  # survives JSON (and torch.save) unchanged
    assert Tokenizer.load_dict(raw, source="models/fp32/model.pt") == tok
    with pytest.raises(R2GenError, match="the tokenizer in models/fp32/model.pt is corrupt"):
        Tokenizer.load_dict({**raw, "tokens": ["a"]}, source="models/fp32/model.pt")
