"""`trainer.profile_start=K`: profile optimizer steps K .. K + profile_steps - 1 with torch.profiler.

Every rank writes, under `<run_dir>/profile/`:
- `trace_rank<R>.json.gz`: a Chrome/Perfetto trace (open it at ui.perfetto.dev or chrome://tracing);
- `ops_rank<R>.txt`: first a summary of the device kernels by kind (matmul, attention, compiled/fused, elementwise,
  reductions, copies and casts, optimizer, all-to-all (expert parallelism), all-gather / reduce-scatter (FSDP2),
  other collectives, other) with each kind's share of device time, the
  slowest kernels, and how busy the device was over the profiled steps' wall time (a low share means the host
  or a synchronisation holds the GPU back); then, on a GPU, where the device idled: its gaps between kernels
  grouped by the host's cause (a synchronisation the host waited in, or the operator whose launch came late);
  then every operator, sorted by its own device time (CPU time without a GPU), as torch.profiler's
  `key_averages().table()` prints it.

Steps before K run unprofiled (with compiled blocks, put K past the compilation: 10 or more). The profiler's own
cost lands in the profiled steps only; the run's throughput windows that include them read lower.
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from diffv2.train.callbacks import Callback, StepResult, TrainContext

log = logging.getLogger(__name__)


# Kernel name -> kind, first match wins (names as CUDA/cuDNN/cuBLAS/Triton/NCCL report them on Hopper).
# NCCL runs all_to_all_single as grouped send/receive kernels; FSDP2 gathers and reduce-scatters parameters.
KINDS = (
    ("all-to-all", r"nccl.*(sendrecv|alltoall)"),
    ("all-gather/r-scatter", r"nccl.*(allgather|reducescatter)"),
    ("collective (other)", r"nccl"),
    ("attention", r"sdpa|fmha|flash|attention|fort_native"),
    ("optimizer", r"adam|multi_tensor"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|sm90_.*(tst|tnt|nnt)|grouped_mm|cublas"),
    ("compiled (triton)", r"^triton_"),
    ("copy / cast", r"memcpy|memset|copy|cast|convert"),
    ("reduction", r"reduce|softmax|norm|cumsum|scan|sort|topk"),
    ("elementwise", r"elementwise|vectorized|unrolled|fill|where|index"),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def kernel_summary(kernels: list[tuple[str, float, int]], wall_us: float, top: int = 15) -> str:
    """(name, device us, calls) per kernel -> a text table by kind and the `top` slowest kernels."""
    total = sum(us for _, us, _ in kernels)
    if total <= 0:
        return "no device kernels recorded\n"
    by_kind: dict[str, list[float]] = {}
    for name, us, calls in kernels:
        row = by_kind.setdefault(kernel_kind(name), [0.0, 0])
        row[0] += us
        row[1] += calls
    lines = [f"device busy {total / 1e3:,.1f} ms of {wall_us / 1e3:,.1f} ms wall ({100 * total / wall_us:.1f}%)",
             f"{'kind':<20} {'ms':>10} {'share':>7} {'kernels':>8}"]
    for kind, (us, calls) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{kind:<20} {us / 1e3:>10,.1f} {100 * us / total:>6.1f}% {calls:>8}")
    lines += ["", f"top {top} kernels", f"{'ms':>10} {'share':>7} {'calls':>6}  {'kind':<18} name"]
    for name, us, calls in sorted(kernels, key=lambda k: -k[1])[:top]:
        lines.append(f"{us / 1e3:>10,.2f} {100 * us / total:>6.1f}% {calls:>6}  {kernel_kind(name):<18} {name[:110]}")
    return "\n".join(lines) + "\n"


_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_HOST_CATS = ("cpu_op", "user_annotation", "python_function")
# Host calls that return only when the device has caught up (a full queue drains while the host waits in them).
_SYNC = re.compile(r"Synchronize|cudaMemcpy(?!Async)|cuMemcpy[DH]to[DH](?!.*Async)|cudaStreamWaitEvent")


class _HostOps:
    """The host operators of one thread, for 'which operator encloses time t' look-ups."""

    def __init__(self, ops: list[dict]):
        self.ops = sorted(ops, key=lambda e: (e["ts"], -e.get("dur", 0)))
        self.starts = [e["ts"] for e in self.ops]
        self.parent: list[int] = []
        stack: list[int] = []
        for i, e in enumerate(self.ops):
            while stack and self.ops[stack[-1]]["ts"] + self.ops[stack[-1]].get("dur", 0) < e["ts"]:
                stack.pop()
            self.parent.append(stack[-1] if stack else -1)
            stack.append(i)

    def enclosing(self, t: float) -> tuple[str, str]:
        """(outermost, innermost) operator running at t on this thread; '-' where none."""
        i = bisect.bisect_right(self.starts, t) - 1
        # The operator starting last at or before t either contains t or ended before it; then only its ancestors can.
        while i >= 0 and self.ops[i]["ts"] + self.ops[i].get("dur", 0) < t:
            i = self.parent[i]
        if i < 0:
            return "-", "-"
        inner, outer = self.ops[i]["name"], i
        while self.parent[outer] >= 0:
            outer = self.parent[outer]
        return self.ops[outer]["name"], inner


def idle_gaps(events: list[dict], min_gap_us: float = 10.0, top: int = 12) -> str:
    """Where the device idled, from a Chrome trace's events (torch.profiler/kineto): every gap of at least
    `min_gap_us` between device activities, grouped by its cause on the host.

    - `sync: <call> in <op>`: the host sat in a synchronising call (`cudaStreamSynchronize`, a blocking copy, ...)
      that returned after the device went idle, so the queue was empty when it resumed launching;
    - `launch: <outermost op> > <innermost op>`: the next kernel was launched after the gap began: the host was
      slower than the device there (Python, many small kernels, a host-side compile or cache look-up)."""
    device = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in _DEVICE_CATS), key=lambda e: e["ts"])
    if len(device) < 2:
        return "device idle gaps: fewer than two device activities recorded\n"
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {})}
    syncs = sorted((e["ts"] + e.get("dur", 0), e["name"], (e.get("pid"), e.get("tid"))) for e in events
                   if e.get("cat") in _LAUNCH_CATS and _SYNC.search(e.get("name", "")))
    sync_ends = [s[0] for s in syncs]
    by_thread: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _HOST_CATS:
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    host = {key: _HostOps(ops) for key, ops in by_thread.items()}
    causes: dict[str, list[float]] = {}
    biggest: list[tuple[float, float, str]] = []
    busy_end, total_idle = device[0]["ts"] + device[0].get("dur", 0), 0.0
    span = max(e["ts"] + e.get("dur", 0) for e in device) - device[0]["ts"]
    for e in device[1:]:
        gap = e["ts"] - busy_end
        if gap >= min_gap_us:
            total_idle += gap
            cause = _gap_cause(busy_end, e, launches, syncs, sync_ends, host)
            row = causes.setdefault(cause, [0.0, 0])
            row[0] += gap
            row[1] += 1
            biggest.append((gap, busy_end, cause))
        busy_end = max(busy_end, e["ts"] + e.get("dur", 0))
    lines = [f"device idle gaps of >= {min_gap_us:g} us: {total_idle / 1e3:,.1f} ms in "
             f"{sum(c[1] for c in causes.values())} gaps ({100 * total_idle / span:.1f}% of the "
             f"{span / 1e3:,.1f} ms from the first to the last kernel), by cause:",
             f"{'ms':>10} {'share':>7} {'gaps':>6}  cause"]
    for cause, (us, n) in sorted(causes.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / 1e3:>10,.2f} {100 * us / max(total_idle, 1e-9):>6.1f}% {n:>6}  {cause[:150]}")
    lines += ["", "largest gaps", f"{'ms':>10} {'at ms':>10}  cause"]
    t0 = device[0]["ts"]
    for gap, at, cause in sorted(biggest, reverse=True)[:top]:
        lines.append(f"{gap / 1e3:>10,.2f} {(at - t0) / 1e3:>10,.1f}  {cause[:150]}")
    return "\n".join(lines) + "\n"


def _gap_cause(gap_start: float, next_event: dict, launches: dict, syncs: list, sync_ends: list, host: dict) -> str:
    launch = launches.get(next_event.get("args", {}).get("correlation"))
    launched_at = launch["ts"] if launch is not None else next_event["ts"]
    # A synchronising call that returned between the start of the gap and the next launch: the host waited there.
    i = bisect.bisect_left(sync_ends, gap_start)
    if i < len(syncs) and syncs[i][0] <= launched_at:
        end, name, thread = syncs[i]
        outer, inner = _enclosing(host, thread, end)
        return f"sync: {name} in {outer} > {inner}"
    if launch is None:
        return "launch: (no launch record)"
    outer, inner = _enclosing(host, (launch.get("pid"), launch.get("tid")), launched_at)
    return f"launch: {outer} > {inner}"


def _enclosing(host: dict, thread: tuple, t: float) -> tuple[str, str]:
    ops = host.get(thread)
    return ops.enclosing(t) if ops is not None else ("-", "-")


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
            if self._cuda:
                torch.cuda.synchronize()
            self._started = time.perf_counter()
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
        wall_us = (time.perf_counter() - self._started) * 1e6
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self._out.mkdir(parents=True, exist_ok=True)
        trace = self._out / f"trace_rank{self.rank}.json.gz"
        raw = self._out / f".trace_rank{self.rank}.json"
        profile.export_chrome_trace(str(raw))
        gaps = ""
        if self._cuda:
            try:
                gaps = idle_gaps(json.loads(raw.read_text()).get("traceEvents", []))
            except (ValueError, KeyError, TypeError) as exc:  # a trace format this torch writes differently
                gaps = f"device idle gaps: not analysed ({type(exc).__name__}: {exc})\n"
        with open(raw, "rb") as src, gzip.open(trace.with_suffix(".gz.tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(trace.with_suffix(".gz.tmp"), trace)
        raw.unlink()
        sort = "self_device_time_total" if self._cuda else "self_cpu_time_total"
        steps = f"steps {self.start}-{step}" if step is not None else f"steps {self.start}- (the run ended)"
        averages = profile.key_averages()
        table = averages.table(sort_by=sort, row_limit=self.row_limit)
        summary = "no device (CPU run): the operator table below has the CPU times\n"
        if self._cuda:
            # Device kernels only: a GPU user annotation (Optimizer.step#AdamW.step) spans kernels already counted.
            kernels = [(e.key, e.self_device_time_total, e.count) for e in averages
                       if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                       and "#" not in e.key]
            summary = kernel_summary(kernels, wall_us) + "\n" + gaps
        (self._out / f"ops_rank{self.rank}.txt").write_text(
            f"optimizer {steps}\n\n{summary}\noperators sorted by {sort}\n{table}\n")
        if self.rank == 0:
            log.info("profiler: %s written to %s (trace_rank*.json.gz, ops_rank*.txt)", steps, self._out)
