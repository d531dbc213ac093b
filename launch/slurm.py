"""Write and submit a SLURM batch script that trains with one task per GPU (or CPU tasks) and outlives its time limit.

    python -m launch.slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu --account proj \\
        -- +experiment=gpu_1b seed=1                 # writes runs/<run_name>/launch/job.sbatch, then sbatch
    python -m launch.slurm --ntasks-per-node 2 --time 1:00:00 -- seed=1   # a CPU job: 2 gloo ranks, no GRES
    python -m launch.slurm ... --dry-run -- ...     # print the script, submit nothing

The script asks SLURM for SIGUSR1 `--signal-lead` seconds before the time limit and to allow requeueing; the
training's preemption callback (diffv2/train/preempt.py) then saves a checkpoint, stops and requeues the job, and the
restart resumes (`trainer.resume=auto`). On its first start the job copies the repository's code (tracked and
untracked-but-not-ignored files, never runs/) into RUN_DIR/code and every start runs from that copy, so a
restart runs the code the run began with, whatever happened to the checkout since. srun starts one
`python train.py` per GPU (per task in a CPU job); each finds its rank, local rank and world size in SLURM's
variables and the rendezvous in MASTER_ADDR/MASTER_PORT, which the script exports. Before anything is written
the composed config is checked as train.py checks it, for the job's task count (diffv2.train.validate.validate), so a
job that would fail at start-up is never queued. Every value from the command line reaches the shell through
shlex.quote: the script runs no text it was given. docs/launch.md has the details.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from launch.common import REPO, Parser, check_config, check_overrides, non_negative_int, positive_int, run_dir_of

SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")  # partitions, accounts, QOS (comma lists)
# #SBATCH lines are read by sbatch, not by the shell: no quoting exists there, so the run directory (in
# --output) is held to characters that need none. '%' is excluded too: sbatch expands %j-style patterns.
JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+@-]+")
MEM = re.compile(r"\d+[KMGT]?")  # sbatch --mem: a size, default unit MB; 0 = all of each node's memory
TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
MAX_SIGNAL_LEAD = 65535  # SLURM's limit for --signal=SIG@seconds
PORT_BASE, PORT_SPAN = 10000, 20000  # MASTER_PORT in [10000, 30000): below Linux's ephemeral ports (32768+)


def parse_time(text: str) -> int:
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds; a finite limit is required."""
    m = TIME.fullmatch(text)
    if not m:
        raise ValueError(f"--time {text!r} is not a SLURM time (24:00:00, 90, 1-12, 2-00:00:00); give a finite limit")
    days, fields = m.group(1), [int(f) for f in m.groups()[1:] if f is not None]
    if days is None:  # M | M:S | H:M:S
        h, mi, s = ([0, fields[0], 0] if len(fields) == 1 else [0, *fields] if len(fields) == 2 else fields)
        bounded = fields[1:]
    else:  # D-H | D-H:M | D-H:M:S
        h, mi, s = (fields + [0, 0])[:3]
        bounded = fields[1:]
    if any(f >= 60 for f in bounded):
        raise ValueError(f"--time {text!r}: minutes and seconds after the first field must be below 60")
    total = (int(days or 0) * 24 + h) * 3600 + mi * 60 + s
    if total <= 0:
        raise ValueError(f"--time {text!r} is zero; give the job's time limit, e.g. 24:00:00")
    return total


