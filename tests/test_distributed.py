"""Multi-process training on CPU (gloo), through the real `torchrun` and `train.py`: the FSDP2 engine's layouts
match a one-process run with the same global batch, checkpoints move between world sizes, activation
checkpointing and async saves change nothing, a 2-node c10d rendezvous trains, and a dead or stalled rank ends the
job with a clear error instead of a hang (issue: scale out; reliability point 5).

Each run is a few steps of the tiny test model; runs are compared on what the loop logs (loss and grad norm per
step, validation loss) to float tolerance: the ranks' reductions add in a different order than one process does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runs import (DIST_STEPS, HANG_S, ROOT, SMALL, error_line, metrics, run_env, run_watched, side_by_side,
                      train, train_cmd, trajectory)
from diffv2.train import checkpoint
from slurm_stand_ins import calls, stand_ins


def torchrun(run_dir: Path, cache: Path, *overrides: str, nproc: int = 2, fault: str = "", fault_rank: int = 0,
             ) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc train.py` of the DIST_STEPS schedule."""
    return train(run_dir, cache, *DIST_STEPS, *overrides, nproc=nproc, fault=fault or None, fault_rank=fault_rank)


def single(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return train(run_dir, cache, *DIST_STEPS, *overrides)


def assert_same_training(a: Path, b: Path, rel: float = 2e-5, param_norms: bool = True) -> None:
    ta, tb = trajectory(a), trajectory(b)
    assert ta["train"].keys() == tb["train"].keys() and ta["val"].keys() == tb["val"].keys()
    for step, (loss, norm) in ta["train"].items():
        assert tb["train"][step][0] == pytest.approx(loss, rel=rel), f"loss at step {step}"
        assert tb["train"][step][1] == pytest.approx(norm, rel=10 * rel), f"grad norm at step {step}"
    for step, val in ta["val"].items():
        assert tb["val"][step] == pytest.approx(val, rel=rel), f"validation loss at step {step}"
    # The grad-norm monitor's per-kind and per-layer norms are global over the shards (issue: monitoring, point 2),
    # and so are the residual-stream maxima (every rank's tokens) and the training forward's per-head context RMS
    # (every rank's tokens, every TP rank's heads; issue #4): per-layer mean/min/max, a1/a2, floor, the heatmap; so
    # are the DIFF V2 sigmoid(lambda) mean, quantiles (of the same token subsample) and per-head heatmap.
    rows_a = {m["step"]: m for m in metrics(a) if "grad/norm_kind/q" in m}
    rows_b = {m["step"]: m for m in metrics(b) if "grad/norm_kind/q" in m}
    assert rows_a and rows_a.keys() == rows_b.keys()
    for step, row in rows_a.items():
        kinds = ("grad/norm_kind/", "grad/norm_layer/", "act/max_abs/", "act/top2_abs/", "act/top3_abs/",
                 "attn/context_rms_", "attn/value_rms/", "attn/lambda_sigmoid_")
        kinds += ("grad/param_norm",) if param_norms else ()
        probes_off = "attn/value_rms/L00" not in rows_b[step]  # probe passes are off under tp > 1 and ZeRO-3
        for key in (k for k in row if k.startswith(kinds) and not (probes_off and k.startswith("attn/value_rms/"))):
            assert key in rows_b[step], f"{key} at step {step}"
            want, got = _flat(row[key]), _flat(rows_b[step][key])  # *_heads matrices: layer x head entries
            assert len(got) == len(want) and got == pytest.approx(want, rel=10 * rel, abs=1e-7), f"{key} at {step}"
    last = rows_a[max(rows_a)]  # every monitor reads at the run's last step
    assert {"attn/context_rms_mean/L00", "attn/context_rms_a1_max/L01", "attn/context_rms_heads"} <= last.keys()
    # context_rms_a1 above means DIFF V2 (the default attention, sigmoid lambda) in every layout: its lambda too
    assert {"attn/lambda_sigmoid_mean/L00", "attn/lambda_sigmoid_p05/L01", "attn/lambda_sigmoid_heads"} <= last.keys()


def _flat(value) -> list:
    return [x for item in value for x in _flat(item)] if isinstance(value, list) else [value]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch (4 micro-batches of 2 per step)."""
    root = tmp_path_factory.mktemp("dist")
    cache = root / "cache"
    proc = single(root / "one", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "one", cache


@pytest.mark.parametrize("layout", [
    ["parallel.data_parallel=shard"],
    ["parallel.data_parallel=replicate", "parallel.activation_checkpoint=full"],
    ["parallel.data_parallel=hybrid", "parallel.shard_group_size=1", "parallel.activation_checkpoint=selective",
     "parallel.meta_init=true"],
    ["parallel=zero2"],
    ["parallel=zero3"],
], ids=["fsdp", "ddp+ac_full", "hsdp+ac_selective+meta_init", "deepspeed_zero2", "deepspeed_zero3"])
def test_two_ranks_train_like_one(reference, tmp_path, layout):
    ref, cache = reference
    proc = torchrun(tmp_path / "two", cache, *layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(ref, tmp_path / "two", param_norms="parallel=zero3" not in layout)  # off under ZeRO-3
    out = proc.stdout + proc.stderr
    assert out.count("step      6 | loss") == 1, "console lines come from rank 0 only"
    assert checkpoint.read_meta(tmp_path / "two/checkpoints/step_00000006")["world_size"] == 2
    deepspeed = any(o.startswith("parallel=zero") for o in layout)
    assert out.count("notice: DeepSpeed ZeRO-2 trained 350m DIFF V2 at 0.64x") == deepspeed, "once, from rank 0"


def test_meta_init_device_draws_do_not_depend_on_the_layout(reference, tmp_path):
    """parallel.meta_init_draw=device (the fast draw for huge models): every rank draws the same full tensors from
    its seeded generator and keeps its shard, so 2 ranks train exactly like 1 rank with the same setting."""
    ref, cache = reference
    fast = ["parallel.meta_init=true", "parallel.meta_init_draw=device"]
    one = single(tmp_path / "one", cache, *fast)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(tmp_path / "two", cache, *fast)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert trajectory(tmp_path / "one")["train"] != trajectory(ref)["train"]  # not the CPU build's weights


def test_checkpoints_move_between_world_sizes(reference, tmp_path):
    """A 2-rank checkpoint resumes on 1 rank and a 1-rank one on 2 (DCP reshards model and optimizer); both
    finish exactly where the uninterrupted run does."""
    ref, cache = reference
    first = torchrun(tmp_path / "a", cache, "trainer.max_steps=6", fault="rank_kill:5", fault_rank=1)
    assert first.returncode != 0 and [p.name for p in checkpoint.list_checkpoints(tmp_path / "a/checkpoints")] == [
        "step_00000003"]
    proc = single(tmp_path / "a", cache)
    assert proc.returncode == 0 and "resumed from" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert_same_training(ref, tmp_path / "a")

    killed = train(tmp_path / "b", cache, *DIST_STEPS, fault="step:5")
    assert killed.returncode != 0
    proc = torchrun(tmp_path / "b", cache, "parallel.async_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(ref, tmp_path / "b")
    assert checkpoint.verify(tmp_path / "b/checkpoints/step_00000006") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_c10d_rendezvous(reference, tmp_path):
    """Two torchrun agents (`--nnodes 2`, one process each) meet through a c10d rendezvous on localhost."""
    ref, cache = reference
    port = _free_port()

    def node(rank: int):
        launcher = ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=nodes-test", "--max_restarts=0"]
        return lambda: train(tmp_path / "nodes", cache, *DIST_STEPS, torchrun=launcher)

    results = side_by_side(node(0), node(1))
    for proc in results:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(ref, tmp_path / "nodes")


def srun_like(run_dir: Path, cache: Path, *overrides: str, ntasks: int = 2, fault: str = "", fault_rank: int = 0,
              timeout: float = HANG_S) -> list[subprocess.CompletedProcess]:
    """What `srun` does for one node: start every task itself with SLURM's variables (no torchrun agent that would
    tear the job down for us); MASTER_ADDR/PORT as the generated batch script exports them."""
    port = _free_port()
    env = run_env(fault or None, dict(SLURM_JOB_ID="4242", SLURM_NTASKS=str(ntasks), SLURM_NNODES="1",
                                      SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_JOB_NODELIST="localhost",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), fault_rank=fault_rank)
    cmd = train_cmd(run_dir, cache, *DIST_STEPS, *overrides)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ntasks)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def test_slurm_tasks_train_like_one(reference, tmp_path):
    """Tasks started with SLURM's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) form the job."""
    ref, cache = reference
    for proc in srun_like(tmp_path / "s", cache):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(ref, tmp_path / "s")


