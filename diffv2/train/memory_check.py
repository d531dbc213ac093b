"""Refuse a model or batch that cannot fit before allocating it: a lower bound of what each process needs,
against the memory it can have (the GPU's, or the host's available memory shared by this host's processes).

The bound counts only what no setting removes, so it never refuses a run that could fit:
- fp32 parameters, gradients and AdamW's two moments, 16 bytes per parameter, spread over every process (the
  most any engine shards them);
- without `parallel.meta_init`, the whole fp32 model that each process builds before the engine shards it;
- each block's input, which backward keeps with or without activation checkpointing (micro-batch x seq x
  d_model per layer, in the compute dtype).
What it leaves out (the other activations, gathered parameters, allocator slack, bench/memory_plan.py's subject)
can only make the real need larger.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from diffv2.config import Config
from diffv2.model.flops import count

GB = 1e9


def lower_bound(cfg: Config, world_size: int, compute_bytes: int) -> tuple[float, str]:
    """(bytes, how they were counted) that each process needs at least."""
    params = count(cfg.model, cfg.data.seq_len).total
    states = 16 * params / world_size
    build = 0 if cfg.parallel.meta_init else 4 * params
    acts = cfg.trainer.micro_batch_size * cfg.data.seq_len * cfg.model.d_model * cfg.model.n_layers * compute_bytes
    how = (f"{params / 1e9:.2f}B parameters: {16 * params / GB:.1f} GB of fp32 weights, gradients and AdamW state "
           f"over {world_size} process(es)" + ("" if cfg.parallel.meta_init else
                                               f", {build / GB:.1f} GB to build the fp32 model before sharding") +
           f", {acts / GB:.1f} GB of block inputs kept for backward")
    return max(states, build) + acts, how


def available(device: torch.device, local_processes: int) -> tuple[Optional[float], str]:
    """Bytes one process may use on `device`, and what that is; None when it cannot be read."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), f"the GPU's {_gpu_name(device)}"
    host = _mem_available()
    if host is None:
        return None, ""
    share = f", shared by {local_processes} processes" if local_processes > 1 else ""
    return host / local_processes, f"this host's available memory{share}"


def check_fits(cfg: Config, device: torch.device, world_size: int, local_processes: int,
               compute_dtype: Optional[torch.dtype]) -> None:
    """ValueError (one line: the estimate, the limit, the fix) when the lower bound exceeds what there is."""
    limit, what = available(device, max(local_processes, 1))
    if limit is None:
        return
    need, how = lower_bound(cfg, world_size, torch.finfo(compute_dtype or torch.float32).bits // 8)
    if need > limit:
        m = cfg.model
        raise ValueError(
            f"model.{m.name} (n_layers={m.n_layers}, d_model={m.d_model}) with micro_batch_size="
            f"{cfg.trainer.micro_batch_size} x seq_len={cfg.data.seq_len} needs at least {need / GB:.1f} GB per "
            f"process ({how}), more than {what} {limit / GB:.1f} GB; use a smaller model or micro-batch, more "
            f"processes (FSDP shards the states), or parallel.meta_init=true")


def _mem_available() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return None


def _gpu_name(device: torch.device) -> str:
    return f"({torch.cuda.get_device_name(device)})"
