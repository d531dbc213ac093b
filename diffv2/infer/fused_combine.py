"""DIFF V2's pair combination compiled into one kernel, for inference on a GPU (decode, generation, evaluation).

Eager, the combination is ~7 kernels per layer (the λ and two strided-view casts, sigmoid, product, difference, the
cast back); at decode batch 16 those launches alone, ~0.3 ms per step over 16 layers, were most of DIFF V2's extra
time per token (docs/inference.md). `install_fused_combine(model)` sets every attention layer's `combine_fn` (the
model's seam for how a pair is combined) to one `FusedCombine` per model; `load_model` (diffv2/infer/inference.py)
does it for every checkpoint it loads. The fused kernel runs only where it reproduces the eager function: on a GPU,
without autograd, outside a compiled graph (a compiled block fuses the combine itself) and with `combine_fp32` (the
activation-dtype mode rounds after every op, which a kernel that is fp32 inside does not). Elsewhere, and for good
once compilation has failed (one warning), the eager function runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch import nn

from diffv2.model.attention import Attention, combine

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _compiled_combine() -> Callable:
    """`combine` compiled with dynamic shapes (one compilation for every batch and length), memoized: one compiled
    callable per process, however many models use it (same pattern as kernels._compiled_flex)."""
    return torch.compile(combine, dynamic=True, fullgraph=True)


class FusedCombine:
    """`combine` with the same arguments, through the compiled kernel where it applies (module docstring)."""

    def __init__(self) -> None:
        self.broken = False

    def __call__(self, attn1_BNHD, attn2_BNHD, lam_BNH, lambda_mode: str, fp32: bool):
        args = (attn1_BNHD, attn2_BNHD, lam_BNH, lambda_mode, fp32)
        if (self.broken or not fp32 or not attn1_BNHD.is_cuda or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):
            return combine(*args)
        try:
            return _compiled_combine()(*args)
        except Exception as e:  # noqa: BLE001 (any compiler failure): the eager function is exact
            self.broken = True
            log.warning("fused DIFF V2 combine unavailable (%s: %s); using eager kernels", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return combine(*args)


def install_fused_combine(model: nn.Module) -> FusedCombine:
    """Every attention layer of `model` (a Transformer or one Attention) combines through one shared FusedCombine;
    returns it."""
    fused = FusedCombine()
    for module in model.modules():
        if isinstance(module, Attention):
            module.combine_fn = fused
    return fused
