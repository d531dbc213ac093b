"""Causal attention core behind one function, dispatched by `attention.backend`.

All backends use the contiguous GQA mapping (query head j reads KV head j // (n_q / n_kv)), which the
DIFF V2 pairing relies on (spec §2.4 R2), and none materialises repeated K/V.

Legend: B batch, N sequence, Q query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import functools
import importlib
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
    """FlashAttention 2 (`flash-attn`). `flash-attn-4` alone also makes `flash_attn` importable (a namespace
    package holding `flash_attn.cute`), without these functions."""
    try:
        import flash_attn
    except ImportError:
        return False
    return torch.cuda.is_available() and hasattr(flash_attn, "flash_attn_varlen_func")


@functools.lru_cache(maxsize=None)
def fa4_unavailable() -> Optional[str]:
    """Why the `fa4` backend cannot run here, or None when it can: FlashAttention-4's CuTe DSL kernels
    (`pip install flash-attn-4`, which brings `nvidia-cutlass-dsl`) on a Hopper (SM90) or Blackwell (SM100) GPU."""
    if not torch.cuda.is_available():
        return "attention.backend=fa4 needs a CUDA GPU; use attention.backend=auto or math on CPU"
    major = torch.cuda.get_device_capability()[0]
    if major not in (9, 10):
        return f"attention.backend=fa4 needs a Hopper or Blackwell GPU (compute capability 9.x/10.x), not {major}.x"
    try:
        importlib.import_module("flash_attn.cute.interface")
    except Exception as exc:  # ImportError, or its compiler's CUDA libraries failing to load
        return (f"attention.backend=fa4 but flash_attn.cute does not import ({type(exc).__name__}: "
                f"{str(exc)[:120]}); pip install flash-attn-4 or use attention.backend=auto")
    return None


def fa4_available() -> bool:
    return fa4_unavailable() is None


_FUSED_GPU = ("fa4", "cudnn", "flash_attn", "sdpa_flash")  # fused kernels: CUDA only, fp16/bf16 inputs only


def resolve_backend(backend: str, device: torch.device, doc_mask: bool, dtype: Optional[torch.dtype] = None) -> str:
    """Turn `auto` into a concrete backend for this device; reject backends this machine cannot run. `dtype`: the
    attention inputs' dtype where known (fp32 on a GPU gets flex, which takes it)."""
    on_gpu = device.type == "cuda"
    fp32 = dtype is not None and dtype not in (torch.float16, torch.bfloat16)
    if backend == "auto":
        if not on_gpu:
            choice = "math"
        elif fp32:
            choice = "flex"
        elif doc_mask:  # varlen kernels: every document is its own causal sequence
            choice = "fa4" if fa4_available() else "flash_attn" if flash_attn_available() else "flex"
        elif torch.cuda.get_device_capability(device)[0] >= 9:
            # cuDNN: ~1.8x the FA2 backend SDPA picks by default on Hopper. FA4, where installed, is faster still
            # at head_dim 64 (bench/results/throughput-1b-H100.md).
            choice = "fa4" if fa4_available() else "cudnn"
        else:
            choice = "flash_attn" if flash_attn_available() else "sdpa_flash"
        log.info("attention backend: auto -> %s", choice)
        return choice
    if backend in _FUSED_GPU and not on_gpu:
        raise ValueError(f"attention.backend={backend} needs a CUDA GPU; use attention.backend=auto or math on CPU")
    if backend == "fa4" and fa4_unavailable():
        raise ValueError(fa4_unavailable())
    if fp32 and backend in _FUSED_GPU:
        raise ValueError(f"attention.backend={backend} runs bf16/fp16 only, and this run computes in {dtype}; "
                         "set trainer.precision=bf16, or attention.backend=flex (or auto)")
    if backend == "flash_attn" and not flash_attn_available():
        raise ValueError("attention.backend=flash_attn but flash_attn is not installed; "
                         "pip install flash-attn or use auto")
    if doc_mask and backend in ("cudnn", "sdpa_flash"):
        raise ValueError(f"attention.backend={backend} cannot mask documents; "
                         "use fa4, flex, flash_attn or auto with doc_mask")
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
    if backend == "fa4":  # takes (B, N, heads, D) as it is: no transposes
        q_BNQD, k_BNKD, v_BNKD = q_BNQD.contiguous(), k_BNKD.contiguous(), v_BNKD.contiguous()
        if doc_ids_BN is None:
            return torch.ops.diffv2.fa4_attention(q_BNQD, k_BNKD, v_BNKD)[0]
        return torch.ops.diffv2.fa4_varlen_attention(q_BNQD, k_BNKD, v_BNKD, doc_ids_BN)[0]
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


