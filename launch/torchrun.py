"""Start train.py under torchrun: one process per GPU, on one node or several (c10d rendezvous).

    python -m launch.torchrun --gpus-per-node 8 -- +experiment=gpu_1b
    python -m launch.torchrun --gpus-per-node 8 --nnodes 2 --rdzv-endpoint node01:29400 --rdzv-id run42 -- ...
        (the same command on every node; torchrun assigns the node ranks)
    python -m launch.torchrun ... --dry-run        # print the command instead of running it

A thin wrapper over `python -m torch.distributed.run` (= torchrun) that checks the overrides first, runs the
same interpreter as itself, and lets torchrun forward SIGUSR1 as well as SIGTERM to the workers, giving them
`--shutdown-timeout` seconds to reach a step boundary and save (diffv2/train/preempt.py) before it kills them. The
command is executed directly (no shell): override values reach train.py verbatim.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Optional

from launch.common import REPO, Parser, check_overrides, positive_int

ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")  # host:port, [ipv6]:port
RDZV_ID = re.compile(r"[A-Za-z0-9_.-]+")
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun's default list, plus SIGUSR1


def build_parser() -> Parser:
    p = Parser(prog="launch.torchrun", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus-per-node", type=positive_int, required=True, help="processes (GPUs) per node")
    p.add_argument("--nnodes", type=positive_int, default=1, help="nodes (default 1: a standalone rendezvous)")
    p.add_argument("--rdzv-endpoint", help="host:port of the c10d rendezvous (several nodes), e.g. node01:29400")
    p.add_argument("--rdzv-id", help="a job id shared by the nodes of one run (several nodes)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="times torchrun restarts all workers after a failure; they resume from the newest checkpoint")
    p.add_argument("--shutdown-timeout", type=positive_int, default=180,
                   help="seconds workers get to checkpoint after torchrun forwards a signal (default 180)")
    p.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("overrides", nargs="*", help="train.py overrides (key=value), after `--`")
    return p


def _supported(option: str) -> bool:
    """Options this torch's torchrun knows (--signals-to-handle and --shutdown-timeout are recent)."""
    from torch.distributed import run

    return any(option in action.option_strings for action in run.get_args_parser()._actions)


def command(a) -> list[str]:
    if a.max_restarts < 0:
        raise ValueError(f"--max-restarts {a.max_restarts} must be 0 or more")
    if a.nnodes == 1 and (a.rdzv_endpoint or a.rdzv_id):
        raise ValueError("--rdzv-endpoint/--rdzv-id are for several nodes; add --nnodes N, or drop them")
    if a.nnodes > 1:
        if not a.rdzv_endpoint or not ENDPOINT.fullmatch(a.rdzv_endpoint):
            raise ValueError(f"--rdzv-endpoint {a.rdzv_endpoint!r} is not host:port; give a host every node reaches, "
                             f"e.g. node01:29400")
        if not 0 < int(a.rdzv_endpoint.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"--rdzv-endpoint {a.rdzv_endpoint}: the port must be 1-65535")
        if not a.rdzv_id or not RDZV_ID.fullmatch(a.rdzv_id):
            raise ValueError(f"--rdzv-id {a.rdzv_id!r}: give the same id (letters, digits, _.-) on every node")
    check_overrides(a.overrides)
    cmd = [a.python, "-m", "torch.distributed.run", f"--nproc-per-node={a.gpus_per_node}"]
    if a.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={a.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={a.rdzv_endpoint}",
                f"--rdzv-id={a.rdzv_id}"]
    cmd.append(f"--max-restarts={a.max_restarts}")
    if _supported("--signals-to-handle"):
        cmd.append(f"--signals-to-handle={FORWARDED_SIGNALS}")
    if _supported("--shutdown-timeout"):
        cmd.append(f"--shutdown-timeout={a.shutdown_timeout}")
    return [*cmd, str(REPO / "train.py"), *a.overrides]


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cmd = command(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(shlex.join(cmd))
        return 0
    os.execv(cmd[0] if "/" in cmd[0] else _which(cmd[0]), cmd)


def _which(name: str) -> str:
    from shutil import which

    found = which(name)
    if found is None:
        raise SystemExit(f"error: {name} not found on PATH; give --python /path/to/python")
    return found


if __name__ == "__main__":
    sys.exit(main())
