"""Stop at a step boundary with a checkpoint on SIGUSR1, SIGTERM or Ctrl-C, then (SIGUSR1 under SLURM) requeue.

SLURM sends SIGUSR1 `--signal-lead` seconds before the time limit (launch/slurm.py asks for it); SIGTERM comes
from `scancel`, SLURM's own preemption or requeue, torchrun shutting down, `timeout` or `docker stop`; SIGINT is
Ctrl-C in a terminal. SLURM and a terminal signal every process of the job step or process group, not just
train.py: DataLoader workers ignore these signals (data/dataset.py), so only the training processes act on them,
and the W&B service (in a session of its own, but signalled by SLURM) may die, which the metric sink survives.

`SignalLatch` only records the signal (async-signal-safe: integer stores). train.py installs it before its
heavy imports, so a signal at any moment of start-up is kept. Everything else happens at a step boundary, where
the trainer asks `PreemptionCallback.should_stop()`, saves a checkpoint and stops; a signal during start-up stops
the run just before its first step, before anything is written. With several processes every rank must stop at
the same step (a checkpoint save is collective), yet a signal can reach one rank a step earlier than another, or
only some ranks: the ranks agree with an all-reduce(MAX) of the signal number over a CPU (gloo) group. Gloo on
the CPU never synchronises the GPU; one int per check is a small network round trip (raise `interval` if it
ever shows).

A second Ctrl-C aborts at once (the handler prints one `error:` line and exits 130 without unwinding or waiting
for anything): checkpoints are written atomically, so the newest complete one stays valid.

After the stop, rank 0 runs `scontrol requeue $SLURM_JOB_ID` for SIGUSR1 only, after the W&B run is finished (a
requeue makes SLURM SIGTERM the whole job step): the job restarts and `trainer.resume=auto` continues from the
checkpoint just saved. SIGTERM is not requeued by the run, because it means `scancel` (which must stay a cancel)
or SLURM's own preemption (which requeues a requeueable job itself).

Exit codes: `EXIT_PREEMPTED` = 75 (sysexits' EX_TEMPFAIL, "try again") after SIGUSR1/SIGTERM, requeued or not:
the training is not finished, so a `train.py && evaluate` chain must not go on, and rerunning the same command
resumes. `EXIT_INTERRUPTED` = 130 (the shell's 128 + SIGINT) after Ctrl-C, with the same checkpoint. A requeued
SLURM job is restarted by SLURM whatever the exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from diffv2.train.callbacks import Callback, StepResult, TrainContext
from diffv2.train.signals import (  # noqa: F401 - the exit codes and latch are part of this module's interface
    EXIT_INTERRUPTED, EXIT_PREEMPTED, REQUEUE_SIGNAL, SIGNALS, SignalLatch, exit_code_for, ignore_stop_signals,
    signals_blocked)

log = logging.getLogger(__name__)


class PreemptionCallback(Callback):
    """Save-and-stop on SIGUSR1/SIGTERM/SIGINT, agreed by every rank; requeue the SLURM job on SIGUSR1.

    `interval`: with several processes, the ranks compare flags every `interval`-th step (a step later than the
    signal at worst); a single process reads its flag every step, at no cost. `requeue`: run `scontrol requeue`
    after a SIGUSR1 stop under SLURM. `latch`: the process's SignalLatch, installed early by train.py; without
    one the callback installs its own at construction (and removes it at the end of an unsignalled run).
    """

    name = "preemption"

    def __init__(self, interval: int = 1, requeue: bool = True, latch: Optional[SignalLatch] = None):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"preemption interval={interval!r} must be a positive integer (1 = check every step)")
        self.interval, self.requeue = interval, requeue
        self._owns_latch = latch is None
        self.latch = latch if latch is not None else SignalLatch().install()
        self.stopped_by = 0  # signal number all ranks agreed on; set once should_stop() fires
        self.before_first_step = False  # the agreed stop came during start-up: nothing was saved (or needed saving)
        self.requeued = False
        self._calls = 0
        self._group = None  # the CPU group for the all-reduce (None = the default group, when it is gloo)
        self._group_ready = False
        self._run_dir: Optional[Path] = None
        self._step, self._last_step = 0, None  # a signal during the last step needs no stop and no requeue

    @property
    def received(self) -> int:
        """Largest signal number this process has seen."""
        return self.latch.received

    @property
    def exit_code(self) -> Optional[int]:
        return exit_code_for(self.stopped_by) if self.stopped_by else None

    def on_train_start(self, ctx: TrainContext) -> None:
        self._run_dir = ctx.run_dir
        self._step = ctx.start_step
        self._last_step = getattr(getattr(ctx.cfg, "trainer", None), "max_steps", None)
        if _distributed():
            self._cpu_group()  # a collective: created here, where every rank is, rather than mid-run

    def on_step_end(self, result: StepResult) -> dict:
        self._step = result.step
        return {}

    def stop_before_start(self) -> Optional[str]:
        """Called once by every rank after start-up, before anything is written: did a signal come meanwhile?"""
        self.before_first_step = True  # _reason() and the log line say so if the ranks agree on a stop now
        reason = self.should_stop()
        self.before_first_step = reason is not None
        return reason

    def should_stop(self) -> Optional[str]:
        if self.stopped_by:
            return self._reason()
        if self._last_step is not None and self._step >= self._last_step:
            return None  # the run ends here anyway, finished: exit 0 and nothing to requeue
        self._calls += 1
        if _distributed():
            if self._calls % self.interval:
                return None
            import torch.distributed as dist

            flag = torch.tensor([self.received], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group())
            signum = int(flag.item())
        else:
            signum = self.received
        if not signum:
            return None
        self.stopped_by = signum
        log.warning("preemption: %s received%s; %s", signal.Signals(signum).name,
                    "" if self.received else " by another rank",
                    "stopping before the first step" if self.before_first_step else "saving a checkpoint and stopping")
        return self._reason()

    def _will_requeue(self) -> bool:
        return self.requeue and self.stopped_by == REQUEUE_SIGNAL and bool(os.environ.get("SLURM_JOB_ID"))

    def _reason(self) -> str:
        """The same text on every rank (it depends only on the agreed signal and the job's environment)."""
        name = signal.Signals(self.stopped_by).name
        if self._will_requeue():
            then = f"requeueing SLURM job {os.environ['SLURM_JOB_ID']}"
        elif self.stopped_by == signal.SIGTERM and os.environ.get("SLURM_JOB_ID"):
            then = "not requeued by the run (SIGTERM is scancel or SLURM's own preemption); resubmit to resume"
        elif self.stopped_by == signal.SIGINT or not os.environ.get("SLURM_JOB_ID"):
            then = "run the same command again to resume (trainer.resume=auto)"
        else:
            then = "requeue is off; resubmit the job to resume"
        how = "interrupted by SIGINT (Ctrl-C)" if self.stopped_by == signal.SIGINT else f"preempted by {name}"
        if self.before_first_step:
            return f"{how} during start-up: stopped before the first step, nothing written; {then}"
        return f"{how}: checkpoint saved; {then}"

    def on_train_end(self) -> None:
        stopped_cleanly = sys.exc_info()[0] is None  # called from the trainer's `finally`: an error is in flight
        if self.stopped_by and stopped_cleanly and self._will_requeue() and _rank() == 0:
            self._requeue(os.environ["SLURM_JOB_ID"])
        if self._owns_latch and not self.received:  # leave no trace on a run that was never signalled
            self.restore()
        # after a signal the handlers stay: the requeue's own SIGTERM must not cut the clean exit short

    def _requeue(self, job: str) -> None:
        script = self._run_dir / "launch" / "job.sbatch" if self._run_dir else None
        resubmit = f"sbatch {script}" if script is not None and script.is_file() else "resubmit the job's batch script"
        how = f"{resubmit}; trainer.resume=auto continues from the checkpoint just saved"
        try:
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            log.error("preemption: scontrol not found, SLURM job %s was not requeued: %s", job, how)
            return
        except subprocess.TimeoutExpired:
            log.error("preemption: scontrol requeue %s timed out after 60 s; if squeue does not list the job: %s",
                      job, how)
            return
        if out.returncode != 0:
            detail = (out.stderr or out.stdout).strip().splitlines()
            log.error("preemption: scontrol requeue %s failed (exit %d%s): %s", job, out.returncode,
                      f": {detail[0]}" if detail else "", how)
            return
        self.requeued = True
        log.warning("preemption: requeued SLURM job %s; it restarts and resumes from the checkpoint just saved", job)

    def restore(self) -> None:
        """Put back the handlers that were installed before this callback's own latch."""
        if self._owns_latch:
            self.latch.restore()

    def _cpu_group(self):
        """The default group when it is gloo, else one gloo group over all ranks, created once."""
        import torch.distributed as dist

        if not self._group_ready:
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._group_ready = True
        return self._group


def _distributed() -> bool:
    from diffv2.parallel import dist as pdist

    return pdist.world_size() > 1


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    value = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return int(value) if value.isdigit() else 0
