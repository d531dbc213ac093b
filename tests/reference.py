"""Independent eager reference for the attention variants of the DIFF V2 spec (docs/spec.md).

Nothing here imports `diffv2`: every formula is re-derived from the spec text, written out literally and
evaluated in whatever dtype the inputs carry (the tests use fp64, or fp32 for the GPU suite), so that a
mistake in the library cannot be copied into the reference.

- RoPE: spec T11, theta_m = t * base^(-2m / rotary_dim), interleaved pairs (2m, 2m+1) or half pairs (m, m + d/2).
- Attention: explicit q k^T / sqrt(d), explicit causal (and optional same-document) mask, explicit softmax.
- DIFF V2 (spec §2.3): c_{t,i} = sum_s (softmax(q_{2i} k/sqrt d) - s(lambda_{t,i}) softmax(q_{2i+1} k/sqrt d)) v,
  KV head kappa(i) = i // (h / h_kv), s = sigmoid (spec), 1 (ablation 2, "none") or identity (ablation 3, "raw").
  Ablation 1 (half_split): pairs (i, h + i) of a 2h-head GQA kernel, query head j reading KV head j // (2h / h_kv).
- Baseline (spec §4): n_q heads, query head j reads KV head j // (n_q / h_kv).
- DIFF V1 (spec §3, flash semantics per A24): q1/q2 = query heads 0::2 / 1::2, k1/k2 = KV heads 0::2 / 1::2,
  V of width 2d per KV head, one scalar lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init, per-head RMSNorm over
  2d with one shared affine weight (eps 1e-5), times (1 - lambda_init).

Legend in names: B batch, N sequence, H heads, D head_dim.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch


# ----------------------------------------------------------------------------------------------------- basics
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    y = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x W^T for a PyTorch-layout (out, in) weight."""
    return torch.einsum("...i,oi->...o", x, w)


def rope(x_BNHD: torch.Tensor, theta: float, style: str, offset: int = 0) -> torch.Tensor:
    """Spec T11, written pair by pair: o[a] = x[a] cos - x[b] sin, o[b] = x[a] sin + x[b] cos.

    interleaved: (a, b) = (2m, 2m+1); half (NeoX): (a, b) = (m, m + d/2). Angle = t * theta^(-2m/d), t = offset + n.
    """
    n, d = x_BNHD.shape[1], x_BNHD.shape[-1]
    half = d // 2
    m = torch.arange(half, dtype=torch.float64, device=x_BNHD.device)
    pos = torch.arange(offset, offset + n, dtype=torch.float64, device=x_BNHD.device)
    angle_NM = pos[:, None] * theta ** (-2.0 * m[None, :] / d)  # theta_m = t * base^(-2m/d)
    c = torch.cos(angle_NM).to(x_BNHD.dtype)[None, :, None, :]
    s = torch.sin(angle_NM).to(x_BNHD.dtype)[None, :, None, :]
    if style == "interleaved":
        a_idx, b_idx = 2 * torch.arange(half), 2 * torch.arange(half) + 1  # pairs (2m, 2m+1)
    elif style == "half":
        a_idx, b_idx = torch.arange(half), torch.arange(half) + half  # pairs (m, m + d/2)
    else:
        raise ValueError(style)
    a_idx, b_idx = a_idx.to(x_BNHD.device), b_idx.to(x_BNHD.device)
    xa, xb = x_BNHD.index_select(-1, a_idx), x_BNHD.index_select(-1, b_idx)
    out = torch.zeros_like(x_BNHD)
    out = out.index_add(-1, a_idx, xa * c - xb * s)
    return out.index_add(-1, b_idx, xa * s + xb * c)

def allowed_mask(n: int, doc_ids_BN: Optional[torch.Tensor], device) -> torch.Tensor:
    """allowed[b, t, s] = (s <= t) and (doc[b, s] == doc[b, t]); shape (B or 1, N, N)."""
    t = torch.arange(n, device=device)
    allowed = (t[None, :] <= t[:, None])[None]
    if doc_ids_BN is not None:
        allowed = allowed & (doc_ids_BN[:, :, None] == doc_ids_BN[:, None, :])
    return allowed


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """exp(s - max) / sum exp(s - max) over the last axis; masked entries are -inf and get weight 0."""
    m = scores.max(dim=-1, keepdim=True).values.detach()
    e = torch.exp(scores - m)
    return e / e.sum(dim=-1, keepdim=True)


