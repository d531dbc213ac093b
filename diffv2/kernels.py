"""Causal attention core behind one function, dispatched by `attention.backend`.

All backends use the contiguous GQA mapping (query head j reads KV head j // (n_q / n_kv)), which the
DIFF V2 pairing relies on (spec §2.4 R2), and none materialises repeated K/V.

Legend: B batch, N sequence, Q query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

_SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "math": SDPBackend.MATH,
}


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(backend: str, device: torch.device, doc_mask: bool) -> str:
    """Turn `auto` into a concrete backend for this device; reject backends this machine cannot run."""
    on_gpu = device.type == "cuda"
    if backend == "auto":
        if not on_gpu:
            choice = "math"
        elif doc_mask:
            choice = "flash_attn" if flash_attn_available() else "flex"
        elif torch.cuda.get_device_capability(device)[0] >= 9:
            choice = "cudnn"  # ~1.8x the FA2 backend SDPA picks by default on Hopper
        else:
            choice = "flash_attn" if flash_attn_available() else "sdpa_flash"
        log.info("attention backend: auto -> %s", choice)
        return choice
    if backend in ("cudnn", "sdpa_flash", "flash_attn") and not on_gpu:
        raise ValueError(f"attention.backend={backend} needs a CUDA GPU; use attention.backend=auto or math on CPU")
    if backend == "flash_attn" and not flash_attn_available():
        raise ValueError("attention.backend=flash_attn but flash_attn is not installed; pip install flash-attn or use auto")
    if doc_mask and backend in ("cudnn", "sdpa_flash"):
        raise ValueError(f"attention.backend={backend} cannot mask documents; use flex, flash_attn or auto with doc_mask")
    return backend


def doc_ids_from_tokens(tokens_BN: torch.Tensor, eod: int) -> torch.Tensor:
    """Document index of every token; the EOD token belongs to the document it closes."""
    is_eod = (tokens_BN == eod).int()
    return torch.cumsum(is_eod, dim=1) - is_eod


def causal_attention(
    q_BNQD: torch.Tensor,
    k_BNKD: torch.Tensor,
    v_BNKD: torch.Tensor,
    backend: str,
    doc_ids_BN: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal [+ same-document]) v, returned as (B, N, Q, D)."""
    if backend == "flash_attn":
        return _flash_attn(q_BNQD, k_BNKD, v_BNKD, doc_ids_BN)
    q, k, v = (t.transpose(1, 2) for t in (q_BNQD, k_BNKD, v_BNKD))  # SDPA/flex take (B, H, N, D)
    if backend == "flex":
        out_BQND = _flex(q, k, v, doc_ids_BN)
    elif doc_ids_BN is not None:
        mask_B1NN = _doc_causal_mask(doc_ids_BN)
        with sdpa_kernel([SDPBackend.MATH]):  # the fused backends take no arbitrary mask with GQA
            out_BQND = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1NN, enable_gqa=True)
    else:
        with sdpa_kernel([_SDPA_BACKENDS[backend]]):
            out_BQND = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out_BQND.transpose(1, 2)


def _doc_causal_mask(doc_ids_BN: torch.Tensor) -> torch.Tensor:
    n = doc_ids_BN.shape[1]
    causal_NN = torch.ones(n, n, dtype=torch.bool, device=doc_ids_BN.device).tril()
    same_doc_BNN = doc_ids_BN[:, :, None] == doc_ids_BN[:, None, :]
    return (same_doc_BNN & causal_NN)[:, None]


def _flash_attn(q, k, v, doc_ids_BN):
    import flash_attn

    if doc_ids_BN is None:
        return flash_attn.flash_attn_func(q, k, v, causal=True)
    # Packed documents -> varlen: each document is its own causal sequence.
    b, n = doc_ids_BN.shape
    global_ids = (doc_ids_BN + torch.arange(b, device=q.device)[:, None] * n).flatten()
    lengths = torch.unique_consecutive(global_ids, return_counts=True)[1]
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())
    out = flash_attn.flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len, causal=True
    )
    return out.view(q.shape)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, doc_ids_BN):
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, n, _ = q.shape
    if doc_ids_BN is None:

        def mask_mod(b_, h_, qi, ki):
            return qi >= ki

        block_mask = create_block_mask(mask_mod, None, None, n, n, device=q.device)
    else:

        def mask_mod(b_, h_, qi, ki):
            return (qi >= ki) & (doc_ids_BN[b_, qi] == doc_ids_BN[b_, ki])

        block_mask = create_block_mask(mask_mod, b, None, n, n, device=q.device)
    flex = _compiled_flex() if q.is_cuda else None
    if flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex
    # torch 2.11's compiled GQA flex finds no kernel config below 128 tokens with its default 128-wide blocks.
    options = {"BLOCK_M": 64, "BLOCK_N": 64} if q.is_cuda and n < 128 else None
    return flex(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options)