def build_parser() -> Parser:
    p = Parser(prog="launch.slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes to allocate (default 1)")
    p.add_argument("--gpus-per-node", type=non_negative_int,
                   help="GPUs per node = tasks per node (one train.py per GPU); 0 = a CPU job (then give "
                        "--ntasks-per-node)")
    p.add_argument("--ntasks-per-node", type=positive_int,
                   help="train.py processes per node of a CPU job (gloo, no GPU requested); alone it means "
                        "--gpus-per-node 0. A GPU job has one per GPU")
    p.add_argument("--time", required=True, help="time limit per start of the job, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--partition", help="partition (default: the cluster's default partition)")
    p.add_argument("--account", help="charge account (omit where the cluster needs none)")
    p.add_argument("--qos", help="quality of service, if the cluster wants one")
    p.add_argument("--cpus-per-task", type=positive_int,
                   help="CPU cores per task (default: not requested, so SLURM's default of 1 per task, or the "
                        "partition's DefCpuPerGPU); OMP_NUM_THREADS follows it unless set")
    p.add_argument("--mem", help="memory per node, sbatch syntax: 16G, 500M, 0 = all of the node's (default: not "
                                 "requested, so the partition's DefMemPerNode/DefMemPerCPU)")
    p.add_argument("--signal-lead", type=positive_int, default=180,
                   help="seconds before the time limit at which SIGUSR1 asks the run to checkpoint and requeue "
                        "(a step plus a checkpoint save must fit; SLURM may send it up to 60 s earlier; default 180)")
    p.add_argument("--run-dir", help="run directory (default: train.py's, runs/<run_name>; relative paths are "
                                     "relative to the repository)")
    p.add_argument("--job-name", help="SLURM job name (default: the run directory's name)")
    p.add_argument("--python", default=os.path.abspath(sys.executable),
                   help="interpreter that runs train.py on the nodes (default: this one, %(default)s)")
    p.add_argument("--out", help="write the script here (default: RUN_DIR/launch/job.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the script (or write --out); submit nothing")
    p.add_argument("overrides", nargs="*", help="train.py overrides (key=value), after `--`")
    return p


def _given(overrides: list[str], key: str) -> Optional[str]:
    """The value of the last override of `key` (key=value, +key=value, ++key=value), or None."""
    value = None
    for o in overrides:
        k, eq, v = o.partition("=")
        if eq and k.lstrip("+~") == key:
            value = v
    return value


def job_shape(a) -> tuple[int, int]:
    """(GPUs per node, tasks per node) from --gpus-per-node / --ntasks-per-node; GPUs 0 is a CPU job."""
    gpus, tasks = a.gpus_per_node, a.ntasks_per_node
    if gpus is None and tasks is None:
        raise ValueError("give --gpus-per-node G (one task per GPU) or, for a CPU job, --ntasks-per-node T")
    if gpus is None or gpus == 0:
        if tasks is None:
            raise ValueError("--gpus-per-node 0 is a CPU job: give its processes per node with --ntasks-per-node")
        return 0, tasks
    if tasks is not None and tasks != gpus:
        raise ValueError(f"--ntasks-per-node {tasks} with --gpus-per-node {gpus}: a GPU job runs one task per GPU; "
                         f"drop --ntasks-per-node (or give --gpus-per-node 0 for a CPU job)")
    return gpus, gpus


