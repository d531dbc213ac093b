"""DIFF V2 lambda: the distribution of sigmoid(lambda) over tokens and heads per layer, and per head.

Read from the training forward of interval steps (the attention observer's `lambda_scale`, spec §2.2 step 5):
mean, p5, p50, p95 per layer every `interval` steps and the layer x head matrix of per-head means every
`heatmap_interval` steps. The raw-lambda ablation (spec §7.3 ablation 3) logs the same statistics of raw
lambda as `attn/lambda_raw_*`. DIFF V1's single lambda per layer (spec §3) is logged as `attn/lambda_v1/L..`.

Legend: B batch, N sequence, H output heads.
"""

from __future__ import annotations

import torch

from monitoring.callback import Callback, TrainContext, every

MAX_SAMPLES = 1 << 16  # values kept per layer and micro-batch for the quantiles (a strided subsample)
QUANTILES = {"p05": 0.05, "p50": 0.5, "p95": 0.95}


class LambdaMonitor(Callback):
    name = "lambdas"

    def __init__(self, interval: int, heatmap_interval: int):
        self.interval, self.heatmap_interval = interval, heatmap_interval
        self._values: dict[int, list[torch.Tensor]] = {}
        self._head_sums: dict[int, torch.Tensor] = {}
        self._v1: dict[int, torch.Tensor] = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.hub = ctx.observers
        self.levels = torch.tensor(list(QUANTILES.values()), device=ctx.device)
        a = ctx.cfg.model.attention
        self.prefix = "attn/lambda_raw" if a.lambda_mode == "raw" else "attn/lambda_sigmoid"
        self.active = a.variant in ("diffv2", "diffv1") and not (a.variant == "diffv2" and a.lambda_mode == "none")

    def on_step_start(self, step: int) -> None:
        if self.active and every(step, self.interval, self.last):
            self._values, self._head_sums, self._v1 = {}, {}, {}
            self.hub.watch_attention(self.name, self._observe)

    def _observe(self, layer_idx: int, stats: dict) -> None:
        if stats.get("lambda_full") is not None:
            self._v1[layer_idx] = stats["lambda_full"].detach().float()
        scale_BNH = stats.get("lambda_scale")
        if scale_BNH is None:
            return
        scale_BNH = scale_BNH.detach().float()
        flat = scale_BNH.reshape(-1)
        self._values.setdefault(layer_idx, []).append(flat[:: max(1, flat.numel() // MAX_SAMPLES)])
        head_H = scale_BNH.mean(dim=(0, 1))
        self._head_sums[layer_idx] = self._head_sums.get(layer_idx, 0) + head_H

    def on_train_end(self) -> None:
        self.hub.unwatch(self.name)  # a run that fails mid-step leaves no observer (or eager stance) behind

    def on_before_optimizer_step(self, step: int) -> dict:
        if not (self.active and every(step, self.interval, self.last)):
            return {}
        self.hub.unwatch(self.name)
        metrics = {f"attn/lambda_v1/L{layer:02d}": lam for layer, lam in sorted(self._v1.items())}
        levels = self.levels
        for layer, chunks in sorted(self._values.items()):
            values = torch.cat(chunks)
            tag = f"L{layer:02d}"
            metrics[f"{self.prefix}_mean/{tag}"] = (self._head_sums[layer] / len(chunks)).mean()  # exact
            for name, q in zip(QUANTILES, torch.quantile(values, levels)):
                metrics[f"{self.prefix}_{name}/{tag}"] = q
        if self._head_sums and every(step, self.heatmap_interval, self.last):
            rows = [self._head_sums[layer] / len(self._values[layer]) for layer in sorted(self._head_sums)]
            metrics[f"{self.prefix}_heads"] = torch.stack(rows)
        self._values, self._head_sums, self._v1 = {}, {}, {}
        return metrics
