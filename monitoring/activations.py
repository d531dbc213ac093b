"""Residual-stream outliers at each block output (spec §7.5: hidden states "at the output of each layer").

On interval steps the block observer is armed for that step's forward passes; statistics are reduced on device
inside the graph (no host synchronisation) and combined over the observed micro-batches (the first
`monitoring.observed_micro_batches` of the step; 0 = all): max |h| and the top-k tokens' max
|h| (the V1 paper reports top-1/2/3; per token, since a top-k over every entry of a large batch costs more
than the rest of the statistics together), kurtosis E[(x - mu)^4] / var^2 over all entries (Pearson: 3 for a
Gaussian) and the share of entries with |x| > 6 std. Kurtosis and the share are averaged over the observed
micro-batches.

Legend: B batch, N sequence, M d_model, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffv2.parallel import dist as pdist
from diffv2.train.callbacks import Callback, TrainContext, every
from diffv2.train.validate import positive
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class ActivationMonitorConfig(MonitorConfig):
    """monitoring.activations: act/: residual-stream max|h|, top-k, kurtosis, share of |x| > 6 std at each block output."""

    interval: int = 100  # steps between measurements (computed in the training forward of that step)
    top_k: int = 3  # largest |h| values logged per layer (V1 paper reports top-1/2/3, spec §7.5)

    def validate(self, key: str) -> None:
        super().validate(key)
        positive(f"{key}.top_k", self.top_k)


def residual_stats(x: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Outlier statistics of x (..., M) as 0-d/1-d fp32 device tensors; top_k ranks tokens by their max |x|."""
    x = x.detach().float()
    token_max_T = x.abs().amax(-1).reshape(-1) if x.ndim > 1 else x.abs()
    x = x.reshape(-1)
    abs_x = x.abs()
    mean = x.mean()
    centred = x - mean
    var = centred.square().mean()
    std = var.sqrt()
    return {
        "top_k": token_max_T.topk(min(top_k, token_max_T.numel())).values,
        "kurtosis": centred.pow(4).mean() / var.square(),
        "frac_gt_6std": (abs_x > 6 * std).float().mean(),
    }


class ActivationMonitor(Callback):
    name = "activations"

    def __init__(self, interval: int, top_k: int = 3):
        self.interval, self.top_k = interval, top_k
        self._per_layer: dict[int, list[dict]] = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.hub = ctx.observers
        self.tp = getattr(getattr(ctx.cfg, "parallel", None), "tp", 1)  # ranks per tensor-parallel group

    def on_step_start(self, step: int) -> None:
        if every(step, self.interval, self.last):
            self._per_layer = {}
            self.hub.watch_blocks(self.name, self._observe)

    def _observe(self, layer_idx: int, x_BNM: torch.Tensor) -> None:
        self._per_layer.setdefault(layer_idx, []).append(residual_stats(x_BNM, self.top_k))

    def on_train_end(self) -> None:
        self.hub.unwatch(self.name)  # a run that fails mid-step leaves no observer behind

    def on_before_optimizer_step(self, step: int) -> dict:
        if not every(step, self.interval, self.last):
            return {}
        self.hub.unwatch(self.name)
        layers = sorted(self._per_layer)
        if not layers:
            return {}
        per = [self._per_layer[layer] for layer in layers]
        tops_LK = torch.stack([torch.cat([s["top_k"] for s in stats]).topk(len(stats[0]["top_k"])).values
                               for stats in per])
        means_L2 = torch.stack([torch.stack([torch.stack([s[k] for s in stats]).mean()
                                             for k in ("kurtosis", "frac_gt_6std")]) for stats in per])
        tops_LK, means_L2 = _over_ranks(tops_LK, means_L2, self.tp)
        metrics = {}
        for i, layer in enumerate(layers):
            tag, top = f"L{layer:02d}", tops_LK[i]
            metrics[f"act/max_abs/{tag}"] = top[0]
            metrics.update({f"act/top{j + 1}_abs/{tag}": top[j] for j in range(1, len(top))})
            metrics[f"act/kurtosis/{tag}"] = means_L2[i, 0]
            metrics[f"act/frac_gt_6std/{tag}"] = means_L2[i, 1]
        self._per_layer = {}
        return metrics


def _over_ranks(tops_LK: torch.Tensor, means_L2: torch.Tensor, tp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Data parallelism: the top-k over every rank's tokens, the mean of the ranks' means (device collectives,
    queued without a host wait). The `tp` ranks of a tensor-parallel group hold the same activations: one copy of
    each group enters the top-k (ranks are tp-innermost); the mean is unchanged by the equal copies."""
    import torch.distributed as dist

    world = pdist.world_size()
    if world == 1:
        return tops_LK, means_L2
    gathered = [torch.empty_like(tops_LK) for _ in range(world)]
    dist.all_gather(gathered, tops_LK.contiguous())
    k = tops_LK.shape[1]
    tops_LK = torch.cat(gathered[::tp], dim=1).topk(k, dim=1).values
    means_L2 = means_L2.clone()
    dist.all_reduce(means_L2)
    return tops_LK, means_L2 / world


SPEC = MonitorSpec("activations", ActivationMonitorConfig, order=20,
                  build=lambda c, env: ActivationMonitor(c.interval, c.top_k))