def train_args(a, run_dir: Path) -> list[str]:
    """train.py's arguments in the job: the user's overrides, then what every start needs."""
    extra = [f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    if job_shape(a)[0] == 0 and _given(a.overrides, "trainer.device") is None:
        extra.append("trainer.device=cpu")  # a CPU job never picks up a GPU the node may have
    return [*a.overrides, *extra]


def check_args(a) -> tuple[int, Path]:
    """Everything that can be wrong before anything is written; returns (time limit in s, run directory)."""
    gpus, tasks_per_node = job_shape(a)
    limit = parse_time(a.time)
    if a.signal_lead > MAX_SIGNAL_LEAD:
        raise ValueError(f"--signal-lead {a.signal_lead} is above SLURM's limit of {MAX_SIGNAL_LEAD} seconds")
    if a.signal_lead >= limit:
        raise ValueError(f"--signal-lead {a.signal_lead} s is not shorter than --time {a.time} ({limit} s); "
                         f"lower it or raise the time limit")
    for flag, value in (("--partition", a.partition), ("--account", a.account), ("--qos", a.qos)):
        if value is not None and not SLURM_NAME.fullmatch(value):
            raise ValueError(f"{flag} {value!r} is not a SLURM name (letters, digits, _.+- and commas)")
    if a.mem is not None and not MEM.fullmatch(a.mem):
        raise ValueError(f"--mem {a.mem!r} is not a memory size (a number of MB, or with a unit: 500M, 16G, 1T; "
                         f"0 = all of the node's)")
    if a.job_name is not None and not JOB_NAME.fullmatch(a.job_name):
        raise ValueError(f"--job-name {a.job_name!r} may hold only letters, digits and _.+-")
    if "/" in a.python:  # the job runs in RUN_DIR/code: a relative path would name nothing there (no realpath:
        a.python = os.path.abspath(os.path.expanduser(a.python))  # a venv's python is a link that must stay one)
    python = a.python if "/" in a.python else shutil.which(a.python)
    if python is None or not os.path.isfile(python) or not os.access(python, os.X_OK):
        raise ValueError(f"--python {a.python} is not an executable file; give the interpreter of the project's "
                         f"environment")
    for o in a.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "trainer.resume" and o.split("=", 1)[-1] != "auto":
            raise ValueError(f"{o!r}: the job sets trainer.resume=auto so that a requeued start resumes; drop it")
        if key == "hydra.run.dir":
            raise ValueError(f"{o!r}: give the run directory as --run-dir")
    check_overrides(a.overrides)
    device = _given(a.overrides, "trainer.device")
    if gpus == 0 and device not in (None, "cpu"):
        raise ValueError(f"trainer.device={device} in a CPU job (no GPU requested); drop it, or request GPUs with "
                         f"--gpus-per-node")
    if gpus > 0 and device == "cpu":
        raise ValueError(f"trainer.device=cpu in a job that requests {gpus} GPU(s) per node; for a CPU job give "
                         f"--gpus-per-node 0 --ntasks-per-node T")
    if a.run_dir:
        run_dir = Path(a.run_dir).expanduser()
        run_dir = run_dir if run_dir.is_absolute() else REPO / run_dir
    else:
        run_dir = run_dir_of(a.overrides)
    run_dir = Path(os.path.normpath(run_dir))
    if not PLAIN_PATH.fullmatch(str(run_dir)):
        bad = sorted({c for c in str(run_dir) if not PLAIN_PATH.fullmatch(c)})
        raise ValueError(f"run directory {str(run_dir)!r} holds {''.join(bad)!r}, which #SBATCH --output cannot "
                         f"carry; choose a run_name or --run-dir of letters, digits and ._+-@/")
    if run_dir.is_relative_to(REPO) and not run_dir.is_relative_to(REPO / "runs"):
        raise ValueError(f"run directory {run_dir} is inside the repository but not under runs/: the code snapshot "
                         f"would copy the run into itself; use runs/ or a directory outside the repository")
    # train.py's own start-up checks, for this many processes: a job that would stop at once is never queued
    world = a.nodes * tasks_per_node
    try:
        cfg = check_config(train_args(a, run_dir), world)
    except ValueError as e:
        raise ValueError(f"{e} (the job runs {world} process(es): {a.nodes} node(s) x {tasks_per_node} task(s))") \
            from None
    if gpus > 0 and cfg.trainer.device == "cpu":  # e.g. set by an +experiment preset
        raise ValueError(f"the config trains on trainer.device=cpu but the job requests {gpus} GPU(s) per node; for "
                         f"a CPU job give --gpus-per-node 0 --ntasks-per-node T")
    check_paths(cfg)
    if os.path.abspath(python) != os.path.abspath(sys.executable):
        check_interpreter(python)
    return limit, run_dir


def check_paths(cfg) -> None:
    """Files the job reads, as train.py will look for them: it runs in RUN_DIR/code, so relative paths would
    name files of the code snapshot, which never holds data (ignored files are not copied)."""
    d = cfg.data
    for prefix in d.prefixes:
        if not os.path.isabs(os.path.expanduser(prefix)):
            raise ValueError(f"data.prefixes entry {prefix!r} is a relative path; the job runs in RUN_DIR/code, "
                             f"so give it as an absolute path")
        for ext in (".bin", ".idx"):
            if not os.path.isfile(os.path.expanduser(prefix) + ext):
                raise ValueError(f"data.prefixes entry {prefix!r}: {prefix}{ext} not found (prepare it with "
                                 f"python -m data.prepare, or fix the path)")
    if d.tokenizer not in ("byte", ""):
        if not os.path.isabs(os.path.expanduser(d.tokenizer)):
            raise ValueError(f"data.tokenizer={d.tokenizer!r} is a relative path; give it as an absolute path")
        from data.tokenizer import check_vocab, load_tokenizer

        check_vocab(load_tokenizer(os.path.expanduser(d.tokenizer)), cfg.model.vocab_size)


def check_interpreter(python: str) -> None:
    """The job's interpreter must have the project's packages (the launcher's own one does)."""
    try:
        out = subprocess.run([python, "-c", "import torch, hydra, omegaconf"], capture_output=True, text=True,
                             timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"--python {python} does not run ({e}); give the interpreter of the project's "
                         "environment") from None
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit {out.returncode}"
        raise ValueError(f"--python {python} cannot import torch, hydra and omegaconf ({why}); give the interpreter "
                         f"of the project's environment (e.g. .venv/bin/python)")


def render(a, run_dir: Path) -> str:
    """The batch script. User values appear only as shlex-quoted words or in #SBATCH lines checked above."""
    q = shlex.quote
    gpus, per_node = job_shape(a)
    tasks = a.nodes * per_node
    job_name = a.job_name or (re.sub(r"[^A-Za-z0-9_.+-]", "_", run_dir.name) or "diffv2")
    what = f"{gpus} GPU(s), one train.py task per GPU" if gpus else f"{per_node} CPU task(s) (gloo), no GPU"
    header = [
        "#!/bin/bash",
        f"# {a.nodes} node(s) x {what}. Written by `python -m launch.slurm` (docs/launch.md):",
        "# a requeue reruns this script; the run resumes from its newest checkpoint, with the code of its first start.",
        f"#SBATCH --job-name={job_name}",
        *([f"#SBATCH --partition={a.partition}"] if a.partition else []),
        *([f"#SBATCH --account={a.account}"] if a.account else []),
        *([f"#SBATCH --qos={a.qos}"] if a.qos else []),
        f"#SBATCH --nodes={a.nodes}",
        f"#SBATCH --ntasks-per-node={per_node}",
        *([f"#SBATCH --gres=gpu:{gpus}"] if gpus else []),
        *([f"#SBATCH --cpus-per-task={a.cpus_per_task}"] if a.cpus_per_task else []),
        *([f"#SBATCH --mem={a.mem}"] if a.mem is not None else []),
        f"#SBATCH --time={a.time}",
        f"#SBATCH --signal=USR1@{a.signal_lead}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
    ]
    args = train_args(a, run_dir)
    srun = ["srun", f"--nodes={a.nodes}", f"--ntasks={tasks}", f"--ntasks-per-node={per_node}",
            *([f"--cpus-per-task={a.cpus_per_task}"] if a.cpus_per_task else []), "--kill-on-bad-exit=1"]
    body = f"""
set -euo pipefail

REPO={q(str(REPO))}
RUN_DIR={q(str(run_dir))}
PY={q(a.python)}
ARGS=(
{chr(10).join("  " + q(x) for x in args)}
)
CODE="$RUN_DIR/code"

case "${{SLURM_JOB_ID:-}}" in
  '' | *[!0-9]*)
    echo "error: SLURM_JOB_ID='${{SLURM_JOB_ID:-}}' is not a job id; submit this script with sbatch" >&2
    exit 2 ;;
esac

# Rendezvous for torch.distributed: the job's first node, and a port that differs between jobs.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${{HOSTS%%$'\\n'*}}
MASTER_PORT=$(( {PORT_BASE} + 10#$SLURM_JOB_ID % {PORT_SPAN} ))
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1
# torch's threads per process: the task's cores (1 unless --cpus-per-task), unless the environment sets them
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}
if [ -z "$MASTER_ADDR" ]; then
  echo "error: scontrol show hostnames gave no host for SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'" >&2; exit 2
fi

if [ ! -d "$CODE" ]; then
  # First start: freeze the code. Built under a temporary name and renamed when complete, so a start killed
  # half-way leaves no snapshot and the next start makes it again.
  echo "launch: job $SLURM_JOB_ID first start: copying the code of $REPO to $CODE"
  mkdir -p "$RUN_DIR/launch"
  TMP="$RUN_DIR/.code-tmp-$SLURM_JOB_ID"
  rm -rf "$RUN_DIR"/.code-tmp-*
  mkdir -p "$TMP"
  if git -C "$REPO" rev-parse --git-dir > /dev/null 2>&1; then
    git -C "$REPO" ls-files -z --cached --others --exclude-standard -- . ':(exclude)runs' \\
      | (cd "$REPO" && tar --null --no-recursion --ignore-failed-read -T - -cf - 2> /dev/null) \\
      | tar -xf - -C "$TMP"
    {{
      printf 'source: %s\\n' "$REPO"
      printf 'commit: %s\\n' "$(git -C "$REPO" rev-parse HEAD 2> /dev/null || echo none)"
      printf 'job: %s\\n' "$SLURM_JOB_ID"
      printf 'time: %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    }} > "$RUN_DIR/launch/snapshot.txt"
    git -C "$REPO" diff HEAD > "$RUN_DIR/launch/snapshot.diff" 2> /dev/null || true
  else
    tar -C "$REPO" --exclude=./runs --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./wandb \\
      --exclude=./outputs --exclude=./multirun --exclude=./.cache --exclude=__pycache__ -cf - . | tar -xf - -C "$TMP"
    printf 'source: %s\\ncommit: none (not a git checkout)\\njob: %s\\n' "$REPO" "$SLURM_JOB_ID" \\
      > "$RUN_DIR/launch/snapshot.txt"
  fi
  (cd "$TMP" && "$PY" train.py "${{ARGS[@]}}" --cfg job --resolve) > "$RUN_DIR/launch/config.yaml"
  mv "$TMP" "$CODE"
fi

cd "$CODE"
# git would otherwise find the repository above a snapshot under runs/ and record its current commit as the run's.
GIT_CEILING_DIRECTORIES=$(cd "$RUN_DIR" && pwd -P)
export GIT_CEILING_DIRECTORIES
echo "launch: job $SLURM_JOB_ID (restarts so far: ${{SLURM_RESTART_COUNT:-0}}):" \\
  "{tasks} task(s) on $SLURM_JOB_NODELIST, MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT, code $CODE"
exec {" ".join(srun)} "$PY" train.py "${{ARGS[@]}}"
"""
    return "\n".join(header) + "\n" + body


def _sbatch(args: list[str], script: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["sbatch", *args, str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ValueError(f"sbatch not found: run this on a SLURM login node, or submit {script} there") from None
    except subprocess.TimeoutExpired:
        raise ValueError(f"sbatch {script} did not answer in 120 s; check squeue before submitting again") from None


def _why(out: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (out.stderr + "\n" + out.stdout).splitlines() if ln.strip()]
    bad = [ln for ln in lines if "error" in ln.lower() or "failure" in ln.lower()]
    return (bad or lines or ["no message"])[0]


def submit(script: Path) -> str:
    """sbatch --test-only first: sbatch itself accepts a job that no node can ever run (e.g. more CPUs per
    node than any node has), which would then wait forever (reason PartitionConfig)."""
    out = _sbatch(["--test-only"], script)
    if out.returncode != 0:
        raise ValueError(f"the cluster cannot run {script} (sbatch --test-only: {_why(out)}); nothing was submitted")
    out = _sbatch(["--parsable"], script)
    if out.returncode != 0:
        raise ValueError(f"sbatch {script} failed (exit {out.returncode}): {_why(out)}")
    return out.stdout.strip().split(";")[0]


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    made: list[Path] = []  # directories this call created, removed again if it ends in an error
    out, previous, wrote = None, None, False
    try:
        _, run_dir = check_args(a)
        script = render(a, run_dir)
        if a.dry_run and not a.out:
            sys.stdout.write(script)
            return 0
        if not a.dry_run and shutil.which("sbatch") is None:
            raise ValueError("sbatch not found: run this on a SLURM login node, or write the script with --dry-run "
                             "--out F and submit it there")
        out = Path(a.out).expanduser() if a.out else run_dir / "launch" / "job.sbatch"
        previous = out.read_bytes() if out.is_file() else None
        for d in (out.parent, *([] if a.dry_run else [run_dir])):  # SLURM opens --output in run_dir first
            missing = [p for p in (d, *d.parents) if not p.exists()]
            d.mkdir(parents=True, exist_ok=True)
            made.extend(missing)  # deepest first
        wrote = True
        out.write_text(script)
        out.chmod(0o755)
        if a.dry_run:
            print(f"wrote {out}; before `sbatch {out}`, create {run_dir} (SLURM opens the job's log there)")
            return 0
        if (run_dir / "code").is_dir():
            print(f"note: the job runs the existing code snapshot {run_dir / 'code'} (delete it to run the "
                  f"current code)", file=sys.stderr)
        if (run_dir / "checkpoints").is_dir():
            print(f"note: {run_dir} holds checkpoints; the job resumes from the newest", file=sys.stderr)
        job = submit(out)
    except (ValueError, OSError) as e:
        _undo(out if wrote else None, previous, made)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job}: run {run_dir}, log {run_dir}/slurm-{job}.out, script {out}")
    return 0


def _undo(out: Optional[Path], previous: Optional[bytes], made: list[Path]) -> None:
    """After a failed submission: the script file this call wrote as it was before (or gone), and no directory
    this call created."""
    try:
        if out is not None and previous is not None:
            out.write_bytes(previous)
        elif out is not None and out.is_file():
            out.unlink()
        for d in sorted(set(made), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
