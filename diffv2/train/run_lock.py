"""One writer per run directory: `RUN/run.lock`, held with a POSIX record lock (fcntl) by rank 0 for the run.

A second `train.py` on the same run directory, on this host or another one sharing the filesystem (POSIX locks
work over NFS through its lock manager, and on Lustre mounted with `-o flock`), is refused before it touches
anything. The kernel drops the lock when its holder dies however it dies (kill -9, a lost node once the
filesystem's lease expires); unlike flock(2), a POSIX lock belongs to the process alone, so forked children
(DataLoader workers) that outlive it for a few seconds do not keep it. A lock left by a dead process is thus
simply taken over; the file's text (host, pid, start time of the holder) is cleared on a clean release, so text
found on taking the lock names the dead holder, and the run says so. The holder reads and writes the file only
through its locking descriptor (closing any other descriptor of the file would drop a POSIX lock). A lock file is
deleted only under its lock, by a refused start that created the directory, and a taker checks it locked the
file that is still there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLock:
    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock `run_dir` or raise ValueError naming the holder. The directory must exist."""
        path = run_dir / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise ValueError(f"run directory {run_dir} is in use by {_describe(_read(path))} ({path}); wait "
                                 f"for that run to end or stop it, or pick another run_name") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # the file was removed while we waited for it (a refused start cleaning up): take the new one
        left = _parse(os.pread(fd, 4096, 0))
        if left:
            log.warning("run directory %s: took over the lock left by %s, which is no longer running", run_dir,
                        _describe(left))
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Clear the holder's text and unlock (idempotent). Process exit unlocks too, leaving the text behind."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None


def remove_unheld(run_dir: Path) -> None:
    """Delete the run's lock file if nobody holds it (a start that created the directory and was refused
    cleans up with this); a held lock is left alone."""
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(path: Path) -> Optional[dict]:
    """The holder's text, read by a process that does not hold the lock."""
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _parse(data: bytes) -> Optional[dict]:
    text = data.decode(errors="replace").strip()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return {"unreadable": True}


def _describe(holder: Optional[dict]) -> str:
    if not holder or "pid" not in holder:
        return "another process"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"
