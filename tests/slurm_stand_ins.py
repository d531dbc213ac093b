"""Stand-in SLURM commands (srun, scontrol, sbatch) that record their arguments, for the tests that run the
generated batch script or the submitter without a cluster (tests/test_launch.py, tests/test_distributed.py)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SRUN = r"""#!/bin/bash
f=$(mktemp "$CALLS/srun.XXXXXX"); printf '%s\0' "$@" > "$f"
ntasks=1; per_node=1
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in --ntasks=*) ntasks=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; esac
  shift
done
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) SLURM_NTASKS=$ntasks "$@" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
SCONTROL = r"""#!/bin/bash
f=$(mktemp "$CALLS/scontrol.XXXXXX"); printf '%s\0' "$@" > "$f"
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-07\ngpu-node-08\n'; exit 0; fi
[[ -n ${SCONTROL_FAIL:-} ]] && { echo "scontrol: error: $SCONTROL_FAIL" >&2; exit 1; }
exit 0
"""
SBATCH = r"""#!/bin/bash
f=$(mktemp "$CALLS/sbatch.XXXXXX"); printf '%s\0' "$@" > "$f"
if [[ $1 == --test-only ]]; then
  [[ -n ${SBATCH_REFUSE:-} ]] && { echo "allocation failure: $SBATCH_REFUSE" >&2; exit 1; }
  echo "sbatch: Job 4243 to start at 2026-01-01T00:00:00 using 8 processors on nodes n1 in partition gpu" >&2
  exit 0
fi
[[ -n ${SBATCH_FAIL:-} ]] && { echo "sbatch: error: $SBATCH_FAIL" >&2; exit 1; }
echo "4243;cluster"
"""


def stand_ins(where: Path, commands: tuple[str, ...] = ("srun", "scontrol", "sbatch")) -> dict:
    """A bin/ of stand-in SLURM commands and a calls/ where they record; returns the environment to run with."""
    bin_dir, calls = where / "bin", where / "calls"
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("sbatch", SBATCH)):
        if name in commands:
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    cleared = ("SLURM_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cleared)}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "CALLS": str(calls),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def calls(env: dict, name: str) -> list[list[str]]:
    """argv of each recorded call to `name`, oldest first."""
    files = sorted(Path(env["CALLS"]).glob(f"{name}.*"), key=lambda p: p.stat().st_mtime_ns)
    return [p.read_bytes().decode().split("\0")[:-1] for p in files]
