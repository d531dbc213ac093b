"""CPU process groups for the tests: `spawn(worker, ranks)` runs `worker(rank)` in each of `ranks` processes, inside
one gloo group over all of them (one thread per process), and tears the group down after it."""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(worker: Callable[[int], None], ranks: int = 2) -> None:
    """Run worker(rank) on `ranks` gloo ranks; a failure on any rank fails the caller (mp.spawn raises it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(worker, ranks, port), nprocs=ranks, join=True)


def _run(rank: int, worker: Callable[[int], None], ranks: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.set_num_threads(1)
    try:
        worker(rank)
    finally:
        dist.destroy_process_group()
