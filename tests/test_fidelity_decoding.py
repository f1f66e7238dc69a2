"""Generation fidelity to the public R2Gen code (issue 15): the generation length and the greedy path's
trigram blocking, checked against a direct transcription of the public rule on hand-built step functions."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import REPO

from r2gen.config import ConfigError, EvaluateConfig, Params
from r2gen.decoding import TRIGRAM_ALPHA, TRIGRAM_LN_HALF, beam_search, trigram_penalty

V = 6  # 0 = EOS, 1..5 words


class ScriptedStepper:
    """A Stepper whose next-token log-probabilities depend only on the last token fed: ``table[last]``."""

    device = torch.device("cpu")

    def __init__(self, table: dict[int, list[float]], rows: int):
        self.table, self.last = table, torch.zeros(rows, dtype=torch.long)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.last = tokens
        return torch.tensor([self.table[int(t)] for t in tokens], dtype=torch.float32)

    def select(self, index: torch.Tensor) -> None:
        self.last = self.last[index.reshape(-1)]


def public_penalty(seq: list[int], vocab: int) -> torch.Tensor:
    """The public ``_sample`` trigram bookkeeping for the next step, transcribed: dict of (a, b) -> [c, ...]
    filled from t = 3 on, one ``mask[j] += 1`` per stored continuation, then ``mask * -0.693 * alpha``."""
    mask = torch.zeros(vocab)
    t = len(seq)
    if t < 3:
        return mask
    trigrams: dict[tuple[int, int], list[int]] = {}
    for u in range(3, t + 1):  # the public loop records (seq[u-3], seq[u-2]) -> seq[u-1] at each step u
        trigrams.setdefault((seq[u - 3], seq[u - 2]), []).append(seq[u - 1])
    for j in trigrams.get((seq[t - 2], seq[t - 1]), []):
        mask[j] += 1
    alpha = 2.0
    return mask * -0.693 * alpha


def cycle_table(rival_gap: float) -> dict[int, list[float]]:
    """After BOS: 1; then 1 -> 2 -> 3 -> 1 ...; word 4 always trails the favourite by ``rival_gap``."""
    table = {}
    for last, favourite in {0: 1, 1: 2, 2: 3, 3: 1, 4: 1, 5: 1}.items():
        row = [-30.0] * V
        row[favourite] = math.log(0.6)
        row[4] = float(torch.tensor(math.log(0.6), dtype=torch.float32) - torch.tensor(rival_gap, dtype=torch.float32))
        table[last] = row
    return table


def test_trigram_penalty_equals_the_public_rule_on_random_sequences():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        t = int(torch.randint(0, 12, (1,), generator=gen))
        seq = torch.randint(1, 4, (1, t), generator=gen)  # 3 words: many repeated trigrams
        expected = public_penalty(seq[0].tolist(), V)
        assert torch.equal(trigram_penalty(seq, V)[0], expected), seq


def test_a_repeated_trigram_is_penalised_once_per_occurrence():
    seq = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])  # (1, 2) -> 3 seen twice
    penalty = trigram_penalty(seq, V)[0]
    one = torch.tensor(1.0) * TRIGRAM_LN_HALF * TRIGRAM_ALPHA
    assert penalty[3] == 2 * one and penalty[torch.arange(V) != 3].eq(0).all()
    assert abs(float(one) - (-1.386)) < 1e-6


def test_greedy_without_blocking_repeats_the_trigram():
    ids = beam_search(ScriptedStepper(cycle_table(1.0), 1), 1, 1, 8)
    assert ids[0].tolist() == [1, 2, 3, 1, 2, 3, 1, 2]


def test_greedy_with_blocking_picks_the_rival_exactly_when_the_public_penalty_says():
    penalty = float(torch.tensor(1.0) * TRIGRAM_LN_HALF * TRIGRAM_ALPHA)  # -1.386 in fp32
    # Word 4 trails word 3 by a bit less than the penalty: after "1 2 3 1 2", the blocked 3 loses to 4.
    below = -penalty - 1e-3
    ids = beam_search(ScriptedStepper(cycle_table(below), 1), 1, 1, 7, block_trigrams=True)
    assert ids[0].tolist() == [1, 2, 3, 1, 2, 4, 1]
    # A bit more than the penalty: the repeat still wins, as it does in the public greedy.
    above = -penalty + 1e-3
    ids = beam_search(ScriptedStepper(cycle_table(above), 1), 1, 1, 7, block_trigrams=True)
    assert ids[0].tolist() == [1, 2, 3, 1, 2, 3, 1]


def test_public_greedy_transcription_gives_the_same_sequences():
    """Rows of a batch, greedy with blocking: our search and a public-style loop (max over penalised log-probs)."""
    tables = [cycle_table(1.0), cycle_table(0.5), cycle_table(2.0)]
    for table in tables:
        ours = beam_search(ScriptedStepper(table, 1), 1, 1, 12, block_trigrams=True)[0].tolist()
        seq, last = [], 0
        for _ in range(12):  # the public loop: t = 0 .. max_seq_length - 1
            logprobs = torch.tensor(table[last], dtype=torch.float32) + public_penalty(seq, V)
            last = int(torch.max(logprobs, 0).indices)
            seq.append(last)
            if last == 0:
                break
        assert ours == seq


def test_block_trigrams_is_refused_for_beam_search():
    with pytest.raises(ValueError, match="greedy decoding only"):
        beam_search(ScriptedStepper(cycle_table(1.0), 2), 2, 3, 5, block_trigrams=True)
    with pytest.raises(ConfigError, match="evaluate.block_trigrams applies to greedy decoding only"):
        EvaluateConfig(num_beams=3, block_trigrams=True)
    assert EvaluateConfig(num_beams=1, block_trigrams=True).block_trigrams


def test_generation_length_defaults_to_the_tokenizers_max_seq_length():
    cfg = Params.from_dict({"evaluate": {"max_new_tokens": None}}).evaluate
    assert cfg.max_new_tokens is None and cfg.max_tokens(100) == 100 and cfg.max_tokens(60) == 60
    assert Params.from_dict({"evaluate": {"max_new_tokens": 12}}).evaluate.max_tokens(100) == 12
    with pytest.raises(ConfigError, match="evaluate.max_new_tokens must be positive"):
        Params.from_dict({"evaluate": {"max_new_tokens": 0}})
    with pytest.raises(ConfigError, match="must be true or false"):
        Params.from_dict({"evaluate": {"block_trigrams": "yes"}})


def test_the_sample_profile_still_generates_60_tokens():
    """params.yaml leaves max_new_tokens to the tokenizer, whose max_seq_length is 60: the committed results hold."""
    params = Params.from_dict(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert params.evaluate.max_new_tokens is None and params.evaluate.block_trigrams is False
    assert params.evaluate.max_tokens(params.tokenizer.max_seq_length) == 60


def test_generation_produces_at_most_max_new_tokens_eos_included():
    """The public loops run t = 0 .. max_seq_length - 1: at most max_seq_length tokens, the EOS among them."""
    never_ends = {last: [-30.0] + [math.log(0.2)] * (V - 1) for last in range(V)}
    for beams in (1, 3):
        ids = beam_search(ScriptedStepper(never_ends, beams), 1, beams, 9)
        assert ids.shape[1] == 9 and 0 not in ids[0].tolist()  # cut at 9 words, no EOS
    ends_at_3 = {0: [-30.0, -30.0, 0.0, -30, -30, -30], 2: [-30.0, -30.0, -30.0, 0.0, -30, -30],
                 3: [0.0] + [-30.0] * (V - 1)}
    assert beam_search(ScriptedStepper(ends_at_3, 1), 1, 1, 3)[0].tolist() == [2, 3, 0]


def test_greedy_takes_the_highest_log_probability_even_where_running_sums_would_tie():
    """The public greedy is torch.max over the step's log-probabilities; adding a running sum of -40 in
    fp32 rounds -41 and -40.9999990 to one value, which must not decide the word."""
    table = {0: [-60.0, -40.0, -60.0, -60.0, -60.0, -60.0],
             1: [-60.0, -60.0, -1.0, float(torch.tensor(-1.0 + 1e-6)), -60.0, -60.0],
             3: [0.0] + [-60.0] * (V - 1), 2: [0.0] + [-60.0] * (V - 1)}
    sums = torch.tensor(-40.0) + torch.tensor(table[1][2:4])
    assert sums[0] == sums[1]  # the tie the running sum would create
    assert beam_search(ScriptedStepper(table, 1), 1, 1, 4)[0].tolist() == [1, 3, 0]
