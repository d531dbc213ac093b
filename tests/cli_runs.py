"""The one place tests spawn `python train.py` / `torchrun ... train.py` (and `python -m data.prepare`), and what
runs leave behind. No test module imports another: what several share lives here (or in watched.py / builders.py).

`train_cmd` builds every train.py command line (launcher, base overrides, run and cache directories, overrides);
`train` runs one through `run_watched`: watched for a hang, not timed: a run that prints nothing for STALL_S seconds
is killed and its test fails (a slow step on a loaded machine never trips it; a deadlock does). One CPU thread per
run: tiny models run fastest so, and every run of a bit-exact comparison then does the same arithmetic.
`side_by_side` runs independent runs on both CI cores.
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
from typing import Callable, Optional, Sequence

import torch

from diffv2.config import Config, register_configs
from monitoring.build import schema
from watched import HANG_S, STALL_S, run_watched  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
register_configs(monitoring=schema())  # the schema compose_cfg composes into, as train.py registers it

# A model small enough that a dozen steps take seconds; accumulation 2 exercises the micro-batch loop.
SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=32",
    "model.ffn_hidden=128", "model.vocab_size=264", "data.seq_len=64", "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8", "trainer.eval_batches=2", "logging.progress=false", "data.num_workers=0",
    "optim.warmup_steps=2",
]
# The inference tests' model: SMALL's shapes, no accumulation, 4 steps (train_tiny's checkpoint is step 4).
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=32",
        "model.ffn_hidden=128", "model.vocab_size=264", "data.seq_len=64", "trainer.micro_batch_size=4",
        "trainer.global_batch_size=4", "trainer.max_steps=4", "logging.progress=false", "data.num_workers=0"]
# The multi-process comparisons' schedule (on top of SMALL): every token observed, so layouts compare over the same
# tokens.
DIST_STEPS = ["trainer.max_steps=6", "trainer.log_interval=1", "trainer.eval_interval=3", "trainer.ckpt_interval=3",
              "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.eval_batches=2",
              "monitoring.observed_micro_batches=0"]

# Never inherited by a spawned run: the test hook, and the rank variables of a launcher the tests may run under.
NOT_INHERITED = ("DIFFV2_FAULT", "DIFFV2_FAULT_RANK", "WORLD_SIZE", "RANK", "LOCAL_RANK")


def run_env(fault: Optional[str] = None, extra: Optional[dict] = None, fault_rank: Optional[int] = None,
            unset: Sequence[str] = ()) -> dict:
    """The environment of a spawned run, read from os.environ at the call (so monkeypatch.setenv reaches it): W&B
    disabled unless WANDB_MODE says otherwise, unbuffered output, one OpenMP thread, nothing of NOT_INHERITED;
    DIFFV2_FAULT=`fault` arms a test hook (diffv2/train/faults.py), on rank `fault_rank` if given; then `extra` on
    top and the `unset` names removed."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if fault:
        env["DIFFV2_FAULT"] = fault
        if fault_rank is not None:
            env["DIFFV2_FAULT_RANK"] = str(fault_rank)
    env.update(extra or {})
    for name in unset:
        env.pop(name, None)
    return env


def train_cmd(run_dir: Optional[Path], cache: Optional[Path], *overrides: str, base: Sequence[str] = SMALL,
              nproc: int = 0, torchrun: Optional[Sequence[str]] = None, flags: Sequence[str] = ()) -> list[str]:
    """The command line of a train.py run: `python train.py`, or with `nproc` `python -m torch.distributed.run
    --standalone --nproc_per_node=N train.py`, or with `torchrun` that launcher with exactly those arguments
    (multi-node rendezvous); then Hydra's `flags` (`-m`, `--help`), hydra.run.dir=`run_dir` and
    data.cache_dir=`cache` (each left out when None), the `base` overrides and the test's own `overrides`."""
    if torchrun is None and nproc:
        torchrun = ["--standalone", f"--nproc_per_node={nproc}"]
    launcher = [sys.executable] if torchrun is None else [sys.executable, "-m", "torch.distributed.run", *torchrun]
    dirs = ([f"hydra.run.dir={run_dir}"] if run_dir is not None else []) + \
        ([f"data.cache_dir={cache}"] if cache is not None else [])
    return [*launcher, "train.py", *flags, *dirs, *base, *overrides]


def train(run_dir: Optional[Path], cache: Optional[Path], *overrides: str, base: Sequence[str] = SMALL,
          nproc: int = 0, torchrun: Optional[Sequence[str]] = None, flags: Sequence[str] = (),
          fault: Optional[str] = None, fault_rank: Optional[int] = None, env: Optional[dict] = None,
          unset: Sequence[str] = (), cwd: Path = ROOT, check: bool = False, signal_at: Optional[int] = None,
          sig: int = signal.SIGKILL, times: int = 1, group: bool = False) -> subprocess.CompletedProcess:
    """Run train.py (train_cmd's arguments) to its end or its death, from `cwd`, in run_env(fault, env, fault_rank,
    unset). `check`: a failed run fails the test with the end of its stderr.

    `signal_at`: send `sig` (`times` times, 50 ms apart) as soon as the run prints the loss of that step (0: as soon
    as it starts); `group`: to its whole process group, as a terminal's Ctrl-C, `timeout` or SLURM reach every
    process (train.py then runs in a session of its own)."""
    on_line = None
    if signal_at is not None:
        sent = threading.Event()

        def on_line(line: str, proc: subprocess.Popen) -> None:
            if not sent.is_set() and (signal_at == 0 or f"step {signal_at:>6} | loss" in line):
                sent.set()
                for i in range(times):
                    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                    if i + 1 < times:
                        time.sleep(0.05)

    cmd = train_cmd(run_dir, cache, *overrides, base=base, nproc=nproc, torchrun=torchrun, flags=flags)
    proc = run_watched(cmd, env=run_env(fault, env, fault_rank, unset), cwd=cwd, on_line=on_line,
                       start_new_session=group)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train_killed_after(run_dir: Path, cache: Path, step: int, *overrides: str) -> subprocess.CompletedProcess:
    """train() SIGKILLed from outside as soon as it prints the loss of `step`: wherever it then is."""
    return train(run_dir, cache, *overrides, signal_at=step, sig=signal.SIGKILL)


def train_signalled_after(run_dir: Path, cache: Path, step: int, sig: int, *overrides: str, times: int = 1,
                          group: bool = False, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """train() sent `sig` as soon as it prints the loss of `step` (see train's signal_at)."""
    return train(run_dir, cache, *overrides, env=env, signal_at=step, sig=sig, times=times, group=group)


def train_tiny(run_dir: Path, cache: Path, *overrides: str) -> Path:
    """A real 4-step run of train.py on TINY that must succeed; returns its checkpoint directory."""
    train(run_dir, cache, *overrides, base=TINY, check=True)
    return run_dir / "checkpoints" / "step_00000004"


def compose_cfg(*overrides: str) -> Config:
    """The Config train.py would compose from `overrides` (in process, through Hydra's compose API)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def prepare(*args: str) -> subprocess.CompletedProcess:
    return run_watched([sys.executable, "-m", "data.prepare", *args], env=run_env())


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
