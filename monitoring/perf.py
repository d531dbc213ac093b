"""Throughput: tokens/s, step time, data-loading share, TFLOP/s and MFU, peak memory, elapsed wall time.

A window covers the steps since the last reading. Step time counts only what happens between on_step_start
and on_step_end (data, forward, backward, optimizer, monitors that ran before this one), so validation and
checkpoint saves between steps do not lower the throughput. On CUDA the device is synchronised at the end of a
window (the only synchronisation), so queued kernels are counted in the window that launched them.
`perf/elapsed_s` is the wall time since training (re)started, everything included, and `perf/cpu_s` this
process's CPU time over the same span (all threads); bench/ uses both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from diffv2.model.flops import peak_flops
from diffv2.parallel import dist as pdist
from diffv2.train.callbacks import Callback, StepResult, TrainContext, every
from diffv2.train.validate import positive
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class PerfMonitorConfig(MonitorConfig):
    """monitoring.perf: perf/: tokens/s, step time, data-loading share, MFU and memory (GPU), elapsed time."""

    interval: int = 0  # steps per throughput window (0 = trainer.log_interval)

    def validate(self, key: str) -> None:
        positive(f"{key}.interval", self.interval, allow_zero=True)


class PerfMonitor(Callback):
    name = "perf"

    def __init__(self, interval: int):
        self.interval = interval

    def on_train_start(self, ctx: TrainContext) -> None:
        self.last = ctx.cfg.trainer.max_steps
        self.ctx = ctx
        self.cuda = ctx.device.type == "cuda"
        self.world = pdist.world_size()
        self.peak = peak_flops(torch.cuda.get_device_name(ctx.device)) if self.cuda else 0.0
        self.t_begin, self.cpu_begin = time.perf_counter(), time.process_time()
        self._reset()

    def _reset(self) -> None:
        self.busy_s, self.data_s, self.steps = 0.0, 0.0, 0

    def on_step_start(self, step: int) -> None:
        self.t_start = time.perf_counter()

    def on_step_end(self, result: StepResult) -> dict:
        if every(result.step, self.interval, self.last) and self.cuda:
            torch.cuda.synchronize(self.ctx.device)
        self.busy_s += time.perf_counter() - self.t_start
        self.data_s += result.data_time_s
        self.steps += 1
        if not every(result.step, self.interval, self.last):
            return {}
        step_time = self.busy_s / self.steps
        tok_s = self.ctx.tokens_per_step / step_time
        # tokens/s of the whole job; TFLOP/s and MFU per GPU (the job's FLOPs over all its GPUs' peak)
        metrics = {"perf/tokens_per_s": tok_s, "perf/tokens_per_s_per_gpu": tok_s / self.world,
                   "perf/step_time_s": step_time, "perf/data_share": self.data_s / self.busy_s,
                   "perf/tflops": tok_s * self.ctx.flops_per_token / 1e12 / self.world,
                   "perf/elapsed_s": time.perf_counter() - self.t_begin,
                   "perf/cpu_s": time.process_time() - self.cpu_begin}
        if self.peak:
            metrics["perf/mfu"] = tok_s * self.ctx.flops_per_token / self.peak / self.world
            metrics["perf/mem_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self._reset()
        return metrics


SPEC = MonitorSpec("perf", PerfMonitorConfig, order=100, always=True,
                  build=lambda c, env: PerfMonitor(c.interval or env.log_interval))
