"""`trainer.profile_start=K`: profile optimizer steps K .. K + profile_steps - 1 with torch.profiler.

Every rank writes, under `<run_dir>/profile/`:
- `trace_rank<R>.json.gz`: a Chrome/Perfetto trace (open it at ui.perfetto.dev or chrome://tracing);
- `ops_rank<R>.txt`: the operators of those steps, sorted by their own device time (CPU time without a GPU), as
  torch.profiler's `key_averages().table()` prints them.

Steps before K run unprofiled (with compiled blocks, put K past the compilation: 10 or more). The profiler's own
cost lands in the profiled steps only; the run's throughput windows that include them read lower.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from monitoring.callback import Callback, StepResult, TrainContext

log = logging.getLogger(__name__)


class ProfilerCallback(Callback):
    name = "profiler"

    def __init__(self, start: int, steps: int, rank: int = 0, record_shapes: bool = False, row_limit: int = 40):
        self.start, self.stop = start, start + steps - 1
        self.rank, self.record_shapes, self.row_limit = rank, record_shapes, row_limit
        self._profile: Optional[torch.profiler.profile] = None
        self._out: Optional[Path] = None
        self._cuda = False

    def on_train_start(self, ctx: TrainContext) -> None:
        self._out = ctx.run_dir / "profile"
        self._cuda = ctx.device.type == "cuda"
        if ctx.start_step >= self.start:
            log.warning("profiler: the run resumes after step %d, so trainer.profile_start=%d profiles nothing; "
                        "set a later trainer.profile_start", ctx.start_step, self.start)

    def on_step_start(self, step: int) -> None:
        if step == self.start and self._profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self._cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities, record_shapes=self.record_shapes)
            self._profile.__enter__()

    def on_step_end(self, result: StepResult) -> dict:
        if self._profile is not None and result.step >= self.stop:
            self._finish(result.step)
        return {}

    def on_train_end(self) -> None:
        if self._profile is not None:  # the run ended inside the window
            self._finish(None)

    def _finish(self, step: Optional[int]) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self._out.mkdir(parents=True, exist_ok=True)
        trace = self._out / f"trace_rank{self.rank}.json.gz"
        raw = self._out / f".trace_rank{self.rank}.json"
        profile.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace.with_suffix(".gz.tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(trace.with_suffix(".gz.tmp"), trace)
        raw.unlink()
        sort = "self_device_time_total" if self._cuda else "self_cpu_time_total"
        steps = f"steps {self.start}-{step}" if step is not None else f"steps {self.start}- (the run ended)"
        table = profile.key_averages().table(sort_by=sort, row_limit=self.row_limit)
        (self._out / f"ops_rank{self.rank}.txt").write_text(f"optimizer {steps}, sorted by {sort}\n{table}\n")
        if self.rank == 0:
            log.info("profiler: %s written to %s (trace_rank*.json.gz, ops_rank*.txt)", steps, self._out)
