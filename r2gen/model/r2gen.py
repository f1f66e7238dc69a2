"""R2Gen: visual extractor + memory-driven Transformer (Chen et al., EMNLP 2020).

``model(images, labels)`` returns the teacher-forced log-probabilities and R2Gen's loss;
``model.generate(images, num_beams=3, max_new_tokens=60)`` runs R2Gen's beam search with
incremental decoding (``IncrementalStepper`` below, driven by r2gen.decoding).

Token ids: 0 is BOS, EOS and PAD at once (as in the public code); ``labels`` are
``[0, w1..wn, 0, 0...]`` padded with 0, and the loss covers w1..wn and the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from r2gen.config import ModelConfig
from r2gen.decoding import beam_search
from r2gen.model.memory import ConditionalLayerNorm, RelationalMemory
from r2gen.model.transformer import Encoder, FeedForward, LayerNorm, MultiHeadAttention, TokenEmbedding
from r2gen.model.visual import VisualExtractor, load_pretrained


@dataclass
class R2GenOutput:
    logprobs: torch.Tensor  # (B, T-1, V) log-probabilities of the next token, fp32
    loss: torch.Tensor | None  # masked token-mean NLL (R2Gen's LanguageModelCriterion)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the channels of token features (B, S, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(0, 1)).view_as(x)


class DecoderLayer(nn.Module):
    """Self-attention, source attention and feed-forward, each behind an MCLN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiHeadAttention(cfg.num_heads, d, cfg.dropout)
        self.src_attn = MultiHeadAttention(cfg.num_heads, d, cfg.dropout)
        self.feed_forward = FeedForward(d, cfg.d_ff, cfg.dropout)
        self.norms = nn.ModuleList(
            [ConditionalLayerNorm(d, cfg.rm_num_slots, cfg.rm_d_model) for _ in range(3)]
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, src_kv, tgt_mask, memory):
        """x (B, T, d), src_kv projected source keys/values, tgt_mask (B, 1, T, T), memory (B, T, slots*d)."""
        h = self.norms[0](x, memory)
        x = x + self.dropout(self.self_attn(h, h, h, tgt_mask))
        h = self.norms[1](x, memory)
        x = x + self.dropout(self.src_attn.attend(h, *src_kv))
        return x + self.dropout(self.feed_forward(self.norms[2](x, memory)))

    def step(self, x, memory, cache: "LayerCache"):
        """One new position: x (N, 1, d), memory (N, 1, slots*d); appends this position's keys/values.

        The N rows are A studies x N/A beams, the beams of a study in consecutive rows.
        """
        h = self.norms[0](x, memory)
        k, v = cache.append(*self.self_attn.project_kv(h, h))  # (N, h, 1, d_k) in, (N, h, t+1, d_k) out
        x = x + self.self_attn.attend(h, k, v)
        h = self.norms[1](x, memory)
        # A study's beams share its visual tokens: they query its source keys/values together, as
        # the query positions of one row, so the (A, h, S, d_k) keys are never copied per beam.
        studies = cache.src_k.shape[0]
        x = x + self.src_attn.attend(h.view(studies, -1, h.shape[-1]), cache.src_k, cache.src_v).view_as(x)
        return x + self.feed_forward(self.norms[2](x, memory))


@dataclass
class LayerCache:
    """Keys/values of one decoder layer: its own past positions (per row) and the visual tokens (per study)."""

    src_k: torch.Tensor  # (A, h, S, d_k), one row per study
    src_v: torch.Tensor
    max_len: int = 0
    # Past keys/values, position-major (max_len, N, h, d_k) so that reordering rows copies only the
    # filled positions; attention reads them as a strided (N, h, t, d_k) view.
    past_k: torch.Tensor | None = None
    past_v: torch.Tensor | None = None
    t: int = 0  # positions filled

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this position's k, v (N, h, 1, d_k); returns all keys and values so far (N, h, t, d_k)."""
        if self.past_k is None:
            shape = (self.max_len, *k.shape[:2], k.shape[3])
            self.past_k, self.past_v = k.new_empty(shape), v.new_empty(shape)
        self.past_k[self.t], self.past_v[self.t] = k[:, :, 0], v[:, :, 0]
        self.t += 1
        return self.past_k[: self.t].permute(1, 2, 0, 3), self.past_v[: self.t].permute(1, 2, 0, 3)

    def select(self, rows: torch.Tensor, studies: torch.Tensor | None) -> None:
        """Keep ``rows`` (N',) of the past keys/values and, if not None, ``studies`` (A',) of the source."""
        if studies is not None:
            self.src_k, self.src_v = self.src_k.index_select(0, studies), self.src_v.index_select(0, studies)
        if self.past_k is not None:
            self.past_k, self.past_v = (_select_rows(self.past_k, self.t, rows), _select_rows(self.past_v, self.t, rows))


