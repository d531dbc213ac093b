"""Head counts of a ModelConfig for each attention variant (spec §2-§4): the query heads fed to the kernel, the
output heads concatenated before o_proj, and the one-line errors for layouts that break DIFF V2 pairing or GQA
grouping. Plain arithmetic, no torch: FLOP accounting, config validation and tensor-parallel checks use it without
importing the model.
"""

from __future__ import annotations

from diffv2.config import ModelConfig


def query_heads(cfg: ModelConfig) -> int:
    """Query heads fed to the attention kernel for each variant."""
    a, h = cfg.attention, cfg.n_heads
    if a.variant == "diffv2":
        return 2 * h
    if a.variant == "baseline":
        return round(a.head_multiplier * h)
    return h  # diffv1: 2 * (h/2) heads of d, split into q1/q2


def output_heads(cfg: ModelConfig) -> int:
    """Heads of width head_dim concatenated before o_proj."""
    return query_heads(cfg) if cfg.attention.variant == "baseline" else cfg.n_heads


def validate_heads(cfg: ModelConfig) -> None:
    """One-line errors for head layouts that break pairing or GQA grouping (spec R1, T3, T16)."""
    a, h, hkv = cfg.attention, cfg.n_heads, cfg.n_kv_heads
    if h <= 0 or hkv <= 0:
        raise ValueError(f"model.n_heads={h} and model.n_kv_heads={hkv} must be positive")
    if a.variant == "diffv2" and (h % hkv or hkv > h):
        raise ValueError(
            f"DIFF V2 pairs need n_heads % n_kv_heads == 0 (spec R1): n_heads={h}, n_kv_heads={hkv} puts heads 2i and "
            f"2i+1 in different GQA groups; choose n_kv_heads dividing n_heads"
        )
    if a.variant == "baseline":
        nq = a.head_multiplier * h
        if nq != round(nq) or round(nq) % hkv:
            raise ValueError(
                f"baseline query heads head_multiplier*n_heads = {a.head_multiplier}*{h} = {nq} must be an integer "
                f"multiple of n_kv_heads={hkv}; pick head_multiplier or n_kv_heads accordingly"
            )
    if a.variant == "diffv1" and (h % 2 or hkv % 2 or (h // 2) % (hkv // 2)):
        raise ValueError(
            f"DIFF V1 uses n_heads/2 and n_kv_heads/2 heads (spec §3): n_heads={h}, n_kv_heads={hkv} must both be even "
            f"with n_kv_heads/2 dividing n_heads/2"
        )
    if a.variant != "diffv2" and (a.pairing != "interleave" or a.lambda_mode != "sigmoid"):
        raise ValueError("attention.pairing / lambda_mode are DIFF V2 ablations; they need attention.variant=diffv2")
    if a.variant != "baseline" and a.head_multiplier != 1.0:
        raise ValueError(f"attention.head_multiplier={a.head_multiplier} applies to variant=baseline only")
