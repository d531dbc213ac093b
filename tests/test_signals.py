"""Nothing lost in real operation (docs/reliability.md): stop signals sent to the whole process group, as a
terminal's Ctrl-C, `timeout -s TERM` and SLURM deliver them (DataLoader workers included), at start-up and
mid-run; a second Ctrl-C; reruns that must not destroy records; one writer per run directory; start-up refusals
that leave nothing behind. Every run is a real `train.py` on the tiny test model with a DataLoader worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli_runs import (ROOT, checkpoint_tensors, differing_tensors, error_line, metrics, run_env, side_by_side, train,
                      train_cmd, train_signalled_after, trajectory, tree_digest)
from diffv2.train import checkpoint

RUN = ["trainer.max_steps=12", "trainer.log_interval=1", "trainer.eval_interval=4", "trainer.ckpt_interval=100",
       "data.num_workers=1"]
FINAL = "checkpoints/step_00000012"
PREEMPTED, INTERRUPTED = 75, 130


def newest_step(run_dir: Path) -> int:
    found = checkpoint.latest_valid(run_dir / "checkpoints")
    return checkpoint.read_meta(found)["step"] if found else 0


def same_run(run_dir: Path, reference: Path) -> None:
    """Every step's loss and grad norm, every validation loss, the final parameters and optimizer state."""
    assert trajectory(run_dir) == trajectory(reference)
    assert differing_tensors(checkpoint_tensors(run_dir / FINAL), checkpoint_tensors(reference / FINAL)) == []


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]


