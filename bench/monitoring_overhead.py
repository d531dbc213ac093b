"""Step-time overhead of training-health monitoring at its default intervals (CPU or GPU).

The same run (default config unless overrides are given) is trained with every monitor on and with every
health monitor off (only the throughput monitor stays, to time the run: it reads a clock twice a step), in
ABBA order to cancel drift on a shared machine. Step time = wall time between the throughput monitor's first
and last readings (`perf/elapsed_s`, everything in the loop included) over the steps between them, so start-up,
the final validation and checkpoint are excluded; the process CPU time over the same span (`perf/cpu_s`) is
reported too, as it is less disturbed by other jobs on a shared CPU machine. The overhead is estimated per ABBA
block and the median over blocks is reported. Prints a table and writes JSON to bench/results/.

`--warmup-steps K` starts the timed window at the first reading at or after step K. Each monitor's first run costs
once-only work (the first eager forward after compilation, first kernel launches of the probe's math path): a short
run that starts timing early reports that one-off cost as if it were paid every interval. For the steady state, set K
past the largest interval (the default intervals repeat every 500 steps) and time at least one full cycle.
`--order` changes the arms within a block, for example `on,off` on one GPU and `off,on` on another to spread blocks
over several GPUs at once.

    python bench/monitoring_overhead.py                          # CPU default run, 100 steps per arm
    python bench/monitoring_overhead.py --steps 300 --repeats 2 -- +experiment=gpu_125m   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"on": [], "off": ["monitoring.enabled=false"]}  # off keeps only the throughput monitor (the clock)


def run_arm(arm: str, steps: int, overrides: list[str], work: Path, index: int, warmup: int = 0) -> dict:
    run_dir = work / f"{arm}_{index}"
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}",
           "trainer.eval_interval=0", "trainer.ckpt_interval=0", "trainer.resume=none", "logging.progress=false",
           "logging.wandb.mode=disabled", *ARMS[arm], *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        raise SystemExit(f"{arm} run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    perf = [(r["step"], r["perf/elapsed_s"], r["perf/cpu_s"]) for r in rows if "perf/elapsed_s" in r]
    timed = [p for p in perf if p[0] >= warmup]
    if len(timed) < 2 or timed[0] == perf[-1]:
        raise SystemExit(f"--warmup-steps {warmup} leaves no timed window in {steps} steps; raise --steps")
    (s0, t0, c0), (s1, t1, c1) = timed[0], perf[-1]
    return {"arm": arm, "steps_timed": s1 - s0, "step_time_s": (t1 - t0) / (s1 - s0),
            "cpu_time_s": (c1 - c0) / (s1 - s0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (first window is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA blocks (each = 2 runs per arm)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="time from the first reading at or after this step (past every monitor's first run)")
    parser.add_argument("--order", default="off,on,on,off", help="the arms of one block, comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms (after --)")
    args = parser.parse_args()
    order = args.order.split(",")
    if sorted(set(order)) != ["off", "on"] or order.count("on") != order.count("off"):
        parser.error(f"--order {args.order!r}: give each of on and off, equally often (e.g. off,on,on,off)")
    results = []
    with tempfile.TemporaryDirectory(prefix="monitoring_overhead_") as tmp:
        for block in range(args.repeats):
            for i, arm in enumerate(order):
                r = run_arm(arm, args.steps, args.overrides, Path(tmp), len(order) * block + i, args.warmup_steps)
                print(f"  {arm:>3}: {r['step_time_s'] * 1e3:9.2f} ms/step wall, {r['cpu_time_s'] * 1e3:9.2f} ms/step "
                      f"CPU over {r['steps_timed']} steps", flush=True)
                results.append(r)
    summary = {}
    for clock in ("step_time_s", "cpu_time_s"):
        per_block = []
        for block in range(args.repeats):
            runs = results[len(order) * block : len(order) * (block + 1)]
            on, off = (sum(r[clock] for r in runs if r["arm"] == arm) for arm in ("on", "off"))
            per_block.append(on / off - 1)
        mean = {arm: statistics.mean(r[clock] for r in results if r["arm"] == arm) for arm in ARMS}
        summary[clock] = {"off": mean["off"], "on": mean["on"], "overhead_per_block": per_block,
                          "overhead": statistics.median(per_block)}
    import torch  # only to name the device

    on_gpu = torch.cuda.is_available() and "trainer.device=cpu" not in args.overrides
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    print("\n| device | clock | steps | monitors off (ms/step) | monitors on (ms/step) | overhead (median, blocks) |"
          "\n|---|---|---|---|---|---|")
    for clock, label in (("step_time_s", "wall"), ("cpu_time_s", "process CPU")):
        m = summary[clock]
        blocks = ", ".join(f"{100 * o:+.1f}%" for o in m["overhead_per_block"])
        print(f"| {device} | {label} | {args.steps} | {m['off'] * 1e3:.2f} | {m['on'] * 1e3:.2f} | "
              f"{100 * m['overhead']:+.2f}% ({blocks}) |")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "_".join(["cpu" if device == "cpu" else device.replace(" ", "_")] +
                    [o.lstrip("+").replace("=", "-").replace("/", "-") for o in args.overrides])
    path = args.out / f"monitoring_overhead_{name}.json"
    path.write_text(json.dumps({"device": device, "steps": args.steps, "warmup_steps": args.warmup_steps,
                                "order": order, "repeats": args.repeats,
                                "overrides": args.overrides, "summary": summary, "runs": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
