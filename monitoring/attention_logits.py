"""Attention-logit outliers: max |q.k/sqrt(d)| per layer over all query heads on the probe batch.

This is the DIFF V1 authors' convention (spec §7.5, unilm#1666): |q1 k1^T/sqrt(d)| and |q2 k2^T/sqrt(d)| over
all heads, i.e. every one of DIFF V2's 2h query heads. Computed through the explicit math path
(monitoring/attention_math.py), so it sees the logits the kernel would form, including qk-norm and RoPE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from diffv2.train.callbacks import Callback, StepResult, TrainContext, every
from monitoring.attention_math import logit_max_abs
from monitoring.spec import MonitorConfig, MonitorSpec

log = logging.getLogger(__name__)


@dataclass
class AttentionLogitMonitorConfig(MonitorConfig):
    """monitoring.attention_logits: attn/logit_max_abs: max |q.k/sqrt(d)| per layer over all query heads on the probe batch."""

    interval: int = 200  # steps between probe passes


class AttentionLogitMonitor(Callback):
    name = "attention_logits"

    def __init__(self, interval: int):
        self.interval = interval
        self._per_layer: dict[int, torch.Tensor] = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.probe = ctx.probe
        if self.probe is None:
            log.warning("attention-logit monitor: no probe batch (no validation split, or turned off by the engine); monitor inactive")

    def on_step_start(self, step: int) -> None:
        if self.probe is not None and every(step, self.interval, self.last):
            self.probe.request(self.name, self._measure)

    def _measure(self, attn, x_BNM: torch.Tensor) -> None:
        self._per_layer[attn.layer_idx] = logit_max_abs(attn, x_BNM).max()

    def on_step_end(self, result: StepResult) -> dict:
        if self.probe is None or not every(result.step, self.interval, self.last):
            return {}
        self.probe.run()
        metrics = {f"attn/logit_max_abs/L{layer:02d}": v for layer, v in sorted(self._per_layer.items())}
        self._per_layer = {}
        return metrics


SPEC = MonitorSpec("attention_logits", AttentionLogitMonitorConfig, order=50,
                  build=lambda c, env: AttentionLogitMonitor(c.interval))
