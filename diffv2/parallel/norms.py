"""Sharded gradient norms: the global L2 norm over every rank's pieces, for clipping (`clip_grad_norm`) and for
the grad-norm monitor (monitoring/grad_norms.py).

Sharded correctness. Every norm is the square root of a sum of squares, and sums of squares add over disjoint
pieces. Each tensor contributes the sum of squares of its *local* values (one fused `torch._foreach_norm`);
contributions are added into one vector of buckets (kinds, layers), and that vector gets a single
`all_reduce(SUM)` when a process group is up. A DTensor shard (FSDP2 `Shard`, TP) contributes its local
piece divided by the number of ranks that replicate it (its `Replicate` mesh dims), so the world-wide sum counts
every element once; a plain tensor (single device, or DDP where every rank holds the full gradient) is already
the full value and is divided by the world size before the reduction. `Partial` placements are refused:
reduce-scatter them first. An engine that keeps gradients outside `param.grad` (DeepSpeed ZeRO) supplies
`TrainContext.named_grads` yielding its local partitions wrapped in `ShardedLocal(tensor)`, which count as
disjoint shards. Assumes every rank holds a piece of the same parameters (FSDP/TP/DDP meshes spanning all
ranks); pipeline stages would need per-stage weights.

Meshes whose ranks outside them hold *different* values (expert parallelism: the ep ranks hold other experts) are
recorded in a `DisjointMeshes` object that the engine owns (`Engine.disjoint`) and passes explicitly to
`local_piece` / `clip_grad_norm` (monitors get it as `TrainContext.disjoint`).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from diffv2.parallel import dist as pdist


def _dtensor_types():
    """(DTensor, Partial, Replicate), imported at the first use: torch.distributed.tensor takes a second to import,
    and the monitors' config schema (which imports this module) is read before any tensor exists."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor, Partial, Replicate


class ShardedLocal:
    """Marks a plain local tensor as this rank's disjoint shard of a larger tensor (e.g. a ZeRO partition)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def mesh_key(mesh) -> tuple:
    return (mesh.device_type, tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names)


class DisjointMeshes:
    """Meshes whose DTensors hold different values on `groups` groups of ranks outside the mesh (e.g. the ep ranks
    that hold other experts), so their norms add over those ranks instead of counting replicas."""

    def __init__(self):
        self._groups: dict[tuple, int] = {}

    def mark(self, mesh, groups: int) -> None:
        self._groups[mesh_key(mesh)] = groups

    def groups(self, mesh) -> int:
        """How many groups of ranks outside `mesh` hold disjoint values (1 when unmarked)."""
        return self._groups.get(mesh_key(mesh), 1)


def local_piece(t, disjoint: Optional[DisjointMeshes] = None) -> tuple[torch.Tensor, float]:
    """This rank's values of t and the weight of their sum of squares in a world-wide SUM (see module doc)."""
    if isinstance(t, ShardedLocal):
        return t.tensor.detach(), 1.0
    if not isinstance(t, torch.Tensor) or not hasattr(t, "placements"):  # a plain tensor needs no DTensor import
        return t.detach(), 1.0 / pdist.world_size()
    DTensor, Partial, Replicate = _dtensor_types()
    if isinstance(t, DTensor):
        if any(isinstance(p, Partial) for p in t.placements):
            raise ValueError("grad norms need reduced gradients; got a DTensor with a Partial placement")
        # Replicated along its Replicate mesh dims, and over every rank outside its mesh (e.g. embeddings sharded
        # over the data-parallel mesh are the same on each tensor-parallel rank), except where the ranks outside
        # hold different values (expert parallelism: other experts).
        replicas = (pdist.world_size() // t.device_mesh.size()
                    // (disjoint.groups(t.device_mesh) if disjoint else 1))
        for dim, p in enumerate(t.placements):
            if isinstance(p, Replicate):
                replicas *= t.device_mesh.size(dim)
        return t.to_local().detach(), 1.0 / replicas
    return t.detach(), 1.0 / pdist.world_size()


class _Plan:
    """Device index tensors for one layout of pieces, built once (no host-to-device copies per reading)."""

    def __init__(self, pieces, device: torch.device):
        groups: dict[tuple, list[int]] = {}
        for i, (t, _, _) in enumerate(pieces):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.groups = [(idx, torch.tensor(idx, device=device)) for idx in groups.values()]
        rows = [(i, b, w) for i, (_, w, buckets) in enumerate(pieces) for b in buckets]
        self.src = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)
        self.dst = torch.tensor([r[1] for r in rows], dtype=torch.long, device=device)
        self.weight = torch.tensor([r[2] for r in rows], dtype=torch.float32, device=device)


def bucket_sum_squares(pieces: list[tuple[torch.Tensor, float, Sequence[int]]], n_buckets: int,
                       device: torch.device, plans: Optional[dict] = None) -> torch.Tensor:
    """Global sum of squares per bucket, (n_buckets,), from (local tensor, weight, buckets it counts in) pieces:
    one fused norm kernel per (device, dtype) group and one all_reduce for all buckets together. `plans`
    caches the index tensors per layout across calls."""
    key = tuple((t.device, t.dtype, w, tuple(b)) for t, w, b in pieces)
    plans = {} if plans is None else plans
    plan = plans.get(key) or plans.setdefault(key, _Plan(pieces, device))
    sq = torch.zeros(len(pieces), dtype=torch.float32, device=device)
    for idx, idx_t in plan.groups:
        sq[idx_t] = torch.stack(torch._foreach_norm([pieces[i][0] for i in idx])).float().to(device).square()
    sums = torch.zeros(n_buckets, dtype=torch.float32, device=device)
    sums.index_add_(0, plan.dst, sq[plan.src] * plan.weight)
    if pdist.world_size() > 1:
        dist.all_reduce(sums)
    return sums


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, plans: Optional[dict] = None,
                   disjoint: Optional[DisjointMeshes] = None) -> torch.Tensor:
    """Global pre-clip L2 norm over every rank's gradients (plain, DDP-replicated or DTensor shards on any mesh),
    then clip in place; no host synchronisation. A non-finite norm leaves gradients non-finite (the guard skips)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    device = params[0].grad.device
    if pdist.world_size() == 1 and not any(hasattr(p.grad, "to_local") for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    pieces = [(t, w, (0,)) for t, w in (local_piece(p.grad, disjoint) for p in params)]
    norm = bucket_sum_squares(pieces, 1, device, plans)[0].sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        torch._foreach_mul_(grads, coef)
    return norm
