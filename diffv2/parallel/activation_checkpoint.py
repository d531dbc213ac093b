"""Activation checkpointing, applied to the single-device model from outside (step 3 of diffv2/parallel/parallelize.py).

`apply_activation_checkpointing(model, mode, every)` picks the blocks and what they keep, and installs a block
runner in the model's `block_runner` seam: in training (grad enabled, no KV cache) a chosen block is recomputed in
backward (torch.utils.checkpoint, non-reentrant). Modes:

    none          nothing checkpointed
    full          every block keeps only its input
    selective     blocks 0, every, 2*every, ... keep only their input
    selective_moe every block keeps the outputs of the ops in `SAVED_OPS` (all-to-all and other collectives, the
                  host copy of the expert-parallel split sizes, matmuls and grouped expert GEMMs, attention) and
                  recomputes the rest (norms, activations, routing): the recomputation repeats no communication, no
                  host sync and no GEMM (torch.utils.checkpoint.create_selective_checkpoint_contexts)

The checkpoint wraps the whole block call, so a compiled block's graph and FSDP2's hooks run inside it, and the
recomputation re-gathers the block's parameters through those hooks. The recomputation runs marked
(diffv2/model/recompute.py: attention observers stay silent) and inside every MoE layer's `forward_state_kept`, so
the model's side effects (router losses, token counts, observer statistics) happen once per forward.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from diffv2.model.moe import MoE
from diffv2.model.recompute import checkpoint_contexts


def _ops(*names: str) -> set:
    """The overload packets among `names` ("namespace.op") that this installation has (flash_attn, FA4 are
    optional)."""
    found = set()
    for name in names:
        namespace, op = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None) if hasattr(torch.ops, namespace) else None
        if packet is not None:
            found.add(packet)
    return found


@functools.cache
def saved_ops() -> frozenset:
    """What `selective_moe` keeps: resolved on first use, after the optional kernels have registered their ops."""
    return frozenset(_ops(
        "_c10d_functional.all_to_all_single", "_c10d_functional.all_gather_into_tensor",
        "_c10d_functional.reduce_scatter_tensor", "_c10d_functional.all_reduce",
        "diffv2.splits_to_host", "diffv2.splits_on_host",  # the expert-parallel split sizes: no second host sync
        "aten.mm", "aten._grouped_mm",
        "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
        "diffv2.fa4_attention", "diffv2.fa4_varlen_attention",
        "flash_attn._flash_attn_forward", "flash_attn._flash_attn_varlen_forward",
    ))


def _selective_moe_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_blocks(mode: str, n_blocks: int, every: int = 2) -> frozenset[int]:
    """The indices of the blocks `mode` recomputes."""
    every_block = range(n_blocks)
    return frozenset({"none": range(0), "full": every_block, "selective": range(0, n_blocks, every),
                      "selective_moe": every_block}[mode])


class CheckpointBlocks:
    """A block runner (Transformer.block_runner) that checkpoints the blocks in `blocks` while training; with
    `save_ops`, the selective_moe policy decides what they keep."""

    def __init__(self, blocks: frozenset[int], save_ops: bool = False):
        self.blocks, self.save_ops = blocks, save_ops
        self.compiled: dict[int, Callable] = {}  # selective_moe: block index -> its compiled checkpoint

    def __call__(self, index: int, block: nn.Module, x_BNM: torch.Tensor, doc_ids_BN: Optional[torch.Tensor],
                 cache, observe: bool) -> torch.Tensor:
        if not (index in self.blocks and block.training and torch.is_grad_enabled() and cache is None):
            return block(x_BNM, doc_ids_BN, cache, observe)
        if self.save_ops and getattr(block, "_compiled_call_impl", None) is not None:
            # Observer statistics break the graph, and so do FSDP2's hooks (the compiled checkpoint traces the block's
            # call, hooks included, with fullgraph=True): those take the eager route below.
            if not observe and not isinstance(block, FSDPModule):
                return self._compiled_checkpoint(index, block)(x_BNM, doc_ids_BN, observe)
            block = block._call_impl  # eager: a saved output of a compiled graph is a buffer its kernels reuse
        return checkpoint(block, x_BNM, doc_ids_BN, None, observe, use_reentrant=False,
                          context_fn=functools.partial(self.contexts, block))

    def contexts(self, block) -> tuple:
        """(around the forward, around the recomputation) for torch.utils.checkpoint's context_fn."""
        forward, recompute = (create_selective_checkpoint_contexts(_selective_moe_policy) if self.save_ops
                              else (contextlib.nullcontext(), contextlib.nullcontext()))
        return forward, _recomputation(getattr(block, "__self__", block), recompute)

    def _compiled_checkpoint(self, index: int, block: nn.Module) -> Callable:
        """selective_moe with a compiled block: the checkpoint is traced too (torchtitan's order, AC inside compile).
        The policy then tags the graph for the partitioner, and the recomputation is part of the compiled backward:
        no Python runs again, so the block's side effects happen once (`skip_fwd_side_effects_in_bwd_under_checkpoint`,
        set by apply_activation_checkpointing)."""
        if index not in self.compiled:
            self.compiled[index] = torch.compile(functools.partial(_saving_checkpoint, block._call_impl),
                                                 fullgraph=True)
        return self.compiled[index]


def _saving_checkpoint(forward: Callable, x_BNM, doc_ids_BN, observe):
    return checkpoint(forward, x_BNM, doc_ids_BN, None, observe, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _selective_moe_policy))


@contextlib.contextmanager
def _recomputation(block: nn.Module, inner):
    """The recomputation: marked, its MoE writes undone, inside `inner` (selective checkpointing's cache)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(checkpoint_contexts()[1])
        for moe in (m for m in block.modules() if isinstance(m, MoE)):
            stack.enter_context(moe.forward_state_kept())
        stack.enter_context(inner)
        yield


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> None:
    """Checkpoint the blocks `mode` picks (parallel.activation_checkpoint, parallel.ac_every); "none" removes it."""
    blocks = checkpointed_blocks(mode, len(model.blocks), every)
    if mode == "selective_moe":  # a compiled checkpoint must not replay the forward's side effects in backward
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    model.block_runner = CheckpointBlocks(blocks, save_ops=mode == "selective_moe") if blocks else None
