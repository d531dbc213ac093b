"""Fault-injection test hooks (tests/test_faults.py, tests/test_nonfinite.py); inert unless DIFFV2_FAULT is set.

    DIFFV2_FAULT="POINT:STEP[,STEP...][;POINT:STEP...]"     e.g. "ckpt_after_meta:4" or "nan_loss:3,4;step:9"

Kill points SIGKILL this process, as a lost node would, at optimizer step STEP (1-based):
  step               before the forward pass of the step
  backward           gradients computed, optimizer not yet stepped
  logged             the step's metrics written, its checkpoint not yet
  eval               as the validation pass after the step begins
  ckpt_after_shards  checkpoint STEP: DCP shards written, no trainer state or meta.json yet
  ckpt_after_meta    checkpoint STEP complete in its temporary directory, not yet renamed into place
  ckpt_after_remove  an older copy of checkpoint STEP deleted, the new one not yet renamed into place
  ckpt_after_rename  checkpoint STEP in place, older checkpoints not yet pruned
  rank_kill          as `step`, but only on the rank named by DIFFV2_FAULT_RANK (a dead node in a multi-rank job)
Other faults:
  stall              the rank named by DIFFV2_FAULT_RANK stops responding before the forward pass of the step
  enospc             checkpoint STEP's writer raises OSError(ENOSPC) after its shards, as a full disk does
  nan_loss, inf_loss the loss of the step is multiplied by NaN / Inf (every micro-batch of it)
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

KILL_POINTS = ("step", "backward", "logged", "eval", "ckpt_after_shards", "ckpt_after_meta", "ckpt_after_remove",
               "ckpt_after_rename")
POINTS = KILL_POINTS + ("rank_kill", "stall", "enospc", "nan_loss", "inf_loss")


def parse(spec: str) -> dict[str, set[int]]:
    plan: dict[str, set[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        point, _, steps = part.partition(":")
        if point not in POINTS or not steps:
            raise ValueError(f"DIFFV2_FAULT={spec!r}: {part!r} is not POINT:STEP[,STEP] (POINT: {', '.join(POINTS)})")
        plan.setdefault(point, set()).update(int(s) for s in steps.split(","))
    return plan


@dataclass(frozen=True)
class FaultPlan:
    """The faults armed for this process (empty unless DIFFV2_FAULT is set). The trainer reads the environment once
    (`from_env`) and hands the plan to the components that have fault points (the train step, the validation pass,
    the metric output, the checkpointer), so two trainers in one process never share one."""

    plan: Mapping[str, frozenset] = field(default_factory=dict)
    this_rank: bool = True  # this process is the rank DIFFV2_FAULT_RANK names (rank_kill, stall)

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] = os.environ) -> "FaultPlan":
        """The plan DIFFV2_FAULT arms for this process, the global rank `rank` (torchrun's RANK, SLURM's PROCID)."""
        plan = parse(environ.get("DIFFV2_FAULT", ""))
        return cls({k: frozenset(v) for k, v in plan.items()}, str(rank) == environ.get("DIFFV2_FAULT_RANK", "0"))

    def kill(self, point: str, step: int) -> None:
        if step in self.plan.get(point, ()):
            os.kill(os.getpid(), signal.SIGKILL)

    def rank_fault(self, step: int) -> None:
        """A multi-rank job loses one rank at `step`: killed (rank_kill) or hung forever (stall)."""
        if step in self.plan.get("rank_kill", ()) and self.this_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.plan.get("stall", ()) and self.this_rank:
            while True:
                time.sleep(3600)

    def disk_full(self, step: int, path: os.PathLike) -> None:
        if step in self.plan.get("enospc", ()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def poison_loss(self, step: int, *losses: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for point, value in (("nan_loss", float("nan")), ("inf_loss", float("inf"))):
            if step in self.plan.get(point, ()):
                return tuple(loss * value for loss in losses)
        return losses


NO_FAULTS = FaultPlan()
