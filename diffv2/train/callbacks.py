"""The one interface between the training loop and every monitor (OLMo-core style callbacks).

This module defines the loop <-> callback protocol (the core's side); the monitors themselves live in monitoring/
and are plugged in by the composition root (train.py).

The loop calls these hooks in order each step; a monitor does its work only on its own interval and returns
metrics as a dict (values may be device tensors: the loop converts them with `to_host` on steps that log
only, in one transfer, so monitors cause no host synchronisation on other steps). Monitors see the model, the
optimizer object and the step's results, never the engine's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch

from diffv2.config import MonitoringConfig
if TYPE_CHECKING:  # imported when a context is built: the monitors' configs load without the model code
    from diffv2.parallel.norms import DisjointMeshes
    from diffv2.train.observers import ObserverHub, ProbeBatch


@dataclass
class TrainContext:
    """What monitors may read, built once by the trainer."""

    cfg: Any  # the full Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run_dir: Path
    device: torch.device
    flops_per_token: float
    tokens_per_step: int
    start_step: int = 0  # optimizer steps already taken (> 0 after a resume)
    autocast_dtype: Optional[torch.dtype] = None  # the training forward's autocast (probe passes use the same)
    probe_tokens: Optional[torch.Tensor] = None  # a fixed validation batch (B, N+1) for probe statistics
    # (name, local gradient tensor) pairs; None = the model's param.grad. An engine that keeps gradients outside
    # param.grad (DeepSpeed ZeRO partitions) supplies its local shards here (see diffv2/parallel/norms.py).
    named_grads: Optional[Callable[[], Iterable[tuple[str, torch.Tensor]]]] = None
    disjoint: Optional[DisjointMeshes] = None  # the engine's expert-parallel meshes (diffv2/parallel/norms.py)
    observers: ObserverHub = field(init=False)
    probe: Optional[ProbeBatch] = field(init=False)

    def __post_init__(self):
        from diffv2.train.observers import ObserverHub, ProbeBatch

        self.observers = ObserverHub(self.model)
        tokens = self.probe_tokens
        self.probe = ProbeBatch(self.model, tokens, self.observers, self.autocast_dtype) if tokens is not None else None


@dataclass
class StepResult:
    step: int  # 1-based index of the optimizer step just taken
    loss: torch.Tensor  # mean cross-entropy of the step (device scalar)
    grad_norm: torch.Tensor  # global grad norm before clipping (device scalar)
    lr: float
    sample_index: int  # index of the step's first sample in the global data order
    batch_size: int = 0  # samples in the step (global batch): the step read samples [sample_index, +batch_size)
    data_time_s: float = 0.0  # host seconds spent waiting for batches in this step


@dataclass
class Table:
    """Rows for a W&B Table (the sink appends them); in metrics.jsonl a list of {column: value} dicts."""

    columns: list[str]
    rows: list[list]


class Callback:
    name = "callback"  # key of this monitor's state in the checkpoint's trainer_state["monitors"]

    def on_train_start(self, ctx: TrainContext) -> None:
        """Called once after the model, optimizer and data are built (and restored on resume)."""

    def on_step_start(self, step: int) -> None:
        """Before the forward passes of optimizer step `step` (1-based); arm observers here."""

    def on_before_optimizer_step(self, step: int) -> dict:
        """Gradients are complete and not yet clipped; forward passes of this step are done."""
        return {}

    def on_step_end(self, result: StepResult) -> dict:
        """After the optimizer step; return metrics to log at this step."""
        return {}

    def should_stop(self) -> Optional[str]:
        """A reason to save a checkpoint and stop after this step, or None (asked after on_step_end)."""
        return None

    def on_train_end(self) -> None:
        """After the last step (also on error)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# (cfg.monitoring, trainer.log_interval, engine.params_readable) -> the monitors, in hook order
MonitorFactory = Callable[[MonitoringConfig, int, bool], list[Callback]]


@dataclass(frozen=True)
class Instrumentation:
    """What the composition root (train.py) plugs into the trainer; the core never imports monitoring/."""

    build_monitors: MonitorFactory = lambda cfg, log_interval, params_readable: []  # default: no monitors
    render_matrix: Optional[Callable[[list, str], Any]] = None  # nested-list metric -> image for W&B


def every(step: int, interval: int, last: int = 0) -> bool:
    """True on multiples of `interval` and on the run's last step `last` (so every run ends with a reading)."""
    return interval > 0 and (step % interval == 0 or step == last)


def to_host(metrics: dict) -> dict:
    """Device tensors -> floats (0-d) or nested lists: one concatenation and one device-to-host copy per (device,
    dtype) group of values, never one per value (a copy per value waits for the device once per value)."""
    groups: dict[tuple, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            groups.setdefault((v.device, v.dtype), []).append(k)
    out = dict(metrics)
    for keys in groups.values():
        tensors = [metrics[k].detach() for k in keys]
        flat = torch.cat([t.reshape(-1) for t in tensors]).cpu().to(torch.float64)
        offset = 0
        for k, t in zip(keys, tensors):
            chunk = flat[offset : offset + t.numel()]
            offset += t.numel()
            out[k] = chunk.item() if t.ndim == 0 else chunk.view(t.shape).tolist()
    return out
