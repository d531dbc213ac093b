"""Gradient norms: global pre/post clip, clip coefficient, per layer and per module kind; parameter norms and
the update/parameter ratio per layer.

Sharded correctness: every norm is a world-wide sum of squares of local pieces (`local_piece`, `bucket_sum_squares` in
diffv2/parallel/norms.py, whose docstring has the rules); meshes of expert-parallel shards come from the engine as
`TrainContext.disjoint`.

Post-clip norm and clip coefficient follow `torch.nn.utils.clip_grad_norm_`: coef = min(1, max / (norm + 1e-6)).

The update |params after - params before| needs the values before the step. A full copy is as large as the parameters
(12 GB for 3B fp32 parameters, on top of a step that may already fill the GPU: it put a 4-layer 30A3 model out of
memory on an 80 GB GPU at its first grad-norm step). Local pieces of at least `SAMPLE_MIN` elements keep only every
k-th element (`update_sample` = k, made coprime with the tensor's last dimension so every column and row is visited,
not every k-th column) and scale their sum of squares by numel / samples: an unbiased estimate of the update's norm
from >= 2^20 / k values per tensor. Parameter norms stay exact (they need no copy). k = 1 copies everything (exact).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from diffv2.parallel.norms import bucket_sum_squares, local_piece
from diffv2.train.callbacks import Callback, StepResult, TrainContext, every
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class GradNormMonitorConfig(MonitorConfig):
    """monitoring.grad_norms: grad/: pre/post-clip global norm, clip coefficient, norms per layer and per module kind."""

    interval: int = 10  # steps between measurements
    param_norms: bool = True  # also parameter norms and update/parameter ratio per layer
    # update norm of tensors >= 2^20 local elements from every k-th element (a transient copy of 1/k of them);
    # 1 = exact, a transient copy of all parameters at every reading
    update_sample: int = 16

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.update_sample < 1:
            raise ValueError(f"{key}.update_sample={self.update_sample} must be >= 1 (1 = exact, a full parameter "
                             f"copy; k keeps every k-th element of large tensors)")


KINDS = ("q", "k", "v", "o", "lambda", "mlp", "router", "experts", "embed", "norm", "other")
_LAYER = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
SAMPLE_MIN = 1 << 20  # local pieces this large keep a 1-in-k sample for the update norm (see module doc)


def kind_of(name: str) -> str:
    """Module kind of a parameter from its name (q/k/v/o/lambda projections, MLP, router, experts, ...)."""
    parts = name.split(".")
    if any(p == "router" for p in parts):
        return "router"
    if any(p == "experts" for p in parts):
        return "experts"
    if any(p.endswith("norm") or p == "subln" for p in parts[:-1]):
        return "norm"
    for proj, kind in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"), ("lambda_proj", "lambda")):
        if proj in parts:
            return kind
    if any(p.startswith("lambda_") for p in parts):  # DIFF V1 lambda_{q1,k1,q2,k2}
        return "lambda"
    if "mlp" in parts or any(p in ("gate_proj", "up_proj", "down_proj") for p in parts):
        return "mlp"
    if any(p in ("embed", "lm_head") for p in parts):
        return "embed"
    return "other"


def layer_of(name: str) -> Optional[int]:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def sample_stride(t: torch.Tensor, k: int) -> int:
    """The sampling stride for the update snapshot of local piece t: 1 (everything) below SAMPLE_MIN elements or
    for k = 1, else the smallest stride >= k coprime with t's last dimension."""
    if k == 1 or t.numel() < SAMPLE_MIN:
        return 1
    last = t.shape[-1] if t.dim() else 1
    while math.gcd(k, last) != 1:
        k += 1
    return k


def _sampled(t: torch.Tensor, stride: int) -> torch.Tensor:
    """Every `stride`-th element of t (t itself for stride 1): the update snapshot's view of a local piece."""
    return t if stride == 1 else t.reshape(-1)[::stride]


