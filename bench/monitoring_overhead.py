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
`--gpus 0 1 ...` runs blocks on several GPUs at once (one process per GPU, CUDA_VISIBLE_DEVICES), `--repeats`
blocks on each, in `--order` on the first GPU, reversed on the second, and so on; the median is over every block.

`--per-step` attributes the overhead to the monitors, free of the drift between runs and leases: both arms time
every step (`monitoring.perf.interval=1`: the throughput monitor, which runs after every other monitor, synchronises
the device at the end of each step), and the steps of the "on" runs are grouped by which monitors were due on them
(read from each run's resolved config). A class's cost is its steps' time above the median of the steps on which no
monitor was due, summed, as a share of the "off" run's time; the steps with nothing due, against the "off" run's
median step, give the cost paid on every step. The per-step synchronisation slows both arms alike (a few ms a step,
the host no longer runs ahead), so read the absolute overhead from the default blocks and the split from this.

    python bench/monitoring_overhead.py                          # CPU default run, 100 steps per arm
    python bench/monitoring_overhead.py --steps 300 --repeats 2 -- +experiment=gpu_125m   # on a GPU
    python bench/monitoring_overhead.py --gpus 0 1 2 3 --steps 900 --warmup-steps 400 --order off,on --repeats 1 \
        -- +experiment=gpu_125m                                  # the steady state, 4 blocks on 4 GPUs
    python bench/monitoring_overhead.py --per-step --steps 750 --warmup-steps 250 --order off,on --repeats 1 \
        -- +experiment=gpu_125m                                  # which monitor costs what
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"on": [], "off": ["monitoring.enabled=false"]}  # off keeps only the throughput monitor (the clock)
# (monitor, interval key) under `monitoring.` whose readings a step may be due for (--per-step classes)
DUE = (("grad_norms", "grad_norms.interval"), ("spikes", "spikes.interval"), ("moe", "moe.interval"),
       ("activations", "activations.interval"), ("context_rms", "context_rms.interval"),
       ("context_rms heatmap", "context_rms.heatmap_interval"), ("lambdas", "lambdas.interval"),
       ("lambdas heatmap", "lambdas.heatmap_interval"), ("attention_logits", "attention_logits.interval"),
       ("attention_sinks", "attention_sinks.interval"))


