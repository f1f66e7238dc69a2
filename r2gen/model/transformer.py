"""Transformer pieces of R2Gen: pre-LN encoder, and a decoder whose LayerNorms are MCLN.

Faithful to the public code (Annotated-Transformer style): LayerNorm is ``g*(x-mean)/(std+eps)+b``
with the unbiased std and eps added to the std; sublayers are ``x + dropout(f(norm(x)))``; attention
uses 4 Linears (q, k, v, out). Differences that do not change the function: attention runs through
``scaled_dot_product_attention`` with boolean masks (no ``-1e9`` literal, which overflows fp16), and
normalisation statistics are computed in fp32 under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm_stats(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) over the last dim, in fp32 (unbiased std, as in R2Gen)."""
    x = x.float()
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    return (x - mean) / (std + eps)


class LayerNorm(nn.Module):
    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(features))
        self.beta = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * layer_norm_stats(x, self.eps) + self.beta


class MultiHeadAttention(nn.Module):
    def __init__(self, num_heads: int, d_model: int, dropout: float = 0.1):
        super().__init__()
        self.h, self.d_k = num_heads, d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.h, self.d_k)).transpose(1, 2)  # (B, T, d) -> (B, h, T, d_k)

    def project_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(key)), self.split_heads(self.v_proj(value))

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Tq, d), projected k/v (B, h, Tk, d_k), boolean mask broadcastable to (B, h, Tq, Tk)."""
        q = self.split_heads(self.q_proj(query))
        q, k, v = q.to(v.dtype), k.to(v.dtype), v  # one dtype for SDPA under autocast
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, Tq, d_k)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(query, *self.project_kv(key, value), mask)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class TokenEmbedding(nn.Module):
    """Embedding * sqrt(d) + sinusoidal positions (dropout is applied by the caller)."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.lut = nn.Embedding(vocab_size, d_model)
        position = torch.arange(max_len).unsqueeze(1).float()
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens (B, T) at positions start..start+T-1 -> (B, T, d)."""
        T = tokens.shape[1]
        return self.lut(tokens) * math.sqrt(self.d_model) + self.pe[start:start + T]


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(num_heads, d_model, dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout)
        self.norms = nn.ModuleList([LayerNorm(d_model), LayerNorm(d_model)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norms[0](x)
        x = x + self.dropout(self.self_attn(h, h, h))
        return x + self.dropout(self.feed_forward(self.norms[1](x)))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, num_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [EncoderLayer(d_model, num_heads, d_ff, dropout) for _ in range(num_layers)]
        )
        self.norm = LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
