"""Per-head context RMS before o_proj (spec §6): RMS(c) = sqrt(|c|^2 / d) per token and head, averaged over
tokens, for every layer x head.

DIFF V2 logs the context after the subtraction (`context_rms`) and each map's own output (`_a1`, `_a2`); the
baseline logs its plain head outputs. Every `interval` steps: mean/min/max over heads per layer; every
`heatmap_interval` steps the full layer x head matrices. Reference values are logged beside them so plots can
be read (spec §6.1, §6.3, A18), averaged over query positions t exactly like the metric (position t sees
t + 1 tokens under the causal mask):
- `attn/context_rms_uniform_ref` = mean_t 1/sqrt(t+1), what a softmax head with uniform attention gives
  (the softmax floor 1/sqrt(n));
- `attn/context_rms_floor/L..` (DIFF V2) = mean over tokens and heads of |1 - s|/sqrt(t+1), the per-token floor
  (1 - sigma)/sqrt(n) with s = sigma(lambda) (|.| keeps it a valid bound for the raw-lambda ablation).
Both assume values with unit RMS that are mutually orthogonal, the spec's idealisation; `attn/value_rms/L..`
(mean RMS of the value heads v_proj(x), on the probe batch at the same weights) gives the scale to divide by
before comparing (trained values are also correlated, which lifts uniform attention above 1/sqrt(n)).

Under data / tensor parallelism the values equal one process's over the same global batch: each rank keeps per-head
token-weighted sums (and its token counts) on the device; on interval steps one all-gather, which every rank
enters, collects them. The `tp` ranks of a tensor-parallel group see the same tokens but hold different heads
(contiguous shards, ranks tp-innermost): their head vectors are concatenated into the full head dimension, then
the data-parallel groups' sums are added and divided by their summed token counts (`monitoring/ranks.py`). No
host wait.

Legend: B batch, N sequence, H heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffv2.train.callbacks import Callback, TrainContext, every
from monitoring.ranks import over_ranks
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class ContextRMSMonitorConfig(MonitorConfig):
    """monitoring.context_rms: attn/context_rms*: per-head RMS of the context before o_proj (spec §6)."""

    interval: int = 100  # steps between per-layer mean/min/max over heads
    heatmap_interval: int = 500  # steps between full layer x head matrices (a multiple of interval)

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.heatmap_interval <= 0 or self.heatmap_interval % self.interval:
            raise ValueError(f"{key}.heatmap_interval={self.heatmap_interval} must be a positive multiple of "
                             f"{key}.interval={self.interval}")


def context_rms_H(ctx_BNHD: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions of sqrt(|c|^2 / d), per head: (H,)."""
    return ctx_BNHD.detach().float().square().mean(-1).sqrt().mean(dim=(0, 1))


def inverse_sqrt_visible_N(n: int, device) -> torch.Tensor:
    """1/sqrt(t + 1) for query positions t < n: the uniform-attention context RMS under a causal mask."""
    return torch.arange(1, n + 1, device=device, dtype=torch.float32).rsqrt()


def floor_H(scale_BNH: torch.Tensor) -> torch.Tensor:
    """Mean of |1 - s| / sqrt(t + 1) over batch and positions, per head: (H,) (spec §6.3 per-token floor)."""
    inv_N = inverse_sqrt_visible_N(scale_BNH.shape[1], scale_BNH.device)
    return ((1 - scale_BNH.detach().float()).abs() * inv_N[None, :, None]).mean(dim=(0, 1))


class ContextRMSMonitor(Callback):
    name = "context_rms"

    def __init__(self, interval: int, heatmap_interval: int):
        self.interval, self.heatmap_interval = interval, heatmap_interval
        self._sums: dict[tuple[str, int], torch.Tensor] = {}  # per head: token-weighted sums (H,)
        self._counts: dict[tuple[str, int], int] = {}  # tokens behind each sum

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.hub, self.probe = ctx.observers, ctx.probe
        self.tp = getattr(getattr(ctx.cfg, "parallel", None), "tp", 1)  # ranks per tensor-parallel group
        self.uniform_ref = inverse_sqrt_visible_N(ctx.cfg.data.seq_len, "cpu").mean().item()

    def on_step_start(self, step: int) -> None:
        if every(step, self.interval, self.last):
            self._sums, self._counts = {}, {}
            self.hub.watch_attention(self.name, self._observe)
            if self.probe is not None:
                self.probe.request(self.name, self._value_rms)

    def _value_rms(self, attn, x_BNM: torch.Tensor) -> None:
        width = attn.head_dim * (2 if attn.variant == "diffv1" else 1)  # DIFF V1 values are 2d wide (spec §3)
        v = torch.nn.functional.linear(x_BNM, attn.v_proj.weight.float()).unflatten(-1, (-1, width))
        self._add("value_rms", attn.layer_idx, context_rms_H(v), v.shape[0] * v.shape[1])

    def _add(self, key: str, layer: int, mean_H: torch.Tensor, tokens: int) -> None:
        """Accumulate a per-head mean over `tokens` tokens as a token-weighted sum."""
        k = (key, layer)
        weighted = mean_H * tokens
        self._sums[k] = self._sums[k] + weighted if k in self._sums else weighted
        self._counts[k] = self._counts.get(k, 0) + tokens

    def _observe(self, layer_idx: int, stats: dict) -> None:
        ctx_BNHD = stats["context"]
        tokens = ctx_BNHD.shape[0] * ctx_BNHD.shape[1]
        self._add("context_rms", layer_idx, context_rms_H(ctx_BNHD), tokens)
        if stats.get("attn1") is not None:
            self._add("context_rms_a1", layer_idx, context_rms_H(stats["attn1"]), tokens)
            self._add("context_rms_a2", layer_idx, context_rms_H(stats["attn2"]), tokens)
            scale = stats.get("lambda_scale")
            if scale is None:  # ablation 2: sigma == 1, the floor is 0
                scale = stats["attn1"].new_ones(stats["attn1"].shape[:3])
            self._add("context_rms_floor", layer_idx, floor_H(scale), tokens)

    def on_train_end(self) -> None:
        self.hub.unwatch(self.name)  # a run that fails mid-step leaves no observer behind

    def on_before_optimizer_step(self, step: int) -> dict:
        if not every(step, self.interval, self.last):
            return {}
        self.hub.unwatch(self.name)
        if self.probe is not None:
            self.probe.run()  # at the weights of this step's forward, before the optimizer moves them
        metrics = {"attn/context_rms_uniform_ref": self.uniform_ref}
        matrices: dict[str, list] = {}
        entries = sorted(self._sums)
        means, _ = over_ranks([self._sums[k] for k in entries], [self._counts[k] for k in entries], self.tp)
        for (key, layer), per_head in zip(entries, means):
            tag = f"L{layer:02d}"
            if key in ("context_rms_floor", "value_rms"):  # means over tokens and heads
                metrics[f"attn/{key}/{tag}"] = per_head.mean()
                continue
            metrics[f"attn/{key}_mean/{tag}"] = per_head.mean()
            metrics[f"attn/{key}_min/{tag}"] = per_head.min()
            metrics[f"attn/{key}_max/{tag}"] = per_head.max()
            matrices.setdefault(key, []).append(per_head)
        if every(step, self.heatmap_interval, self.last):
            metrics.update({f"attn/{key}_heads": torch.stack(rows) for key, rows in matrices.items()})
        self._sums, self._counts = {}, {}
        return metrics


SPEC = MonitorSpec("context_rms", ContextRMSMonitorConfig, order=30,
                  build=lambda c, env: ContextRMSMonitor(c.interval, c.heatmap_interval))
