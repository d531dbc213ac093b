"""trainer.compile: every block compiled, as one graph or by regions (step 4 of diffv2/parallel/parallelize.py).

Whole blocks (the default): `block.compile()`, one compiled call per block; FSDP2, applied afterwards, wraps it with
its hooks outside the graph.

By regions, when each MoE layer's experts are an FSDP2 unit of their own (expert parallelism, or
`parallel.expert_fsdp=own`): a whole MoE block's graph would hold the experts' FSDP2 hooks, which dynamo leaves to run
eagerly, so it would break in two places. As torchtitan does for its MoE blocks, the parts between those hooks are
compiled apart instead, each with fullgraph=True (a break fails at the first call instead of slowing every step):

    attn_norm, attn, mlp_norm    the modules' calls; the attention's observer statistics leave its graph as outputs
                                 (`Attention.defer_stats`) and are delivered after it
    MoE.front, MoE.back          routing, the load-balancing accounting, the expert-sorted slots and the shared expert;
                                 the weighted sum of the experts' outputs
    experts                      their forward only: FSDP2's hooks (gather, reshard, gradient reduction) run around it

What stays eager is glue: the two residual adds, the dispatcher's token exchange (under expert parallelism: the
all-to-alls and the one host sync for the split sizes, diffv2/parallel/expert.py) and FSDP2's hooks. Dense blocks are
compiled whole either way.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn

from diffv2.model.attention import Attention
from diffv2.model.moe import MoE


def apply_compile(model: nn.Module, regions: bool = False) -> str:
    """Compile every block of `model` in place: whole, or (`regions`) an MoE block's parts between its experts'
    FSDP2 hooks. Call it after activation checkpointing is applied. Compilation happens lazily, at the first call.
    Returns what it did to MoE blocks by regions, for the start-up line ("" when every block is compiled whole)."""
    # selective_moe's checkpoint (activation_checkpoint.py) caches tensors that compiled regions inside it would
    # write to again: there the MoE blocks run eagerly (a whole compiled block traces its checkpoint instead).
    selective = getattr(model.block_runner, "save_ops", False)
    for block in model.blocks:
        if not (regions and isinstance(block.mlp, MoE)):
            block.compile()
        elif not selective:
            compile_regions(block)
    if not (regions and model.moe_layers()):
        return ""
    return "MoE blocks eager (selective_moe)" if selective else "MoE blocks compiled by regions"


def compile_regions(block: nn.Module) -> None:
    """Compile an MoE block's parts apart, each with fullgraph=True (the module docstring says which)."""
    block.attn_norm.compile(fullgraph=True)
    block.mlp_norm.compile(fullgraph=True)
    block.attn.defer_stats = True
    block.attn.forward = Region(block.attn, "forward")
    moe = block.mlp
    moe.front = Region(moe, "front")
    # With a capacity limit the kept slots are as many as the routing leaves; else always T*K.
    moe.back = Region(moe, "back", varying=(0, 1) if moe.cfg.capacity_factor > 0 else ())
    moe.experts.forward = Region(moe.experts, "forward", varying=(0,))  # under EP: the slots this rank received
    if moe.experts.impl != "grouped_mm":  # the per-expert loop (CPU tensors under "auto") splits by sizes read on
        torch._dynamo.config.capture_scalar_outputs = True  # the host: symbolic ints in the graph, not a break


class Region:
    """`module.<name>` compiled with fullgraph=True, set on the instance in its place; for a module's `forward`,
    nn.Module's call, and with it any hooks on the module (FSDP2's), runs eagerly around the graph. The first dim of
    the arguments at the positions in `varying` changes from call to call with the routing: it is marked unbacked,
    so that one graph serves every size. (Left to dynamo, a second size compiles a second, dynamic graph, and an
    activation-checkpointing recomputation can then run another graph than its forward did, which checkpointing
    refuses.) A collective's output still in flight (the dispatcher's all-to-all) is waited for before the graph:
    left to the compiler's input handling, that wait hung one of two gloo ranks in about half the runs. After an
    attention's graph, the statistics it kept for the observer are delivered."""

    def __init__(self, module: nn.Module, name: str, varying: tuple[int, ...] = ()):
        self.module, self.name, self.varying = module, name, varying
        self.compiled = torch.compile(getattr(type(module), name).__get__(module), fullgraph=True)

    def __call__(self, *args, **kwargs):
        args = tuple(a.wait() if isinstance(a, funcol.AsyncCollectiveTensor) else a for a in args)
        for i in self.varying:
            torch._dynamo.decorators.mark_unbacked(args[i], 0)
        out = self.compiled(*args, **kwargs)
        if isinstance(self.module, Attention):
            self.module.deliver_deferred()
        return out

    def __deepcopy__(self, memo) -> "Region":
        return Region(copy.deepcopy(self.module, memo), self.name, self.varying)  # compiled again, for the copy
