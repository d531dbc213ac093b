"""The engine factory: `build_engine(cfg, model, device)` parallelizes the single-device model
(diffv2/parallel/parallelize.py: FP8 -> TP -> EP -> activation checkpointing -> compile -> FSDP2), builds the optimizer
over the parameters that result, and picks the `Engine` for cfg.parallel (the plain single-device loop, FSDP2 /
HSDP / DDP with tensor and expert parallelism, or DeepSpeed ZeRO). It lives apart from the engines so that the base
class (engine.py) and its subclasses (deepspeed_engine.py) only import downwards; the trainer imports this module.
"""

from __future__ import annotations

import torch
from torch import nn

from diffv2.optim import build_optimizer
from diffv2.parallel.deepspeed_engine import DeepSpeedEngine  # imports deepspeed only inside its methods
from diffv2.parallel.engine import Engine, FSDPEngine
from diffv2.parallel.parallelize import parallelize


def build_engine(cfg, model: nn.Module, device: torch.device, param_dtype=None, materialize: bool = False) -> Engine:
    """Parallelize `model` (already on `device`, or on the meta device with `materialize`: allocated and
    initialised after sharding, before the optimizer) for cfg.parallel and wrap it with its optimizer;
    `param_dtype` is the compute dtype FSDP2 casts parameters to (bf16 when training in bf16, else None = the
    stored fp32)."""
    layout = parallelize(model, cfg, device, param_dtype, materialize)
    if cfg.parallel.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, device)  # DeepSpeed wraps the model and builds its optimizer itself
    optimizer = build_optimizer(model, cfg.optim, device)  # over the sharded / parallelised parameters
    if not layout.sharded:
        return Engine(model, optimizer)
    return FSDPEngine(model, optimizer, layout)