def wandb_core_children(pid: int) -> list[int]:
    """The W&B service processes train.py `pid` started (in a session of their own: SLURM signals them anyway)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = (stat.parent / "comm").read_text().strip()
        except OSError:
            continue
        if int(fields[1]) == pid and "wandb" in comm:
            found.append(int(stat.parent.name))
    return found


def chain(run_dir: Path, cache: Path, sig: int, times: int = 1, *extra: str, env=None) -> list:
    """Signal the process group after step 3, then rerun to the end."""
    first = train_signalled_after(run_dir, cache, 3, sig, *RUN, *extra, times=times, group=True, env=env)
    stopped_at = newest_step(run_dir)
    return [first, stopped_at, train(run_dir, cache, *RUN, *extra, env=env)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict:
    root = tmp_path_factory.mktemp("signals")
    reference = train(root / "reference", cache, *RUN)  # alone first: it also prepares the data caches
    assert reference.returncode == 0, reference.stderr[-3000:]
    offline = {"WANDB_MODE": "offline", "WANDB_X_DISABLE_STATS": "true"}
    jobs = {
        "usr1": lambda: chain(root / "usr1", cache, signal.SIGUSR1),
        "term": lambda: chain(root / "term", cache, signal.SIGTERM),
        "int": lambda: chain(root / "int", cache, signal.SIGINT, 1, env=offline),
        "int twice": lambda: chain(root / "int-twice", cache, signal.SIGINT, 2, "trainer.ckpt_interval=2"),
        "start-up": lambda: train_signalled_after(root / "start-up", cache, 0, signal.SIGUSR1, *RUN, group=True),
        "kill -9": lambda: chain(root / "kill9", cache, signal.SIGKILL),
    }
    results = dict(zip(jobs, side_by_side(*jobs.values())))
    finished = root / "usr1"
    before = tree_digest(finished)
    results["finished again"] = (train(finished, cache, *RUN), before, tree_digest(finished))
    return {"reference": root / "reference", "root": root, **results}


@pytest.mark.parametrize("name, code", [("usr1", PREEMPTED), ("term", PREEMPTED), ("int", INTERRUPTED)])
def test_a_group_signal_saves_stops_and_resumes_bit_exactly(runs, name, code):
    """SIGUSR1 (SLURM's warning), SIGTERM (`timeout`, scancel), SIGINT (Ctrl-C) to every process of the group,
    the DataLoader worker included: a checkpoint of the step it stopped at, the documented exit code, no traceback;
    the rerun resumes from it and ends bit-identical to a run never stopped."""
    first, stopped_at, rerun = runs[name]
    assert first.returncode == code, (first.stdout + first.stderr)[-3000:]
    no_traceback(first)
    assert 3 <= stopped_at < 12
    assert "checkpoint saved; run the same command again to resume" in first.stdout + first.stderr
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout and f"at step {stopped_at}" in rerun.stdout
    same_run(runs["root"] / name, runs["reference"])
    assert not (runs["root"] / name / "metrics.rewound.jsonl").exists()  # nothing logged past the checkpoint


def test_ctrl_c_tells_the_terminal_what_happens(runs):
    first = runs["int"][0]
    assert "Ctrl-C: stopping after this step with a checkpoint (press Ctrl-C again to abort at once)" in first.stderr
    assert "interrupted by SIGINT (Ctrl-C): checkpoint saved" in first.stdout


def test_one_wandb_run_per_run_directory_across_restarts(runs):
    run_dir = runs["root"] / "int"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline), offline


def test_second_ctrl_c_aborts_at_once_and_the_newest_checkpoint_stays_valid(runs):
    first, stopped_at, rerun = runs["int twice"]
    assert first.returncode == INTERRUPTED
    assert "Traceback" not in first.stderr
    line = error_line(first)
    assert line.startswith("error: aborted by a second Ctrl-C; the newest checkpoint") and "is intact" in line, line
    newest = checkpoint.list_checkpoints(runs["root"] / "int-twice" / "checkpoints")[-1]
    assert checkpoint.verify(newest) is None and stopped_at >= 2
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_run(runs["root"] / "int-twice", runs["reference"])


def test_a_signal_during_start_up_stops_before_the_first_step_writing_nothing(runs):
    proc = runs["start-up"]
    assert proc.returncode == PREEMPTED, (proc.stdout + proc.stderr)[-3000:]
    no_traceback(proc)
    assert "during start-up: stopped before the first step, nothing written" in proc.stdout
    assert "step      1 | loss" not in proc.stdout
    assert not (runs["root"] / "start-up").exists()


def test_rows_logged_after_the_resumed_checkpoint_are_moved_aside_not_dropped(runs):
    """Killed (-9) after step 3 with no checkpoint yet: the rerun starts over and metrics.jsonl holds one row
    per step again; the killed attempt's rows are kept in metrics.rewound.jsonl, and the rerun says so."""
    first, stopped_at, rerun = runs["kill -9"]
    run_dir = runs["root"] / "kill9"
    assert first.returncode == -signal.SIGKILL and stopped_at == 0
    assert "3 line(s) logged after step 0" in rerun.stdout + rerun.stderr or \
        "line(s) logged after step 0, the step this run resumes from, moved to metrics.rewound.jsonl" in \
        rerun.stdout + rerun.stderr
    aside = [json.loads(line) for line in (run_dir / "metrics.rewound.jsonl").read_text().splitlines()]
    assert [r["step"] for r in aside if "train/loss" in r][:3] == [1, 2, 3]
    same_run(run_dir, runs["reference"])


def test_rerunning_a_finished_run_says_so_with_its_real_numbers_and_writes_nothing(runs):
    proc, before, after = runs["finished again"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [m for m in metrics(runs["root"] / "usr1") if "train/loss" in m][-1]["train/loss"]
    val = [m for m in metrics(runs["root"] / "usr1") if "train/val_loss" in m][-1]["train/val_loss"]
    assert f"already finished at step 12: train loss {last:.4f}, validation loss {val:.4f}" in proc.stdout
    assert "nan" not in proc.stdout
    assert after == before


# ------------------------------------------------------------------------------------------- one writer per run


def test_a_second_process_on_a_run_directory_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, cache):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(train_cmd(run_dir, cache, *RUN, "trainer.max_steps=400"), cwd=ROOT,
                              env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in holder.stdout:
            if "step      1 | loss" in line:
                break
        second = train(run_dir, cache, *RUN, "trainer.max_steps=400")
        assert second.returncode == 2
        assert error_line(second).startswith(f"error: run directory {run_dir} is in use by pid {holder.pid} on host")
        assert "pick another run_name" in error_line(second)
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == holder.pid
        assert "resumed from" not in second.stdout and "model tiny" not in second.stdout  # refused before building
        assert holder.poll() is None  # the first run goes on
    finally:
        holder.kill()
        holder.wait()
    steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved rows
    # the holder was killed: the next start takes the lock over and says so (then a start-up signal ends it fast)
    third = train_signalled_after(run_dir, cache, 0, signal.SIGUSR1, *RUN, "trainer.max_steps=400")
    assert third.returncode == PREEMPTED, third.stderr[-3000:]
    assert f"took over the lock left by pid {holder.pid}" in third.stdout


# ---------------------------------------------------------------------------------- refusals that leave nothing


@pytest.mark.parametrize("overrides, env, expected", [
    (["trainer.global_batch_size=7"], {}, "error: trainer.global_batch_size"),
    (["model.n_layers=100000"], {}, "needs at least"),
    ([], {"WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": "/nonexistent"},
     "error: W&B mode is online but no API key is configured"),
    (["logging.wandb.project='a/b?c#d%e'"], {"WANDB_MODE": "offline"},
     "error: logging.wandb.project='a/b?c#d%e' contains '#' '%' '/' '?', which W&B does not allow"),
])
def test_a_refused_start_is_one_line_and_leaves_no_directory(tmp_path, cache, overrides, env, expected):
    run_dir = tmp_path / "runs" / "new"
    start = time.monotonic()
    proc = train(run_dir, cache, *overrides, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in error_line(proc) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert not run_dir.exists()
    assert time.monotonic() - start < 120  # refused before allocating: no minutes of growth


# ----------------------------------------------------------------------------------- several ranks, W&B service


def test_every_rank_exits_with_the_same_code_and_a_dead_wandb_service_does_not_crash_the_stop(tmp_path, cache):
    """Two ranks started as srun starts them (one process group: both, their DataLoader workers), W&B offline on
    rank 0. At step 3 the W&B service is SIGTERMed (SLURM signals every process of the step, the service too)
    and SIGUSR1 goes to the group: both ranks save, stop and exit 75; the rerun resumes and finishes."""
    port = str(_free_port())
    env = run_env(extra={"WANDB_MODE": "offline", "WANDB_X_DISABLE_STATS": "true", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": port, "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2"},
                  unset=("SLURM_JOB_ID",))
    run_dir = tmp_path / "job"
    cmd = train_cmd(run_dir, cache, *RUN, "trainer.micro_batch_size=2")
    leader = subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=os.setpgrp)
    other = subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: os.setpgid(0, leader.pid))
    seen = []
    try:
        for line in leader.stdout:
            seen.append(line)
            if "step      3 | loss" in line:
                services = wandb_core_children(leader.pid)
                for pid in services:
                    os.kill(pid, signal.SIGTERM)
                os.killpg(leader.pid, signal.SIGUSR1)
        codes = (leader.wait(timeout=600), other.wait(timeout=600))
    finally:
        for p in (leader, other):
            if p.poll() is None:
                p.kill()
    text = "".join(seen) + other.stdout.read()
    assert services, "no W&B service process found"
    assert codes == (PREEMPTED, PREEMPTED), text[-3000:]
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]
    assert re.search(r"stopping at step \d+: preempted by SIGUSR1: checkpoint saved", text)
    assert newest_step(run_dir) >= 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
