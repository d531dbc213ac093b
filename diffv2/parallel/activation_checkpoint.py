"""Activation checkpointing, applied to the single-device model from outside (step 3 of diffv2/parallel/parallelize.py).

`apply_activation_checkpointing(model, mode, every)` picks the blocks (none | full: every block | selective: blocks
0, every, 2*every, ...) and installs a block runner in the model's `block_runner` seam: in training (grad enabled,
no KV cache) a chosen block keeps only its input and is recomputed in backward (torch.utils.checkpoint,
non-reentrant). The checkpoint wraps the whole block call, so a compiled block's graph and FSDP2's hooks run inside
it, and the recomputation re-gathers the block's parameters through those hooks. `checkpoint_contexts` marks the
recomputation (diffv2/model/recompute.py), so the model's side effects (MoE router losses and token counts,
observer statistics) happen once per forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffv2.model.recompute import checkpoint_contexts

AC_MODES = ("none", "full", "selective")


def checkpointed_blocks(mode: str, n_blocks: int, every: int = 2) -> frozenset[int]:
    """The indices of the blocks `mode` recomputes."""
    return frozenset({"none": range(0), "full": range(n_blocks), "selective": range(0, n_blocks, every)}[mode])


class CheckpointBlocks:
    """A block runner (Transformer.block_runner) that checkpoints the blocks in `blocks` while training."""

    def __init__(self, blocks: frozenset[int]):
        self.blocks = blocks

    def __call__(self, index: int, block: nn.Module, x_BNM: torch.Tensor, doc_ids_BN: Optional[torch.Tensor],
                 cache, observe: bool) -> torch.Tensor:
        if index in self.blocks and block.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(block, x_BNM, doc_ids_BN, None, observe, use_reentrant=False,
                              context_fn=checkpoint_contexts)
        return block(x_BNM, doc_ids_BN, cache, observe)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> None:
    """Checkpoint the blocks `mode` picks (parallel.activation_checkpoint, parallel.ac_every); "none" removes it."""
    blocks = checkpointed_blocks(mode, len(model.blocks), every)
    model.block_runner = CheckpointBlocks(blocks) if blocks else None