# FlashAttention-4 as two opaque custom ops: torch.compile calls them from a compiled block instead of tracing the
# CuTe DSL launcher (its JIT compile and cache lookups are host Python). Inputs are made contiguous by the caller,
# so the real outputs have the fake ones' (contiguous) strides.
@torch.library.custom_op("diffv2::fa4_attention", mutates_args=(), device_types="cuda")
def fa4_attention(q_BNQD: torch.Tensor, k_BNKD: torch.Tensor, v_BNKD: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with GQA; returns the output (B, N, Q, D) and the fp32 log-sum-exp (B, Q, N)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out_BNQD, lse_BQN = _flash_attn_fwd(q_BNQD, k_BNKD, v_BNKD, causal=True, return_lse=True)[:2]
    return out_BNQD, lse_BQN


@fa4_attention.register_fake
def _fa4_attention_fake(q_BNQD, k_BNKD, v_BNKD):
    b, n, n_q, _ = q_BNQD.shape
    return torch.empty_like(q_BNQD), q_BNQD.new_empty((b, n_q, n), dtype=torch.float32)


@torch.library.custom_op("diffv2::fa4_attention_backward", mutates_args=(), device_types="cuda")
def fa4_attention_backward(dout_BNQD: torch.Tensor, q_BNQD: torch.Tensor, k_BNKD: torch.Tensor, v_BNKD: torch.Tensor,
                           out_BNQD: torch.Tensor, lse_BQN: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q_BNQD, k_BNKD, v_BNKD, out_BNQD, dout_BNQD, lse_BQN, causal=True)[:3]
    return dq, dk, dv


@fa4_attention_backward.register_fake
def _fa4_attention_backward_fake(dout_BNQD, q_BNQD, k_BNKD, v_BNKD, out_BNQD, lse_BQN):
    return torch.empty_like(q_BNQD), torch.empty_like(k_BNKD), torch.empty_like(v_BNKD)


def _fa4_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _fa4_backward(ctx, dout_BNQD, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_attention_backward(dout_BNQD.contiguous(), q, k, v, out, lse)


fa4_attention.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


def doc_cu_seqlens(doc_ids_BN: torch.Tensor) -> torch.Tensor:
    """Packed documents as varlen sequences: the cumulative lengths (int32, starting at 0) of every document of
    every row over the B*N flattened tokens; a document never continues into the next row. Expects what
    `doc_ids_from_tokens` gives: ids in [0, N), each document contiguous in its row (flex and math mask by id
    equality, the varlen kernels split where the id changes). Costs one host sync (the number of documents)."""
    b, n = doc_ids_BN.shape
    global_ids = (doc_ids_BN + torch.arange(b, device=doc_ids_BN.device)[:, None] * n).flatten()
    lengths = torch.unique_consecutive(global_ids, return_counts=True)[1]
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


# Packed documents on FA4: its varlen kernels over the flattened tokens. The document boundaries are recomputed from
# doc_ids in the backward (a tensor of data-dependent size cannot be an output of an op that torch.compile traces), so
# each layer pays one host sync in forward and one in backward (one more when activation checkpointing recomputes).
# max_seqlen is the row length, a static upper bound: no sync for the longest document; FA4's varlen scheduler
# sizes its work by the real lengths.
@torch.library.custom_op("diffv2::fa4_varlen_attention", mutates_args=(), device_types="cuda")
def fa4_varlen_attention(q_BNQD: torch.Tensor, k_BNKD: torch.Tensor, v_BNKD: torch.Tensor, doc_ids_BN: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each document; returns the output (B, N, Q, D) and the fp32 log-sum-exp (Q, B*N)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    cu_seqlens = doc_cu_seqlens(doc_ids_BN)
    n = q_BNQD.shape[1]
    out_TQD, lse_QT = _flash_attn_fwd(q_BNQD.flatten(0, 1), k_BNKD.flatten(0, 1), v_BNKD.flatten(0, 1),
                                      cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=n,
                                      max_seqlen_k=n, causal=True, return_lse=True)[:2]
    return out_TQD.view(q_BNQD.shape), lse_QT


@fa4_varlen_attention.register_fake
def _fa4_varlen_attention_fake(q_BNQD, k_BNKD, v_BNKD, doc_ids_BN):
    b, n, n_q, _ = q_BNQD.shape
    return torch.empty_like(q_BNQD), q_BNQD.new_empty((n_q, b * n), dtype=torch.float32)


@torch.library.custom_op("diffv2::fa4_varlen_attention_backward", mutates_args=(), device_types="cuda")
def fa4_varlen_attention_backward(dout_BNQD: torch.Tensor, q_BNQD: torch.Tensor, k_BNKD: torch.Tensor,
                                  v_BNKD: torch.Tensor, out_BNQD: torch.Tensor, lse_QT: torch.Tensor,
                                  doc_ids_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    cu_seqlens = doc_cu_seqlens(doc_ids_BN)
    n = q_BNQD.shape[1]
    flat = [t.flatten(0, 1) for t in (q_BNQD, k_BNKD, v_BNKD, out_BNQD, dout_BNQD)]
    dq, dk, dv = _flash_attn_bwd(*flat, lse_QT, causal=True, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                 max_seqlen_q=n, max_seqlen_k=n)[:3]
    return dq.view(q_BNQD.shape), dk.view(k_BNKD.shape), dv.view(v_BNKD.shape)


@fa4_varlen_attention_backward.register_fake
def _fa4_varlen_attention_backward_fake(dout_BNQD, q_BNQD, k_BNKD, v_BNKD, out_BNQD, lse_QT, doc_ids_BN):
    return torch.empty_like(q_BNQD), torch.empty_like(k_BNKD), torch.empty_like(v_BNKD)


def _fa4_varlen_backward(ctx, dout_BNQD, _dlse):
    q, k, v, doc_ids, out, lse = ctx.saved_tensors
    return (*fa4_varlen_attention_backward(dout_BNQD.contiguous(), q, k, v, out, lse, doc_ids), None)


fa4_varlen_attention.register_autograd(_fa4_varlen_backward, setup_context=_fa4_setup_context)


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
    cu = doc_cu_seqlens(doc_ids_BN)
    max_len = int((cu[1:] - cu[:-1]).max())
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
