"""DIFF V2, the standard GQA baseline and DIFF V1 attention from one module (spec §2, §3, §4).

Legend: B batch, N sequence (new tokens when decoding), L keys (N, or every cached slot when decoding), M d_model,
H output heads (h), Q query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffv2.config import AttentionConfig, ModelConfig
from diffv2.model.heads import output_heads, query_heads, validate_heads
from diffv2.model.kernels import causal_attention
from diffv2.model.recompute import recomputing
from diffv2.model.rope import RotaryEmbedding

if TYPE_CHECKING:
    from diffv2.model.kv_cache import KVCache

log = logging.getLogger(__name__)

# An observer receives (layer_idx, stats dict) from the same forward; None costs nothing (monitoring hook).
Observer = Callable[[int, dict], None]


def lambda_init(depth: int) -> float:
    """DIFF V1 lambda_init schedule, depth = 0-based layer index (spec §3)."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (x.shape[-1],), eps=self.eps).type_as(x)
        return y * self.weight if self.weight is not None else y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: str = "math"):
        super().__init__()
        validate_heads(cfg)
        a: AttentionConfig = cfg.attention
        self.cfg, self.layer_idx, self.backend = a, layer_idx, backend
        self.variant, self.head_dim = a.variant, cfg.head_dim
        # Head counts of this module; under tensor parallelism (degree tp) they count this rank's heads.
        self.n_q, self.n_out, self.n_kv, self.tp = query_heads(cfg), output_heads(cfg), cfg.n_kv_heads, 1
        d, m = cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(m, self.n_q * d, bias=False)
        self.k_proj = nn.Linear(m, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(m, self.n_kv * d, bias=False)  # V1: n_kv/2 heads of 2d, same size
        self.o_proj = nn.Linear(self.n_out * d, m, bias=False)
        self.lambda_proj = None
        if self.variant == "diffv2" and a.lambda_mode != "none":  # ablation 2 has no lambda at all
            self.lambda_proj = nn.Linear(m, cfg.n_heads, bias=False)  # one lambda per token per output head
        if self.variant == "diffv1":
            self.lambda_init = lambda_init(layer_idx)
            self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
                nn.Parameter(torch.zeros(d)) for _ in range(4)
            )
            self.subln = RMSNorm(2 * d, eps=1e-5)  # one affine shared by all heads (spec §3)
        self.q_norm = RMSNorm(d, cfg.norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.norm_eps) if a.qk_norm else None
        self.rope = RotaryEmbedding(d, cfg.max_seq_len, a.rope_theta, a.rope_style)
        self.observer: Optional[Observer] = None
        self.defer_stats = False  # `_emit`: keep the statistics for the caller (attention compiled as its own region)
        self.deferred: Optional[dict] = None
        # How a DIFF V2 pair is combined: `combine` below; GPU inference installs its one-kernel version from outside
        # (diffv2/infer/fused_combine.py).
        self.combine_fn: Callable = combine

    def forward(self, x_BNM: torch.Tensor, doc_ids_BN: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, observe: Optional[bool] = None) -> torch.Tensor:
        """Causal self-attention over x; with a cache, x holds the new tokens and attends to every cached slot too.

        `observe`: compute the observer's statistics in this forward (None: whenever an observer is installed).
        Compiled callers pass it explicitly, so the graph never depends on a guard on the `observer` attribute: on
        torch 2.11 (GPU), a compiled block that read the attribute ran its observed graph after the slot had been
        emptied."""
        b, n, _ = x_BNM.shape
        # Head counts come from the projections: under tensor parallelism they hold this rank's heads only.
        q_BNQD = self.q_proj(x_BNM).view(b, n, -1, self.head_dim)
        k_BNKD = self.k_proj(x_BNM).view(b, n, -1, self.head_dim)
        v_width = 2 * self.head_dim if self.variant == "diffv1" else self.head_dim  # V1: n_kv/2 heads of 2D (§3)
        v_BNKD = self.v_proj(x_BNM).view(b, n, -1, v_width)
        if self.q_norm is not None:  # before RoPE, as Qwen3
            q_BNQD, k_BNKD = self.q_norm(q_BNQD), self.k_norm(k_BNKD)
        offset, positions_BN = (0, None) if cache is None else (cache.length, cache.positions(n))
        q_BNQD, k_BNKD = self.rope(q_BNQD, offset, positions_BN), self.rope(k_BNKD, offset, positions_BN)
        # spec §2.5: the cache holds k and v only; queries, lambda and the combination are per new token.
        k_BLKD, v_BLKD = (k_BNKD, v_BNKD) if cache is None else cache.update(self.layer_idx, k_BNKD, v_BNKD)
        decoding = {} if cache is None else {"cache": cache}  # training calls the cores as always (hooks wrap them)
        if observe is not None:
            decoding["observe"] = observe
        if self.variant == "diffv1":
            ctx_BNHD = self.diffv1_core(q_BNQD, k_BLKD, v_BLKD, doc_ids_BN, **decoding)
        else:
            lam_BNH = self.lambda_proj(x_BNM) if self.lambda_proj is not None else None  # spec A6: input of q/k/v
            ctx_BNHD = self.core(q_BNQD, k_BLKD, v_BLKD, lam_BNH, doc_ids_BN, **decoding)
        return self.o_proj(ctx_BNHD.reshape(b, n, -1))

    def core(self, q_BNQD, k_BLKD, v_BLKD, lam_BNH=None, doc_ids_BN=None, *, cache=None,
             observe: Optional[bool] = None) -> torch.Tensor:
        """Attention kernel, then (DIFF V2) the per-pair differential combination; returns (B, N, H, D)."""
        observe = self.observer is not None if observe is None else observe
        attn_BNQD = self._attend(q_BNQD, k_BLKD, v_BLKD, doc_ids_BN, cache)
        if self.variant != "diffv2":
            if observe:
                self._emit(dict(context=attn_BNQD))
            return attn_BNQD
        if self.cfg.pairing == "interleave":  # spec §2.4: heads 2i, 2i+1 share a GQA group
            attn1_BNHD, attn2_BNHD = attn_BNQD[:, :, 0::2], attn_BNQD[:, :, 1::2]
        else:  # ablation 1 (spec R3): pairs across groups
            attn1_BNHD, attn2_BNHD = attn_BNQD.chunk(2, dim=2)
        ctx_BNHD, scale_BNH = self.combine_fn(attn1_BNHD, attn2_BNHD, lam_BNH, self.cfg.lambda_mode,
                                              self.cfg.combine_fp32)
        if observe:
            self._emit(dict(context=ctx_BNHD, attn1=attn1_BNHD, attn2=attn2_BNHD, lambda_scale=scale_BNH))
        return ctx_BNHD

    def diffv1_core(self, q_BNQD, k_BLKD, v_BLKE, doc_ids_BN=None, *, cache=None,
                    observe: Optional[bool] = None) -> torch.Tensor:
        """DIFF V1, flash-version semantics (spec §3, A24): q1/k1 = even heads, q2/k2 = odd heads, V of width 2D."""
        observe = self.observer is not None if observe is None else observe
        d = self.head_dim
        q12 = torch.cat((q_BNQD[:, :, 0::2], q_BNQD[:, :, 1::2]), dim=2)  # [q1 heads | q2 heads]
        k12 = torch.cat((k_BLKD[:, :, 0::2], k_BLKD[:, :, 1::2]), dim=2)  # [k1 heads | k2 heads]
        # Two calls over the V halves (flashdiff_2): the kernel needs equal qk and v widths.
        halves = [self._attend(q12, k12, torch.cat((vh, vh), dim=2), doc_ids_BN, cache)
                  for vh in (v_BLKE[..., :d], v_BLKE[..., d:])]
        attn_BNQE = torch.cat(halves, dim=-1)
        attn1_BNHE, attn2_BNHE = attn_BNQE.chunk(2, dim=2)
        lq1, lk1, lq2, lk2 = self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2
        lam = (
            torch.exp(torch.dot(lq1.float(), lk1.float())) - torch.exp(torch.dot(lq2.float(), lk2.float()))
            + self.lambda_init
        ).to(q_BNQD.dtype)
        ctx = self.subln(attn1_BNHE - lam * attn2_BNHE) * (1 - self.lambda_init)
        b, n, hh, _ = ctx.shape
        ctx_BNHD = ctx.reshape(b, n, 2 * hh, d)
        if observe:
            self._emit(dict(context=ctx_BNHD, lambda_full=lam))
        return ctx_BNHD

    def _attend(self, q_BNQD, k_BLKD, v_BLKD, doc_ids_BN, cache) -> torch.Tensor:
        if cache is None:
            return causal_attention(q_BNQD, k_BLKD, v_BLKD, self.backend, doc_ids_BN)
        return cache.attend(q_BNQD, k_BLKD, v_BLKD, self.backend)  # bottom-right causal over the cached slots

    def _emit(self, stats: dict) -> None:
        """Hand the statistics to the observer. With `defer_stats` (set when the attention is compiled as a region
        of its own, diffv2/parallel/compile.py) they are kept in `deferred` instead, which a compiled graph does as
        a side effect, without a break, and the caller outside the graph delivers them (`deliver_deferred`)."""
        if self.defer_stats:
            self.deferred = stats
        else:
            self._deliver(stats)

    def deliver_deferred(self) -> None:
        """Deliver (and drop) what `_emit` deferred."""
        stats, self.deferred = self.deferred, None
        if stats is not None:
            self._deliver(stats)

    @torch.compiler.disable
    def _deliver(self, stats: dict) -> None:
        """Call the observer, outside any compiled graph: a compiled block breaks its graph here (its statistics
        tensors become outputs) instead of tracing the observer, which would specialise the graph on this layer's
        index and recompile once per layer. The same graphs serve a checkpointed block's recomputation, which the
        observer has seen already. The slot is read here, outside the graph: emptied since the caller decided to
        observe, the statistics are dropped."""
        if self.observer is not None and not recomputing():
            self.observer(self.layer_idx, stats)


def combine(attn1_BNHD, attn2_BNHD, lam_BNH, lambda_mode: str, fp32: bool):
    """attn1 - s * attn2 with s = sigmoid(lambda) (spec §2.2 step 5); nothing after the subtraction (T10)."""
    out_dtype = attn1_BNHD.dtype
    if lambda_mode == "none":  # ablation 2: plain attn1 - attn2
        return attn1_BNHD - attn2_BNHD, None
    compute_dtype = torch.float32 if fp32 else out_dtype  # spec A5: bf16 sigmoid has 2^-8 steps near 1
    lam_BNH = lam_BNH.to(compute_dtype)
    scale_BNH = torch.sigmoid(lam_BNH) if lambda_mode == "sigmoid" else lam_BNH  # "raw" = ablation 3
    diff_BNHD = attn1_BNHD.to(compute_dtype) - scale_BNH.unsqueeze(-1) * attn2_BNHD.to(compute_dtype)
    return diff_BNHD.to(out_dtype), scale_BNH
