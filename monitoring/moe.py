"""MoE routing health: tokens per expert, load imbalance (max/mean) per layer, aux and z losses, dead experts.

The contract a MoE layer fills (the MoE issue implements it): the module exposes `moe_stats`, a dict of device
tensors it updates in every forward without host synchronisation:
- `tokens_per_expert` (E,): tokens routed to each expert, *added up* over forwards; this monitor reads it every
  `interval` steps and zeroes it in place, so each reading covers the steps since the last one;
- `aux_loss`, `z_loss` (0-d, optional): the load-balancing and router z losses of the last forward;
- `expert_bias` (E,) (optional): the aux-loss-free routing bias, logged as a layer x expert matrix;
and optionally `layer_idx` (int; otherwise layers are numbered in module order). Imbalance = max/mean of tokens
per expert (OLMo-core's convention); a dead expert received no token over the whole reading window.

Legend: E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffv2.train.callbacks import Callback, TrainContext, every
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class MoEMonitorConfig(MonitorConfig):
    """monitoring.moe: moe/: tokens per expert, imbalance max/mean, aux and z loss, dead experts (if MoE layers)."""

    interval: int = 10  # steps between reads of the layers' moe_stats


class MoEMonitor(Callback):
    name = "moe"

    def __init__(self, interval: int):
        self.interval = interval

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        layers = [m for m in ctx.model.modules() if isinstance(getattr(m, "moe_stats", None), dict)]
        self.layers = [(getattr(m, "layer_idx", i), m) for i, m in enumerate(layers)]

    def on_before_optimizer_step(self, step: int) -> dict:
        if not self.layers or not every(step, self.interval, self.last):
            return {}
        metrics, counts, biases = {}, [], []
        for layer, module in self.layers:
            stats, tag = module.moe_stats, f"L{layer:02d}"
            tokens_E = stats["tokens_per_expert"].detach().float()
            counts.append(tokens_E.clone())
            metrics[f"moe/imbalance/{tag}"] = tokens_E.max() / tokens_E.mean().clamp_min(1e-12)
            metrics[f"moe/dead_experts/{tag}"] = (tokens_E == 0).sum()
            for key in ("aux_loss", "z_loss"):
                if stats.get(key) is not None:
                    metrics[f"moe/{key}/{tag}"] = stats[key].detach().float()
            if stats.get("expert_bias") is not None:
                biases.append(stats["expert_bias"].detach().float().clone())
            stats["tokens_per_expert"].zero_()
        for key, rows in (("moe/tokens_per_expert", counts), ("moe/expert_bias", biases)):
            if rows and len({r.numel() for r in rows}) == 1:
                metrics[key] = torch.stack(rows)  # layer x expert
        return metrics


SPEC = MonitorSpec("moe", MoEMonitorConfig, order=70, build=lambda c, env: MoEMonitor(c.interval))
