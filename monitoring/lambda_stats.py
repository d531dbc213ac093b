"""DIFF V2 lambda: the distribution of sigmoid(lambda) over tokens and heads per layer, and per head.

Read from the training forward of interval steps (the attention observer's `lambda_scale`, spec §2.2 step 5):
mean, p5, p50, p95 per layer every `interval` steps and the layer x head matrix of per-head means every
`heatmap_interval` steps. The raw-lambda ablation (spec §7.3 ablation 3) logs the same statistics of raw
lambda as `attn/lambda_raw_*`. DIFF V1's single lambda per layer (spec §3) is logged as `attn/lambda_v1/L..`.

What the statistics are (the same with one process or under data / tensor parallelism):
- `_mean/L..` and `_heads`: means over every token of the step's global batch (exact), over all heads for the
  former, per head for the latter. Each rank keeps per-head token-weighted sums on the device; `monitoring/ranks.py`
  joins the tensor-parallel head shards and adds the data-parallel ranks' sums in one all-gather.
- `_p05/_p50/_p95/L..`: `torch.quantile` (linear interpolation) of the values, all heads, of a token subsample:
  from each micro-batch of T tokens every s-th token (row-major over batch and position), s = max(1, M*T*H //
  MAX_SAMPLES), with M = global_batch_size / micro_batch_size the micro-batches of the step over all data-parallel
  ranks and H all heads of the layer, so at most about 2 * MAX_SAMPLES values per layer and step. The ranks'
  samples are gathered in the same all-gather (head shards joined, data-parallel samples pooled): the sample is the
  one a single process takes with the same micro_batch_size, and the quantiles are its quantiles (up to float noise
  in the lambda values themselves). Every token while M*T*H <= MAX_SAMPLES.
- DIFF V1's lambda is a function of four parameters, replicated on every rank (FSDP gathers them for the forward,
  tensor parallelism keeps them Replicate): each rank computes the same value and no collective is needed.

Legend: B batch, N sequence, H output heads (this rank's under tensor parallelism), K sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffv2.train.callbacks import Callback, TrainContext, every
from monitoring.ranks import over_ranks
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class LambdaMonitorConfig(MonitorConfig):
    """monitoring.lambdas: attn/lambda_*: sigmoid(lambda) mean/p5/p50/p95 per layer (DIFF V2), lambda (DIFF V1)."""

    interval: int = 100  # steps between measurements
    heatmap_interval: int = 500  # steps between layer x head matrices of the per-head mean (a multiple of interval)

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.heatmap_interval <= 0 or self.heatmap_interval % self.interval:
            raise ValueError(f"{key}.heatmap_interval={self.heatmap_interval} must be a positive multiple of "
                             f"{key}.interval={self.interval}")


MAX_SAMPLES = 1 << 16  # sigmoid(lambda) values per layer and step for the quantiles, over all ranks (about)
QUANTILES = {"p05": 0.05, "p50": 0.5, "p95": 0.95}


class LambdaMonitor(Callback):
    name = "lambdas"

    def __init__(self, interval: int, heatmap_interval: int):
        self.interval, self.heatmap_interval = interval, heatmap_interval
        self._samples: dict[int, list[torch.Tensor]] = {}  # per layer: (K, H) rows of sampled tokens
        self._head_sums: dict[int, torch.Tensor] = {}  # per layer: token-weighted sums (H,)
        self._tokens: dict[int, int] = {}
        self._v1: dict[int, torch.Tensor] = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.hub = ctx.observers
        self.levels = torch.tensor(list(QUANTILES.values()), device=ctx.device)
        self.tp = getattr(getattr(ctx.cfg, "parallel", None), "tp", 1)  # ranks per tensor-parallel group
        t = ctx.cfg.trainer
        self.micro_batches = max(1, t.global_batch_size // t.micro_batch_size)  # per step, all data-parallel ranks
        a = ctx.cfg.model.attention
        self.prefix = "attn/lambda_raw" if a.lambda_mode == "raw" else "attn/lambda_sigmoid"
        self.active = a.variant in ("diffv2", "diffv1") and not (a.variant == "diffv2" and a.lambda_mode == "none")

    def _reset(self) -> None:
        self._samples, self._head_sums, self._tokens, self._v1 = {}, {}, {}, {}

    def on_step_start(self, step: int) -> None:
        if self.active and every(step, self.interval, self.last):
            self._reset()
            self.hub.watch_attention(self.name, self._observe)

    def _observe(self, layer_idx: int, stats: dict) -> None:
        if stats.get("lambda_full") is not None:
            self._v1[layer_idx] = stats["lambda_full"].detach().float()
        scale_BNH = stats.get("lambda_scale")
        if scale_BNH is None:
            return
        scale_TH = scale_BNH.detach().float().reshape(-1, scale_BNH.shape[-1])  # tokens x this rank's heads
        tokens, heads = scale_TH.shape[0], scale_TH.shape[1] * self.tp
        stride = max(1, self.micro_batches * tokens * heads // MAX_SAMPLES)  # same tokens on every layout
        self._samples.setdefault(layer_idx, []).append(scale_TH[::stride])
        weighted_H = scale_TH.sum(0)
        self._head_sums[layer_idx] = self._head_sums[layer_idx] + weighted_H if layer_idx in self._head_sums \
            else weighted_H
        self._tokens[layer_idx] = self._tokens.get(layer_idx, 0) + tokens

    def on_train_end(self) -> None:
        self.hub.unwatch(self.name)  # a run that fails mid-step leaves no observer behind

    def on_before_optimizer_step(self, step: int) -> dict:
        if not (self.active and every(step, self.interval, self.last)):
            return {}
        self.hub.unwatch(self.name)
        metrics = {f"attn/lambda_v1/L{layer:02d}": lam for layer, lam in sorted(self._v1.items())}
        layers = sorted(self._head_sums)
        heads, samples = over_ranks([self._head_sums[k] for k in layers], [self._tokens[k] for k in layers], self.tp,
                                    [torch.cat(self._samples[k]) for k in layers])
        for layer, head_H, sample_KH in zip(layers, heads, samples):
            tag = f"L{layer:02d}"
            metrics[f"{self.prefix}_mean/{tag}"] = head_H.mean()  # exact: every head counts the same tokens
            for name, q in zip(QUANTILES, torch.quantile(sample_KH.reshape(-1), self.levels)):
                metrics[f"{self.prefix}_{name}/{tag}"] = q
        if layers and every(step, self.heatmap_interval, self.last):
            metrics[f"{self.prefix}_heads"] = torch.stack(heads)
        self._reset()
        return metrics


SPEC = MonitorSpec("lambdas", LambdaMonitorConfig, order=40,
                  build=lambda c, env: LambdaMonitor(c.interval, c.heatmap_interval))
