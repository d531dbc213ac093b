"""Real `python train.py` / `python -m data.prepare` runs for the reliability tests, and what they leave behind.

Every run has a timeout (a hang fails the test instead of blocking CI) and one CPU thread: tiny models run
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from test_train import SMALL

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240  # seconds per run; the slowest takes ~15 on two busy cores
ENV = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}


def _env(fault: Optional[str], extra: Optional[dict]) -> dict:
    env = {k: v for k, v in ENV.items() if k not in ("DIFFV2_FAULT", "WORLD_SIZE")}
    return {**env, **({"DIFFV2_FAULT": fault} if fault else {}), **(extra or {})}


def train_cmd(run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}", *SMALL, *overrides]


def train(run_dir: Path, cache: Path, *overrides: str, fault: Optional[str] = None,
          env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run train.py to its end (or its death); DIFFV2_FAULT=`fault` arms a test hook (diffv2/faults.py)."""
    return subprocess.run(train_cmd(run_dir, cache, *overrides), cwd=ROOT, env=_env(fault, env),
                          capture_output=True, text=True, timeout=TIMEOUT)


def train_killed_after(run_dir: Path, cache: Path, step: int, *overrides: str) -> subprocess.CompletedProcess:
    """Run train.py and SIGKILL it from outside as soon as it prints the loss of `step`: wherever it then is."""
    log = run_dir.parent / f".{run_dir.name}-{time.monotonic_ns()}.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(train_cmd(run_dir, cache, *overrides), cwd=ROOT, env=_env(None, None), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and f"step {step:>6} | loss" not in log.read_text():
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"train.py did not reach step {step} in {TIMEOUT} s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    output = log.read_text()
    log.unlink()
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=ROOT, env=_env(None, None),
                          capture_output=True, text=True, timeout=TIMEOUT)


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