class GradNormMonitor(Callback):
    name = "grad_norms"

    def __init__(self, interval: int, param_norms: bool = True, update_sample: int = 16):
        GradNormMonitorConfig(interval=interval, update_sample=update_sample).validate("monitoring.grad_norms")
        self.interval, self.param_norms, self.update_sample = interval, param_norms, update_sample
        self._before: Optional[list[tuple[torch.Tensor, float, int]]] = None
        self._metrics: dict = {}
        self._plans: dict = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.ctx = ctx
        self.max_norm = ctx.cfg.optim.grad_clip
        self.params = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]
        self.kinds = [k for k in KINDS if any(kind_of(n) == k for n, _ in self.params)]
        self.layers = sorted({layer_of(n) for n, _ in self.params} - {None})

    def _buckets(self, name: str) -> list[int]:
        """Buckets: kinds [0, K), layers [K, K + L), everything at K + L."""
        k, layer = len(self.kinds), layer_of(name)
        out = [self.kinds.index(kind_of(name)), k + len(self.layers)]
        if layer is not None:
            out.append(k + self.layers.index(layer))
        return out

    def _named_grads(self) -> Iterable[tuple[str, object]]:
        if self.ctx.named_grads is not None:
            return self.ctx.named_grads()
        return ((n, p.grad) for n, p in self.params if p.grad is not None)

    def on_before_optimizer_step(self, step: int) -> dict:
        if not every(step, self.interval, self.last):
            return {}
        pieces = [(*local_piece(g, self.ctx.disjoint), self._buckets(n)) for n, g in self._named_grads()]
        sums = bucket_sum_squares(pieces, len(self.kinds) + len(self.layers) + 1, self.ctx.device, self._plans).sqrt()
        self._metrics = {f"grad/norm_kind/{k}": sums[i] for i, k in enumerate(self.kinds)}
        for i, layer in enumerate(self.layers):
            self._metrics[f"grad/norm_layer/L{layer:02d}"] = sums[len(self.kinds) + i]
        if self.param_norms:
            self._before = []
            for _, p in self.params:
                t, w = local_piece(p, self.ctx.disjoint)
                stride = sample_stride(t, self.update_sample)
                sample = _sampled(t, stride)
                # weight x numel / samples: the sample's sum of squares estimates the whole tensor's
                self._before.append((sample.clone(), w * t.numel() / max(sample.numel(), 1), stride))
        return {}

    def on_step_end(self, result: StepResult) -> dict:
        if not every(result.step, self.interval, self.last):
            return {}
        metrics, self._metrics = self._metrics, {}
        norm = result.grad_norm.detach().float()
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0) if self.max_norm else torch.ones_like(norm)
        metrics.update({"grad/norm_clipped": norm * coef, "grad/clip_coef": coef})
        if self._before is not None:
            metrics.update(self._param_metrics())
        return metrics

    def _param_metrics(self) -> dict:
        """Parameter norm after the step and |update| / |param| per layer (update = params after - before)."""
        before, self._before = self._before, None
        nl = len(self.layers)

        def buckets(name, offset):  # layers [0, L), everything at L; params first, updates after
            layer = layer_of(name)
            return [offset + nl] + ([offset + self.layers.index(layer)] if layer is not None else [])

        now = [local_piece(p, self.ctx.disjoint) for _, p in self.params]
        olds = [old for old, _, _ in before]
        torch._foreach_sub_(olds, [_sampled(t, k) for (t, _), (_, _, k) in zip(now, before)])
        pieces = []  # olds now hold -update (or a sample of it): same norm
        for (name, _), (t, w), (old, w_old, _) in zip(self.params, now, before):
            pieces += [(t, w, buckets(name, 0)), (old, w_old, buckets(name, nl + 1))]
        sums = bucket_sum_squares(pieces, 2 * (nl + 1), self.ctx.device, self._plans).sqrt()
        params, updates = sums[: nl + 1], sums[nl + 1 :]
        metrics = {"grad/param_norm": params[nl], "grad/update_ratio": updates[nl] / params[nl]}
        for i, layer in enumerate(self.layers):
            metrics[f"grad/param_norm_layer/L{layer:02d}"] = params[i]
            metrics[f"grad/update_ratio_layer/L{layer:02d}"] = updates[i] / params[i]
        return metrics


# Parameter norms read the parameters between steps: off when the engine empties them (ZeRO-3).
SPEC = MonitorSpec("grad_norms", GradNormMonitorConfig, order=10, build=lambda c, env: GradNormMonitor(
    c.interval, c.param_norms and env.params_readable, c.update_sample))
