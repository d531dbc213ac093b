"""The training loop's components: one optimizer step, the logged loss window, the validation pass, the run's
output (metrics file, W&B, console) and the callback list. diffv2/train/trainer.py builds them and its loop calls them in
this order per step:

    callbacks.on_step_start -> TrainStep (micro-batches, backward, callbacks.on_before_optimizer_step, optimizer step
    with the non-finite guard) -> callbacks.on_step_end -> LossWindow -> RunOutput.log -> Validation (when due) ->
    stop agreement (every callback's should_stop, every rank) -> checkpoint (when due or stopping)

Each component holds the state it needs (the engine, the guard, the fault plan) as attributes: nothing here is
module-level state, and nothing names an engine: engines declare what they can do (diffv2/parallel/engine.py).
Names: B batch, N sequence length (a token row holds N + 1 tokens: inputs and shifted labels).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffv2.train.callbacks import Callback, StepResult, TrainContext, to_host
from diffv2.train.faults import FaultPlan
from diffv2.model.kernels import doc_ids_from_tokens
from diffv2.train.nonfinite import NonFiniteGuard
from diffv2.optim import set_lr
from diffv2.parallel import dist as pdist
from diffv2.train.record import PROGRESS
from diffv2.train.sink import MetricSink

log = logging.getLogger(__name__)


class CallbackList:
    """The run's callbacks in hook order; it remembers which were started, so exactly those are ended."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks, self.started = list(callbacks), []

    def start(self, ctx: TrainContext, saved: dict, stop_early: Callable[[Callback], Optional[str]]) -> Optional[str]:
        """on_train_start in order, each callback's checkpointed state restored first. `stop_early(callback)` runs
        after each start: a reason it returns ends the start-up there (a signal before the first step)."""
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
            cb.on_train_start(ctx)
            self.started.append(cb)
            if reason := stop_early(cb):
                return reason
        return None

    def step_start(self, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_start(step)

    def before_optimizer_step(self, step: int) -> dict:
        return {k: v for cb in self.callbacks for k, v in cb.on_before_optimizer_step(step).items()}

    def step_end(self, result: StepResult) -> dict:
        return {k: v for cb in self.callbacks for k, v in cb.on_step_end(result).items()}

    def stop_request(self) -> Optional[str]:
        """The first callback's reason to stop; every callback is asked, on every rank (some ask collectively)."""
        asked = [cb.should_stop() for cb in self.callbacks]
        return next((r for r in asked if r), None)

    def state_dict(self) -> dict:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def end(self) -> None:
        for cb in self.started:
            cb.on_train_end()


@dataclass
class StepOutput:
    loss: torch.Tensor  # the step's mean cross-entropy over micro-batches and ranks (device scalar)
    grad_norm: torch.Tensor  # global pre-clip gradient norm (device scalar)
    bad: Optional[torch.Tensor]  # device bool: the guard skipped this step (None without a guard)
    data_time_s: float  # host seconds spent waiting for batches
    metrics: dict = field(default_factory=dict)  # the callbacks' on_before_optimizer_step readings


class TrainStep:
    """One optimizer step over `accum` micro-batches: learning rate, forward/backward with gradient accumulation, the
    callbacks' hooks, the optimizer step behind the non-finite guard, the MoE expert-bias update, zero_grad."""

    def __init__(self, engine, forward: Callable, batches: Iterator[torch.Tensor], accum: int, device: torch.device,
                 callbacks: CallbackList, observers, observed: int, guard: Optional[NonFiniteGuard],
                 weights, grad_clip: float, faults: FaultPlan):
        """`forward(tokens_BN1) -> (loss, ce, aux)`; `observers`: the monitors' observer hub, watched on the first
        `observed` micro-batches of an observed step only (0 = all); `weights`: bf16 compute weights or None."""
        self.engine, self.forward, self.batches, self.accum, self.device = engine, forward, batches, accum, device
        self.callbacks, self.observers, self.observed = callbacks, observers, observed
        self.guard, self.weights, self.grad_clip, self.faults = guard, weights, grad_clip, faults

    def __call__(self, step: int, lr: float) -> StepOutput:
        engine, guard, weights = self.engine, self.guard, self.weights
        set_lr(engine.optimizer, lr)
        self.callbacks.step_start(step)
        self.faults.kill("step", step)
        self.faults.rank_fault(step)
        loss, data_time = torch.zeros((), device=self.device), 0.0
        if weights is not None:
            weights.refresh()
        for micro in range(self.accum):
            t0 = time.perf_counter()
            tokens_BN1 = next(self.batches).to(self.device, non_blocking=True)
            data_time += time.perf_counter() - t0
            # an observed step observes its first `observed` micro-batches; the rest run the unobserved graph
            pause = 0 < self.observed <= micro and self.observers.watching
            with (self.observers.paused() if pause else contextlib.nullcontext()), \
                    (weights.swapped() if weights is not None else contextlib.nullcontext()):
                total, ce, _ = self.forward(tokens_BN1)
                total, ce = self.faults.poison_loss(step, total, ce)
                engine.backward(total / self.accum, last_micro=micro == self.accum - 1)
            if weights is not None:
                weights.accumulate()
            loss += ce.detach() / self.accum
        loss = pdist.mean_over_ranks(loss)  # async on GPU: no host wait
        metrics = self.callbacks.before_optimizer_step(step)
        self.faults.kill("backward", step)
        if guard is not None:
            guard.before_step()
        grad_norm = engine.optimizer_step(self.grad_clip, guard.gate(loss) if guard else None)
        # MoE aux-loss-free balancing moves the expert biases after every step, outside autograd (no-op if dense).
        # The biases are buffers, which a skipped step does not restore: their move comes from the step's integer
        # routing counts (finite even when the loss is not) and is a sign step of fixed size.
        unwrapped(engine.model).update_expert_bias()
        bad = guard.after_step(loss, grad_norm) if guard is not None else None
        engine.zero_grad()
        return StepOutput(loss, grad_norm, bad, data_time, metrics)


class LossWindow:
    """The mean training loss over the steps since the last log step; a skipped step stays out of it."""

    def __init__(self, device: torch.device, guard: Optional[NonFiniteGuard]):
        self.device, self.guard = device, guard
        self._reset()

    def _reset(self) -> None:
        self.total, self.steps = torch.zeros((), device=self.device), 0

    def add(self, out: StepOutput) -> None:
        if out.bad is None:
            self.total, self.steps = self.total + out.loss, self.steps + 1
        else:
            self.total, self.steps = self.total + torch.where(out.bad, 0.0, out.loss), self.steps + ~out.bad

    def metrics(self, out: StepOutput, lr: float, tokens: int) -> dict:
        """The log step's metrics (device values), and a new window."""
        metrics = {"train/loss": self.total / self.steps, "train/lr": lr, "grad/norm": out.grad_norm,
                   "train/tokens": tokens}
        if self.guard is not None:
            metrics.update(self.guard.metrics())
        self._reset()
        return metrics


class Validation:
    """Mean validation cross-entropy over trainer.eval_batches x micro_batch_size samples; each rank evaluates its
    share (the shares interleave, so the mean over ranks is the one-process value)."""

    def __init__(self, model, forward: Callable, valid_ds, rows: int, micro_batch_size: int, seed: int,
                 device: torch.device, faults: FaultPlan):
        self.model, self.forward, self.valid_ds, self.rows = model, forward, valid_ds, rows
        self.micro_batch_size, self.seed, self.device, self.faults = micro_batch_size, seed, device, faults

    @torch.no_grad()
    def __call__(self, step: int) -> float:
        from data.dataset import make_loader

        self.faults.kill("eval", step)
        self.model.eval()
        rows_left = self.rows
        loader = make_loader(self.valid_ds, min(self.micro_batch_size, rows_left), start_sample=0, num_workers=0,
                             seed=self.seed)
        total = torch.zeros((), device=self.device)
        for tokens_BN1 in loader:
            tokens_BN1 = tokens_BN1[:rows_left]
            total += self.forward(tokens_BN1.to(self.device))[1] * len(tokens_BN1)
            rows_left -= len(tokens_BN1)
            if rows_left == 0:
                break
        self.model.train()
        return pdist.mean_over_ranks(total / self.rows).item()


class RunOutput:
    """Where a run's numbers go: metrics.jsonl and W&B (the sink), the progress bar, the console and train.log.
    Device metrics become floats here, only on steps that log. Rank 0 alone writes."""

    def __init__(self, sink: MetricSink, max_steps: int, start_step: int, progress: bool, rank0: bool,
                 faults: FaultPlan):
        self.sink, self.faults, self.rank0 = sink, faults, rank0
        self.summary: dict = {}  # the newest train/loss and train/val_loss
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not (progress and rank0), unit="step",
                        dynamic_ncols=True)
        self._console = contextlib.ExitStack()
        if not self.bar.disable:  # log lines go through the bar's writer: one coherent console stream
            self._console.enter_context(logging_redirect_tqdm())

    def say(self, line: str) -> None:
        if self.rank0:
            self.bar.write(line)
            PROGRESS.info(line)

    def log(self, step: int, metrics: dict) -> dict:
        """Write the step's metrics (if any); the host values."""
        self.bar.update(1)
        if metrics:
            metrics = to_host(metrics)
            self.sink.log(step, metrics)
            if "train/loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
                self.say(format_step(step, metrics))
                self.summary["train/loss"] = metrics["train/loss"]
        self.faults.kill("logged", step)
        return metrics

    def validation(self, step: int, loss: float) -> None:
        self.sink.log(step, {"train/val_loss": loss})
        self.say(f"step {step:>6} | validation loss {loss:.4f}")
        self.summary["train/val_loss"] = loss

    def close(self) -> None:
        self._console.close()
        self.bar.close()


def format_step(step: int, metrics: dict) -> str:
    parts = [f"step {step:>6}", f"loss {metrics['train/loss']:.4f}", f"lr {metrics['train/lr']:.2e}",
             f"grad {metrics['grad/norm']:.3f}"]
    if "perf/tokens_per_s" in metrics:
        parts.append(f"{metrics['perf/tokens_per_s']:,.0f} tok/s")
    if "perf/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
    return " | ".join(parts)


def unwrapped(model):
    """The Transformer inside an engine's wrapper (FSDP2 keeps the object itself; DeepSpeed holds it in .module)."""
    return getattr(model, "module", model)


def lm_forward(device: torch.device, autocast_dtype: Optional[torch.dtype], eod: Optional[int]) -> Callable:
    """forward(model, tokens_BN1) -> (loss, ce, aux): next-token loss under the run's autocast; `eod` set: attention
    stays inside documents."""

    def forward(model, tokens_BN1):
        x, y = tokens_BN1[:, :-1], tokens_BN1[:, 1:]
        doc_ids = doc_ids_from_tokens(x, eod) if eod is not None else None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model.loss(x, y, doc_ids)

    return forward
