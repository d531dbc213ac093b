"""Expert parallelism: each rank of an EP group holds E/ep experts; tokens travel to them by all-to-all.

`apply_expert_parallel(model, group)` shards every MoE layer's `experts` in place and swaps its `dispatch` for an
`AllToAllDispatcher`; the router, the expert bias and every non-expert parameter stay replicated. Experts are their
own submodule (`blocks.i.mlp.experts`), so a data-parallel wrapper (FSDP2 `fully_shard`) can shard the non-expert
parameters over the data-parallel mesh and the experts over the ranks that hold the same expert shard (torchtitan's
dp_mod_ep): that composition is the distributed engine's job.

A dispatcher is `plan -> dispatch -> experts -> combine` (`ExpertDispatcher`). `MoE` calls `plan` with the counts
alone, before it gathers the expert-sorted slots (and runs the shared expert), so that the count exchange and the
copy of the split sizes to the host run while that work is queued; `dispatch` reads the sizes as late as it can,
just before the token all-to-all that needs them. Another dispatcher (fixed worst-case buffers over
torch.distributed._symmetric_memory, no host sizes at all) fits behind the same four calls.

Host syncs of `AllToAllDispatcher`, per MoE layer and step: forward 1 (the split sizes, one copy of 2P integers);
backward 0 (the all-to-all's backward reuses the forward's sizes, captured as Python ints); recomputation 1 under
full activation checkpointing (the layer runs again), 0 under `selective_moe` (the host copy is saved like the
collectives, diffv2/parallel/activation_checkpoint.py). The CPU per-expert loop (`experts_impl=loop`) reads its own
group sizes; the grouped GEMM keeps them on the device.

Collectives are functional (`torch.distributed._functional_collectives`): dynamo traces them, so an MoE block
compiles with fullgraph=True; the host split sizes become unbacked symbolic ints, which needs
`torch._dynamo.config.capture_scalar_outputs` (set by `apply_expert_parallel`). Gloo implements all_to_all_single
with split sizes on CPU, so the same code runs in the CPU tests and on NCCL.

Legend: S slots sent by this rank (sorted by global expert), R slots received, E experts, G local experts (E/ep),
P ep ranks, M d_model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from diffv2.model.moe import MoE, GroupedExperts

_copies_in_flight: dict[int, torch.Event] = {}  # host buffer address -> the event after its device-to-host copy


@torch.library.custom_op("diffv2::splits_to_host", mutates_args=())
def splits_to_host(splits: torch.Tensor) -> torch.Tensor:
    """Start copying `splits` to (pinned) host memory without waiting; `splits_on_host` waits. An op, so that
    selective checkpointing can save its output and the recomputation neither copies nor waits again."""
    if splits.device.type == "cpu":
        return splits.clone()
    host = splits.to("cpu", non_blocking=True)  # non_blocking from an accelerator allocates pinned memory
    event = torch.Event(splits.device.type)
    event.record()
    _copies_in_flight[host.data_ptr()] = event
    return host


@splits_to_host.register_fake
def _(splits):
    return splits.new_empty(splits.shape, device="cpu")


@torch.library.custom_op("diffv2::splits_on_host", mutates_args=())
def splits_on_host(host: torch.Tensor) -> torch.Tensor:
    """`host` once its copy has landed: the host waits for the copy (and the device work queued before it) only."""
    event = _copies_in_flight.pop(host.data_ptr(), None)
    if event is not None:
        event.synchronize()
    return host.clone()  # an op's output may not alias its input


@splits_on_host.register_fake
def _(host):
    return torch.empty_like(host)


class ExpertDispatcher(ABC):
    """MoE.dispatch under expert parallelism: plan (counts only) -> dispatch -> experts -> combine."""

    @abstractmethod
    def plan(self, tokens_E: torch.Tensor):
        """Start whatever needs only the counts per expert; return what `dispatch` needs."""

    @abstractmethod
    def dispatch(self, x_SM: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(the slots of this rank's experts sorted by local expert, tokens per local expert G, route for combine)."""

    @abstractmethod
    def combine(self, y_RM: torch.Tensor, route) -> torch.Tensor:
        """The experts' outputs back to the ranks and slots they came from (S, M)."""

    def __call__(self, experts: GroupedExperts, x_SM: torch.Tensor, plan) -> torch.Tensor:
        x_RM, tokens_G, route = self.dispatch(x_SM, plan)
        return self.combine(experts(x_RM, tokens_G), route)

    def __deepcopy__(self, memo) -> "ExpertDispatcher":
        return self  # holds no tensors, only process groups, which cannot be copied: a copied model shares it


