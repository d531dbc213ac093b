"""Explicit attention math for probes: q/k recomputed from a layer's own weights, maps formed head by head.

Nothing here runs inside the training kernel: the probes take the attention input x of a few probe sequences
and recompute q = q_norm(q_proj x) and k = k_norm(k_proj x) with RoPE in fp32, then form logits and softmax
maps explicitly with the causal mask (document masks are not applied). Heads are processed in chunks so that
at most ~2^26 attention entries are alive at once.

Legend: B batch, N sequence (query t, key s), M d_model, Q query heads, H output heads/pairs, D head_dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffv2.model.attention import Attention

MAX_ENTRIES = 1 << 26


def project_qk(attn: Attention, x_BNM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Q, N, D) and, per query head, the key it attends with (B, Q, N, D), as the kernel pairs them."""
    b, n, _ = x_BNM.shape
    d = attn.head_dim
    q_BNQD = F.linear(x_BNM, attn.q_proj.weight.float()).view(b, n, attn.n_q, d)
    k_BNKD = F.linear(x_BNM, attn.k_proj.weight.float()).view(b, n, attn.n_kv, d)
    if attn.q_norm is not None:
        q_BNQD, k_BNKD = attn.q_norm(q_BNQD), attn.k_norm(k_BNKD)
    q_BNQD, k_BNKD = attn.rope(q_BNQD.float()), attn.rope(k_BNKD.float())
    if attn.variant == "diffv1":  # spec §3, A24: [q1 | q2] heads against [k1 | k2] heads, as in diffv1_core
        q_BNQD = torch.cat((q_BNQD[:, :, 0::2], q_BNQD[:, :, 1::2]), dim=2)
        k_BNKD = torch.cat((k_BNKD[:, :, 0::2], k_BNKD[:, :, 1::2]), dim=2)
    # spec §2.4 R2: query head j reads KV head j // (Q / K)
    k_BNQD = k_BNKD.repeat_interleave(attn.n_q // attn.n_kv, dim=2)
    return q_BNQD.transpose(1, 2), k_BNQD.transpose(1, 2)


def pairs(attn: Attention) -> Optional[list[tuple[int, int]]]:
    """(positive, subtracted) query-head index per output head of a differential layer; None for the baseline."""
    if attn.variant == "diffv2":
        h = attn.n_q // 2
        if attn.cfg.pairing == "interleave":  # spec §2.2 step 5: attn1 = 0::2, attn2 = 1::2
            return [(2 * i, 2 * i + 1) for i in range(h)]
        return [(i, i + h) for i in range(h)]  # ablation 1 (half split)
    if attn.variant == "diffv1":  # after project_qk's reordering: first half q1, second half q2
        h = attn.n_q // 2
        return [(i, i + h) for i in range(h)]
    return None


def lambda_scale(attn: Attention, x_BNM: torch.Tensor) -> torch.Tensor:
    """What multiplies the second map: (B, N, H) for DIFF V2 (spec §2.2), a 0-d tensor for DIFF V1 (spec §3)."""
    if attn.variant == "diffv1":
        lq1, lk1, lq2, lk2 = (p.float() for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2))
        return torch.exp(torch.dot(lq1, lk1)) - torch.exp(torch.dot(lq2, lk2)) + attn.lambda_init
    if attn.lambda_proj is None:  # ablation 2: sigma == 1
        return x_BNM.new_ones(x_BNM.shape[0], x_BNM.shape[1], attn.n_q // 2)
    lam_BNH = F.linear(x_BNM, attn.lambda_proj.weight.float())
    return torch.sigmoid(lam_BNH) if attn.cfg.lambda_mode == "sigmoid" else lam_BNH


def head_chunks(q_BQND: torch.Tensor, idx: list[int]) -> Iterator[list[int]]:
    b, _, n, _ = q_BQND.shape
    size = max(1, MAX_ENTRIES // (b * n * n))
    for start in range(0, len(idx), size):
        yield idx[start : start + size]


def logits(q_BQND: torch.Tensor, k_BQND: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """q.k/sqrt(d) for the given query heads, (B, len(heads), N, N); entries above the diagonal are -inf."""
    n, d = q_BQND.shape[2], q_BQND.shape[3]
    s_BCNN = q_BQND[:, heads] @ k_BQND[:, heads].transpose(-1, -2) / math.sqrt(d)
    causal_NN = torch.ones(n, n, dtype=torch.bool, device=s_BCNN.device).tril()
    return s_BCNN.masked_fill(~causal_NN, float("-inf"))


def logit_max_abs(attn: Attention, x_BNM: torch.Tensor) -> torch.Tensor:
    """max over batch and causal (t, s) of |q_t.k_s/sqrt(d)| for every query head: (Q,)."""
    q, k = project_qk(attn, x_BNM)
    out = []
    for heads in head_chunks(q, list(range(q.shape[1]))):
        s_BCNN = logits(q, k, heads)
        out.append(s_BCNN.nan_to_num(neginf=0.0).abs().amax(dim=(0, 2, 3)))
    return torch.cat(out)


def sink_and_entropy(attn: Attention, x_BNM: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mass on the first token and entropy per head, averaged over the batch and query positions t >= 1.

    Baseline: `sink_mass`, `entropy` per query head. Differential layers: per output head, for the positive map
    (`_a1`), the subtracted map (`_a2`) and the differential weights a1 - s * a2 (`sink_mass`; no entropy,
    the weights can be negative), with s = sigmoid(lambda) (DIFF V2) or lambda (DIFF V1).
    """
    q, k = project_qk(attn, x_BNM)
    pair_list = pairs(attn)
    if pair_list is None:
        maps = {"": list(range(q.shape[1]))}
    else:
        maps = {"_a1": [p[0] for p in pair_list], "_a2": [p[1] for p in pair_list]}
    out: dict[str, list] = {}
    probs: dict[str, list] = {}
    for suffix, heads in maps.items():
        for chunk in head_chunks(q, heads):
            p_BCNN = torch.softmax(logits(q, k, chunk), dim=-1)[:, :, 1:]  # t = 0 can only attend to itself
            out.setdefault(f"sink_mass{suffix}", []).append(p_BCNN[..., 0].mean(dim=(0, 2)))
            ent_BCN = -torch.special.xlogy(p_BCNN, p_BCNN).sum(-1)
            out.setdefault(f"entropy{suffix}", []).append(ent_BCN.mean(dim=(0, 2)))
            if pair_list is not None:
                probs.setdefault(suffix, []).append(p_BCNN[..., 0])  # only the first-token column is needed
    result = {key: torch.cat(v) for key, v in out.items()}
    if pair_list is not None:
        first1_BHN, first2_BHN = torch.cat(probs["_a1"], dim=1), torch.cat(probs["_a2"], dim=1)
        scale = lambda_scale(attn, x_BNM)
        scale_BHN = scale.expand(first1_BHN.shape) if scale.ndim == 0 else scale.transpose(1, 2)[:, :, 1:]
        result["sink_mass"] = (first1_BHN - scale_BHN * first2_BHN).mean(dim=(0, 2))
    return result
