"""Kill -9 at fault points, damaged checkpoints and a full disk: a resumed run ends bit-identical to one never hurt.

Three chains of real train.py runs share one run directory each: every attempt is SIGKILLed at a fault point
(diffv2/train/faults.py) or from outside, then the next attempt resumes with trainer.resume=auto (and is itself
killed at the next point); the last one finishes. One uninterrupted run is the reference. The chains run side
by side on the two CI cores (tests/cli_runs.py); each test below checks one property over every attempt.
"""

from __future__ import annotations

import errno
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import pytest
import torch

from cli_runs import (checkpoint_tensors, differing_tensors, error_line, side_by_side, train, train_killed_after,
                      trajectory)
from diffv2.train import checkpoint
from diffv2.parallel.engine import Engine
from diffv2.config import ModelConfig
from diffv2.model.transformer import Transformer
from diffv2.train.sink import rewind_jsonl

RUN = ["trainer.max_steps=12", "trainer.log_interval=1", "trainer.ckpt_interval=2", "trainer.eval_interval=4",
       "trainer.keep_last=2"]
KILLED = -signal.SIGKILL
STOPPED = 3  # train.py's exit code for a run stopped mid-way (here: the disk is full)


def flip_byte(ckpt: Path) -> None:
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def truncate_shard(ckpt: Path) -> None:
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])


def delete_shard(ckpt: Path) -> None:
    next(ckpt.glob("*.distcp")).unlink()


def delete_manifest(ckpt: Path) -> None:
    (ckpt / "meta.json").unlink()


def delete_dcp_metadata(ckpt: Path) -> None:
    (ckpt / ".metadata").unlink()


@dataclass
class Attempt:
    where: str  # the fault, in words
    newest_after: Union[int, tuple]  # newest checkpoint that verifies after it (a tuple: the kill's timing decides)
    fault: Optional[str] = None  # DIFFV2_FAULT of this attempt
    kill_after_step: Optional[int] = None  # SIGKILL from outside once this step's loss is printed
    damage: Optional[Callable[[Path], None]] = None  # done to the newest checkpoint before the attempt
    warning: str = ""  # what the resume must say about the damaged checkpoint
    exit_code: int = KILLED


CHAINS = {
    "training and checkpoint writes": [
        Attempt("before the forward pass of step 3", 2, fault="step:3"),
        Attempt("after the backward pass of step 3", 2, fault="backward:3"),
        Attempt("checkpoint 4: shards written, no meta.json", 2, fault="ckpt_after_shards:4"),
        Attempt("checkpoint 4: complete but not renamed into place", 2, fault="ckpt_after_meta:4"),
        Attempt("checkpoint 4: renamed, older ones not pruned", 4, fault="ckpt_after_rename:4"),
        Attempt("metrics of step 5 written, no checkpoint", 4, fault="logged:5"),
        Attempt("validation pass after step 8", 6, fault="eval:8"),
        Attempt("from outside, once step 9 is printed", (8, 10), kill_after_step=9),
        Attempt("checkpoint 12 (the last): renamed, not pruned", 12, fault="ckpt_after_rename:12"),
        Attempt("no fault: rerun after the last checkpoint", 12, exit_code=0),
    ],
    "damaged checkpoints": [
        Attempt("metrics of step 9 written", 8, fault="logged:9"),
        Attempt("flipped byte; replacing checkpoint 8: old removed, new not renamed", 6, fault="ckpt_after_remove:8",
                damage=flip_byte, warning="checksum mismatch"),
        Attempt("metrics of step 11 written", 10, fault="logged:11"),
        Attempt("truncated shard; metrics of step 11 written", 10, fault="logged:11", damage=truncate_shard,
                warning="bytes, expected"),
        Attempt("missing shard; from outside, once step 11 is printed", (10, 12), kill_after_step=11,
                damage=delete_shard, warning=".distcp missing"),
        Attempt("missing meta.json; metrics of step 11 written", 10, fault="logged:11", damage=delete_manifest,
                warning="meta.json missing"),
        Attempt("missing DCP .metadata; no fault", 12, damage=delete_dcp_metadata, warning=".metadata missing",
                exit_code=0),
    ],
    "full disk": [
        Attempt("checkpoint 6's writer gets ENOSPC", 4, fault="enospc:6", exit_code=STOPPED),
        Attempt("no fault: rerun once there is space", 12, exit_code=0),
    ],
}


