"""Real `python train.py` / `python -m data.prepare` runs for the reliability tests, and what they leave behind.

Every run is watched for a hang, not timed: a run that prints nothing for STALL_S seconds is killed and its test
fails (a slow step on a loaded machine never trips it; a deadlock does). One CPU thread per run: tiny models run
fastest so, and every run of a bit-exact comparison then does the same arithmetic. `side_by_side` runs
independent runs on both CI cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from test_train import SMALL
from watched import HANG_S, STALL_S, run_watched  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}


def _env(fault: Optional[str], extra: Optional[dict]) -> dict:
    env = {k: v for k, v in ENV.items() if k not in ("DIFFV2_FAULT", "WORLD_SIZE")}
    return {**env, **({"DIFFV2_FAULT": fault} if fault else {}), **(extra or {})}


def train_cmd(run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}", *SMALL, *overrides]


def train(run_dir: Path, cache: Path, *overrides: str, fault: Optional[str] = None,
          env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run train.py to its end (or its death); DIFFV2_FAULT=`fault` arms a test hook (diffv2/train/faults.py)."""
    return run_watched(train_cmd(run_dir, cache, *overrides), env=_env(fault, env))


def train_killed_after(run_dir: Path, cache: Path, step: int, *overrides: str) -> subprocess.CompletedProcess:
    """Run train.py and SIGKILL it from outside as soon as it prints the loss of `step`: wherever it then is."""
    return train_signalled_after(run_dir, cache, step, signal.SIGKILL, *overrides)


def train_signalled_after(run_dir: Path, cache: Path, step: int, sig: int, *overrides: str, times: int = 1,
                          group: bool = False, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run train.py and send it `sig` (`times` times, 50 ms apart) as soon as it prints the loss of `step`;
    `group`: to its whole process group, as a terminal's Ctrl-C, `timeout` or SLURM reach every process (train.py
    then runs in a session of its own). step 0: as soon as it starts (start-up)."""
    sent = threading.Event()

    def send(line: str, proc: subprocess.Popen) -> None:
        if not sent.is_set() and (step == 0 or f"step {step:>6} | loss" in line):
            sent.set()
            for i in range(times):
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                if i + 1 < times:
                    time.sleep(0.05)

    return run_watched(train_cmd(run_dir, cache, *overrides), env=_env(None, env), on_line=send,
                       start_new_session=group)


def prepare(*args: str) -> subprocess.CompletedProcess:
    return run_watched([sys.executable, "-m", "data.prepare", *args], env=_env(None, None))


def side_by_side(*jobs: Callable[[], object]) -> list:
    """Run independent jobs (each a callable running subprocesses) two at a time; results in order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line a refused or stopped run prints last on stderr."""
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (hidden ones too) by relative path; directories map to 'dir'."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trajectory(run_dir: Path) -> dict:
    """Per step: training loss, grad norm, skipped steps; and the validation losses: what a resume must repeat."""
    rows = metrics(run_dir)
    return {"train": {m["step"]: (m["train/loss"], m["grad/norm"]) for m in rows if "train/loss" in m},
            "val": {m["step"]: m["train/val_loss"] for m in rows if "train/val_loss" in m}}


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model and optimizer-state tensor of a DCP checkpoint by flat name (no model needs to be built)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat_file = ckpt.parent / f".flat-{ckpt.name}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(ckpt, flat_file)
    state = torch.load(flat_file, weights_only=True)
    flat_file.unlink()
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("model", state["model"])
    walk("optim", state["optim"]["state"])  # param_groups hold the lr of the step that saved, not state
    return out


def differing_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (so NaN == NaN), or that only one side has."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).contiguous().view(torch.uint8)

    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(bits(a[k]), bits(b[k]))]
