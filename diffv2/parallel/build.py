"""The engine factory: `build_engine(cfg, model, device)` picks the `Engine` for cfg.parallel (the plain
single-device loop, FSDP2 / HSDP / DDP with tensor and expert parallelism, or DeepSpeed ZeRO) and builds its
optimizer. It lives apart from the engines so that the base class (engine.py) and its subclasses
(deepspeed_engine.py) only import downwards; the trainer imports this module.
"""

from __future__ import annotations

import torch
from torch import nn

from diffv2.optim import build_optimizer
from diffv2.parallel import dist as pdist
from diffv2.parallel.deepspeed_engine import DeepSpeedEngine  # imports deepspeed only inside its methods
from diffv2.parallel.engine import Engine, FSDPEngine


def build_engine(cfg, model: nn.Module, device: torch.device, param_dtype=None, materialize: bool = False) -> Engine:
    """Wrap `model` (already on `device`) for cfg.parallel and build its optimizer; `param_dtype` is the compute
    dtype FSDP casts parameters to (bf16 when training in bf16, else None = the stored fp32). `materialize`: the
    model was built on the meta device; it is allocated and initialised after sharding, before the optimizer."""
    p = cfg.parallel
    builder = lambda m: build_optimizer(m, cfg.optim, device)  # noqa: E731 - the optimizer must see wrapped params
    if p.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, device)
    if pdist.world_size() == 1 and p.tp == 1:
        if materialize:
            model.materialize(device, p.meta_init_draw, cfg.seed)
        return Engine(model, builder(model))
    return FSDPEngine(model, builder, cfg, device, param_dtype, materialize)
