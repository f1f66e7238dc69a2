"""Batched beam search with R2Gen's exact semantics, over any :class:`Stepper` (incremental or full recompute).

R2Gen's search (ruotianluo's ``beam_search`` with group_size 1, R2GEN_NOTES.md §7):
- step 0 feeds BOS (id 0) for each study; every step adds the new log-probabilities to the running
  sums, sorts the flattened beam x vocabulary candidates (``torch.sort``, descending) and keeps the top
  ``num_beams``;
- a beam whose new token is EOS (id 0), or any beam at the last step, is copied to the study's
  finished list with its running sum as score, and its running sum is lowered by 1000 (it stays in
  the beam and keeps being extended);
- the result is the finished beam with the highest score (no length penalty); on ties the earliest
  finished wins (Python's stable sort in the original).

Early exit (ours): log-probabilities are <= 0 and IEEE addition is monotonic, so no extension of a
beam can score above its running sum. Once a study's best finished score is >= every running sum
of its beams, no later finished beam can replace it, so the study is done and its rows are dropped.
This cannot change the result; the full-recompute reference runs every step without it.

``num_beams=1`` is deterministic greedy decoding, the word of highest log-probability at each step
as the public greedy picks it (``torch.max``); the public code with beam size 1 samples at random
unless ``--sample_method greedy``. ``block_trigrams=True`` (greedy only, as in the public code,
whose beam search ignores the option) applies the public greedy's trigram penalty, see
:func:`trigram_penalty`.
"""

from __future__ import annotations

from typing import Protocol

import torch

EOS = 0
FINISHED_PENALTY = 1000.0
# The public greedy's trigram penalty, per earlier occurrence: ln(1/2) * alpha, with its constants
# (R2Gen's att_model._sample, from lukemelas/image-paragraph-captioning).
TRIGRAM_LN_HALF = -0.693
TRIGRAM_ALPHA = 2.0


class Stepper(Protocol):
    """What the search needs from a model: rows of partial sequences it can extend and reorder.

    The model provides it (``r2gen.model.r2gen.IncrementalStepper``, and ``FullRecomputeStepper``, the
    public code's way, as the reference); this module never imports the model.
    """

    device: torch.device  # where the search puts its token tensors

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: tokens (N,) -> next-token log-probabilities (N, V)."""
        ...

    def select(self, index: torch.Tensor) -> None:
        """Keep/reorder/duplicate rows: ``index`` (A, k) gives, for each new row, its old row."""
        ...


def trigram_penalty(seqs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The public greedy's trigram blocking for the next token: (N, t) generated tokens -> (N, V) fp32.

    Each row's trigrams so far (``seqs[u-2], seqs[u-1], seqs[u]``, BOS not included) that start with
    its last two tokens penalise their third token by ``-0.693 * 2.0`` per occurrence, evaluated as
    the public ``logprobs + mask * -0.693 * alpha`` does (the count times -0.693 in fp32, times 2).
    Zero before the fourth token (t < 3), as in the public code.
    """
    N, t = seqs.shape
    counts = torch.zeros(N, vocab_size, device=seqs.device)
    if t >= 3:
        last_two = seqs[:, t - 2 :]  # (N, 2)
        seen = (seqs[:, : t - 2] == last_two[:, :1]) & (seqs[:, 1 : t - 1] == last_two[:, 1:])  # (N, t-2)
        counts.scatter_add_(1, seqs[:, 2:], seen.float())
    return counts * TRIGRAM_LN_HALF * TRIGRAM_ALPHA


@torch.no_grad()
def beam_search(stepper: Stepper, batch_size: int, num_beams: int, max_len: int, early_exit: bool = True,
                block_trigrams: bool = False) -> torch.Tensor:
    """Best sequence per study (B, L) including its EOS, 0-padded. ``num_beams=1`` is greedy.

    ``stepper.step(tokens (N,)) -> logprobs (N, V)`` advances every row by one token;
    ``stepper.select(index (A, k))`` keeps/reorders/duplicates rows: the k new rows of study a (in
    consecutive rows, studies in their order) are the old rows ``index[a]``, all from study a's rows.
    ``block_trigrams`` (greedy only) adds :func:`trigram_penalty` to each step's log-probabilities.

    Raises:
        ValueError: ``block_trigrams`` with ``num_beams > 1`` (the public beam search has no blocking).
    """
    if block_trigrams and num_beams != 1:
        raise ValueError(f"block_trigrams applies to greedy decoding only (num_beams=1), got num_beams={num_beams}; "
                         "the public code's beam search does not block trigrams either")
    k, device = num_beams, stepper.device
    active = torch.arange(batch_size)  # studies still searching, in row-block order
    best_score = [float("-inf")] * batch_size
    best_seq: list[torch.Tensor | None] = [None] * batch_size

    logprobs = stepper.step(torch.zeros(batch_size, dtype=torch.long, device=device))
    sums = torch.zeros(batch_size, 1, device=device)  # (A, beams so far)
    seqs = torch.zeros(batch_size, 1, 0, dtype=torch.long, device=device)
    for t in range(max_len):
        A, V = len(active), logprobs.shape[-1]
        lp = logprobs.float().view(A, -1, V)  # (A, kk, V); kk = 1 at t = 0
        if block_trigrams:  # k = 1: one row per study
            lp = lp + trigram_penalty(seqs[:, 0], V).unsqueeze(1)
        kk = lp.shape[1]
        if k == 1:
            # Greedy: the public code's torch.max over this step's log-probabilities (the first of equal
            # maxima), not over running sums, whose fp32 rounding can tie two close candidates.
            best, ix = lp[:, 0].max(-1, keepdim=True)  # (A, 1)
            scores = sums[:, :1] + best
        else:
            candidates = sums[:, :kk].unsqueeze(-1) + lp
            scores, ix = torch.sort(candidates.reshape(A, -1), -1, True)
            scores, ix = scores[:, :k], ix[:, :k]  # (A, k)
        beam_ix, words = ix // V, ix % V
        seqs = torch.cat([seqs.gather(1, beam_ix.unsqueeze(-1).expand(-1, -1, seqs.shape[2])),
                          words.unsqueeze(-1)], dim=-1)  # (A, k, t+1)
        sums = scores.clone()
        rows = beam_ix + torch.arange(A, device=device).unsqueeze(1) * kk  # (A, k) rows of the parents

        ended = words == EOS
        if t == max_len - 1:
            ended[:] = True
        for a, b in enumerate(active.tolist()):
            for j in torch.nonzero(ended[a]).flatten().tolist():
                if sums[a, j].item() > best_score[b]:  # strict: the earliest of equal scores wins
                    best_score[b], best_seq[b] = sums[a, j].item(), seqs[a, j].clone()
        sums[ended] -= FINISHED_PENALTY
        if t == max_len - 1:
            break

        keep = torch.ones(A, dtype=torch.bool)
        if early_exit:
            best = torch.tensor([best_score[b] for b in active.tolist()], device=device)
            keep = (sums.max(dim=1).values > best).cpu()
            if not keep.any():
                break
        if not keep.all():
            kept = torch.nonzero(keep).flatten()
            active, sums, seqs, words = active[kept], sums[kept], seqs[kept], words[kept]
            rows = rows[kept.to(device)]
        stepper.select(rows)
        logprobs = stepper.step(words.reshape(-1))

    length = max(len(s) for s in best_seq)
    out = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    for b, s in enumerate(best_seq):
        out[b, : len(s)] = s
    return out