@pytest.mark.parametrize("fault", ["stall", "rank_kill"])
def test_a_lost_rank_ends_the_job_with_an_error_then_it_resumes(reference, tmp_path, fault):
    """Rank 1 hangs (or dies) at step 5: rank 0 leaves within parallel.timeout_s with a one-line error and exit
    code 4, the checkpoint of step 3 is intact, and a relaunch resumes from it and finishes like the reference."""
    ref, cache = reference
    timeout_s = 15
    start = time.monotonic()
    procs = srun_like(tmp_path / "r", cache, f"parallel.timeout_s={timeout_s}", fault=f"{fault}:5", fault_rank=1,
                      timeout=HANG_S) if fault == "rank_kill" else None
    if procs is None:  # the stalled rank never exits by itself: stop it once rank 0 has given up
        procs = _stalled_job(tmp_path / "r", cache, timeout_s)
    elapsed = time.monotonic() - start
    rank0 = procs[0]
    assert rank0.returncode == 4, rank0.stderr[-3000:]
    assert elapsed < timeout_s + 90, f"rank 0 took {elapsed:.0f}s to give up"
    last = error_line(rank0)
    assert last.startswith("[rank 0] error: rank 0: a collective") and "trainer.resume=auto" in last, last
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "r/checkpoints")] == ["step_00000003"]
    assert checkpoint.verify(tmp_path / "r/checkpoints/step_00000003") is None
    for proc in srun_like(tmp_path / "r", cache):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(ref, tmp_path / "r")


