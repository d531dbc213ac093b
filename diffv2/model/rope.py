"""Rotary position embedding, interleaved (GPT-J, the DIFF V2 reference) or half-split (NeoX).

Legend: B batch, N sequence, H heads, D head_dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables for positions [0, max_seq_len) and rotates q/k of shape (B, N, H, D)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, style: str):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"model.head_dim={head_dim} must be even for RoPE")
        self.style, self.max_seq_len, self.head_dim, self.theta = style, max_seq_len, head_dim, theta
        # fp32 tables, not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos_NF", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin_NF", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the tables in place (also after a meta-device build is materialised)."""
        if self.cos_NF.is_meta:
            return
        inv_freq_F = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angle_NF = torch.arange(self.max_seq_len, dtype=torch.float64)[:, None] * inv_freq_F[None, :]
        with torch.no_grad():
            self.cos_NF.copy_(angle_NF.cos())
            self.sin_NF.copy_(angle_NF.sin())

    def forward(self, x_BNHD: torch.Tensor, offset: int = 0,
                positions_BN: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate token j of every row by position offset + j, or by positions_BN[b, j] when given (per-row
        positions of a left-padded batch, each < offset + n)."""
        n = x_BNHD.shape[1]
        if offset + n > self.max_seq_len:
            raise ValueError(
                f"sequence position {offset + n} exceeds model.max_seq_len={self.max_seq_len}; raise model.max_seq_len"
            )
        if positions_BN is None:
            cos = self.cos_NF[offset : offset + n, None, :]
            sin = self.sin_NF[offset : offset + n, None, :]
        else:
            cos, sin = self.cos_NF[positions_BN][:, :, None, :], self.sin_NF[positions_BN][:, :, None, :]
        x = x_BNHD.to(torch.promote_types(x_BNHD.dtype, torch.float32))  # rotate in >= fp32, cast back once
        if self.style == "interleaved":  # pairs (x[2m], x[2m+1]), spec §2.2 step 2
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        else:  # NeoX: pairs (x[m], x[m + D/2])
            x0, x1 = x.chunk(2, dim=-1)
            out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.type_as(x_BNHD)