def run_arm(arm: str, steps: int, overrides: list[str], work: Path, index: int, warmup: int = 0,
            gpu: Optional[int] = None, per_step: bool = False) -> dict:
    run_dir = work / f"{arm}_{index}"
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}",
           "trainer.eval_interval=0", "trainer.ckpt_interval=0", "trainer.resume=none", "logging.progress=false",
           "logging.wandb.mode=disabled", *ARMS[arm], *overrides]
    if per_step:
        cmd.append("monitoring.perf.interval=1")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        where = "" if gpu is None else f" on GPU {gpu}"
        raise SystemExit(f"{arm} run{where} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    perf = [(r["step"], r["perf/elapsed_s"], r["perf/cpu_s"]) for r in rows if "perf/elapsed_s" in r]
    timed = [p for p in perf if p[0] >= warmup]
    if len(timed) < 2 or timed[0] == perf[-1]:
        raise SystemExit(f"--warmup-steps {warmup} leaves no timed window in {steps} steps; raise --steps")
    (s0, t0, c0), (s1, t1, c1) = timed[0], perf[-1]
    out = {"arm": arm, "gpu": gpu, "steps_timed": s1 - s0, "step_time_s": (t1 - t0) / (s1 - s0),
           "cpu_time_s": (c1 - c0) / (s1 - s0)}
    if per_step:  # each step's time and the monitors due on it; the run's last step (every monitor reads) left out
        intervals = due_intervals(run_dir)
        out["steps"] = [{"step": b[0], "time_s": b[1] - a[1], "due": due_on(b[0], intervals)}
                        for a, b in zip(timed, timed[1:]) if b[0] == a[0] + 1 and b[0] != steps]
    return out


def due_intervals(run_dir: Path) -> dict:
    """{monitor: interval} of the enabled health monitors, from the run's resolved config."""
    from omegaconf import OmegaConf

    mon = OmegaConf.load(run_dir / "config.yaml").monitoring  # the run record (diffv2/train/record.py)
    if not mon.enabled:
        return {}
    return {name: OmegaConf.select(mon, key) for name, key in DUE
            if OmegaConf.select(mon, key.split(".")[0] + ".enabled")}


def due_on(step: int, intervals: dict) -> str:
    """The monitors due on `step`, '+'-joined ('-' for none)."""
    return "+".join(name for name, every in intervals.items() if every > 0 and step % every == 0) or "-"


def breakdown(results: list[dict]) -> dict:
    """Per-step classes of the "on" runs against the median plain step; see the module doc (--per-step)."""
    on = [s for r in results if r["arm"] == "on" for s in r["steps"]]
    off = [s["time_s"] for r in results if r["arm"] == "off" for s in r["steps"]]
    plain = statistics.median(s["time_s"] for s in on if s["due"] == "-")
    off_median, off_total = statistics.median(off), statistics.mean(off) * len(on)
    classes = {}
    for s in on:
        classes.setdefault(s["due"], []).append(s["time_s"])
    rows = [{"due": due, "steps": len(ts), "median_ms": 1e3 * statistics.median(ts),
             "excess_ms": 1e3 * statistics.mean(t - plain for t in ts),
             "share": sum(t - plain for t in ts) / off_total} for due, ts in classes.items() if due != "-"]
    rows.sort(key=lambda r: -r["share"])
    every_step = plain / off_median - 1
    return {"off_median_ms": 1e3 * off_median, "plain_on_median_ms": 1e3 * plain, "every_step": every_step,
            "classes": rows, "total": every_step + sum(r["share"] for r in rows),
            "measured": statistics.mean(s["time_s"] for s in on) / statistics.mean(off) - 1}


def run_blocks(args, order: list[str], work: Path, gpu: Optional[int], first_index: int) -> list[list[dict]]:
    """`args.repeats` blocks one after another (on one GPU, or wherever the runs land without --gpus)."""
    blocks = []
    for block in range(args.repeats):
        runs = []
        for i, arm in enumerate(order):
            r = run_arm(arm, args.steps, args.overrides, work, first_index + len(order) * block + i, args.warmup_steps,
                        gpu, args.per_step)
            where = "" if gpu is None else f"GPU {gpu} "
            print(f"  {where}{arm:>3}: {r['step_time_s'] * 1e3:9.2f} ms/step wall, {r['cpu_time_s'] * 1e3:9.2f} "
                  f"ms/step CPU over {r['steps_timed']} steps", flush=True)
            runs.append(r)
        blocks.append(runs)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (first window is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA blocks (each = 2 runs per arm)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="time from the first reading at or after this step (past every monitor's first run)")
    parser.add_argument("--order", default="off,on,on,off", help="the arms of one block, comma-separated")
    parser.add_argument("--gpus", type=int, nargs="+", default=None,
                        help="GPU indices: --repeats blocks on each at once, the order reversed on every other GPU")
    parser.add_argument("--per-step", action="store_true",
                        help="time every step and split the overhead by the monitors due on it (see the module doc)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms (after --)")
    args = parser.parse_args()
    order = args.order.split(",")
    if sorted(set(order)) != ["off", "on"] or order.count("on") != order.count("off"):
        parser.error(f"--order {args.order!r}: give each of on and off, equally often (e.g. off,on,on,off)")
    import torch  # to check --gpus and to name the device

    if args.gpus is not None and "trainer.device=cpu" not in args.overrides:
        visible = torch.cuda.device_count()
        if not visible:
            parser.error("--gpus needs CUDA GPUs and none is visible; drop --gpus")
        if any(g < 0 or g >= visible for g in args.gpus) or len(set(args.gpus)) < len(args.gpus):
            parser.error(f"--gpus {' '.join(map(str, args.gpus))}: give distinct indices of the {visible} visible GPUs")
    with tempfile.TemporaryDirectory(prefix="monitoring_overhead_") as tmp:
        if args.gpus is None:
            blocks = run_blocks(args, order, Path(tmp), None, 0)
        else:
            per_gpu = args.repeats * len(order)
            with ThreadPoolExecutor(len(args.gpus)) as pool:  # the runs are subprocesses: threads only wait
                jobs = [pool.submit(run_blocks, args, order if k % 2 == 0 else order[::-1], Path(tmp), gpu,
                                    k * per_gpu) for k, gpu in enumerate(args.gpus)]
                blocks = [block for job in jobs for block in job.result()]
    results = [r for runs in blocks for r in runs]
    summary = {}
    for clock in ("step_time_s", "cpu_time_s"):
        per_block = []
        for runs in blocks:
            on, off = (sum(r[clock] for r in runs if r["arm"] == arm) for arm in ("on", "off"))
            per_block.append(on / off - 1)
        mean = {arm: statistics.mean(r[clock] for r in results if r["arm"] == arm) for arm in ARMS}
        summary[clock] = {"off": mean["off"], "on": mean["on"], "overhead_per_block": per_block,
                          "overhead": statistics.median(per_block), "pooled": mean["on"] / mean["off"] - 1}
    on_gpu = torch.cuda.is_available() and "trainer.device=cpu" not in args.overrides
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    print("\n| device | clock | steps | monitors off (ms/step) | monitors on (ms/step) | overhead (median, blocks) "
          "| pooled |\n|---|---|---|---|---|---|---|")
    for clock, label in (("step_time_s", "wall"), ("cpu_time_s", "process CPU")):
        m = summary[clock]
        blocks = ", ".join(f"{100 * o:+.1f}%" for o in m["overhead_per_block"])
        print(f"| {device} | {label} | {args.steps} | {m['off'] * 1e3:.2f} | {m['on'] * 1e3:.2f} | "
              f"{100 * m['overhead']:+.2f}% ({blocks}) | {100 * m['pooled']:+.2f}% |")
    split = breakdown(results) if args.per_step else None
    if split:
        print(f"\nPer step (every step synchronised): monitors off {split['off_median_ms']:.2f} ms (median), on with "
              f"nothing due {split['plain_on_median_ms']:.2f} ms: {100 * split['every_step']:+.2f}% on every step\n"
              "\n| monitors due on the step | steps | median ms | mean ms above a plain step | share of the run |"
              "\n|---|---|---|---|---|")
        for r in split["classes"]:
            print(f"| {r['due']} | {r['steps']} | {r['median_ms']:.2f} | {r['excess_ms']:+.2f} | "
                  f"{100 * r['share']:+.2f}% |")
        print(f"| **all (every step + classes)** | | | | **{100 * split['total']:+.2f}%** (measured on/off: "
              f"{100 * split['measured']:+.2f}%) |")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "_".join(["cpu" if device == "cpu" else device.replace(" ", "_")] +
                    [o.lstrip("+").replace("=", "-").replace("/", "-") for o in args.overrides] +
                    (["per-step"] if args.per_step else []))
    path = args.out / f"monitoring_overhead_{name}.json"
    path.write_text(json.dumps({"device": device, "steps": args.steps, "warmup_steps": args.warmup_steps,
                                "order": order, "repeats": args.repeats, "gpus": args.gpus,
                                "overrides": args.overrides, "summary": summary, "breakdown": split,
                                "runs": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
