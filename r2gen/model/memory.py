"""Relational Memory (RM) and Memory-driven Conditional Layer Normalization (MCLN).

RM keeps ``num_slots`` memory rows that are updated once per report token:
``M' = M + MHA(q=M, k=v=[M; y_t])``, ``M' = M' + MLP(M')``, gates ``W y_t + U tanh(M)`` split into
input/forget, ``M_t = i * tanh(M') + f * M``. Its output at step t (the memory after reading token
t, flattened to ``slots*d``) conditions every decoder LayerNorm at position t through MCLN:
``gamma_hat = gamma + MLP_gamma(M_t)``, ``beta_hat = beta + MLP_beta(M_t)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from r2gen.model.transformer import MultiHeadAttention, layer_norm_stats


class RelationalMemory(nn.Module):
    def __init__(self, num_slots: int, d_model: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.num_slots, self.d_model = num_slots, d_model
        self.attn = MultiHeadAttention(num_heads, d_model, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU()
        )
        self.W = nn.Linear(d_model, 2 * d_model)  # from the input token
        self.U = nn.Linear(d_model, 2 * d_model)  # from the previous memory

    def init_memory(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """M0: the identity in the first ``num_slots`` columns, zeros elsewhere: (B, slots, d)."""
        eye = torch.eye(self.num_slots, self.d_model, device=device)
        return eye.unsqueeze(0).expand(batch_size, -1, -1).contiguous()

    def step(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """One update: token embedding ``y`` (B, d), memory (B, slots, d) -> next memory (B, slots, d)."""
        return self._step(memory, *self._token_side(y), self._memory_qkv_weights())

    def forward(self, ys: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Run along the sequence: ``ys`` (B, T, d) -> memory after each token, flattened (B, T, slots*d)."""
        wy, ky, vy = self._token_side(ys)  # everything that depends on the tokens only: one GEMM each for all T
        qkv_weights = self._memory_qkv_weights()
        outputs = []
        for t in range(ys.shape[1]):
            memory = self._step(memory, wy[:, t], ky[:, t], vy[:, t], qkv_weights)
            outputs.append(memory.flatten(1))
        return torch.stack(outputs, dim=1)

    def _token_side(self, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W y, and the attention's key/value projections of the token (it is the last key/value row)."""
        return self.W(ys), self.attn.k_proj(ys), self.attn.v_proj(ys)

    def _memory_qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k and v of the memory rows in one GEMM: the same function as three Linears, fewer calls.
        a = self.attn
        return (torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))

    def _step(self, memory, wy, ky, vy, qkv_weights):
        """memory (B, slots, d); wy (B, 2d), ky/vy (B, d): this token's projections."""
        a = self.attn
        q, k, v = F.linear(memory, *qkv_weights).chunk(3, dim=-1)  # (B, slots, d) each
        k = torch.cat([k, ky.unsqueeze(1).to(k.dtype)], dim=1)  # keys/values: [M; y_t], (B, slots+1, d)
        v = torch.cat([v, vy.unsqueeze(1).to(v.dtype)], dim=1)
        att = F.scaled_dot_product_attention(
            a.split_heads(q), a.split_heads(k), a.split_heads(v), dropout_p=a.dropout if self.training else 0.0
        )  # (B, h, slots, d_k)
        nxt = memory + a.out_proj(att.transpose(1, 2).flatten(2))
        nxt = nxt + self.mlp(nxt)
        gates = wy.unsqueeze(1) + self.U(torch.tanh(memory))  # (B, slots, 2d)
        input_gate, forget_gate = torch.sigmoid(gates).chunk(2, dim=-1)
        return input_gate * torch.tanh(nxt) + forget_gate * memory


class ConditionalLayerNorm(nn.Module):
    """LayerNorm whose gain and bias are shifted by MLPs of the relational memory (MCLN)."""

    def __init__(self, d_model: int, rm_num_slots: int, rm_d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(d_model))
        self.beta = nn.Parameter(torch.zeros(d_model))
        self.mlp_gamma = nn.Sequential(
            nn.Linear(rm_num_slots * rm_d_model, d_model), nn.ReLU(inplace=True), nn.Linear(rm_d_model, rm_d_model)
        )
        self.mlp_beta = nn.Sequential(
            nn.Linear(rm_num_slots * rm_d_model, d_model), nn.ReLU(inplace=True), nn.Linear(d_model, d_model)
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.1)

    def conditioning(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma_hat, beta_hat for memory states (..., slots*d) -> (..., d) each."""
        return self.gamma + self.mlp_gamma(memory), self.beta + self.mlp_beta(memory)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        gamma_hat, beta_hat = self.conditioning(memory)
        return gamma_hat * layer_norm_stats(x, self.eps) + beta_hat
