"""Atomic DCP checkpoints: model + optimizer through torch.distributed.checkpoint, trainer state beside them.

Layout: RUN/checkpoints/step_00000100/{.metadata, *.distcp, trainer.pt, meta.json}. A checkpoint is written into
a hidden temporary directory and renamed into place only when complete, so a crash mid-save never touches the
last good one; meta.json (written last) lists every file's size and sha256 so truncation or corruption is found.
Temporary directories left by a killed save are removed by the next save; pruned checkpoints are renamed away
before deletion, so no half-deleted checkpoint is ever listed. One job per checkpoint root is assumed; within it,
every rank writes its own shards and rank 0 alone writes the manifest and renames.
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
from pathlib import Path
from typing import Optional

import torch

from diffv2.train.faults import NO_FAULTS, FaultPlan
from diffv2.parallel import dist as pdist

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


class Checkpointer:
    """Writes a run's checkpoints into `ckpt_root`; holds the unfinished half of an asynchronous save.

    `save` writes checkpoint `step` atomically and prunes to the newest `keep_last`. Collective: every rank calls it.
    The engine (diffv2/parallel/engine.py) writes the model and optimizer shards of every rank into a temporary
    directory; rank 0 adds trainer.pt and the manifest and renames it into place once every rank's files are
    whole. `async_save`: the shards are copied to host memory now and written in the background; the manifest and
    rename happen at the next save (or `finish_pending`), so until then the previous checkpoint is the newest.
    `faults`: the test hooks armed for this process (diffv2/train/faults.py).
    """

    def __init__(self, ckpt_root: Path, faults: FaultPlan = NO_FAULTS):
        self.root, self.faults = ckpt_root, faults
        self._pending: Optional[tuple] = None  # the finishing half of an asynchronous save

    def save(self, step: int, engine, trainer_state: dict, meta: dict, keep_last: int,
             async_save: bool = False) -> Path:
        self.finish_pending()
        ckpt_root = self.root
        rank0 = pdist.rank() == 0
        final = ckpt_root / f"step_{step:08d}"
        tmp = ckpt_root / f".tmp_step_{step:08d}"
        if rank0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            for stale in ckpt_root.glob(".tmp_*"):  # left by a save or prune that was killed
                shutil.rmtree(stale, ignore_errors=True)
        pdist.barrier()
        need = int(pdist.all_sum(engine.state_bytes()))  # a lower bound: formats add metadata
        kept = list_checkpoints(ckpt_root)
        expected = max(need, sum(p.stat().st_size for p in kept[-1].iterdir())) if kept else need
        if not pdist.all_ok(shutil.disk_usage(ckpt_root).free >= need):
            raise DiskFullError(_disk_full_message(ckpt_root, final, need, written=False))
        try:
            ok = False
            try:
                engine.save(tmp, async_ok=async_save)
                ok = True
            finally:
                if not pdist.all_ok(ok):  # a rank whose write failed: every rank leaves the same way
                    raise RuntimeError(f"checkpoint {final.name}: a rank failed to write its shards (see its log)")
            args = (engine, tmp, final, step, trainer_state, meta, expected, keep_last)
            if async_save:
                self._pending = args
                return final
            self._complete(*args)
        except BaseException as err:
            _cleanup_after(err, ckpt_root, tmp, final, expected)
            raise
        return final

    def finish_pending(self) -> None:
        """Complete an asynchronous save (waits for its background writes). Collective."""
        args, self._pending = self._pending, None
        if args is None:
            return
        try:
            self._complete(*args)
        except BaseException as err:
            _cleanup_after(err, self.root, args[1], args[2], args[6])
            raise

    def _complete(self, engine, tmp: Path, final: Path, step: int, trainer_state: dict, meta: dict,
                  expected: int, keep_last: int) -> None:
        ckpt_root, faults = self.root, self.faults
        engine.wait()
        pdist.barrier()  # every rank's shards are on disk
        faults.kill("ckpt_after_shards", step)
        faults.disk_full(step, tmp)
        error: Optional[BaseException] = None
        try:  # each rank fsyncs and hashes a share of the files (every rank sees them all on a shared filesystem)
            names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())  # engines may nest
            mine = {n: _file_record(tmp / n) for n in names[pdist.rank()::pdist.world_size()]}
        except OSError as err:
            error, mine = err, {}
        files = _gather_dicts(mine)  # collective: reached by every rank, failed or not
        if pdist.rank() == 0 and error is None:
            try:
                torch.save(trainer_state, tmp / "trainer.pt")
                files["trainer.pt"] = _file_record(tmp / "trainer.pt")
                _publish(ckpt_root, tmp, final, step, meta, dict(sorted(files.items())), faults)
            except BaseException as err:  # noqa: BLE001 - reported to every rank below, then raised
                error = err
        if not pdist.all_ok(error is None):  # every rank leaves the same way
            raise error if error is not None else RuntimeError(f"checkpoint {final.name} failed on another rank")
        faults.kill("ckpt_after_rename", step)
        if pdist.rank() == 0:
            for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
                doomed = ckpt_root / f".tmp_prune_{old.name}"
                os.rename(old, doomed)  # atomic: a killed prune leaves a temporary directory, never a half checkpoint
                shutil.rmtree(doomed, ignore_errors=True)
        pdist.barrier()


def save(ckpt_root: Path, step: int, engine, trainer_state: dict, meta: dict, keep_last: int) -> Path:
    """One synchronous save into `ckpt_root` (see `Checkpointer.save`)."""
    return Checkpointer(ckpt_root).save(step, engine, trainer_state, meta, keep_last)


def _file_record(path: Path) -> dict:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _gather_dicts(mine: dict) -> dict:
    if pdist.world_size() == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * pdist.world_size()
    dist.all_gather_object(parts, mine, group=pdist.control_group())
    return {k: v for part in parts for k, v in part.items()}


def _publish(ckpt_root: Path, tmp: Path, final: Path, step: int, meta: dict, files: dict, faults: FaultPlan) -> None:
    """Rank 0: the manifest last, then the rename that makes the checkpoint visible."""
    meta_tmp = tmp / "meta.json"
    meta_tmp.write_text(json.dumps({**meta, "step": step, "world_size": pdist.world_size(), "files": files},
                                   indent=1))
    with open(meta_tmp, "rb") as f:
        os.fsync(f.fileno())
    faults.kill("ckpt_after_meta", step)
    if final.exists():  # re-saving a step (e.g. after a resume) replaces it only once the new one is whole
        shutil.rmtree(final)
        faults.kill("ckpt_after_remove", step)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)


def _cleanup_after(err: BaseException, ckpt_root: Path, tmp: Path, final: Path, expected: int) -> None:
    """Remove a failed save's files; a full disk becomes DiskFullError (raised from `err`)."""
    if pdist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    # A full disk does not always say ENOSPC (torch's zip writer reports a bad file position): compare the space
    # left with what the previous checkpoint took.
    interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))  # DCP's CheckpointException is a BaseException
    if isinstance(err, DiskFullError) or interrupted:
        return
    if _is_disk_full(err) or shutil.disk_usage(ckpt_root).free < expected:
        raise DiskFullError(_disk_full_message(ckpt_root, final, expected, written=True)) from err


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


def load(path: Path, engine) -> dict:
    """Restore model and optimizer in place through the engine (collective); returns the trainer state saved
    with them. DCP checkpoints load onto any number of ranks (resharded); trainer.pt holds no tensors of the model."""
    from diffv2 import safe_load

    engine.load(path)
    return safe_load.torch_load(path / "trainer.pt")  # weights_only=True; a refusal is a one-line ValueError
