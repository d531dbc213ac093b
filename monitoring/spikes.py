"""Loss-spike detection on the loss and the grad norm (OLMo-core's stability monitor, spec A17 (iv)).

A value is a spike when it exceeds mean + k * std of the previous `window` accepted values (defaults k = 6,
window = 128), once `warmup_steps` values have been seen. Non-finite values are always spikes. A spike enters
the window clipped to mean + k * std (winsorised): one spike cannot hide the next by inflating the std, and a
genuine level shift is still followed after a while. Each step records (loss, grad norm) on the device; every
`interval` steps the host reads them in one copy, runs the detector over them in order, writes the events
(step, loss, grad norm, z-scores, the batch's global sample indices) to `spikes.jsonl` and a W&B Table, and
logs `spike/score`, the share of spike steps over the last `score_window` steps.

Actions (off by default): `skip_step` undoes the optimizer step of a spike step on the device
(diffv2/train/step_undo.py); the detector then runs on the device every step, since the decision is needed
before the next step, still without host synchronisation. `stop` saves a checkpoint and stops at the next host
read after a spike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from diffv2.train.callbacks import Callback, StepResult, Table, TrainContext, every
from diffv2.train.sink import rewind_jsonl
from diffv2.train.step_undo import StepUndo
from diffv2.train.validate import positive
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class SpikeMonitorConfig(MonitorConfig):
    """monitoring.spikes: spike/: loss and grad-norm spike detection, spike score, spikes.jsonl event log."""

    interval: int = 10  # steps between host reads: detection over the recorded steps, events, metrics, stop
    k: float = 6.0  # a value is a spike when it exceeds mean + k * std of the window
    window: int = 128  # past values in the rolling mean and std
    warmup_steps: int = 64  # steps observed before any value can be flagged
    score_window: int = 1000  # steps over which spike/score is the share of spike steps
    skip_step: bool = False  # action: undo the optimizer step of a spike step (params and optimizer state restored)
    stop: bool = False  # action: save a checkpoint and stop at the first host read after a spike

    def validate(self, key: str) -> None:
        super().validate(key)
        positive(f"{key}.k", self.k)
        positive(f"{key}.score_window", self.score_window)
        if self.window < 2:
            raise ValueError(f"{key}.window={self.window} must be >= 2 (the rolling std needs two values)")
        if self.warmup_steps < 2:
            raise ValueError(f"{key}.warmup_steps={self.warmup_steps} must be >= 2 so the window has a std")


EVENT_COLUMNS = ["step", "loss", "grad_norm", "loss_z", "grad_norm_z", "signal", "skipped", "sample_indices"]


class RollingSpikeDetector:
    """Device-resident rolling mean/std test on S signals at once (about a dozen small kernels per update).

    The host mirrors the count (one value per update), so ring indices and the warm-up test need no device read.
    Legend: W window, S signals.
    """

    def __init__(self, k: float, window: int, warmup_steps: int, device: torch.device, signals: int = 1):
        self.k, self.window, self.warmup = k, window, warmup_steps
        self.values_WS = torch.zeros(window, signals, dtype=torch.float64, device=device)
        self.seen = 0

    def update(self, x_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_spike (S,) bool, z-score (S,)) of x against the window, then push x (winsorised)."""
        x_S = x_S.detach().to(self.values_WS.device, torch.float64).reshape(-1)
        finite_S = torch.isfinite(x_S)
        n = min(self.seen, self.window)
        if n >= 2:
            past_NS = self.values_WS[:n]
            mean_S, std_S = past_NS.mean(0), past_NS.std(0).clamp_min(1e-12)
            z_S = torch.where(finite_S, (x_S - mean_S) / std_S, float("inf"))
            upper_S = torch.add(mean_S, std_S, alpha=self.k)
            accepted_S = torch.where(finite_S, torch.minimum(x_S, upper_S), upper_S)
        else:
            z_S, accepted_S = torch.zeros_like(x_S), torch.where(finite_S, x_S, 0.0)
        if self.seen < self.warmup:  # no decisions yet; values enter unclipped while the std forms
            spike_S = torch.zeros_like(finite_S)
            accepted_S = torch.where(finite_S, x_S, accepted_S)
        else:
            spike_S = z_S > self.k
        self.values_WS[self.seen % self.window] = accepted_S
        self.seen += 1
        return spike_S, z_S

    def state_dict(self) -> dict:
        return {"values": self.values_WS.cpu().clone(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.values_WS.copy_(state["values"])
        self.seen = int(state["seen"])


class SpikeMonitor(Callback):
    name = "spikes"

    def __init__(self, interval: int, k: float = 6.0, window: int = 128, warmup_steps: int = 64,
                 score_window: int = 1000, skip_step: bool = False, stop: bool = False):
        self.interval, self.k, self.window, self.warmup = interval, k, window, warmup_steps
        self.score_window, self.skip_step, self.stop = score_window, skip_step, stop
        self._state: Optional[dict] = None
        # (row, decided, step, first sample, batch size); row = x (2,) until decided, then _decide's (7,) row
        self._pending: list[tuple[torch.Tensor, bool, int, int, int]] = []
        self.counts = {"loss": 0, "grad_norm": 0, "any": 0, "skipped": 0}
        self._stop_reason: Optional[str] = None

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        # Skipping decides before the next step, so on the device; otherwise decisions wait for the host read
        # and run there, leaving two kernels per step on the device.
        dev = ctx.device if self.skip_step else torch.device("cpu")
        self.detector = RollingSpikeDetector(self.k, self.window, self.warmup, dev, signals=2)  # loss, grad norm
        self.flags_S = torch.zeros(self.score_window, dtype=torch.float32, device=dev)
        self._not_skipped = torch.zeros(1, dtype=torch.float64, device=dev)
        self.steps = 0
        self.undo = StepUndo(ctx.model, ctx.optimizer) if self.skip_step else None
        self.path = Path(ctx.run_dir) / "spikes.jsonl"
        if self._state is not None:
            self._restore(self._state)
        self.path.touch()  # the event log exists even when nothing spiked
        rewind_jsonl(self.path, ctx.start_step)  # a resume rewinds the event log to the checkpoint, like metrics.jsonl

    def on_before_optimizer_step(self, step: int) -> dict:
        if self.undo is not None and self.detector.seen >= self.warmup:
            self.undo.snapshot()
        return {}

    def on_step_end(self, result: StepResult) -> dict:
        x_2 = torch.stack([result.loss.detach().reshape(()), result.grad_norm.detach().reshape(()).to(result.loss)])
        decided = self.undo is not None
        row = self._decide(x_2, undo=self.detector.seen >= self.warmup) if decided else x_2
        self._pending.append((row, decided, result.step, result.sample_index, result.batch_size))
        return self.flush() if every(result.step, self.interval, self.last) else {}

    def _decide(self, x_2: torch.Tensor, undo: bool = False) -> torch.Tensor:
        """Run the detector on one step: row [loss, grad norm, their z, their spike flags, skipped]."""
        spike_2, z_2 = self.detector.update(x_2)
        spike = spike_2.any()
        skipped = self.undo.restore_if(spike).double().reshape(1) if undo else self._not_skipped
        self.flags_S[self.steps % self.score_window] = spike
        self.steps += 1
        return torch.cat([x_2.to(z_2), z_2, spike_2.double(), skipped])

    def flush(self) -> dict:
        """Read the pending steps to the host (the only synchronisation), write events, return metrics."""
        if not self._pending:
            return {}
        self._decide_pending()
        rows = torch.stack([r for r, *_ in self._pending]).cpu().tolist()
        events = []
        for (loss, gn, lz, gz, ls, gs, sk), (*_, step, first, size) in zip(rows, self._pending):
            if not (ls or gs):
                continue
            signal = "+".join(name for name, hit in (("loss", ls), ("grad_norm", gs)) if hit)
            events.append({"step": step, "loss": loss, "grad_norm": gn, "loss_z": lz, "grad_norm_z": gz,
                           "signal": signal, "skipped": bool(sk), "sample_indices": list(range(first, first + size))})
            self.counts["loss"] += bool(ls)
            self.counts["grad_norm"] += bool(gs)
            self.counts["any"] += 1
            self.counts["skipped"] += bool(sk)
        self._pending = []
        if events:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(e, allow_nan=True) + "\n" for e in events)
            if self.stop:
                e = events[0]
                self._stop_reason = f"{e['signal']} spike at step {e['step']} (monitoring.spikes.stop=true)"
        n = min(self.steps, self.score_window)
        metrics = {"spike/loss_z": rows[-1][2], "spike/grad_norm_z": rows[-1][3],
                   "spike/score": self.flags_S[:n].mean(), "spike/count": self.counts["any"],
                   "spike/loss_count": self.counts["loss"], "spike/grad_norm_count": self.counts["grad_norm"]}
        if self.undo is not None:
            metrics["spike/skipped"] = self.counts["skipped"]
        if events:
            metrics["spike/events"] = Table(EVENT_COLUMNS, [[e[c] for c in EVENT_COLUMNS] for e in events])
        return metrics

    def _decide_pending(self) -> None:
        """Decide the recorded steps in order (one copy of their values to the host when deferred)."""
        undecided = [i for i, (_, decided, *_) in enumerate(self._pending) if not decided]
        if undecided:
            values = torch.stack([self._pending[i][0] for i in undecided]).to(self.detector.values_WS.device)
            for i, x_2 in zip(undecided, values):
                self._pending[i] = (self._decide(x_2), True, *self._pending[i][2:])

    def should_stop(self) -> Optional[str]:
        return self._stop_reason

    def state_dict(self) -> dict:
        pending = [(row.cpu(), *info) for row, *info in self._pending]  # steps not yet read survive a resume
        return {"detector": self.detector.state_dict(),
                "flags": self.flags_S.cpu().clone(), "steps": self.steps, "counts": dict(self.counts),
                "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        self._state = state  # applied in on_train_start, once the detectors exist on their device

    def _restore(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.flags_S.copy_(state["flags"])
        self.steps = int(state["steps"])
        self.counts = dict(state["counts"])
        self._pending = [(row.to(self.flags_S.device), *info) for row, *info in state["pending"]]
        self._decide_pending()  # before any new step, whichever mode wrote them


SPEC = MonitorSpec("spikes", SpikeMonitorConfig, order=0, build=lambda c, env: SpikeMonitor(
    c.interval, c.k, c.window, c.warmup_steps, c.score_window, c.skip_step, c.stop))