class _Plan(NamedTuple):  # a tuple: it leaves a compiled `MoE.front` as graph outputs
    recv_PG: torch.Tensor  # slots each rank sends to each of this rank's experts (device)
    splits_2P: torch.Tensor  # [slots sent to each rank, slots received from each rank], on its way to the host


@dataclass
class _Route:
    send_P: list[int]
    recv_P: list[int]
    order_R: torch.Tensor  # received slot -> its place when sorted by local expert


class AllToAllDispatcher(ExpertDispatcher):
    """Expert-sorted slots to their experts' rank by all_to_all_single with split sizes, and back."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ep = dist.get_world_size(group)

    def plan(self, tokens_E: torch.Tensor) -> _Plan:
        # Rank p learns how many slots each rank sends to each of its G experts (integers: no gradient).
        recv_PG = funcol.all_to_all_single(tokens_E.contiguous(), None, None, self.group).view(self.ep, -1)
        splits_2P = torch.stack((tokens_E.view(self.ep, -1).sum(1), recv_PG.sum(1)))
        return _Plan(recv_PG, torch.ops.diffv2.splits_to_host(splits_2P))

    def dispatch(self, x_SM: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor, _Route]:
        send_P, recv_P = torch.ops.diffv2.splits_on_host(plan.splits_2P).tolist()  # the layer's one host sync
        for n in (*send_P, *recv_P):
            torch._check(n >= 0)  # under compile: unbacked sizes, of which the all-to-all shapes are made
        torch._check(sum(send_P) == x_SM.shape[0])
        x_RM = funcol.all_to_all_single_autograd(x_SM, recv_P, send_P, self.group)
        # Received slots are ordered (source rank, local expert); the experts want them by local expert.
        n_local = plan.recv_PG.shape[1]
        local_R = torch.arange(n_local, device=x_RM.device).repeat(self.ep).repeat_interleave(
            plan.recv_PG.flatten(), output_size=sum(recv_P))
        order_R = local_R.argsort(stable=True)
        return x_RM[order_R], plan.recv_PG.sum(0), _Route(send_P, recv_P, order_R)

    def combine(self, y_RM: torch.Tensor, route: _Route) -> torch.Tensor:
        y_RM = y_RM.new_zeros(y_RM.shape).index_copy(0, route.order_R, y_RM)  # back to (source rank, expert) order
        return funcol.all_to_all_single_autograd(y_RM, route.send_P, route.recv_P, self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Keep this rank's contiguous block of experts in every MoE layer; route tokens across `group`.

    Call it before building the optimizer: the expert parameters are replaced by their shards. Sets dynamo's
    capture_scalar_outputs: without it the split sizes' `.tolist()` breaks a compiled block's graph in two.
    """
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    torch._dynamo.config.capture_scalar_outputs = True
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if moe.n_experts % ep:
            raise ValueError(f"model.moe.n_experts={moe.n_experts} is not divisible by the expert-parallel size "
                             f"{ep}; choose an expert-parallel size that divides it")
        n_local = moe.n_experts // ep
        for name, w in list(moe.experts.named_parameters()):
            shard = w.detach()[rank * n_local:(rank + 1) * n_local].clone()
            setattr(moe.experts, name, nn.Parameter(shard, requires_grad=w.requires_grad))
        moe.dispatch = AllToAllDispatcher(group)
        moe.expert_slice = (rank * n_local, (rank + 1) * n_local)  # what a meta-device init draws in full, then keeps