@dataclass
class Outcome:
    attempt: Attempt
    proc: subprocess.CompletedProcess
    resumed_from: Optional[int]  # the step the attempt resumed from, None for a fresh start
    newest_after: Optional[int]
    temp_dirs_after: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


def newest_valid_step(ckpt_root: Path) -> Optional[int]:
    found = checkpoint.latest_valid(ckpt_root)
    return int(found.name.split("_")[1]) if found else None


def run_chain(run_dir: Path, cache: Path, attempts: list[Attempt]) -> list[Outcome]:
    outcomes, ckpt_root = [], run_dir / "checkpoints"
    for attempt in attempts:
        if attempt.damage:
            attempt.damage(checkpoint.list_checkpoints(ckpt_root)[-1])
        if attempt.kill_after_step:
            proc = train_killed_after(run_dir, cache, attempt.kill_after_step, *RUN)
        else:
            proc = train(run_dir, cache, *RUN, fault=attempt.fault)
        # a rerun of a finished run resumes nothing: it names the finished checkpoint it found
        resumed = re.search(r"resumed from \S+step_(\d+) at step|already finished at step \d+: .* \| checkpoint "
                            r"\S+step_(\d+)", proc.stdout)
        outcomes.append(Outcome(attempt, proc, int(resumed.group(1) or resumed.group(2)) if resumed else None,
                                newest_valid_step(ckpt_root), sorted(p.name for p in ckpt_root.glob(".tmp_*"))))
    return outcomes


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict:
    root = tmp_path_factory.mktemp("faults")
    reference = train(root / "reference", cache, *RUN)  # alone first: it also prepares the data caches
    assert reference.returncode == 0, reference.stderr[-3000:]
    chains = [lambda name=name: run_chain(root / name.replace(" ", "-"), cache, CHAINS[name]) for name in CHAINS]
    return {"reference": root / "reference", **dict(zip(CHAINS, side_by_side(*chains)))}


def chain_cases():
    return [pytest.param(name, i, id=f"{name}: {a.where}") for name in CHAINS for i, a in enumerate(CHAINS[name])]


def test_at_least_ten_kill_points_are_covered():
    kills = [a for chain in CHAINS.values() for a in chain if a.exit_code == KILLED]
    assert len(kills) >= 10 and len({a.fault or a.where for a in kills}) >= 10


@pytest.mark.parametrize("chain, index", chain_cases())
def test_each_attempt_dies_where_it_was_told(runs, chain, index):
    outcome = runs[chain][index]
    assert outcome.proc.returncode == outcome.attempt.exit_code, outcome.output[-3000:]


@pytest.mark.parametrize("chain, index", chain_cases())
def test_only_complete_checkpoints_count_after_a_kill(runs, chain, index):
    """A kill inside a save never yields a checkpoint that verifies; a save that finished always survives."""
    outcome, expected = runs[chain][index], runs[chain][index].attempt.newest_after
    assert outcome.newest_after in (expected if isinstance(expected, tuple) else (expected,))


@pytest.mark.parametrize("chain, index", [c for c in chain_cases() if c.values[1] > 0])
def test_resume_continues_from_the_last_good_checkpoint(runs, chain, index):
    before, outcome = runs[chain][index - 1], runs[chain][index]
    if outcome.attempt.damage:  # the damaged newest one is skipped for the one before it
        assert outcome.resumed_from == before.newest_after - 2
    else:
        assert outcome.resumed_from == before.newest_after


@pytest.mark.parametrize("chain, index", [c for c in chain_cases() if CHAINS[c.values[0]][c.values[1]].damage])
def test_damaged_checkpoint_is_skipped_with_a_clear_warning(runs, chain, index):
    before, outcome = runs[chain][index - 1], runs[chain][index]
    damaged = f"step_{before.newest_after:08d}"
    warning = next(line for line in outcome.output.splitlines() if "skipping checkpoint" in line)
    assert damaged in warning and outcome.attempt.warning in warning and "falling back to the previous one" in warning


