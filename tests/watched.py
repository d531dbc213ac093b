"""Subprocesses watched for hangs instead of timed: a slow step on a loaded machine never fails a test; a
deadlock does (STALL_S seconds without a line of output)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
STALL_S = 900  # seconds without a line of output: hung (a tiny run prints every few seconds even on a busy machine)
HANG_S = 1800  # whole-run guard where the output cannot be watched line by line: minutes of work take seconds


def run_watched(cmd: list[str], env: Optional[dict] = None, cwd: Path = ROOT, stall_s: float = STALL_S,
                on_line: Optional[Callable[[str, subprocess.Popen], None]] = None,
                **popen) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), killed only when it prints nothing (stdout or stderr)
    for `stall_s` seconds (then TimeoutError). `on_line(line, proc)` sees every stdout line as it comes."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    out, err, last = [], [], [time.monotonic()]

    def pump(stream, sink, callback):
        for line in stream:
            sink.append(line)
            last[0] = time.monotonic()
            if callback is not None:
                callback(line, proc)

    readers = [threading.Thread(target=pump, args=(proc.stdout, out, on_line), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, None), daemon=True)]
    for r in readers:
        r.start()
    while proc.poll() is None:
        if time.monotonic() - last[0] > stall_s:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{' '.join(map(str, cmd[:4]))} ... printed nothing for {stall_s:.0f} s (hung?); "
                               f"last output:\n{''.join((out + err)[-20:])}")
        time.sleep(0.05)
    for r in readers:
        r.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err))
