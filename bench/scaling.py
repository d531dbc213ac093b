"""Engine throughput and data-parallel scaling (GPU): the real `train.py` under torchrun on 1 and N GPUs.

For each engine (FSDP2, DeepSpeed ZeRO-2/3) and GPU count, trains --steps steps of a preset with a constant
per-GPU batch (weak scaling: global batch = micro-batch x GPUs), reads rank 0's metrics.jsonl and reports job
tokens/s, tokens/s per GPU, MFU per GPU (DIFF V2's real FLOPs, dense BF16 datasheet peak), peak memory and the
scaling efficiency tokens/s(N) / (N x tokens/s(1)). One GPU with engine fsdp is the plain single-device loop.
Tokens/s, MFU and TFLOP/s are medians over the log windows after the first (warm-up, compilation) and before the
last (the end of the run); peak memory is the largest of them.

    python bench/scaling.py --preset 350m --seq 4096 --micro-batch 4 --gpus 1 2 --engines fsdp zero2

Results (table, command, versions) go to bench/results/scaling-*.json. Each run's output is written as it comes
to `<out>/scaling-<preset>-<attention>-<engine>-<gpus>gpu.log`, and `--timeout` stops a run (its whole process
group) that has not finished after that many seconds, recording how far its log got.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffv2.train.record import versions  # noqa: E402

MIN_WINDOWS = 3  # measured log windows a median needs
PARALLEL = {"fsdp": "parallel=fsdp", "ddp": "parallel=ddp", "zero2": "parallel=zero2", "zero3": "parallel=zero3"}


def run(args, engine: str, gpus: int, work: Path) -> dict:
    run_dir = work / f"{engine}-{gpus}"
    accum = -(-args.global_tokens // (args.micro_batch * gpus * args.seq)) if args.global_tokens else args.accum
    overrides = [
        f"model={args.preset}", f"attention={args.attention}", PARALLEL[engine], f"data.seq_len={args.seq}",
        f"model.max_seq_len={args.seq}", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch * gpus * accum}", f"trainer.max_steps={args.steps}",
        f"trainer.log_interval={args.log_interval}", "trainer.eval_interval=-1", "trainer.ckpt_interval=-1",
        f"trainer.compile={str(args.compile).lower()}", "trainer.nonfinite=ignore", "logging.progress=false",
        "logging.wandb.mode=disabled", f"hydra.run.dir={run_dir}", *args.override,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "train.py",
           *overrides]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    log_path = Path(args.out) / f"scaling-{args.preset}-{args.attention}-{engine}-{gpus}gpu.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
            proc.wait()
            returncode = None
    wall = time.monotonic() - start
    tail = log_path.read_text(errors="replace")[-2000:]
    if returncode is None:
        return dict(engine=engine, gpus=gpus, error=f"{tail}\nstopped by --timeout {args.timeout:g} s", wall_s=wall,
                    command=" ".join(cmd))
    if returncode != 0:
        return dict(engine=engine, gpus=gpus, error=tail, wall_s=wall, command=" ".join(cmd))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The first window holds warm-up and compilation, the last the end of the run (final validation, checkpoint).
    perf = [r for r in rows if "perf/tokens_per_s" in r][1:-1]
    if len(perf) < MIN_WINDOWS:
        raise SystemExit(f"--steps {args.steps} at --log-interval {args.log_interval} leaves {len(perf)} measured "
                         f"windows (the first and the last are not measured); raise --steps to at least "
                         f"{(MIN_WINDOWS + 2) * args.log_interval}")
    med = lambda key: statistics.median(r[key] for r in perf)  # noqa: E731
    return dict(engine=engine, gpus=gpus, tokens_per_s=med("perf/tokens_per_s"), mfu=med("perf/mfu"),
                tflops_per_gpu=med("perf/tflops"), mem_gb=max(r["perf/mem_gb"] for r in perf),
                data_share=max(r["perf/data_share"] for r in perf), windows=len(perf), wall_s=wall,
                final_loss=[r["train/loss"] for r in rows if "train/loss" in r][-1], command=" ".join(cmd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350m")
    p.add_argument("--attention", default="diffv2")
    p.add_argument("--engines", nargs="+", default=["fsdp", "zero2"], choices=sorted(PARALLEL))
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per GPU per step")
    p.add_argument("--global-tokens", type=int, default=None, metavar="TOKENS",
                   help="tokens per optimizer step instead of --accum, for every GPU count (accumulation rounded up "
                        "to reach it); production runs step every ~1-4M tokens (e.g. --global-tokens 1048576)")
    p.add_argument("--steps", type=int, default=80,
                   help="steps per run; tokens/s is the median of the log windows between the first and the last "
                        "(with --compile, the first monitored step compiles its own block variant in an early window: "
                        "30 steps measured 20%% MFU where 80 measured 36%%)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile each block (adds compile time per run)")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which a run is stopped (default: none)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < max(args.gpus):
        sys.exit(f"bench/scaling.py needs {max(args.gpus)} CUDA GPUs; {torch.cuda.device_count()} visible")
    gpu = torch.cuda.get_device_name()
    os.environ.setdefault("DIFFV2_CACHE", tempfile.mkdtemp(prefix="diffv2-cache-"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            for gpus in args.gpus:
                results.append(run(args, engine, gpus, Path(tmp)))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "command"}), flush=True)
    one = {r["engine"]: r for r in results if r["gpus"] == 1 and "error" not in r}
    per_step = (f"{args.global_tokens:,}+ tokens per optimizer step" if args.global_tokens else
                f"{args.accum} micro-batches per GPU per optimizer step")
    lines = [f"{args.preset}/{args.attention}, seq {args.seq}, micro-batch {args.micro_batch} per GPU, {per_step}, "
             f"{'compiled' if args.compile else 'eager'}, {gpu}",
             f"{'engine':<7} {'GPUs':>4} {'tok/s':>9} {'tok/s/GPU':>10} {'TFLOP/s/GPU':>11} {'MFU':>6} {'mem GB':>7} "
             f"{'scaling':>8}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['engine']:<7} {r['gpus']:>4} failed: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        base = one.get(r["engine"])
        eff = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"]) if base else float("nan")
        r["scaling_efficiency"] = eff
        lines.append(f"{r['engine']:<7} {r['gpus']:>4} {r['tokens_per_s']:>9,.0f} {r['tokens_per_s'] / r['gpus']:>10,.0f} "
                     f"{r['tflops_per_gpu']:>11.1f} {100 * r['mfu']:>5.1f}% {r['mem_gb']:>7.1f} {100 * eff:>7.1f}%")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scaling-{args.preset}-s{args.seq}-{gpu.replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "env": versions(), "table": lines,
                                "results": results}, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
