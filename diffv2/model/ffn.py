"""The SwiGLU feed-forward network: every dense block's MLP, and the MoE layers' shared experts (diffv2/model/moe.py).

Legend: M d_model, F hidden width; `...` any leading dimensions (B, N for a block, T tokens for a shared expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x_M: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_M)) * self.up_proj(x_M))
