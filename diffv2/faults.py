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


PLAN = parse(os.environ.get("DIFFV2_FAULT", ""))


def kill(point: str, step: int) -> None:
    if step in PLAN.get(point, ()):
        os.kill(os.getpid(), signal.SIGKILL)


def _this_rank() -> bool:
    return os.environ.get("RANK", "0") == os.environ.get("DIFFV2_FAULT_RANK", "0")


def rank_fault(step: int) -> None:
    """A multi-rank job loses one rank at `step`: killed (rank_kill) or hung forever (stall)."""
    if step in PLAN.get("rank_kill", ()) and _this_rank():
        os.kill(os.getpid(), signal.SIGKILL)
    if step in PLAN.get("stall", ()) and _this_rank():
        while True:
            time.sleep(3600)


def disk_full(step: int, path: os.PathLike) -> None:
    if step in PLAN.get("enospc", ()):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def poison_loss(step: int, *losses: torch.Tensor) -> tuple[torch.Tensor, ...]:
    for point, value in (("nan_loss", float("nan")), ("inf_loss", float("inf"))):
        if step in PLAN.get(point, ()):
            return tuple(loss * value for loss in losses)
    return losses