def attention_map(q_BND: torch.Tensor, k_BND: torch.Tensor, doc_ids_BN=None) -> torch.Tensor:
    """softmax_s(q_t . k_s / sqrt(d)) under the causal (+document) mask; (B, N, N)."""
    d = q_BND.shape[-1]
    scores = torch.einsum("btd,bsd->bts", q_BND, k_BND) / math.sqrt(d)
    scores = scores.masked_fill(~allowed_mask(q_BND.shape[1], doc_ids_BN, q_BND.device), float("-inf"))
    return softmax_rows(scores)


def apply_map(p_BNN: torch.Tensor, v_BND: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bts,bsd->btd", p_BNN, v_BND)


def lambda_scale(lam: torch.Tensor, lambda_mode: str) -> torch.Tensor:
    if lambda_mode == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-lam))
    if lambda_mode == "raw":
        return lam
    raise ValueError(lambda_mode)


# ---------------------------------------------------------------------------------------------- attention cores
def diffv2_core(q_BNQD, k_BNKD, v_BNKD, lam_BNH=None, lambda_mode="sigmoid", pairing="interleave",
                doc_ids_BN=None, return_maps=False):
    """Spec §2.3 pair by pair; returns (B, N, h, d) (and per-pair maps (B, h, N, N) when return_maps)."""
    h, h_kv = q_BNQD.shape[2] // 2, k_BNKD.shape[2]
    g = 2 * h // h_kv  # query heads per GQA group of the 2h-head kernel (ablation 1 only)
    ctx, maps1, maps2, scales = [], [], [], []
    for i in range(h):
        if pairing == "interleave":
            j1, j2 = 2 * i, 2 * i + 1
            kv1 = kv2 = i // (h // h_kv)  # kappa(i), spec §2.3
        elif pairing == "half_split":
            j1, j2 = i, h + i
            kv1, kv2 = j1 // g, j2 // g
        else:
            raise ValueError(pairing)
        p1 = attention_map(q_BNQD[:, :, j1], k_BNKD[:, :, kv1], doc_ids_BN)
        p2 = attention_map(q_BNQD[:, :, j2], k_BNKD[:, :, kv2], doc_ids_BN)
        if lambda_mode == "none":
            s = torch.ones_like(p1[..., :1])
        else:
            s = lambda_scale(lam_BNH[:, :, i], lambda_mode)[..., None]  # one scalar per (token, head)
        if kv1 == kv2:
            c = apply_map(p1 - s * p2, v_BNKD[:, :, kv1])  # the literal differential map times shared V
        else:
            c = apply_map(p1, v_BNKD[:, :, kv1]) - s * apply_map(p2, v_BNKD[:, :, kv2])
        ctx.append(c)
        maps1.append(p1)
        maps2.append(p2)
        scales.append(s[..., 0])
    out = torch.stack(ctx, dim=2)
    if return_maps:
        return out, torch.stack(maps1, 1), torch.stack(maps2, 1), torch.stack(scales, 2)
    return out