def _select_rows(past: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
    """A new (max_len, N', h, d_k) buffer whose first ``t`` positions are ``past``'s rows ``rows``."""
    out = past.new_empty((past.shape[0], len(rows), *past.shape[2:]))
    torch.index_select(past[:t], 1, rows, out=out[:t])
    return out


@dataclass
class DecodeCache:
    """Everything carried from one generation step to the next: A studies x ``beams`` rows."""

    memory: torch.Tensor  # relational memory (N, slots, d)
    layers: list[LayerCache]
    t: int = 0  # position of the next input token
    beams: int = 1  # rows per study; a study's rows are consecutive

    def select(self, index: torch.Tensor) -> None:
        """Keep/reorder/duplicate rows: ``index`` (A', beams') gives, for beam j of study a in the new
        cache, its row in the old one. The beams of a study come from that study's old rows (a beam
        search never mixes studies), and the studies keep their order.
        """
        studies = index.shape[0]
        rows = index.reshape(-1)
        dropped = studies != self.layers[0].src_k.shape[0]
        kept = index[:, 0] // self.beams if dropped else None  # (A',) old study of each new study
        self.memory = self.memory.index_select(0, rows)
        for layer in self.layers:
            layer.select(rows, kept)
        self.beams = index.shape[1]


class IncrementalStepper:
    """The search's stepper (r2gen.decoding.Stepper): carries the relational memory, MCLN conditioning
    and self-attention K/V between steps."""

    def __init__(self, model: R2Gen, src: torch.Tensor, max_len: int):
        self.model, self.device = model, src.device
        self.cache = model.init_cache(src, max_len)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(tokens, self.cache)

    def select(self, index: torch.Tensor) -> None:
        self.cache.select(index)


class FullRecomputeStepper:
    """The public code's way: re-run memory and decoder over the whole prefix at every step."""

    def __init__(self, model: R2Gen, src: torch.Tensor):
        self.model, self.src, self.device = model, src, src.device
        self.prefix = src.new_zeros((src.shape[0], 0), dtype=torch.long)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prefix = torch.cat([self.prefix, tokens.unsqueeze(1)], dim=1)
        return self.model.decode_full(self.src, self.prefix, pad_mask=False)[:, -1]

    def select(self, index: torch.Tensor) -> None:
        index = index.reshape(-1)
        self.src, self.prefix = self.src[index], self.prefix[index]


class R2Gen(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        """``vocab_size``: number of output classes, id 0 (BOS/EOS/PAD) included."""
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.visual = VisualExtractor(cfg.visual_extractor, cfg.visual_width, cfg.visual_recompute)
        # R2Gen's att_embed: [BN] Linear ReLU Dropout [BN]. The public code's BatchNorm1d options
        # (use_bn) crash on its (B, tokens, C) input; TokenBatchNorm normalises each channel over
        # all tokens of the batch, which is what they were meant to do.
        self.att_embed = nn.Sequential(
            *([TokenBatchNorm(self.visual.out_channels)] if cfg.use_bn else []),
            nn.Linear(self.visual.out_channels, cfg.d_model), nn.ReLU(), nn.Dropout(cfg.drop_prob_lm),
            *([TokenBatchNorm(cfg.d_model)] if cfg.use_bn == 2 else []),
        )
        self.encoder = Encoder(cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.dropout)
        self.embed = TokenEmbedding(vocab_size, cfg.d_model)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.rm = RelationalMemory(cfg.rm_num_slots, cfg.rm_d_model, cfg.rm_num_heads, cfg.dropout)
        self.decoder_layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.decoder_norm = LayerNorm(cfg.d_model)
        self.logit = nn.Linear(cfg.d_model, vocab_size)
        # R2Gen's make_model: xavier on every matrix of the Transformer (encoder, decoder, embedding,
        # memory); att_embed and the vocabulary head keep PyTorch's default init; MCLN biases stay 0.1.
        for part in (self.encoder, self.embed, self.rm, self.decoder_layers, self.decoder_norm):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if cfg.pretrained:
            load_pretrained(self.visual.trunk, cfg.visual_extractor, cfg.visual_width, cfg.pretrained)

    # ------------------------------------------------------------------ encoding
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 views (B, V, H, W) -> encoder states over the visual tokens (B, V*h*w, d)."""
        patches, _ = self.visual(images)
        return self.encoder(self.att_embed(patches))

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> R2GenOutput:
        """images uint8 (B, V, H, W); labels (B, T) token ids starting with BOS=0, padded with 0."""
        src = self.encode(images)
        logprobs = self.decode_full(src, labels[:, :-1], pad_mask=True)
        return R2GenOutput(logprobs, self.loss(logprobs, labels))

    def decode_full(self, src: torch.Tensor, seq: torch.Tensor, pad_mask: bool) -> torch.Tensor:
        """Decode a whole prefix at once: seq (B, T) -> next-token log-probabilities (B, T, V).

        ``pad_mask`` hides padding keys as in training (R2Gen's ``seq_mask``); R2Gen's sampling path
        uses the causal mask only.
        """
        B, T = seq.shape
        e = self.embed(seq)
        # R2Gen embeds the target twice (memory and decoder), with independent dropout masks.
        memory = self.rm(self.embed_dropout(e), self.rm.init_memory(B, seq.device))  # (B, T, slots*d)
        x = self.embed_dropout(e)
        mask = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()  # (T, T) causal
        if pad_mask:
            keys = seq > 0
            keys[:, 0] = True  # BOS is id 0 too but is always attended
            mask = mask & keys[:, None, None, :]  # (B, 1, T, T)
        for layer in self.decoder_layers:
            x = layer(x, layer.src_attn.project_kv(src, src), mask, memory)
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logit(self.decoder_norm(x)).float(), dim=-1)

    @staticmethod
    def target_mask(labels: torch.Tensor) -> torch.Tensor:
        """(B, T-1) float mask of the real targets of labels[:, 1:]: the words (ids > 0) and one EOS.

        R2Gen's dataset builds this mask from the report length; a truncated report has no EOS.
        """
        target = labels[:, 1:]
        lengths = ((target > 0).sum(1) + 1).clamp(max=target.shape[1])
        positions = torch.arange(target.shape[1], device=labels.device)
        return (positions[None, :] < lengths[:, None]).float()

    @classmethod
    def loss(cls, logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """R2Gen's LanguageModelCriterion: NLL of labels[:, 1:] summed over real targets / their count."""
        mask = cls.target_mask(labels)
        nll = -logprobs.gather(2, labels[:, 1:].unsqueeze(2)).squeeze(2)
        return (nll * mask).sum() / mask.sum()

    # ------------------------------------------------------------------ incremental decoding
    def init_cache(self, src: torch.Tensor, max_len: int) -> DecodeCache:
        layers = [LayerCache(*layer.src_attn.project_kv(src, src), max_len=max_len) for layer in self.decoder_layers]
        return DecodeCache(memory=self.rm.init_memory(src.shape[0], src.device), layers=layers)

    def decode_step(self, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Feed one token per row at position ``cache.t``: tokens (N,) -> log-probabilities (N, V).

        N is the cache's studies x beams, the beams of a study in consecutive rows.
        """
        e = self.embed(tokens.unsqueeze(1), start=cache.t)  # (N, 1, d)
        cache.memory = self.rm.step(e[:, 0], cache.memory)
        memory = cache.memory.flatten(1).unsqueeze(1)  # (N, 1, slots*d)
        x = e
        for layer, layer_cache in zip(self.decoder_layers, cache.layers):
            x = layer.step(x, memory, layer_cache)
        cache.t += 1
        return self.head(x)[:, 0]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, num_beams: int = 3, max_new_tokens: int = 60,
                 block_trigrams: bool = False) -> torch.Tensor:
        """Reports for a batch of studies: uint8 (B, V, H, W) -> token ids (B, L), 0-padded, EOS kept.

        At most ``max_new_tokens`` tokens, the EOS included (the public code's ``max_seq_length``).
        ``num_beams=1`` is deterministic greedy decoding; ``block_trigrams`` (greedy only) adds the
        public greedy's trigram penalty (r2gen.decoding.trigram_penalty). R2Gen's beam semantics: no
        length penalty, finished beams kept with a -1000 penalty on their running score, best by
        summed log-probability.
        """
        was_training = self.training
        self.eval()
        try:
            stepper = IncrementalStepper(self, self.encode(images), max_new_tokens)
            return beam_search(stepper, images.shape[0], num_beams, max_new_tokens, block_trigrams=block_trigrams)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ precision policy hooks
    def fp8_candidates(self) -> list[tuple[str, nn.Linear]]:
        """Linears of the encoder/decoder attention and feed-forward blocks (FP8-eligible by role).

        The relational memory, the MCLN MLPs, the visual projection and the vocabulary head are
        deliberately absent: they stay in bf16 under fp8 (DESIGN.md §4).
        """
        out = []
        for prefix, layers in (("encoder.layers", self.encoder.layers), ("decoder_layers", self.decoder_layers)):
            for i, layer in enumerate(layers):
                for name, module in layer.named_modules():
                    if isinstance(module, nn.Linear) and (
                        name.startswith(("self_attn.", "src_attn.", "feed_forward."))
                    ):
                        out.append((f"{prefix}.{i}.{name}", module))
        return out