def _stalled_job(run_dir: Path, cache: Path, timeout_s: int) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = run_env("stall:5", dict(SLURM_JOB_ID="4243", SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), fault_rank=1)
    cmd = train_cmd(run_dir, cache, *DIST_STEPS, f"parallel.timeout_s={timeout_s}")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    stdout, stderr = procs[0].communicate(timeout=HANG_S)
    procs[1].kill()  # the scheduler's job: a task that hangs forever is killed when the job ends
    procs[1].communicate()
    return [subprocess.CompletedProcess(procs[0].args, procs[0].returncode, stdout, stderr)]


def test_slurm_job_preempted_checkpoints_requeues_and_resumes(tmp_path):
    """The generated batch script under stand-in `srun`/`scontrol` (the training tasks are real): SIGUSR1 to the
    tasks mid-run -> the ranks agree, save a checkpoint and exit 75 -> rank 0 runs `scontrol requeue JOB` -> the
    batch script starts again (as SLURM's requeue does), resumes and finishes exactly like an uninterrupted run."""
    import random
    import signal

    from launch import slurm

    cache, job_id = tmp_path / "cache", str(random.randrange(1000, 9999))
    overrides = [f"data.cache_dir={cache}", *SMALL, *DIST_STEPS, "trainer.max_steps=12", "trainer.ckpt_interval=100"]
    env = stand_ins(tmp_path)
    scontrol = Path(env["PATH"].split(os.pathsep)[0]) / "scontrol"  # this cluster's one node is this machine
    scontrol.write_text(scontrol.read_text().replace("gpu-node-07\\ngpu-node-08", "127.0.0.1"))
    env.update({k: v for k, v in run_env().items() if k.startswith(("WANDB", "OMP"))}, SLURM_JOB_ID=job_id,
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1")
    run_dir, script = tmp_path / "runs" / "job", tmp_path / "job.sbatch"
    assert slurm.main(["--nodes", "1", "--gpus-per-node", "2", "--time", "10", "--partition", "cpu", "--run-dir",
                       str(run_dir), "--python", sys.executable, "--out", str(script), "--dry-run", "--",
                       *overrides]) == 0
    reference = subprocess.Popen(train_cmd(tmp_path / "ref", cache, *DIST_STEPS, "trainer.max_steps=12",
                                           "trainer.ckpt_interval=100"),
                                 cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in job.stdout:
        seen.append(line)
        if "step      3 | loss" in line:  # SLURM signals every task of the step; here: all but the batch shell
            for pid in _train_processes(run_dir):
                os.kill(pid, signal.SIGUSR1)
    assert job.wait(timeout=HANG_S) == 75, "".join(seen)[-3000:]
    assert ["requeue", job_id] in calls(env, "scontrol")
    (saved,) = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert 3 <= checkpoint.read_meta(saved)["step"] < 12 and checkpoint.verify(saved) is None

    again = run_watched(["bash", str(script)], env=env, cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resumed from {saved}" in again.stdout + again.stderr
    assert reference.wait(timeout=HANG_S) == 0, reference.stderr.read()[-3000:]
    assert_same_training(tmp_path / "ref", run_dir)


def _train_processes(run_dir: Path) -> list[int]:
    """PIDs of the `python train.py ... hydra.run.dir=RUN` tasks (not the shells that started them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if len(argv) > 1 and argv[1] == "train.py" and f"hydra.run.dir={run_dir}" in argv:
            pids.append(int(proc.name))
    return pids


def test_tensor_parallel_train_py_like_one(tmp_path, reference):
    """parallel.tp=2 through train.py (each rank holds half of every block's heads and MLP columns). With QK-norm:
    the norm weights every head shares get their gradient summed over the TP ranks by the engine."""
    _, cache = reference
    heads = ["model.n_kv_heads=2", "model.attention.qk_norm=true"]  # tp must divide the KV heads (spec R5)
    one, two = side_by_side(lambda: single(tmp_path / "one", cache, *heads),
                            lambda: torchrun(tmp_path / "tp", cache, *heads, "parallel.tp=2"))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "tp")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_fsdp2_with_compile_and_activation_checkpointing(tmp_path):
    """On GPUs (NCCL, bf16): FSDP2 over up to 2 GPUs with compiled blocks, with and without full activation
    checkpointing; recomputation must not change the training beyond bf16 noise."""
    import torch

    gpus = min(torch.cuda.device_count(), 2)
    cache = tmp_path / "cache"
    common = ["trainer.compile=true", "trainer.device=cuda", "model.n_kv_heads=2", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=2", "trainer.eval_batches=4"]
    plain = torchrun(tmp_path / "plain", cache, *common, nproc=gpus)
    assert plain.returncode == 0, plain.stderr[-3000:]
    ac = torchrun(tmp_path / "ac", cache, *common, "parallel.activation_checkpoint=full", nproc=gpus)
    assert ac.returncode == 0, ac.stderr[-3000:]
    a, b = trajectory(tmp_path / "plain"), trajectory(tmp_path / "ac")
    losses = [loss for loss, _ in a["train"].values()]
    assert losses[-1] < losses[0] - 0.3, losses  # it learns
    for step, (loss, _) in a["train"].items():
        assert b["train"][step][0] == pytest.approx(loss, rel=2e-2), f"step {step}"


def test_expert_parallel_with_fsdp2_trains_like_one_and_resumes(tmp_path, reference):
    """MoE with parallel.ep=2 on 2 ranks (each holds half the experts, tokens travel by all-to-all, every other
    parameter FSDP2-sharded): the same training as one process, also across a lost rank and a resume. Balance
    losses are off: the global-batch aux loss balances over all ranks' tokens at once, one process over each
    micro-batch, so they legitimately differ."""
    _, cache = reference
    moe = ["model=moe_tiny", "model.vocab_size=264", "model.moe.balance=none"]
    ep = ["parallel.ep=2", "parallel.meta_init=true"]  # each rank draws only its experts, as the full model would
    one, killed = side_by_side(lambda: single(tmp_path / "one", cache, *moe),
                               lambda: torchrun(tmp_path / "ep", cache, *moe, *ep, fault="rank_kill:5", fault_rank=1))
    assert one.returncode == 0, one.stderr[-3000:]
    assert killed.returncode != 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "ep/checkpoints")] == ["step_00000003"]
    resumed = torchrun(tmp_path / "ep", cache, *moe, *ep)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "ep")
    other_ep = single(tmp_path / "ep", cache, *moe)
    assert other_ep.returncode == 2 and "parallel.ep=2" in error_line(other_ep)


def test_compiled_expert_parallel_trains_like_one_eager_process(tmp_path, reference):
    """trainer.compile=true with parallel.ep=2 on 2 ranks: the MoE blocks are compiled by regions with fullgraph=True
    (the experts are an FSDP2 unit of their own, diffv2/parallel/compile.py), every monitor on, and the run trains like
    one eager process: losses, grad norms, validation and the monitors' global statistics (observed steps included)
    within the compiled kernels' rounding."""
    _, cache = reference
    moe = ["model=moe_tiny", "model.vocab_size=264", "model.moe.balance=none"]
    one, compiled = side_by_side(
        lambda: single(tmp_path / "one", cache, *moe),
        lambda: torchrun(tmp_path / "compiled", cache, *moe, "parallel.ep=2", "trainer.compile=true"))
    assert one.returncode == 0 and compiled.returncode == 0, (one.stderr + compiled.stderr)[-3000:]
    assert "MoE blocks compiled by regions" in compiled.stdout + compiled.stderr
    assert_same_training(tmp_path / "one", tmp_path / "compiled", rel=1e-4)


def test_experts_as_their_own_fsdp_unit_train_like_one_and_resume_a_block_checkpoint(tmp_path, reference):
    """parallel.expert_fsdp=own at ep=1 (each MoE layer's experts their own FSDP2 unit over both ranks, gathered
    apart from the block) trains like one process, and resumes a checkpoint of the default expert_fsdp=block. Three
    experts over two ranks: the block unit splits them unevenly by expert (2 + 1), their own unit along d_model
    (Shard(1)), so the resume crosses placements (DCP reshards) and meta_init draws Shard(1) pieces."""
    _, cache = reference
    moe = ["model=moe_tiny", "model.vocab_size=264", "model.moe.balance=none", "model.moe.n_experts=3"]
    own = ["parallel.expert_fsdp=own", "parallel.meta_init=true"]
    one, fresh, killed = side_by_side(
        lambda: single(tmp_path / "one", cache, *moe),
        lambda: torchrun(tmp_path / "own", cache, *moe, *own),
        lambda: torchrun(tmp_path / "moved", cache, *moe, fault="rank_kill:5", fault_rank=1))
    assert one.returncode == 0 and fresh.returncode == 0, (one.stderr + fresh.stderr)[-3000:]
    assert "experts their own FSDP2 units (Shard(1) over 2 ranks)" in fresh.stdout + fresh.stderr
    assert_same_training(tmp_path / "one", tmp_path / "own")
    assert killed.returncode != 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "moved/checkpoints")] == ["step_00000003"]
    resumed = torchrun(tmp_path / "moved", cache, *moe, *own)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "moved")
