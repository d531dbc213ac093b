"""Launchers and preemption (docs/launch.md): the SLURM batch script, torchrun command lines, the Hydra SLURM
launcher config, and the preemption callback in real processes with real signals.

The batch script runs for real under bash; only the outer SLURM commands are stand-ins (tiny bash scripts first
on PATH that record their argv: srun starts the given command once per task with SLURM_PROCID/SLURM_LOCALID/
SLURM_NTASKS set, as srun does), and train.py's interpreter is a recorder (the generator's --python) that
writes down its argv, working directory and environment instead of training (it hands `--cfg` to the real
interpreter, so the snapshot's resolved config is real). CPU only, about 20 s.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

from diffv2.train.preempt import EXIT_PREEMPTED, PreemptionCallback
from launch import slurm, torchrun
from slurm_stand_ins import calls, stand_ins

ROOT = Path(__file__).resolve().parent.parent
NASTY = "logging.wandb.name='$(touch PWNED) `touch PWNED3`; touch PWNED2'"  # a valid override: hydra strips the quotes
PWNED = ("PWNED", "PWNED2", "PWNED3", "PWNED4")
JOB_ID = "4242"

# train.py's interpreter in the script under test: records instead of training; `--cfg` goes to the real one.
RECORDER = r"""#!/bin/bash
[[ $1 == -c ]] && exec "$(dirname "$0")/real-python" "$@"  # the launcher's check that it imports torch
for a in "$@"; do [[ $a == --cfg ]] && exec "$REAL_PY" "$@"; done
exec "$REAL_PY" "$RECORD_PY" "$@"
"""
RECORD_PY = """import json, os, sys
keys = ("MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "PYTHONUNBUFFERED",
        "GIT_CEILING_DIRECTORIES")
out = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}
with open(os.path.join(os.environ["CALLS"], "train.%s.json" % os.environ["SLURM_PROCID"]), "w") as f:
    json.dump(out, f)
