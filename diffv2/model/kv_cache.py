"""KV cache for incremental decoding (spec §2.5, T13): one preallocated key and value buffer per layer.

DIFF V2 caches exactly what the baseline caches: h_kv key heads and h_kv value heads of width D, i.e.
2·h_kv·D elements per token per layer (spec §5.4). Its 2h queries, λ and the pair combination belong to the new
token and are never cached. DIFF V1 stores its values as h_kv/2 heads of width 2D: the same bytes.

Batches of prompts are left-padded to one length, so every row writes the same slot at every step. RoPE positions
are per row: slot − the row's pads (pads themselves get 0), as the HF port's position_ids. Rotating a padded row
by slot instead would give the same q·k in exact arithmetic (spec T11), but not in bf16: q and k are rounded after
the rotation, and rounding at other angles puts a padded row's logits ~1e-2 (relative) away from the same row
decoded alone, the size of the whole bf16 error (issue #9). With per-row positions a padded row's q and k are
rounded as the unpadded row's (bit for bit where the inputs are equal); what may differ is the kernels. Pads form
their own segment: real tokens never see them and pad queries see only pads, so every softmax row has a key (a
fully masked row gives NaN, and a zero weight does not cancel a NaN value).

Kernels: a prefill runs the training backend (a padded one a backend that masks documents); a single new token
runs SDPA with enable_gqa and no mask (flash on GPU); masked steps (chunks on a non-empty cache, decoding
left-padded rows) need SDPA's masked path, which with GQA is the math kernel on GPU: correct, but it expands K/V
per query head.

Legend: B batch, N new tokens, L slots attended (cached + new), Q query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffv2.config import ModelConfig
from diffv2.model.kernels import causal_attention, fa4_available, flash_attn_available


class KVCache:
    """Keys (B, max_len, K, D) and values of every layer, filled left to right; `length` slots are in use."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 pads_B: Optional[torch.Tensor] = None, tp: int = 1):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"a {max_len}-token cache exceeds model.max_seq_len={cfg.max_seq_len} (the RoPE table); "
                             f"shorten the prompt or the number of new tokens")
        n_kv, d = cfg.n_kv_heads // tp, cfg.head_dim  # tensor parallelism: this rank's KV heads only
        v_heads, v_width = (n_kv // 2, 2 * d) if cfg.attention.variant == "diffv1" else (n_kv, d)
        self.k_BLKD = [torch.zeros(batch, max_len, n_kv, d, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v_BLKD = [torch.zeros(batch, max_len, v_heads, v_width, dtype=dtype, device=device)
                       for _ in range(cfg.n_layers)]
        self.max_len, self.length = max_len, 0
        self.pads_B = None if pads_B is None else pads_B.to(device)  # left pads per row; None = no padding
        self._positions = None  # (length, n, positions_BN) of the forward in progress

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int,
                  pads_B: Optional[torch.Tensor] = None) -> "KVCache":
        """A cache in the model's parameter dtype on its device, for its rank's heads under tensor parallelism."""
        p = next(model.parameters())
        return cls(model.cfg, batch, max_len, p.dtype, p.device, pads_B, tp=model.blocks[0].attn.tp)

    def positions(self, n: int) -> Optional[torch.Tensor]:
        """RoPE positions (B, n) of the next n tokens of every row: slot − pads, 0 for pads; None without padding
        (positions are the slots then). One tensor per forward, shared by its layers."""
        if self.pads_B is None:
            return None
        if self._positions is None or self._positions[:2] != (self.length, n):
            slot_N = torch.arange(self.length, self.length + n, device=self.pads_B.device)
            self._positions = (self.length, n, (slot_N[None, :] - self.pads_B[:, None]).clamp_min(0))
        return self._positions[2]

    def update(self, layer: int, k_BNKD: torch.Tensor, v_BNKD: torch.Tensor):
        """Write the new tokens' keys and values after the cached ones; return every slot in use, new ones included."""
        start, end = self.length, self.length + k_BNKD.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} slots is full ({start} used, {end - start} more); "
                             f"allocate it with a larger max_len")
        self.k_BLKD[layer][:, start:end] = k_BNKD
        self.v_BLKD[layer][:, start:end] = v_BNKD
        return self.k_BLKD[layer][:, :end], self.v_BLKD[layer][:, :end]

    def advance(self, n: int) -> None:
        """Called once per model forward, after every layer wrote its n new slots."""
        self.length += n

    def attend(self, q_BNQD: torch.Tensor, k_BLKD: torch.Tensor, v_BLKD: torch.Tensor, backend: str) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + mask) v with the causal mask aligned bottom-right (spec §2.5); (B, N, Q, D)."""
        n, L = q_BNQD.shape[1], k_BLKD.shape[1]
        seg_BL = None
        if self.pads_B is not None:
            seg_BL = (torch.arange(L, device=k_BLKD.device)[None, :] >= self.pads_B[:, None]).long()
        if n == L:  # prefill of an empty cache: the training kernel, pads as a document of their own
            if seg_BL is not None and backend in ("cudnn", "sdpa_flash"):  # these cannot mask documents
                backend = "fa4" if fa4_available() else "flash_attn" if flash_attn_available() else "flex"
            return causal_attention(q_BNQD, k_BLKD, v_BLKD, backend, seg_BL)
        q, k, v = (t.transpose(1, 2) for t in (q_BNQD, k_BLKD, v_BLKD))
        if n == 1 and seg_BL is None:  # one new token sees every slot: no mask at all
            out_BQND = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
        else:
            slot_N = torch.arange(L - n, L, device=q.device)
            mask_B1NL = (torch.arange(L, device=q.device)[None, :] <= slot_N[:, None])[None, None]  # B broadcast
            if seg_BL is not None:
                mask_B1NL = mask_B1NL & (seg_BL[:, None, None, :] == seg_BL[:, None, L - n:, None])
            out_BQND = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1NL, enable_gqa=True)
        return out_BQND.transpose(1, 2)
