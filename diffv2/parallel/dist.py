"""Process-group set-up from the launcher's environment: torchrun (or any env:// launcher) or SLURM `srun`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT). Under `srun` with one task per GPU, SLURM sets
SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the batch script exports MASTER_ADDR/MASTER_PORT (see launch/);
this module copies them into the env:// variables so torch.distributed and DeepSpeed read one convention. A single
process with neither is world size 1 and starts no process group.

Collectives on host values (agreement on a checkpoint path, a stop signal) go through `control_group()`: a gloo
group, so they never wait on the GPU stream.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
# The gloo group for host-side agreement: it lives and dies with torch's process-wide default group (init, shutdown).
_CONTROL: Optional[Any] = None
# What a collective raises when a peer died (connection closed) or stalled past the timeout: torch's DistError
# family, or (gloo on CPU) a RuntimeError from the transport.
_PEER_LOST = re.compile(r"timed out|timeout|connection (closed|reset|refused)|broken pipe|gloo|nccl|socket", re.I)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"  # single | torchrun | slurm


def _int(env: dict, key: str) -> int:
    value, count = env[key], key.endswith(("SIZE", "NTASKS", "NNODES"))
    if not value.isdigit() or (count and int(value) < 1):
        kind = "positive" if count else "non-negative"
        raise ValueError(f"{key}={value!r} is not a {kind} integer (set by the launcher; unset it for one process)")
    return int(value)


def detect(env: Optional[dict] = None) -> DistEnv:
    """The launcher's view of this process. SLURM counts only when it ran more than one task and exported a
    rendezvous address (a single `python train.py` inside an allocation is one process)."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" not in env and _int(env, "WORLD_SIZE") > 1:
        raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} but RANK is not set; start the processes with torchrun "
                         f"(or srun), or unset WORLD_SIZE for one process")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        found = DistEnv(rank, world, local, local_world, "torchrun" if world > 1 else "single")
    elif "SLURM_PROCID" in env and env.get("SLURM_NTASKS", "1") != "1" and "MASTER_ADDR" in env:
        world = _int(env, "SLURM_NTASKS")
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # e.g. "8(x4)"
        nodes = _int(env, "SLURM_NNODES") if "SLURM_NNODES" in env else 1
        local_world = int(tasks_per_node) if tasks_per_node.isdigit() else max(world // nodes, 1)
        found = DistEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"), local_world, "slurm")
    else:
        return DistEnv()
    if not 0 <= found.rank < found.world_size or not 0 <= found.local_rank < max(found.local_world_size, 1):
        raise ValueError(f"launcher environment is inconsistent: rank {found.rank} of {found.world_size}, local rank "
                         f"{found.local_rank} of {found.local_world_size}")
    if found.world_size > 1 and "MASTER_ADDR" not in env:
        raise ValueError("WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun or the launch/ scripts")
    return found


def is_peer_failure(err: BaseException) -> bool:
    """Did a collective fail because another rank died or stalled? (only asked with a process group up)"""
    if world_size() == 1:
        return False
    if hasattr(dist, "DistError") and isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and bool(_PEER_LOST.search(str(err)))


def explain_timeout(err: BaseException, timeout_s: float) -> str:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return (f"rank {rank()}: a collective with the other ranks failed ({first}); another rank died or stalled "
            f"longer than parallel.timeout_s={timeout_s:g}s. Check the other ranks' logs, then relaunch: "
            f"trainer.resume=auto continues from the last checkpoint")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int,
                       tp: Optional[int] = None) -> int:
    """Micro-batches per rank in one optimizer step: global batch / (micro-batch x data-parallel ranks). With `tp`,
    world_size / tp ranks are data-parallel (and the error says so); without, every rank is."""
    dp = world_size // (tp or 1)
    if global_batch_size % (micro_batch_size * dp):
        ranks = (f"data-parallel ranks = {micro_batch_size} x {dp} (world size {world_size} / tp {tp})" if tp
                 else f"ranks = {micro_batch_size} x {world_size}")
        raise ValueError(f"trainer.global_batch_size={global_batch_size} is not a multiple of micro_batch_size x "
                         f"{ranks}; change one of them")
    return global_batch_size // (micro_batch_size * dp)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(found: DistEnv, device_type: str, timeout_s: float) -> torch.device:
    """Start the default process group (NCCL on GPU, gloo on CPU) and return this process's device."""
    global _CONTROL
    device = torch.device("cpu")
    if device_type == "cuda":
        if torch.cuda.device_count() <= found.local_rank:
            raise ValueError(f"local rank {found.local_rank} needs GPU {found.local_rank} but only "
                             f"{torch.cuda.device_count()} are visible; start one process per GPU")
        device = torch.device("cuda", found.local_rank)
        torch.cuda.set_device(device)
    if found.world_size == 1 or dist.is_initialized():
        return device
    os.environ.update(RANK=str(found.rank), WORLD_SIZE=str(found.world_size), LOCAL_RANK=str(found.local_rank),
                      LOCAL_WORLD_SIZE=str(found.local_world_size))
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    _CONTROL = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD
    log.info("process group up: rank %d of %d (%s, %s), timeout %ds", found.rank, found.world_size, found.launcher,
             backend, timeout_s)
    return device


def control_group():
    """A gloo group for host-side agreement (None when there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return _CONTROL if _CONTROL is not None else dist.group.WORLD


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (identity without a process group)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def all_ok(ok: bool) -> bool:
    """True only if every rank says ok: every rank then takes the same branch after a local failure."""
    if world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group())
    return flag.item() == 0


def all_sum(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=control_group())
    return t.item()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Mean of a device scalar over the data-parallel ranks (tensor-parallel peers hold the same value, so the
    world sum is divided by the world size). Queued on the device: no host wait."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def agree_on(reason: Optional[str]) -> Optional[str]:
    """A stop reason any rank has, on every rank (the lowest rank's wording wins)."""
    if world_size() == 1 or all_ok(not reason):  # one small host-side all-reduce per step in the common case
        return reason
    reasons = [None] * world_size()
    dist.all_gather_object(reasons, reason, group=control_group())
    return next((r for r in reasons if r), None)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier(group=control_group())


def shutdown() -> None:
    global _CONTROL
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None