"""


def no_pwned(*dirs: Path) -> list[Path]:
    return [d / name for d in dirs for name in PWNED if (d / name).exists()]


# ---------------------------------------------------------------------------------------------- SLURM script


@dataclass
class Job:
    tmp: Path
    env: dict
    script: Path
    run_dir: Path
    recorder: Path
    first: subprocess.CompletedProcess

    def start(self, **extra) -> subprocess.CompletedProcess:
        env = {**self.env, "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NNODES": "2",
               "SLURM_JOB_NUM_NODES": "2", **extra}
        return subprocess.run(["bash", str(self.script)], cwd=self.tmp / "submit", env=env, capture_output=True,
                              text=True, timeout=60)

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(Path(self.env["CALLS"]).glob("train.*.json"))]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    """A 2-node x 2-GPU script with a hostile override and a hostile interpreter path, run once (a first start)."""
    tmp = tmp_path_factory.mktemp("slurm")
    env = stand_ins(tmp)
    (tmp / "submit").mkdir()
    odd_dir = tmp / "$(touch PWNED4); x"  # the interpreter's path holds shell syntax too
    odd_dir.mkdir()
    recorder = odd_dir / "python"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    (tmp / "record.py").write_text(RECORD_PY)
    (odd_dir / "real-python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (odd_dir / "real-python").chmod(0o755)  # what the launcher's import check runs
    env.update(REAL_PY=sys.executable, RECORD_PY=str(tmp / "record.py"))
    script, run_dir = tmp / "job.sbatch", tmp / "runs" / "t-1"
    rc = slurm.main(["--nodes", "2", "--gpus-per-node", "2", "--time", "24:00:00", "--partition", "gpu",
                     "--account", "proj", "--run-dir", str(run_dir), "--python", str(recorder), "--out", str(script),
                     "--dry-run", "--", "seed=3", NASTY, "trainer.global_batch_size=32"])
    assert rc == 0
    j = Job(tmp, env, script, run_dir, recorder, None)
    j.first = j.start()
    return j


def test_sbatch_script_requests_tasks_signal_and_requeue(job):
    text = job.script.read_text()
    assert subprocess.run(["bash", "-n", str(job.script)]).returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gres=gpu:2", "#SBATCH --time=24:00:00",
                 "#SBATCH --signal=USR1@180", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={job.run_dir}/slurm-%j.out", "#SBATCH --partition=gpu", "#SBATCH --account=proj"):
        assert line in text.splitlines(), line
    assert "exec srun " in text and "torchrun" not in text


def test_sbatch_starts_one_task_per_gpu_with_rendezvous(job):
    assert job.first.returncode == 0, job.first.stderr
    (srun,) = calls(job.env, "srun")
    assert srun[:5] == ["--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--kill-on-bad-exit=1", str(job.recorder)]
    assert ["show", "hostnames", "gpu-node-[07-08]"] in calls(job.env, "scontrol")
    records = job.records()
    assert [(r["env"]["SLURM_PROCID"], r["env"]["SLURM_LOCALID"]) for r in records] == [
        ("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")]
    for r in records:
        assert r["env"]["MASTER_ADDR"] == "gpu-node-07"
        assert r["env"]["MASTER_PORT"] == str(10000 + int(JOB_ID) % 20000)
        assert r["env"]["SLURM_NTASKS"] == "4" and r["env"]["PYTHONUNBUFFERED"] == "1"
        assert Path(r["cwd"]) == (job.run_dir / "code").resolve()  # runs the snapshot, not the checkout
        assert r["env"]["GIT_CEILING_DIRECTORIES"] == str(job.run_dir.resolve())
        assert r["argv"] == ["train.py", "seed=3", NASTY, "trainer.global_batch_size=32", f"hydra.run.dir={job.run_dir}",
                             "trainer.resume=auto"]


def test_sbatch_quoting_runs_nothing_and_passes_values_verbatim(job):
    """A hostile override and interpreter path run no command; the program gets the text as typed."""
    assert job.first.returncode == 0, job.first.stderr
    assert not no_pwned(job.tmp, job.tmp / "submit", job.run_dir, job.run_dir / "code", ROOT, Path.cwd())
    assert all(r["argv"][2] == NASTY for r in job.records())
    assert calls(job.env, "srun")[0][4] == str(job.recorder)  # the "$(touch PWNED4); x" directory, verbatim
    # the real train.py (--cfg job --resolve) parsed it: the value arrived intact through bash and Hydra
    assert "name: $(touch PWNED) `touch PWNED3`; touch PWNED2" in (job.run_dir / "launch" / "config.yaml").read_text()


def test_sbatch_first_start_snapshots_code_and_resolved_config(job):
    code = job.run_dir / "code"
    for rel in ("train.py", "diffv2/train/preempt.py", "launch/slurm.py", "configs/config.yaml"):
        assert (code / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
    assert not (code / "runs").exists() and not (code / ".git").exists()
    assert not list(job.run_dir.glob(".code-tmp-*"))
    config = (job.run_dir / "launch" / "config.yaml").read_text()
    assert "seed: 3" in config and "resume: auto" in config
    info = (job.run_dir / "launch" / "snapshot.txt").read_text()
    assert f"source: {ROOT}" in info and f"job: {JOB_ID}" in info


def test_sbatch_restart_runs_the_same_snapshot(job):
    """A requeued start finds the snapshot and keeps it (and the first start's config): nothing is copied again."""
    assert job.first.returncode == 0, job.first.stderr
    marker = job.run_dir / "code" / "MARKER"
    marker.write_text("from the first start")
    config = job.run_dir / "launch" / "config.yaml"
    before = config.read_text()
    for p in Path(job.env["CALLS"]).glob("train.*.json"):
        p.unlink()
    again = job.start(SLURM_RESTART_COUNT="1")
    assert again.returncode == 0, again.stderr
    assert "first start" not in again.stdout and "restarts so far: 1" in again.stdout
    assert marker.read_text() == "from the first start" and config.read_text() == before
    assert len(job.records()) == 4
    assert {Path(r["cwd"]) for r in job.records()} == {(job.run_dir / "code").resolve()}


@pytest.mark.parametrize("vcs", ["git", "plain"])
def test_sbatch_snapshot_takes_the_working_tree_minus_ignored_and_runs(tmp_path, monkeypatch, vcs):
    """git: tracked and untracked files are copied, ignored ones and runs/ are not, a deleted tracked file is no
    error. Without git: everything but runs/ and the usual environment and output directories."""
    if vcs == "git" and shutil.which("git") is None:
        pytest.skip("needs git")
    repo = tmp_path / "repo"
    for d in ("pkg", "runs/old", ".venv/bin", "pkg/__pycache__"):
        (repo / d).mkdir(parents=True)
    for rel, text in ((".gitignore", "*.bin\n/.venv/\n__pycache__/\n"), ("train.py", "tracked"),
                      ("pkg/mod.py", "tracked"), ("gone.py", "deleted later")):
        (repo / rel).write_text(text)
    if vcs == "git":
        git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(repo)]
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (repo / "gone.py").unlink()
    for rel, text in (("new.py", "untracked"), ("weights.bin", "ignored"), ("runs/old/ckpt", "a previous run"),
                      (".venv/bin/python", "an environment"), ("pkg/__pycache__/mod.pyc", "bytecode")):
        (repo / rel).write_text(text)
    env = {**stand_ins(tmp_path), "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # no repository above tmp_path counts
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/bash\n[[ " $* " == *" --cfg "* ]] && { echo "seed: 0"; exit 0; }\nexit 0\n')
    recorder.chmod(0o755)
    monkeypatch.setattr(slurm, "REPO", repo)
    script, run_dir = tmp_path / "job.sbatch", tmp_path / "out" / "run"
    assert slurm.main(["--nodes", "1", "--gpus-per-node", "1", "--time", "60", "--partition", "p", "--account", "a",
                       "--run-dir", str(run_dir), "--python", str(recorder), "--out", str(script), "--dry-run"]) == 0
    done = subprocess.run(["bash", str(script)], env={**env, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    code = run_dir / "code"
    copied = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    info = (run_dir / "launch" / "snapshot.txt").read_text()
    assert (run_dir / "launch" / "config.yaml").read_text() == "seed: 0\n"
    if vcs == "plain":
        assert copied == [".gitignore", "new.py", "pkg/mod.py", "train.py", "weights.bin"]
        assert "commit: none (not a git checkout)" in info
        return
    assert copied == [".gitignore", "new.py", "pkg/mod.py", "train.py"]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert f"commit: {commit.strip()}" in info
    assert "gone.py" in (run_dir / "launch" / "snapshot.diff").read_text()


def test_sbatch_script_refuses_to_run_outside_a_job(job):
    done = subprocess.run(["bash", str(job.script)], env={**job.env, "SLURM_JOB_ID": "1; touch PWNED"},
                          cwd=job.tmp / "submit", capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("error: SLURM_JOB_ID=") and "sbatch" in done.stderr
    assert not no_pwned(job.tmp / "submit")


def test_slurm_cli_submits_with_sbatch(tmp_path, monkeypatch, capsys):
    env = stand_ins(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("CALLS", env["CALLS"])
    run_dir = tmp_path / "runs" / "sub"
    assert slurm.main(["--nodes", "1", "--gpus-per-node", "8", "--time", "2-00:00:00", "--partition", "gpu",
                       "--account", "proj", "--signal-lead", "300", "--run-dir", str(run_dir), "--", "seed=1",
                       "trainer.micro_batch_size=1"]) == 0
    script = run_dir / "launch" / "job.sbatch"
    assert calls(env, "sbatch") == [["--test-only", str(script)], ["--parsable", str(script)]]
    assert "#SBATCH --signal=USR1@300" in script.read_text()
    assert capsys.readouterr().out.startswith(f"submitted job 4243: run {run_dir}, log {run_dir}/slurm-4243.out")


@pytest.mark.parametrize("shape", [["--ntasks-per-node", "2"], ["--gpus-per-node", "0", "--ntasks-per-node", "2"]])
def test_slurm_cpu_job_script_asks_no_gpu_and_runs_gloo(tmp_path, capsys, shape):
    """A CPU job: tasks per node without GRES, trainer.device=cpu, cores and memory as asked, one thread per core."""
    run_dir = tmp_path / "runs" / "cpu"
    assert slurm.main([*shape, "--nodes", "2", "--cpus-per-task", "3", "--mem", "4G", "--time", "30",
                       "--signal-lead", "60", "--run-dir", str(run_dir), "--dry-run", "--",
                       "trainer.micro_batch_size=2"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=3", "#SBATCH --mem=4G",
                 "#SBATCH --time=30", "#SBATCH --signal=USR1@60", "#SBATCH --requeue",
                 "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
                 "  trainer.device=cpu"):
        assert line in lines, line
    assert "gres" not in text and "#SBATCH --partition" not in text  # the cluster's default partition
    assert ('exec srun --nodes=2 --ntasks=4 --ntasks-per-node=2 --cpus-per-task=3 --kill-on-bad-exit=1 "$PY" train.py '
            '"${ARGS[@]}"') in lines
    assert not run_dir.exists()  # --dry-run without --out writes nothing
    script = tmp_path / "cpu.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_slurm_relative_python_becomes_absolute(tmp_path, monkeypatch, capsys):
    """The job runs in RUN_DIR/code, where a relative interpreter path would name nothing; a venv's link is kept."""
    py = tmp_path / "env" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    py.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert slurm.main(["--ntasks-per-node", "2", "--time", "30", "--signal-lead", "60", "--python", "env/bin/python",
                       "--run-dir", str(tmp_path / "run"), "--dry-run", "--", "trainer.micro_batch_size=4"]) == 0
    assert f"PY={py}" in capsys.readouterr().out.splitlines()


def test_slurm_refused_submission_leaves_nothing(tmp_path, monkeypatch, capsys):
    """sbatch refusing the job (here at --test-only: a request no node can meet, which plain sbatch would queue
    for ever; or at the submission itself): one error line, exit 2, no run directory; a script of an earlier
    submission in the same run directory is put back byte for byte."""
    env = stand_ins(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("CALLS", env["CALLS"])
    argv = ["--ntasks-per-node", "2", "--cpus-per-task", "64", "--time", "30", "--signal-lead", "60", "--run-dir"]
    fresh = tmp_path / "runs" / "new"
    monkeypatch.setenv("SBATCH_REFUSE", "Requested node configuration is not available")
    assert slurm.main([*argv, str(fresh), "--", "trainer.micro_batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the cluster cannot run ") and (
        "(sbatch --test-only: allocation failure: Requested node configuration is not available); nothing was "
        "submitted") in err, err
    assert not (tmp_path / "runs").exists()
    assert [c[0] for c in calls(env, "sbatch")] == ["--test-only"]
    old = tmp_path / "old"
    (old / "launch").mkdir(parents=True)
    (old / "launch" / "job.sbatch").write_bytes(b"#!/bin/bash\n# the script of the job that made this run\n")
    before = tree_digest(old)
    monkeypatch.delenv("SBATCH_REFUSE")
    monkeypatch.setenv("SBATCH_FAIL", "Batch job submission failed: Invalid account or account/partition combination")
    assert slurm.main([*argv, str(old), "--", "trainer.micro_batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed (exit 1): sbatch: error: Batch job submission failed: Invalid account" in err
    assert tree_digest(old) == before


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def test_slurm_python_without_the_project_is_refused(tmp_path, capsys):
    """--python that cannot import torch would fail on the node after the queue wait: refused now."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    assert slurm.main(["--gpus-per-node", "1", "--time", "60", "--python", str(fake), "--run-dir",
                       str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --python {fake} cannot import torch, hydra and omegaconf (ModuleNotFoundError: "
                          f"No module named 'torch')") and err.count("\n") == 1, err


def cli(main, argv: list[str]) -> int:
    """A CLI's exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("options, overrides, message", [
    ({"--nodes": "0"}, [], "argument --nodes: '0' is not a positive integer"),
    ({"--gpus-per-node": "x"}, [], "argument --gpus-per-node: 'x' is not a non-negative integer"),
    ({"--gpus-per-node": "0"}, [], "--gpus-per-node 0 is a CPU job: give its processes per node with --ntasks-per-node"),
    ({"--gpus-per-node": "2", "--ntasks-per-node": "4"}, [], "a GPU job runs one task per GPU"),
    ({"--gpus-per-node": "0", "--ntasks-per-node": "2"}, ["trainer.device=cuda"],
     "trainer.device=cuda in a CPU job (no GPU requested)"),
    ({}, ["trainer.device=cpu"], "trainer.device=cpu in a job that requests 1 GPU(s) per node"),
    ({"--mem": "16GB"}, [], "--mem '16GB' is not a memory size"),
    ({"--python": "/nonexistent/python"}, [], "--python /nonexistent/python is not an executable file"),
    # train.py's own start-up validation, for the job's task count (a job that would stop at once is never queued)
    ({"--gpus-per-node": "0", "--ntasks-per-node": "3"}, [],
     "trainer.global_batch_size=8 is not a multiple of micro_batch_size x data-parallel ranks = 8 x 3 (world size 3 "
     "/ tp 1); change one of them (the job runs 3 process(es): 1 node(s) x 3 task(s))"),
    ({"--nodes": "2", "--gpus-per-node": "4"}, ["trainer.micro_batch_size=1", "parallel.tp=3"],
     "parallel.tp=3 does not divide the world size 8"),
    ({"--gpus-per-node": "0", "--ntasks-per-node": "2"}, ["trainer.micro_batch_size=1", "trainer.eval_batches=1"],
     "validation reads trainer.eval_batches x micro_batch_size = 1 x 1 samples"),
    ({}, ["data.prefixes=[data/corpus]"], "data.prefixes entry 'data/corpus' is a relative path"),
    ({}, ["data.prefixes=[/nonexistent/corpus]"], "/nonexistent/corpus.bin not found"),
    ({"--time": "12h"}, [], "--time '12h' is not a SLURM time"),
    ({"--time": "1:75:00"}, [], "minutes and seconds after the first field must be below 60"),
    ({"--time": "2"}, [], "--signal-lead 180 s is not shorter than --time 2 (120 s)"),
    ({"--partition": "gpu\n#SBATCH --uid=0"}, [], "--partition 'gpu\\n#SBATCH --uid=0' is not a SLURM name"),
    ({"--account": "a;b"}, [], "--account 'a;b' is not a SLURM name"),
    ({}, ["trainer.resume=none"], "'trainer.resume=none': the job sets trainer.resume=auto"),
    ({}, ["modle=tiny"], "Could not override 'modle'"),
    ({"--run-dir": "runs/a b"}, [], "holds ' ', which #SBATCH --output cannot carry"),
    ({}, ["-m"], "'-m' is a flag, not a key=value override"),
])
def test_slurm_cli_rejects_bad_input_in_one_line(options, overrides, message, capsys):
    given = {"--nodes": "1", "--gpus-per-node": "1", "--time": "1:00:00", "--partition": "p", "--account": "a",
             **options}
    if given.get("--ntasks-per-node") and "--gpus-per-node" not in options:
        del given["--gpus-per-node"]
    rc = cli(slurm.main, [x for kv in given.items() for x in kv] + ["--dry-run", "--", *overrides])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "", captured.out
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_slurm_time_formats():
    assert [slurm.parse_time(t) for t in ("90", "90:30", "24:00:00", "1-12", "1-12:30", "2-00:00:05")] == [
        5400, 5430, 86400, 129600, 131400, 172805]


# --------------------------------------------------------------------------------------------------- torchrun


def test_torchrun_commands_are_argument_lists(capsys):
    assert torchrun.main(["--gpus-per-node", "4", "--dry-run", "--", "seed=2", NASTY]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone"]
    assert argv[-3:] == [str(ROOT / "train.py"), "seed=2", NASTY]
    assert torchrun.main(["--gpus-per-node", "8", "--nnodes", "2", "--rdzv-endpoint", "node01:29400",
                          "--rdzv-id", "run42", "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29400", "--rdzv-id=run42"} <= set(argv)
    assert "--standalone" not in argv
    assert torchrun.main(["--gpus-per-node", "8", "--nnodes", "2", "--rdzv-endpoint", "$(x):1", "--rdzv-id", "r",
                          "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: --rdzv-endpoint '$(x):1' is not host:port")


# --------------------------------------------------------------------------------------- Hydra SLURM launcher


def test_hydra_slurm_launcher_config_composes_and_renders(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    submitit = pytest.importorskip("submitit")
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        default = compose("config", return_hydra_config=True)
        cfg = compose("config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm_gpu8", "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj", f"hydra.launcher.submitit_folder={tmp_path}/%j",
            "hydra.launcher.name=train"])
    assert default.hydra.launcher._target_.endswith("BasicLauncher")  # the default never needs submitit
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["tasks_per_node"] == params["gpus_per_node"] == 8
    # build the sbatch text the way hydra-submitit-launcher does (submitit wants an srun on PATH)
    monkeypatch.setenv("PATH", stand_ins(tmp_path)["PATH"])
    params.pop("_target_")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --signal=USR1@180", "#SBATCH --requeue", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=2880", "#SBATCH --open-mode=append"):
        assert line in text.splitlines(), line
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "export MASTER_PORT=$(( 10000 + SLURM_JOB_ID % 20000 ))" in text


# ------------------------------------------------------------------------------------------------ preemption

# One process runs the single-process scenarios one after another (torch is imported once), two more form a
# gloo group; all three start together. For each scenario the worker builds a callback (handlers installed),
# prints "ready NAME", then calls should_stop() every ~2 ms until it stops; the test sends the signal on "ready".
WORKER = r"""
import io, json, logging, os, sys, time
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    if os.environ.get("FAKE_NCCL"):  # make the callback take a gloo group of its own, as under NCCL
        default_backend = dist.get_backend
        dist.get_backend = lambda group=None: "nccl" if group is None else default_backend(group)
from diffv2.train.preempt import PreemptionCallback
root = logging.getLogger()
root.setLevel(logging.INFO)
for sc in json.loads(sys.argv[1]):
    for k, v in sc.get("env", {}).items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    root.addHandler(handler)
    cb = PreemptionCallback(interval=sc.get("interval", 1))
    print("ready", sc["name"], flush=True)
    reason, step, deadline = None, 0, time.monotonic() + 120
    while reason is None and time.monotonic() < deadline:
        step += 1
        reason = cb.should_stop()
        time.sleep(0.002)
    cb.on_train_end()
    cb.restore()
    root.removeHandler(handler)
    print(json.dumps({"step": step, "reason": reason, "exit_code": cb.exit_code, "requeued": cb.requeued,
                      "received": cb.received, "own_group": cb._group is not None, "log": log.getvalue()}), flush=True)
"""


@dataclass
class Scenario:
    name: str
    sig: int
    env: dict  # set in the worker for this scenario (None: unset)
    calls: Path  # where its stand-in scontrol records


def _worker(scenarios: list[dict], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(scenarios)], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _expect_ready(p: subprocess.Popen, name: str) -> None:
    line = p.stdout.readline().strip()
    assert line == f"ready {name}", line or p.stderr.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> dict:
    """name -> what the callback did: its result dict, and the scontrol calls it made ("two_ranks": both ranks)."""
    tmp = tmp_path_factory.mktemp("preempt")
    base = stand_ins(tmp / "base")
    dirs = {n: tmp / n for n in ("usr1", "term", "fails", "missing", "plain", "two_ranks")}

    def slurm_env(name, job, commands=("scontrol",), **extra):
        env = stand_ins(dirs[name], commands)
        return {"PATH": env["PATH"], "CALLS": env["CALLS"], "SLURM_JOB_ID": job, "SCONTROL_FAIL": None, **extra}

    scenarios = [
        Scenario("usr1", signal.SIGUSR1, slurm_env("usr1", "777"), dirs["usr1"] / "calls"),
        Scenario("term", signal.SIGTERM, slurm_env("term", "778"), dirs["term"] / "calls"),
        Scenario("fails", signal.SIGUSR1, slurm_env("fails", "779", SCONTROL_FAIL="Invalid job id specified"),
                 dirs["fails"] / "calls"),
        Scenario("missing", signal.SIGUSR1, {**slurm_env("missing", "779", ()), "PATH": str(dirs["missing"] / "bin")},
                 dirs["missing"] / "calls"),
        Scenario("plain", signal.SIGUSR1, {**slurm_env("plain", "0"), "SLURM_JOB_ID": None}, dirs["plain"] / "calls"),
    ]
    ranks_env = {**stand_ins(dirs["two_ranks"]), "SLURM_JOB_ID": "780", "FAKE_NCCL": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    ranks = [_worker([{"name": "two_ranks", "interval": 3}], {**ranks_env, "RANK": str(r)}) for r in range(2)]
    single = _worker([{"name": s.name, "env": s.env} for s in scenarios], base)
    results = {}
    try:
        for s in scenarios:
            _expect_ready(single, s.name)
            single.send_signal(s.sig)
            line = single.stdout.readline()
            assert line, single.stderr.read()
            results[s.name] = {**json.loads(line), "scontrol": calls({"CALLS": str(s.calls)}, "scontrol")}
        for p in ranks:
            _expect_ready(p, "two_ranks")
        time.sleep(0.05)
        ranks[1].send_signal(signal.SIGUSR1)  # rank 1 only
        results["two_ranks"] = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in ranks]
        results["two_ranks_scontrol"] = calls(ranks_env, "scontrol")
        assert single.wait(timeout=60) == 0, single.stderr.read()
    finally:
        for p in (single, *ranks):
            if p.poll() is None:
                p.kill()
    return results


def test_preemption_sigusr1_stops_then_requeues_the_slurm_job(preempted):
    r = preempted["usr1"]
    assert r["reason"] == "preempted by SIGUSR1: checkpoint saved; requeueing SLURM job 777"
    assert r["exit_code"] == EXIT_PREEMPTED == 75 and r["requeued"]
    assert r["scontrol"] == [["requeue", "777"]]
    assert "SIGUSR1 received; saving a checkpoint and stopping" in r["log"]
    assert "requeued SLURM job 777" in r["log"]


def test_preemption_sigterm_stops_without_requeue(preempted):
    """SIGTERM is scancel or SLURM's own preemption: stop with a checkpoint, but never requeue from the run."""
    r = preempted["term"]
    assert r["reason"].startswith("preempted by SIGTERM: checkpoint saved; not requeued by the run")
    assert r["exit_code"] == EXIT_PREEMPTED and not r["requeued"] and r["scontrol"] == []


@pytest.mark.parametrize("name, expected", [
    ("fails", "scontrol requeue 779 failed (exit 1: scontrol: error: Invalid job id specified)"),
    ("missing", "scontrol not found, SLURM job 779 was not requeued"),
])
def test_preemption_failed_requeue_says_how_to_resubmit(preempted, name, expected):
    r = preempted[name]
    assert r["exit_code"] == EXIT_PREEMPTED and not r["requeued"]
    assert expected in r["log"] and "resubmit the job's batch script; trainer.resume=auto continues" in r["log"]


def test_preemption_outside_slurm_stops_and_says_rerun(preempted):
    r = preempted["plain"]
    assert r["reason"] == ("preempted by SIGUSR1: checkpoint saved; run the same command again to resume "
                           "(trainer.resume=auto)")
    assert r["exit_code"] == EXIT_PREEMPTED and r["scontrol"] == []


def test_preemption_two_ranks_agree_when_only_one_is_signalled(preempted):
    """Only rank 1 gets SIGUSR1; both stop at the same check (every 3rd step here) with the same reason, through
    a gloo group of the callback's own (the default group poses as NCCL); rank 0 alone requeues."""
    r0, r1 = preempted["two_ranks"]
    assert r0["step"] == r1["step"] and r0["step"] % 3 == 0
    assert r0["reason"] == r1["reason"] == "preempted by SIGUSR1: checkpoint saved; requeueing SLURM job 780"
    assert (r0["received"], r1["received"]) == (0, signal.SIGUSR1)
    assert r0["own_group"] and r1["own_group"]
    assert r0["requeued"] and not r1["requeued"]
    assert preempted["two_ranks_scontrol"] == [["requeue", "780"]]
    assert "SIGUSR1 received by another rank" in r0["log"]


def test_preemption_callback_in_process():
    """Unsignalled: no stop, no exit code, the previous handlers come back. A bad interval fails in one line."""
    before = signal.getsignal(signal.SIGTERM)
    cb = PreemptionCallback()
    try:
        assert signal.getsignal(signal.SIGTERM) == cb.latch._handle and cb.name == "preemption"
        assert [cb.should_stop() for _ in range(3)] == [None] * 3
        assert cb.state_dict() == {} and cb.exit_code is None
        cb.on_train_end()
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        cb.restore()
    with pytest.raises(ValueError, match="preemption interval=0 must be a positive integer"):
        PreemptionCallback(interval=0)


def test_preemption_signal_in_the_last_step_just_finishes(tmp_path, monkeypatch):
    """The run ends at max_steps anyway: no preemption stop, exit code None (0), nothing to requeue."""
    import torch
    from diffv2.train.callbacks import StepResult

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    ctx = SimpleNamespace(run_dir=tmp_path, start_step=0, cfg=SimpleNamespace(trainer=SimpleNamespace(max_steps=2)))
    zero = torch.zeros(())
    for signalled_at, expected in ((1, "preempted by SIGUSR1"), (2, None)):
        cb = PreemptionCallback()
        try:
            cb.on_train_start(ctx)
            for step in range(1, signalled_at + 1):
                if step == signalled_at:
                    os.kill(os.getpid(), signal.SIGUSR1)  # the handler has run once os.kill returns
                cb.on_step_end(StepResult(step, zero, zero, 1e-3, sample_index=0))
                reason = cb.should_stop()
            assert reason is None if expected is None else reason.startswith(expected)
            assert cb.exit_code == (EXIT_PREEMPTED if expected else None) and cb.received == signal.SIGUSR1
        finally:
            cb.restore()


# ----------------------------------------------------------------------------------------------------------
# Helper for the end-to-end test (signal -> checkpoint -> requeue -> resume with real training), to be written
# once the trainer builds PreemptionCallback: start train.py, wait for a line, signal it, collect its result.


def signal_when(cmd: list[str], line: str, sig: int = signal.SIGUSR1, env: Optional[dict] = None,
                cwd: Path = ROOT, timeout: float = 240) -> tuple[int, str]:
    """Run `cmd`, send `sig` as soon as its output holds `line` (e.g. "step      3 | loss"), wait for its exit;
    returns (exit code, whole output). With env from stand_ins(...) plus SLURM_JOB_ID, the requeue is recorded:
    calls(env, "scontrol") == [["requeue", job_id]]; the resumed run is then the same command again."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline, sent = [], time.monotonic() + timeout, False
    for text in proc.stdout:
        seen.append(text)
        if not sent and line in text:
            proc.send_signal(sig)
            sent = True
        if time.monotonic() > deadline:
            proc.kill()
            break
    proc.wait(timeout=60)
    return proc.returncode, "".join(seen)