def test_kill_inside_a_save_leaves_its_temporary_directory_until_the_next_save(runs):
    chain = runs["training and checkpoint writes"]
    assert [len(o.temp_dirs_after) for o in chain[2:5]] == [1, 1, 0]
    assert chain[2].temp_dirs_after == [".tmp_step_00000004"]  # one name on every rank (no pid suffix)


@pytest.mark.parametrize("chain", list(CHAINS))
def test_killed_run_ends_bit_identical_to_an_uninterrupted_one(runs, chain):
    reference, run_dir = runs["reference"], runs["reference"].parent / chain.replace(" ", "-")
    assert runs[chain][-1].proc.returncode == 0
    assert trajectory(run_dir) == trajectory(reference)  # every step's loss and grad norm, every validation loss
    final = "checkpoints/step_00000012"
    assert differing_tensors(checkpoint_tensors(run_dir / final), checkpoint_tensors(reference / final)) == []
    rng = [torch.load(d / final / "trainer.pt", weights_only=True)["rng"]["torch"] for d in (run_dir, reference)]
    assert torch.equal(*rng)
    assert list((run_dir / "checkpoints").glob(".tmp_*")) == []


def test_full_disk_stops_with_one_line_keeping_the_last_checkpoint(runs):
    outcome = runs["full disk"][0]
    assert "Traceback" not in outcome.proc.stderr
    assert error_line(outcome.proc).startswith(
        "error: stopped at step 6: no space left on device for checkpoint step_00000006")
    assert "the newest checkpoint step_00000004 is untouched" in error_line(outcome.proc)
    assert outcome.temp_dirs_after == []


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "train/loss": 5.5}\n{"step": 2, "train/loss": 5.1}\n{"step": 3, "train/lo')
    rewind_jsonl(log, 2)
    assert log.read_text() == '{"step": 1, "train/loss": 5.5}\n{"step": 2, "train/loss": 5.1}\n'


# A real size-limited filesystem, where the disk says ENOSPC itself (needs mount rights: root or CAP_SYS_ADMIN).
NO_MOUNT = "cannot mount a size-limited tmpfs here (needs root or CAP_SYS_ADMIN); the ENOSPC fault hook covers it"


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount_point)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    if not mounted:
        pytest.skip(NO_MOUNT)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_real_full_disk_stops_the_run_and_keeps_the_last_checkpoint(small_disk, cache):
    """2.5 MB hold the run record and one 1.6 MB checkpoint; the next one does not fit."""
    run_dir = small_disk / "run"
    proc = train(run_dir, cache, *RUN)
    assert proc.returncode == STOPPED, proc.stderr[-3000:]
    assert error_line(proc).startswith("error: stopped at step 4: no space left on device for checkpoint step_00000004")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    assert checkpoint.verify(run_dir / "checkpoints/step_00000002") is None


def test_real_full_disk_mid_write_is_reported_and_cleaned(small_disk):
    """The checkpoint passes the free-space check but the filesystem runs out while DCP writes it."""
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=64, vocab_size=64,
                      max_seq_len=32)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    model.loss(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))[0].backward()
    optimizer.step()
    root = small_disk / "checkpoints"
    good = checkpoint.save(root, 1, Engine(model, optimizer), {}, {}, keep_last=2)
    on_disk = sum(p.stat().st_size for p in good.iterdir())
    lower_bound = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # params + AdamW moments
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - (lower_bound + on_disk) // 2))  # between the two
    with pytest.raises(checkpoint.DiskFullError, match="no space left on device for checkpoint step_00000002") as err:
        checkpoint.save(root, 2, Engine(model, optimizer), {}, {}, keep_last=2)
    assert err.value.errno == errno.ENOSPC and "its partial files were removed" in str(err.value)
    assert [p.name for p in root.iterdir()] == [good.name] and checkpoint.verify(good) is None
