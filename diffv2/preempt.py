"""Stop at a step boundary with a checkpoint when the job is about to lose its GPUs, then requeue it.

SLURM sends SIGUSR1 `--signal-lead` seconds before the time limit (launch/slurm.py asks for it); SIGTERM comes
from `scancel`, SLURM's own preemption, torchrun shutting down, or `docker stop`. The handlers only record the
signal number: everything else happens at the next step boundary, where the trainer asks `should_stop()`, saves
a checkpoint and stops. With several processes, every rank must stop at the same step (a checkpoint save is
collective), yet a signal can reach one rank a step earlier than another, or only some ranks: the ranks
therefore agree with an all-reduce(MAX) of the signal number over a CPU (gloo) group. Gloo on the CPU never
synchronises the GPU; one int per check is a small network round trip (raise `interval` if it ever shows).

After the stop, rank 0 runs `scontrol requeue $SLURM_JOB_ID` for SIGUSR1 only: the job restarts and
`trainer.resume=auto` continues from the checkpoint just saved. SIGTERM is not requeued by the run, because it
means `scancel` (which must stay a cancel) or SLURM's own preemption (which requeues a requeueable job itself).

Exit code after such a stop: `EXIT_PREEMPTED` = 75 (sysexits' EX_TEMPFAIL, "try again"), requeued or not: the
training is not finished, so a `train.py && evaluate` chain must not go on, and rerunning the same command
resumes. A requeued SLURM job is restarted by SLURM whatever the exit code.
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

from monitoring.callback import Callback, StepResult, TrainContext

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped with a checkpoint; run again (or let SLURM's requeue) to resume
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_SIGNAL = signal.SIGUSR1  # the time-limit warning from `--signal=USR1@lead`
_latest: Optional["PreemptionCallback"] = None


def exit_code() -> Optional[int]:
    """EXIT_PREEMPTED if this process's preemption callback stopped the run, else None (train.py's exit status)."""
    return _latest.exit_code if _latest is not None else None


class PreemptionCallback(Callback):
    """Save-and-stop on SIGUSR1/SIGTERM, agreed by every rank; requeue the SLURM job on SIGUSR1.

    `interval`: with several processes, the ranks compare flags every `interval`-th step (a step later than the
    signal at worst); a single process reads its flag every step, at no cost. `requeue`: run `scontrol requeue`
    after a SIGUSR1 stop under SLURM. Handlers are installed at construction, so a signal during start-up (data
    preparation, model build) stops the run after its first step.
    """

    name = "preemption"

    def __init__(self, interval: int = 1, requeue: bool = True):
        global _latest
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"preemption interval={interval!r} must be a positive integer (1 = check every step)")
        self.interval, self.requeue = interval, requeue
        self.received = 0  # largest signal number seen by this process (written by the handlers only)
        self.stopped_by = 0  # signal number all ranks agreed on; set once should_stop() fires
        self.requeued = False
        self._calls = 0
        self._group = None  # the CPU group for the all-reduce (None = the default group, when it is gloo)
        self._group_ready = False
        self._run_dir: Optional[Path] = None
        self._step, self._last_step = 0, None  # a signal during the last step needs no stop and no requeue
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: Python lets only the main thread install handlers
                log.warning("preemption: %s is not handled (signal handlers need the main thread)", sig.name)
        _latest = self

    def _handle(self, signum, frame) -> None:
        """Async-signal-safe: one integer store, no I/O, no locks (logging here could deadlock on its lock)."""
        self.received = max(self.received, signum)

    @property
    def exit_code(self) -> Optional[int]:
        return EXIT_PREEMPTED if self.stopped_by else None

    def on_train_start(self, ctx: TrainContext) -> None:
        self._run_dir = ctx.run_dir
        self._last_step = getattr(getattr(ctx.cfg, "trainer", None), "max_steps", None)
        if _distributed():
            self._cpu_group()  # a collective: created here, where every rank is, rather than mid-run

    def on_step_end(self, result: StepResult) -> dict:
        self._step = result.step
        return {}

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
        log.warning("preemption: %s received%s; saving a checkpoint and stopping", signal.Signals(signum).name,
                    "" if self.received else " by another rank")
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
        elif os.environ.get("SLURM_JOB_ID"):
            then = "requeue is off; resubmit the job to resume"
        else:
            then = "run the same command again to resume (trainer.resume=auto)"
        return f"preempted by {name}: checkpoint saved; {then}"

    def on_train_end(self) -> None:
        stopped_cleanly = sys.exc_info()[0] is None  # called from the trainer's `finally`: an error is in flight
        if self.stopped_by and stopped_cleanly and self._will_requeue() and _rank() == 0:
            self._requeue(os.environ["SLURM_JOB_ID"])
        if not self.received:  # leave no trace on a run that was never signalled
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
        """Put back the handlers that were installed before this callback."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _cpu_group(self):
        """The default group when it is gloo, else one gloo group over all ranks, created once."""
        import torch.distributed as dist

        if not self._group_ready:
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._group_ready = True
        return self._group


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    value = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return int(value) if value.isdigit() else 0
