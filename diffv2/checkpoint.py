"""Atomic DCP checkpoints: model + optimizer through torch.distributed.checkpoint, trainer state beside them.

Layout: RUN/checkpoints/step_00000100/{.metadata, *.distcp, trainer.pt, meta.json}. A checkpoint is written into
a hidden temporary directory and renamed into place only when complete, so a crash mid-save never touches the
last good one; meta.json (written last) lists every file's size and sha256 so truncation or corruption is found.
Temporary directories left by a killed save are removed by the next save; pruned checkpoints are renamed away
before deletion, so no half-deleted checkpoint is ever listed. One writer per checkpoint root is assumed.
A save that cannot fit on the disk raises DiskFullError and leaves every existing checkpoint as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from diffv2 import faults

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """A checkpoint did not fit on its filesystem; the message says how much it needs and how much is free."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the error, including DCP's per-rank CheckpointException failures."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (error, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def save(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict, meta: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp_*"):  # left by a save or prune that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}_{os.getpid()}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    need = _tensor_bytes(model_sd) + _tensor_bytes(optim_sd)  # a lower bound: DCP adds metadata
    if shutil.disk_usage(ckpt_root).free < need:
        raise DiskFullError(_disk_full_message(ckpt_root, final, need, written=False))
    kept = list_checkpoints(ckpt_root)
    expected = max(need, sum(p.stat().st_size for p in kept[-1].iterdir())) if kept else need
    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group on one device
            warnings.simplefilter("ignore")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        faults.kill("ckpt_after_shards", step)
        faults.disk_full(step, tmp)
        torch.save(trainer_state, tmp / "trainer.pt")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        meta_tmp = tmp / "meta.json"
        meta_tmp.write_text(json.dumps({**meta, "step": step, "files": files}, indent=1))
        with open(meta_tmp, "rb") as f:
            os.fsync(f.fileno())
        faults.kill("ckpt_after_meta", step)
        if final.exists():  # re-saving a step (e.g. after a resume) replaces it only once the new one is whole
            shutil.rmtree(final)
            faults.kill("ckpt_after_remove", step)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # A full disk does not always say ENOSPC (torch's zip writer reports a bad file position): compare the space
        # left with what the previous checkpoint took.
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))  # DCP's CheckpointException is a BaseException
        if not interrupted and (_is_disk_full(err) or shutil.disk_usage(ckpt_root).free < expected):
            raise DiskFullError(_disk_full_message(ckpt_root, final, expected, written=True)) from err
        raise
    faults.kill("ckpt_after_rename", step)
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        doomed = ckpt_root / f".tmp_prune_{old.name}"
        os.rename(old, doomed)  # atomic: a killed prune leaves a temporary directory, never a half checkpoint
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def _disk_full_message(ckpt_root: Path, final: Path, need: int, written: bool) -> str:
    free = shutil.disk_usage(ckpt_root).free
    kept = list_checkpoints(ckpt_root)
    last = f"the newest checkpoint {kept[-1].name} is untouched" if kept else "there is no earlier checkpoint"
    partial = "its partial files were removed" if written else "nothing was written"
    return (f"no space left on device for checkpoint {final.name} in {ckpt_root}: it needs about {_mb(need)}, "
            f"{_mb(free)} free; {partial} and {last} (free space, then rerun: trainer.resume=auto continues from it)")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Completed checkpoint directories, oldest first (temporary directories are ignored)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def verify(path: Path) -> Optional[str]:
    """None when the checkpoint is whole, else the reason it is not."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "meta.json missing"
    try:
        files = json.loads(meta_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"meta.json unreadable ({e})"
    for name, want in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} missing"
        if p.stat().st_size != want["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {want['bytes']}"
        if _sha256(p) != want["sha256"]:
            return f"{name} checksum mismatch"
    return None


def latest_valid(ckpt_root: Path) -> Optional[Path]:
    """Newest checkpoint that verifies; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; falling back to the previous one", path, problem)
    return None


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def load(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer in place; returns the trainer state saved with them."""
    from diffv2 import safe_load

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    safe_load.dcp_load(state, path)  # stock dcp.load unpickles .metadata unrestricted (diffv2/safe_load.py)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return safe_load.torch_load(path / "trainer.pt")  # weights_only=True; a refusal is a one-line ValueError
