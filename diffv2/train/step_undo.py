"""Undo an optimizer step on device, without a host synchronisation (the spike monitor's skip action).

Why not zero the gradients or the learning rate: AdamW with zero gradients still decays its moments
(m <- beta1 m), advances its step count (bias correction) and, with lr > 0, still moves parameters along the old
moments; lr = 0 alone still updates m and v. A skipped step must leave parameters *and* optimizer state exactly
as they were, whatever the optimizer. So before every step that might be skipped we copy this rank's local
parameter values and optimizer-state tensors, and after the step we write back
`torch.where(skip, saved, current)`, a device-side select: bit-identical on a skip (even with inf/NaN
gradients, which a multiply-by-zero scheme would turn into NaN), untouched otherwise.

All ranks agree: the flag is all-reduced with MAX on device (an asynchronous collective, no host wait), so if
any rank saw a spike every rank restores. Cost: one copy of the local parameters and optimizer state per step
(memory ~ 3x parameters for AdamW) while the action is on; it is off by default. State tensors that live on
another device than the flag (the CPU `step` counters of non-fused AdamW on GPU) need the flag there, which
costs a synchronisation; fused AdamW (the default on GPU) keeps `step` on the device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from diffv2.parallel import dist as pdist


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def agree(skip: torch.Tensor) -> torch.Tensor:
    """The 0-d bool flag, true on every rank if it is true on any (an asynchronous all-reduce, no host wait)."""
    flag = skip.to(torch.int32)
    if pdist.world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.bool()


def fused_skip_works(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Can the optimizer itself skip a step, exactly and for free? Fused Adam/AdamW take a `found_inf` flag
    (the one GradScaler uses): at 1.0 the kernel leaves parameters, moments and step counts as they were. Only for
    plain tensors: sharded (DTensor) parameters keep the snapshot."""
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")
    return bool(fused) and not any(hasattr(p, "to_local") for p in model.parameters())


class StepUndo:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def snapshot(self) -> None:
        """Copy parameters and optimizer state (call after backward, before optimizer.step)."""
        live = [_local(p.detach()) for p in self.params]
        for p in self.params:
            live += [_local(v) for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        self._live = live
        self._saved = [t.clone() for t in live]

    def restore_if(self, skip: torch.Tensor) -> torch.Tensor:
        """After optimizer.step: put the snapshot back where `skip` (0-d bool) is true; returns the agreed flag."""
        agreed = agree(skip)
        per_device: dict[torch.device, torch.Tensor] = {}
        for live, saved in zip(self._live, self._saved):
            cond: Optional[torch.Tensor] = per_device.get(live.device)
            if cond is None:
                cond = per_device[live.device] = agreed.to(live.device)
            live.copy_(torch.where(cond, saved, live))
        self._live, self._saved = [], []
        return agreed
