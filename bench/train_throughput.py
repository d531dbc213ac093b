"""Training throughput (GPU): real training steps of one preset for several attention arms, side by side.

Each arm runs the real trainer (data pipeline, compiled blocks, fused AdamW, fused cross-entropy) for --steps
steps on the shipped sample corpus, and reports tokens/s, TFLOP/s and MFU from the trainer's own metrics
(FLOPs from diffv2/model/flops.py, DIFF V2's extra query heads counted), peak memory and data-loading share. MFU is
against the dense BF16 datasheet peak (989 TFLOP/s for H100/H200); the table also gives the ratio to the
measured 8192^3 bf16 matmul rate of the same GPU. --accum K runs K micro-batches per optimizer step, as a real
run with a global batch larger than one micro-batch does (the optimizer, clipping and grad-norm work is then paid
once per K micro-batches). With --profile, two extra optimizer steps of each arm run under torch.profiler
(trainer.profile_start) after the measured ones, and the kernel summary and operator table (device time by kernel
kind, top kernels, device busy share) are saved beside the results as profile-<arm>-<preset>-...-<stamp>.txt.
Every run takes one more step that is not measured: the last step of a run takes every monitor's final reading.

    python bench/train_throughput.py --preset 1b --seq 4096 --micro-batch 2 --steps 40
    python bench/train_throughput.py --preset 1b --accum 8 --steps 12 --log-interval 4 --profile
    python bench/train_throughput.py --preset 1b --accum 8 --steps 6 --log-interval 2 --ab trainer.bf16_weights=true
    python bench/train_throughput.py --preset moe_30a3 --global-tokens 1048576 --steps 6 --log-interval 2 --override model.n_layers=4 model.moe.force_balance=true

The last one steps every 1M tokens (128 micro-batches of 2 x 4096), as production runs do, with forced balanced
routing (model.moe.force_balance: benchmarks only, to compare with peers that report forced-balance numbers).

`--ab OVERRIDE...` measures a change on the same GPU lease: every arm runs a second time with those overrides added
(rows marked +B) and the table ends with the B/A tokens/s ratio per arm. The matmul rate of one H100 model varied by
6% between leases, so a before/after taken on two leases cannot resolve a change of a few percent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffv2.train.record import versions  # noqa: E402


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * n**3 / (statistics.median(times) / 1e3) / 1e12


def run_arm(args, arm: str, run_dir: Path, extra: tuple[str, ...] = ()) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from diffv2.config import register_configs
    from diffv2.train.trainer import Trainer
    from diffv2.train.validate import validate
    from monitoring.build import instrumentation, schema

    register_configs(monitoring=schema())
    profile = [f"trainer.profile_start={args.steps + 1}", "trainer.profile_steps=2"] if args.profile else []
    overrides = [
        f"model={args.preset}", f"attention={arm}", f"data.seq_len={args.seq}", f"model.max_seq_len={args.seq}",
        f"trainer.micro_batch_size={args.micro_batch}", f"trainer.global_batch_size={args.micro_batch * args.accum}",
        # One step past the measured (and profiled) ones: the run's last step takes every monitor's final reading.
        f"trainer.max_steps={args.steps + (3 if args.profile else 1)}", f"trainer.log_interval={args.log_interval}",
        "trainer.eval_interval=-1", *profile,
        "trainer.ckpt_interval=-1", f"trainer.compile={str(not args.no_compile).lower()}", "logging.progress=false",
        "logging.wandb.mode=disabled", f"data.num_workers={args.workers}", *args.override, *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    validate(cfg)
    torch.cuda.reset_peak_memory_stats()
    Trainer(cfg, run_dir, instrumentation=instrumentation()).run()  # with monitors: perf/ is read below
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The first window holds compilation; the steps after --steps (profiled, last) are not measured.
    perf = [r for r in rows if "perf/tokens_per_s" in r and r["step"] <= args.steps][1:]
    if not perf:
        raise SystemExit(f"--steps {args.steps} gives no measured window after warm-up; raise --steps")
    tok_s = statistics.median(r["perf/tokens_per_s"] for r in perf)
    mfu = statistics.median(r["perf/mfu"] for r in perf)
    ops = run_dir / "profile" / "ops_rank0.txt"
    return dict(arm=arm, tokens_per_s=tok_s, mfu=mfu, tflops=mfu * 989.0, profile=ops.read_text() if args.profile else None,
                data_share=max(r["perf/data_share"] for r in perf),
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30, windows=len(perf), overrides=overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--arms", nargs="+", default=["baseline", "diffv2", "baseline_2h"])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--global-tokens", type=int, default=None, metavar="TOKENS",
                   help="tokens per optimizer step instead of --accum (accumulation rounded up to reach it); "
                        "production runs step every ~1-4M tokens (e.g. --global-tokens 1048576)")
    p.add_argument("--profile", action="store_true", help="save a torch.profiler operator table per arm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every arm")
    p.add_argument("--ab", nargs="+", default=None, metavar="OVERRIDE",
                   help="A/B on one GPU lease: every arm runs again with these overrides added (rows marked +B)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    if args.global_tokens:
        args.accum = -(-args.global_tokens // (args.micro_batch * args.seq))
    if not torch.cuda.is_available():
        sys.exit("bench/train_throughput.py needs a CUDA GPU")
    os.environ.setdefault("DIFFV2_CACHE", tempfile.mkdtemp(prefix="diffv2-cache-"))
    matmul = matmul_tflops()
    results = []
    variants = [("", ())] + ([("+B", tuple(args.ab))] if args.ab else [])
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms:
            for mark, extra in variants:  # A then B per arm: the two runs of an arm are minutes apart, not more
                r = run_arm(args, arm, Path(tmp) / f"{arm}{mark}", extra)
                results.append({**r, "label": f"{arm}{mark}", "ab": list(extra)})
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    lines = [f"{args.preset}, seq {args.seq}, micro-batch {args.micro_batch} x {args.accum} per optimizer step "
             f"({args.micro_batch * args.accum * args.seq:,} tokens), {gpu}; matmul 8192^3: {matmul:.0f} TFLOP/s",
             f"{'arm':<14} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'/matmul':>8} {'mem GB':>7} {'data':>6}"]
    for r in results:
        lines.append(f"{r['label']:<14} {r['tokens_per_s']:>9,.0f} {r['tflops']:>8.1f} {100 * r['mfu']:>5.1f}% "
                     f"{r['tflops'] / matmul:>8.3f} {r['peak_mem_gb']:>7.1f} {100 * r['data_share']:>5.2f}%")
    by_label = {r["label"]: r for r in results}
    for mark, _ in variants:
        if f"diffv2{mark}" in by_label and f"baseline_2h{mark}" in by_label:
            lines.append(f"DIFF V2 tokens/s / 2h-head baseline{' (B)' if mark else ''}: "
                         f"{by_label[f'diffv2{mark}']['tokens_per_s'] / by_label[f'baseline_2h{mark}']['tokens_per_s']:.3f}")
    if args.ab:
        lines.append(f"B = {' '.join(args.ab)}; tokens/s B / A: " + ", ".join(
            f"{arm} {by_label[arm + '+B']['tokens_per_s'] / by_label[arm]['tokens_per_s']:.3f}" for arm in args.arms))
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = f"{args.preset}-s{args.seq}-{gpu.replace(' ', '_')}-{stamp}"
    for r in results:
        table = r.pop("profile")
        if table is not None:
            profile_path = out / f"profile-{r['label'].replace('+', '-')}-{tag}.txt"
            profile_path.write_text(table)
            print(f"profile: {profile_path}")
    path = out / f"train-{tag}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "env": versions(), "matmul_tflops": matmul,
                                "table": lines, "results": results}, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
