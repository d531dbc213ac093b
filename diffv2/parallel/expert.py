"""Expert parallelism: each rank of an EP group holds E/ep experts; tokens travel to them by all-to-all.

`apply_expert_parallel(model, group)` shards every MoE layer's `experts` in place and swaps its `dispatch`; the
router, the expert bias and every non-expert parameter stay replicated. Experts are their own submodule
(`blocks.i.mlp.experts`), so a data-parallel wrapper (FSDP2 `fully_shard`) can shard the non-expert parameters
over the data-parallel mesh and the experts over the ranks that hold the same expert shard (torchtitan's
dp_mod_ep): that composition is the distributed engine's job. Gloo implements all_to_all_single with split sizes
on CPU, so the same code runs in the CPU tests and on NCCL.

Legend: S slots sent by this rank (sorted by global expert), R slots received, E experts, G local experts (E/ep),
P ep ranks, M d_model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from diffv2.model.moe import MoE, GroupedExperts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back along the reverse splits."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class ExpertParallelDispatch:
    """MoE.dispatch under EP: send expert-sorted slots to their experts' rank, compute, send the results back."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ep = dist.get_world_size(group)

    def __call__(self, experts: GroupedExperts, x_SM: torch.Tensor, tokens_E: torch.Tensor) -> torch.Tensor:
        n_local = experts.w1.shape[0]
        # Exchange counts first: rank p learns how many slots each rank sends to each of its G experts.
        recv_E = torch.empty_like(tokens_E)
        dist.all_to_all_single(recv_E, tokens_E.contiguous(), group=self.group)
        recv_PG = recv_E.view(self.ep, n_local)
        send_splits = tokens_E.view(self.ep, n_local).sum(1).tolist()  # one host sync: the splits size buffers
        recv_splits = recv_PG.sum(1).tolist()
        x_RM = _AllToAll.apply(x_SM, recv_splits, send_splits, self.group)
        # Received slots are ordered (source rank, local expert); the experts want them by local expert.
        local_R = torch.arange(n_local, device=x_RM.device).repeat(self.ep).repeat_interleave(recv_PG.flatten())
        order_R = local_R.argsort(stable=True)
        y_RM = experts(x_RM[order_R], recv_PG.sum(0))
        y_RM = y_RM.new_zeros(y_RM.shape).index_copy(0, order_R, y_RM)  # back to (source rank, expert) order
        return _AllToAll.apply(y_RM, send_splits, recv_splits, self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Keep this rank's contiguous block of experts in every MoE layer; route tokens across `group`.

    Call it before building the optimizer: the expert parameters are replaced by their shards.
    """
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if moe.n_experts % ep:
            raise ValueError(f"model.moe.n_experts={moe.n_experts} is not divisible by the expert-parallel size "
                             f"{ep}; choose an expert-parallel size that divides it")
        n_local = moe.n_experts // ep
        for name, w in list(moe.experts.named_parameters()):
            shard = w.detach()[rank * n_local:(rank + 1) * n_local].clone()
            setattr(moe.experts, name, nn.Parameter(shard, requires_grad=w.requires_grad))
        moe.dispatch = ExpertParallelDispatch(group)
        moe.expert_slice = (rank * n_local, (rank + 1) * n_local)  # what a meta-device init draws in full, then keeps
