"""Attention sinks and entropy per head on the probe batch (spec A17 (i)).

Through the explicit math path (monitoring/attention_math.py), never the training kernel: the attention mass
on the first token and the entropy of each head's map, averaged over query positions t >= 1. For DIFF V2 (and
V1) both maps are measured (`_a1`, `_a2`) and the differential weights a1 - sigma * a2 (`sink_mass`), whose
rows sum to 1 - sigma (spec §2.3), so a pair can drop its first-token mass without a sink.

Per layer the mean and max over heads are logged every interval; the layer x head matrices as `_heads`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from diffv2.train.callbacks import Callback, StepResult, TrainContext, every
from monitoring.attention_math import sink_and_entropy
from monitoring.spec import MonitorConfig, MonitorSpec

log = logging.getLogger(__name__)


@dataclass
class AttentionSinkMonitorConfig(MonitorConfig):
    """monitoring.attention_sinks: attn/sink_mass*, attn/entropy*: first-token attention mass and entropy per head (probe)."""

    interval: int = 200  # steps between probe passes


class AttentionSinkMonitor(Callback):
    name = "attention_sinks"

    def __init__(self, interval: int):
        self.interval = interval
        self._per_layer: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.probe = ctx.probe
        if self.probe is None:
            log.warning("attention-sink monitor: no probe batch (no validation split, or turned off by the engine); monitor inactive")

    def on_step_start(self, step: int) -> None:
        if self.probe is not None and every(step, self.interval, self.last):
            self.probe.request(self.name, self._measure)

    def _measure(self, attn, x_BNM: torch.Tensor) -> None:
        self._per_layer[attn.layer_idx] = sink_and_entropy(attn, x_BNM)

    def on_step_end(self, result: StepResult) -> dict:
        if self.probe is None or not every(result.step, self.interval, self.last):
            return {}
        self.probe.run()
        metrics, matrices = {}, {}
        for layer, stats in sorted(self._per_layer.items()):
            for key, per_head in stats.items():
                metrics[f"attn/{key}/L{layer:02d}"] = per_head.mean()
                metrics[f"attn/{key}_max/L{layer:02d}"] = per_head.max()
                matrices.setdefault(key, []).append(per_head)
        metrics.update({f"attn/{key}_heads": torch.stack(rows) for key, rows in matrices.items()})
        self._per_layer = {}
        return metrics


SPEC = MonitorSpec("attention_sinks", AttentionSinkMonitorConfig, order=60,
                  build=lambda c, env: AttentionSinkMonitor(c.interval))
