"""Atomic DCP checkpoints: model + optimizer through torch.distributed.checkpoint, trainer state beside them.

Layout: RUN/checkpoints/step_00000100/{.metadata, *.distcp, trainer.pt, meta.json}. A checkpoint is written into
a hidden temporary directory and renamed into place only when complete, so a crash mid-save never touches the
last good one; meta.json (written last) lists every file's size and sha256 so truncation or corruption is found.
"""

from __future__ import annotations

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


def save(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict, meta: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # DCP warns that it runs without a process group on one device
            warnings.simplefilter("ignore")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(trainer_state, tmp / "trainer.pt")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        meta_tmp = tmp / "meta.json"
        meta_tmp.write_text(json.dumps({**meta, "step": step, "files": files}, indent=1))
        with open(meta_tmp, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. after a resume) replaces it only once the new one is whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(path / "trainer.pt", weights_only=True)
