"""Stop signals, recorded: SIGINT (Ctrl-C), SIGUSR1 (SLURM's time-limit warning), SIGTERM (scancel, requeue,
`timeout`, `docker stop`). Standard library only, so train.py installs the latch before its heavy imports and a
signal at any moment of start-up is kept; diffv2/train/preempt.py acts on it at step boundaries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Callable

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped with a checkpoint; run again (or let SLURM's requeue) to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C: stopped with a checkpoint; run again to resume
SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
REQUEUE_SIGNAL = signal.SIGUSR1  # the time-limit warning from `--signal=USR1@lead`
# Rank 0 (or a process outside any launcher) tells the terminal what the first Ctrl-C does: os.write only.
_CTRL_C_NOTE = b"\nCtrl-C: stopping after this step with a checkpoint (press Ctrl-C again to abort at once)\n"


def _write(data: bytes) -> None:
    try:
        os.write(2, data)
    except OSError:
        pass


def exit_code_for(signum: int) -> int:
    """The process's exit status after a clean stop on `signum`."""
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


class SignalLatch:
    """Records SIGINT/SIGUSR1/SIGTERM for this process; nothing else happens in the handler.

    `received`: the largest signal number seen (SIGTERM > SIGUSR1 > SIGINT: a preemption outranks a Ctrl-C).
    The second SIGINT aborts the process at once: one `error:` line (with `abort_note()`, e.g. which checkpoint
    is intact) and exit 130, without unwinding (an exception raised from a signal handler could land inside a
    checkpoint writer's C++ callback and abort the process). `install()` returns the latch; `restore()` puts back
    the handlers it replaced."""

    def __init__(self):
        self.received = 0
        self.interrupts = 0
        self.abort_note: Callable[[], str] = lambda: ""
        self._previous: dict = {}
        self._rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))

    def install(self) -> "SignalLatch":
        for sig in SIGNALS:
            try:
                previous = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: Python lets only the main thread install handlers
                log.warning("preemption: %s is not handled (signal handlers need the main thread)", sig.name)
                continue
            self._previous.setdefault(sig, previous)
        return self

    def _handle(self, signum, frame) -> None:
        """Integer stores and os.write only, no logging (its lock could deadlock)."""
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self._abort()
            if self._rank in ("", "0"):
                _write(_CTRL_C_NOTE)
        self.received = max(self.received, signum)

    def _abort(self) -> None:
        try:
            note = self.abort_note()
        except Exception:  # noqa: BLE001 - the exit must happen whatever the note does
            note = ""
        prefix = f"[rank {self._rank}] " if self._rank not in ("", "0") or os.environ.get("WORLD_SIZE", "1") != "1" \
            else ""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - e.g. a reentrant flush when the signal came inside a write
                pass
        _write(f"{prefix}error: aborted by a second Ctrl-C{'; ' + note if note else ''}\n".encode())
        os._exit(EXIT_INTERRUPTED)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


@contextlib.contextmanager
def signals_blocked():
    """Hold SIGINT/SIGUSR1/SIGTERM while child processes start: a child inherits the blocked mask, so a signal
    sent to the whole step in the moment between its fork and `ignore_stop_signals` stays pending instead of
    killing it. Signals that arrive meanwhile reach this process when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn` for workers that must outlive a signal sent to the whole job step or process
    group: they ignore it (pending ones are dropped) and their parent decides when they end (a sentinel on
    shutdown; they also exit on their own within 5 s once the parent is gone)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
