"""AdamW with weight-decay groups and the learning-rate schedules (cosine, WSD, constant) with warm-up."""

from __future__ import annotations

import math

import torch

from diffv2.config import OptimConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Matrices decay; norms, biases and embeddings do not unless configured (spec A13: lambda_proj is a matrix)."""
    decay, no_decay = [], []
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or id(p) in embedding_params
        (no_decay if exempt and not cfg.decay_norms_and_embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "on"
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function, so resume needs only the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)  # wsd: stable, then linear decay
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, max_steps - decay_start)
    return cfg.lr + (floor - cfg.lr) * min(progress, 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
