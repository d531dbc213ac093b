"""Run an experiment suite: many single-GPU train.py runs, one per visible GPU at a time, resumable.

    python -m launch.suite configs/suite/repro_small.yaml --phase sweep --data PREFIX --out results/repro_small
    python -m launch.suite configs/suite/repro_small.yaml --phase main --data PREFIX --out results/repro_small \
        [--lr normal=2e-3 large=1.6e-2] [--gpus 8] [-- extra.hydra=overrides ...]

A suite file names a Hydra experiment, overrides for every run and phases; a phase is a list of grids
{attention: A|[A...], lr: X|[X...]|NAME, seed: S|[S...], overrides: [...]} expanded to runs named `{attention}-lr{lr}-s{seed}`
under OUT/runs/. LR names (`normal`, `large`) come from --lr or, if not given, from the finished sweep phase
(analysis.claims.pick_lrs). A run whose OUT/runs/NAME/suite_status.json records success is skipped, so a
suite interrupted anywhere is finished by running the same command again; runs that are identical in two phases
are trained once. Each run's console goes to OUT/logs/NAME.log; OUT/suite-PHASE.json lists every run and its outcome.
With no GPU the runs go one after another on the CPU (for tests and dry runs with tiny overrides).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launch.common import REPO, Parser, check_overrides

STATUS = "suite_status.json"


@dataclass
class SuiteRun:
    name: str
    attention: str
    lr: float
    seed: int
    lr_name: Optional[str]  # `normal` / `large` when the LR came from a name
    overrides: tuple = ()  # the grid's own Hydra overrides


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_suite(path: Path) -> dict:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ValueError(f"suite file not found: {path} (give e.g. configs/suite/repro_small.yaml)")
    suite = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("experiment", "phases"):
        if not isinstance(suite, dict) or key not in suite:
            raise ValueError(f"{path}: no `{key}` key (see configs/suite/repro_small.yaml for the format)")
    phases = suite["phases"]
    for name, grids in (phases.items() if isinstance(phases, dict) else [("phases", None)]):
        if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) for g in grids):
            raise ValueError(f"{path}: phase `{name}` must be a non-empty list of grids "
                             f"{{attention: ..., lr: ..., seed: ...}} (see configs/suite/repro_small.yaml)")
    return suite


def run_name(attention: str, lr: float, seed: int) -> str:
    return f"{attention}-lr{lr:g}-s{seed}"


def expand(grids: Sequence[dict], lrs: Dict[str, float]) -> List[SuiteRun]:
    """Grids -> runs in order, each run once (a run named twice is kept at its first place)."""
    runs: Dict[str, SuiteRun] = {}
    for grid in grids:
        unknown = set(grid) - {"attention", "lr", "seed", "overrides"}
        if unknown or "attention" not in grid or "lr" not in grid:
            raise ValueError(f"bad grid {grid}: give attention, lr and optionally seed and overrides (nothing else)")
        for attention, lr, seed in itertools.product(
            _as_list(grid["attention"]), _as_list(grid["lr"]), _as_list(grid.get("seed", 0))
        ):
            lr_name = lr if isinstance(lr, str) else None
            if lr_name is not None:
                if lr_name not in lrs:
                    raise ValueError(
                        f"learning rate `{lr_name}` is not known yet: finish the sweep phase first, or pass "
                        f"--lr {lr_name}=VALUE"
                    )
                lr = lrs[lr_name]
            run = SuiteRun(run_name(attention, float(lr), int(seed)), attention, float(lr), int(seed), lr_name,
                           tuple(grid.get("overrides") or ()))
            first = runs.setdefault(run.name, run)
            if first.overrides != run.overrides:  # same run directory, different model: one would be lost
                raise ValueError(f"run {run.name} is in two grids with different overrides ({list(first.overrides)} "
                                 f"and {list(run.overrides)}): give them different attention, lr or seed")
    return list(runs.values())


def last_status(out: Path, name: str) -> Optional[dict]:
    """The status of the run's last attempt (None if it never ended)."""
    path = out / "runs" / name / STATUS
    return json.loads(path.read_text()) if path.is_file() else None


def finished(out: Path, name: str) -> Optional[dict]:
    status = last_status(out, name)
    return status if status and (status.get("returncode") == 0 or status.get("diverged")) else None


def command(suite: dict, run: SuiteRun, out: Path, data: Optional[str], extra: Sequence[str],
            slot: int = 0) -> List[str]:
    """train.py command line of one run. Each slot has its own index cache: concurrent runs never write the same
    cache files, and runs after each other on a slot reuse it."""
    overrides = [f"+experiment={suite['experiment']}", f"attention={run.attention}", f"optim.lr={run.lr:g}",
                 f"seed={run.seed}", f"run_name={run.name}", f"hydra.run.dir={out / 'runs' / run.name}",
                 f"data.cache_dir={out / 'cache' / f'slot{slot}'}"]
    if data:
        overrides += [f"data.prefixes=[{data}]", f"data.tokenizer={data}.tokenizer.json"]
    overrides += list(suite.get("overrides") or []) + list(run.overrides) + list(extra)
    return [sys.executable, str(REPO / "train.py"), *overrides]