def gqa_core(q_BNQD, k_BNKD, v_BNKD, doc_ids_BN=None):
    """Plain causal GQA attention, query head j reading KV head j // (n_q / n_kv); (B, N, n_q, d)."""
    n_q, n_kv = q_BNQD.shape[2], k_BNKD.shape[2]
    g = n_q // n_kv
    outs = [apply_map(attention_map(q_BNQD[:, :, j], k_BNKD[:, :, j // g], doc_ids_BN), v_BNKD[:, :, j // g])
            for j in range(n_q)]
    return torch.stack(outs, dim=2)


def diffv1_lambda(lq1, lk1, lq2, lk2, lambda_init: float) -> torch.Tensor:
    return torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lambda_init


def diffv1_lambda_init(depth: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def diffv1_core(q_BNQD, k_BNKD, v_BNKE, lam, lambda_init: float, subln_w, eps: float = 1e-5, doc_ids_BN=None):
    """DIFF V1 flash semantics (spec §3, A24). q: (B,N,2H,d), k: (B,N,2H_kv,d), v: (B,N,H_kv,2d) -> (B,N,2H,d)."""
    b, n, two_h, d = q_BNQD.shape
    H, H_kv = two_h // 2, k_BNKD.shape[2] // 2
    n_rep = H // H_kv
    outs = []
    for i in range(H):
        kv = i // n_rep
        p1 = attention_map(q_BNQD[:, :, 2 * i], k_BNKD[:, :, 2 * kv], doc_ids_BN)  # q1 = 0::2, k1 = 0::2
        p2 = attention_map(q_BNQD[:, :, 2 * i + 1], k_BNKD[:, :, 2 * kv + 1], doc_ids_BN)  # q2 = 1::2, k2 = 1::2
        c = apply_map(p1 - lam * p2, v_BNKE[:, :, kv])  # (B, N, 2d)
        outs.append(rms_norm(c, subln_w, eps) * (1.0 - lambda_init))
    return torch.stack(outs, dim=2).reshape(b, n, two_h, d)  # head i's 2d features -> o_proj columns [2di, 2d(i+1))


# ------------------------------------------------------------------------------------------------- full module
def attention(x_BNM: torch.Tensor, W: Dict[str, torch.Tensor], *, variant: str, n_heads: int, n_kv_heads: int,
              head_dim: int, theta: float = 10000.0, rope_style: str = "interleaved", lambda_mode: str = "sigmoid",
              pairing: str = "interleave", norm_eps: float = 1e-6, depth: int = 0, doc_ids_BN=None,
              lam_override: Optional[torch.Tensor] = None):
    """Whole attention layer from weights W (names as in the spec: q_proj, k_proj, v_proj, o_proj, lambda_proj,
    q_norm, k_norm, lambda_q1, lambda_k1, lambda_q2, lambda_k2, subln). Returns (y, intermediates)."""
    b, n, _ = x_BNM.shape
    d = head_dim
    q = linear(x_BNM, W["q_proj"]).reshape(b, n, -1, d)
    k = linear(x_BNM, W["k_proj"]).reshape(b, n, -1, d)
    v = linear(x_BNM, W["v_proj"])
    if "q_norm" in W:  # QK-norm: per-head RMSNorm over d, before RoPE
        q, k = rms_norm(q, W["q_norm"], norm_eps), rms_norm(k, W["k_norm"], norm_eps)
    q_pre, k_pre = q, k
    q, k = rope(q, theta, rope_style), rope(k, theta, rope_style)
    inter = {"q_pre_rope": q_pre, "k_pre_rope": k_pre, "q": q, "k": k}
    if variant == "diffv2":
        v = v.reshape(b, n, n_kv_heads, d)
        lam = None
        if lambda_mode != "none":
            lam = linear(x_BNM, W["lambda_proj"]) if lam_override is None else lam_override
        ctx = diffv2_core(q, k, v, lam, lambda_mode, pairing, doc_ids_BN)
        inter["lambda"] = lam
    elif variant == "baseline":
        v = v.reshape(b, n, n_kv_heads, d)
        ctx = gqa_core(q, k, v, doc_ids_BN)
    elif variant == "diffv1":
        v = v.reshape(b, n, n_kv_heads // 2, 2 * d)
        li = diffv1_lambda_init(depth)
        lam = diffv1_lambda(W["lambda_q1"], W["lambda_k1"], W["lambda_q2"], W["lambda_k2"], li)
        ctx = diffv1_core(q, k, v, lam, li, W["subln"], 1e-5, doc_ids_BN)
        inter["lambda"] = lam
    else:
        raise ValueError(variant)
    inter["v"] = v
    inter["context"] = ctx
    o_in = ctx.reshape(b, n, -1)
    inter["o_proj_input"] = o_in
    return linear(o_in, W["o_proj"]), inter



# --------------------------------------------------------------------------------------- test utilities (generic)
@torch.no_grad()
def init_sharp_(module: torch.nn.Module, gain: float = 1.5) -> torch.nn.Module:
    """Random weights giving peaked (non-uniform) attention maps and sigma(lambda) spread over (0, 1):
    q/k/lambda projections N(0, gain^2/fan_in) (unit-variance inputs give scores of std ~gain^2), other matrices
    N(0, 1/fan_in), DIFF V1 lambda vectors N(0, 0.1^2), norm weights U(0.5, 1.5) so that a missing affine shows."""
    qk_gain = gain
    for name, p in module.named_parameters():
        if p.ndim == 2:
            gain = qk_gain if name.split(".")[0] in ("q_proj", "k_proj", "lambda_proj") else 1.0
            p.normal_(0.0, gain / math.sqrt(p.shape[1]))
        elif name.startswith("lambda_"):
            p.normal_(0.0, 0.1)
        else:
            p.uniform_(0.5, 1.5)
    return module


def weights(module: torch.nn.Module, dtype=torch.float64) -> Dict[str, torch.Tensor]:
    """Parameters by spec name (q_proj, ..., q_norm, subln, lambda_q1), detached and cast for the reference."""
    return {n.removesuffix(".weight"): p.detach().to(dtype) for n, p in module.named_parameters()}


def assert_rel_close(actual, expected, rel, atol=0.0, what=""):
    """max |actual - expected| <= rel * max|expected| + atol (the form of the spec's T4 bound)."""
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * expected.double().abs().max().item() + atol
    assert err <= bound, f"{what}: max|delta|={err:.3e} > {bound:.3e}"