def _write_status(out: Path, run: SuiteRun, cmd: List[str], rc: int, seconds: float, gpu: Optional[int]) -> dict:
    status = {"name": run.name, "attention": run.attention, "lr": run.lr, "lr_name": run.lr_name, "seed": run.seed,
              "returncode": rc, "seconds": round(seconds, 1), "gpu": gpu,
              # exit 3 = the trainer stopped the run on non-finite losses: a legitimate outcome at a large LR
              "diverged": rc == 3, "command": cmd}
    run_dir = out / "runs" / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATUS + ".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, run_dir / STATUS)
    return status


def execute(suite: dict, runs: List[SuiteRun], out: Path, data: Optional[str], extra: Sequence[str],
            gpus: int) -> None:
    """Run what is not finished: `gpus` at a time (CUDA_VISIBLE_DEVICES=i each), or one by one on the CPU."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if finished(out, r.name) is None]
    done = len(runs) - len(todo)
    print(f"suite: {len(runs)} runs, {done} already finished, {len(todo)} to run on "
          f"{f'{gpus} GPU(s)' if gpus else 'the CPU'}", flush=True)
    slots: Dict[int, tuple] = {}  # slot -> (run, process, start, cmd, log file)
    queue = list(todo)
    width = max(1, gpus)
    while queue or slots:
        for slot in range(width):
            if slot not in slots and queue:
                run = queue.pop(0)
                cmd = command(suite, run, out, data, extra, slot)
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                log = open(out / "logs" / f"{run.name}.log", "w")
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                slots[slot] = (run, proc, time.time(), cmd, log)
                print(f"  start {run.name} ({'GPU ' + str(slot) if gpus else 'CPU'})", flush=True)
        time.sleep(0.5)
        for slot, (run, proc, start, cmd, log) in list(slots.items()):
            if proc.poll() is None:
                continue
            log.close()
            status = _write_status(out, run, cmd, proc.returncode, time.time() - start, slot if gpus else None)
            del slots[slot]
            outcome = "ok" if proc.returncode == 0 else ("diverged" if status["diverged"] else "FAILED")
            print(f"  {outcome:8s} {run.name} in {status['seconds']:.0f}s"
                  + ("" if outcome != "FAILED" else f" (exit {proc.returncode}; see {out / 'logs' / run.name}.log)"),
                  flush=True)


def parse_lrs(items: Sequence[str]) -> Dict[str, float]:
    lrs = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            if not name:
                raise ValueError
            lrs[name] = float(value)
        except ValueError:
            raise ValueError(f"bad --lr {item!r} (give NAME=VALUE, e.g. large=1.6e-2)") from None
    return lrs


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = Parser(prog="launch.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="suite file (configs/suite/*.yaml)")
    p.add_argument("--phase", required=True, help="phase of the suite file to run")
    p.add_argument("--out", type=Path, required=True, help="suite directory: runs/, logs/, suite-PHASE.json")
    p.add_argument("--data", help="Megatron corpus prefix (PREFIX.bin/.idx, tokenizer at PREFIX.tokenizer.json)")
    p.add_argument("--lr", nargs="+", default=[], metavar="NAME=VALUE", help="named learning rates (else the sweep's)")
    p.add_argument("--gpus", type=int, default=None, help="runs at a time, one per GPU (default: all visible GPUs)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and commands, run nothing")
    args = p.parse_args(argv)
    try:
        suite = load_suite(args.suite)
        if args.phase not in suite["phases"]:
            raise ValueError(f"no phase {args.phase!r} in {args.suite} (phases: {', '.join(suite['phases'])})")
        out = args.out.resolve()
        data = str(Path(args.data).resolve()) if args.data else None
        if data and not (Path(data + ".bin").is_file() and Path(data + ".tokenizer.json").is_file()):
            raise ValueError(f"--data {args.data}: need {args.data}.bin/.idx and {args.data}.tokenizer.json "
                             f"(prepare with python -m data.prepare ... --tokenizer bpe:N)")
        lrs = parse_lrs(args.lr)
        needs_names = any(isinstance(v, str) for g in suite["phases"][args.phase] for v in _as_list(g.get("lr")))
        if needs_names and not lrs:
            from analysis.claims import pick_lrs

            lrs = pick_lrs(out)["lrs"]
            print(f"suite: learning rates from the sweep: {', '.join(f'{k}={v:g}' for k, v in lrs.items())}")
        runs = expand(suite["phases"][args.phase], lrs)
        checked = set()
        for run in runs:  # every distinct arm, not only the first: a typo in the last grid costs nothing now
            if (run.attention, run.overrides) not in checked:
                checked.add((run.attention, run.overrides))
                check_overrides(command(suite, run, out, data, extra)[2:])
        gpus = args.gpus
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            print(" ".join(command(suite, run, out, data, extra)))
        return 0
    start = time.time()
    execute(suite, runs, out, data, extra, gpus)
    record = {"suite": str(args.suite), "phase": args.phase, "lrs": lrs, "extra_overrides": extra,
              "runs": [last_status(out, r.name) or {"name": r.name, "returncode": None} for r in runs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"suite-{args.phase}.json").write_text(json.dumps(record, indent=1))
    failed = [r.name for r in runs if finished(out, r.name) is None]
    print(f"suite: phase {args.phase} done in {time.time() - start:.0f}s; "
          + (f"{len(failed)} run(s) FAILED: {', '.join(failed)}" if failed else "every run finished"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
