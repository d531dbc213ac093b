"""FlashAttention-4 kernel configurations on Hopper (GPU): forward and backward time of the attention core per config.

FA4's SM90 kernels pick their tiles from a table tuned for FA3's workloads. This sweep times the alternatives that
fit in registers and shared memory for the layer's head_dim, plus a GQA-expanded backward (K/V repeated to the query
heads, so the kernel writes dK/dV per query head in bf16 instead of accumulating them in fp32 with atomics and a
post-processing pass; the group sum is one torch reduction). Every variant's outputs are compared with the default
config's: a variant that is faster but differs beyond bf16 noise is marked, not ranked.

TFLOP/s use the flash-attention convention (causal fwd = 2*B*S^2*Q*D, bwd = 2.5x fwd, fwd+bwd = 3.5x fwd), as in
bench/attention.py, whose `core` column is the default fwd+bwd here plus the autograd wrapper.

    python bench/fa4_configs.py                       # spec layer: d_model 2048, h 16 (2h = 32 query heads), h_kv 4
    python bench/fa4_configs.py --seqs 2048 --profile # also the backward's kernels (preprocess, main, postprocess)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import bench_ms  # noqa: E402
from diffv2.model.kernels import fa4_unavailable  # noqa: E402
from diffv2.train.record import versions  # noqa: E402

# Forward variants: keyword arguments of FA4's _flash_attn_fwd (tile_mn, pack_gqa). Default: 128x128, pack_gqa on
# for GQA. Wider tile_n trades registers for fewer K/V loads; all fit the hd128 register budget (2 MMA warp groups).
FWD_VARIANTS = {
    "default": {},
    "no_pack_gqa": dict(pack_gqa=False),
    "tile_128x144": dict(tile_mn=(128, 144)),
    "tile_128x160": dict(tile_mn=(128, 160)),
    "tile_128x176": dict(tile_mn=(128, 176)),
    "tile_128x192": dict(tile_mn=(128, 192)),
    "no_pack_128x144": dict(pack_gqa=False, tile_mn=(128, 144)),
    "no_pack_128x160": dict(pack_gqa=False, tile_mn=(128, 160)),
}

# Backward variants: fields replaced in FA4's SM90 BwdConfig (default for causal hd128: 64x128, SdP_swapAB). 80x128
# with dQ_swapAB is FA3's non-causal choice; the others are the next-best by shared-memory traffic per block in
# flash_attn/cute/sm90_config_search.py. Only fields in the kernel's compile key (num_stages_PdS is not) can vary here.
# "gqa_expand" keeps the default tiles and changes the data flow instead.
BWD_VARIANTS = {
    "default": {},
    "tile_80x128_dQswap": dict(m_block_size=80, dQ_swapAB=True),
    "dQ_atom2": dict(AtomLayoutMdQ=2, dQ_swapAB=True),
    "dQ_single_wg": dict(dQ_single_wg=True),
    "gqa_expand": "gqa_expand",
}


def _fa4():
    from flash_attn.cute import interface

    return interface


def run_fwd(q, k, v, kw):
    return _fa4()._flash_attn_fwd(q, k, v, causal=True, return_lse=True, **kw)[:2]


def run_bwd(q, k, v, out, dout, lse, variant):
    fa = _fa4()
    if variant == "gqa_expand":
        group = q.shape[2] // k.shape[2]
        k_rep, v_rep = (t.repeat_interleave(group, dim=2) for t in (k, v))
        dq, dk_rep, dv_rep = fa._flash_attn_bwd(q, k_rep, v_rep, out, dout, lse, causal=True)[:3]
        b, n, n_kv, d = k.shape
        dk = dk_rep.view(b, n, n_kv, group, d).sum(3, dtype=torch.float32).to(k.dtype)
        dv = dv_rep.view(b, n, n_kv, group, d).sum(3, dtype=torch.float32).to(v.dtype)
        return dq, dk, dv
    default = fa._tile_size_bwd_sm90
    if variant:
        fa._tile_size_bwd_sm90 = lambda *a, **kw: dataclasses.replace(default(*a, **kw), **variant)
    try:
        return fa._flash_attn_bwd(q, k, v, out, dout, lse, causal=True)[:3]
    finally:
        fa._tile_size_bwd_sm90 = default


def _max_rel_err(got, ref) -> float:
    return max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref))


def host_ms(fn, reps: int = 10) -> float:
    """Host time per call of fn with the GPU left to run behind (no sync inside): above the device time, fn is
    launch-bound when called alone."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / reps * 1e3


def measure(fn) -> dict:
    """Event time (bench_ms), host time per call and device time per call (the profiler's kernel sum), in ms."""
    return dict(ms=bench_ms(fn), host_ms=host_ms(fn), device_ms=sum(ms for _, ms in kernel_breakdown(fn)))


def kernel_breakdown(fn, reps: int = 5) -> list[tuple[str, float]]:
    """Device time per call of each kernel fn launches, from the profiler (ms, largest first)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            total[ev.name[:90]] += ev.device_time / 1e3 / reps
    return sorted(total.items(), key=lambda kv: -kv[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=32768, help="batch * seq per measurement")
    p.add_argument("--q-heads", type=int, default=32, help="query heads (DIFF V2: 2h)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--fwd", nargs="+", default=list(FWD_VARIANTS), choices=list(FWD_VARIANTS))
    p.add_argument("--bwd", nargs="+", default=list(BWD_VARIANTS), choices=list(BWD_VARIANTS))
    p.add_argument("--profile", action="store_true", help="print the default backward's kernels and their times")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if fa4_unavailable():
        sys.exit(f"bench/fa4_configs.py: {fa4_unavailable()}")
    if torch.cuda.get_device_capability()[0] != 9:
        sys.exit("bench/fa4_configs.py tunes FA4's SM90 (Hopper) configs; this GPU is not compute capability 9.x")
    rows, kernels = [], {}
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        torch.manual_seed(0)
        q = torch.randn(batch, seq, args.q_heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, seq, args.kv_heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        dout = torch.randn_like(q)
        fwd_flops = 2 * batch * seq * seq * args.q_heads * args.head_dim
        out, lse = run_fwd(q, k, v, {})
        ref_bwd = run_bwd(q, k, v, out, dout, lse, {})
        for name in args.fwd:
            kw = FWD_VARIANTS[name]
            try:
                err = _max_rel_err(run_fwd(q, k, v, kw)[:1], (out,))
                times = measure(lambda: run_fwd(q, k, v, kw))
            except Exception as e:  # a config the kernel rejects: record why
                rows.append(dict(seq=seq, pass_="fwd", variant=name, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(seq=seq, batch=batch, pass_="fwd", variant=name, **times,
                             tflops=fwd_flops / times["ms"] / 1e9, max_rel_err=err))
        for name in args.bwd:
            variant = BWD_VARIANTS[name]
            try:
                err = _max_rel_err(run_bwd(q, k, v, out, dout, lse, variant), ref_bwd)
                times = measure(lambda: run_bwd(q, k, v, out, dout, lse, variant))
            except Exception as e:
                rows.append(dict(seq=seq, pass_="bwd", variant=name, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(seq=seq, batch=batch, pass_="bwd", variant=name, **times,
                             tflops=2.5 * fwd_flops / times["ms"] / 1e9, max_rel_err=err))
        if args.profile:
            kernels[seq] = kernel_breakdown(lambda: run_bwd(q, k, v, out, dout, lse, {}))
    summary = print_table(rows)
    for seq, ks in kernels.items():
        print(f"\nS={seq}: default backward, device ms per call by kernel")
        for name, ms in ks:
            print(f"  {ms:8.3f}  {name}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = out_dir / f"fa4-configs-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "env": versions(), "rows": rows, "best": summary,
                                "kernels": {str(s): ks for s, ks in kernels.items()},
                                "shape": dict(q_heads=args.q_heads, kv_heads=args.kv_heads,
                                              head_dim=args.head_dim, tokens=args.tokens)}, indent=1))
    print(f"results: {path}")


# A variant whose outputs differ from the default config's by more than this (relative to the largest magnitude) is
# not a faster way to compute the same thing. Measured on one H100, every variant differed by 5e-3 or less (bf16
# rounding of reordered sums).
MAX_REL_ERR = 2e-2


def print_table(rows: list[dict]) -> dict:
    """Print every row with its speed-up over the default, then the best fwd+bwd per S; return that summary."""
    print(f"{'seq':>5} {'pass':<4} {'variant':<20} {'ms':>8} {'TF/s':>7} {'vs default':>10} {'host ms':>8} "
          f"{'device ms':>9} {'max rel err':>11}")
    default = {(r["seq"], r["pass_"]): r for r in rows if r["variant"] == "default" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['seq']:>5} {r['pass_']:<4} {r['variant']:<20} {r['error']}")
            continue
        base = default.get((r["seq"], r["pass_"]))
        speedup = base["ms"] / r["ms"] if base else float("nan")
        flag = "" if r["max_rel_err"] <= MAX_REL_ERR else "  DIFFERS"
        print(f"{r['seq']:>5} {r['pass_']:<4} {r['variant']:<20} {r['ms']:>8.3f} {r['tflops']:>7.1f} {speedup:>10.3f} "
              f"{r['host_ms']:>8.3f} {r['device_ms']:>9.3f} {r['max_rel_err']:>11.2e}{flag}")
    summary = {}
    for seq in sorted({r["seq"] for r in rows}):
        best = {}
        for pass_ in ("fwd", "bwd"):
            ok = [r for r in rows if r["seq"] == seq and r["pass_"] == pass_ and "error" not in r
                  and r["max_rel_err"] <= MAX_REL_ERR]
            if ok:
                best[pass_] = min(ok, key=lambda r: r["ms"])
        if len(best) == 2 and (seq, "fwd") in default and (seq, "bwd") in default:
            flops = best["fwd"]["tflops"] * best["fwd"]["ms"] * 1e9 * 3.5
            base_ms = default[(seq, "fwd")]["ms"] + default[(seq, "bwd")]["ms"]
            best_ms = best["fwd"]["ms"] + best["bwd"]["ms"]
            summary[seq] = dict(fwd=best["fwd"]["variant"], bwd=best["bwd"]["variant"],
                                default_ms=base_ms, default_tflops=flops / base_ms / 1e9,
                                best_ms=best_ms, best_tflops=flops / best_ms / 1e9)
    print(f"\n{'seq':>5} {'fwd+bwd default':>22} {'best':>22}  best variants")
    for seq, s in summary.items():
        print(f"{seq:>5} {s['default_ms']:>8.3f} ms {s['default_tflops']:>6.1f} TF/s "
              f"{s['best_ms']:>8.3f} ms {s['best_tflops']:>6.1f} TF/s  fwd {s['fwd']}, bwd {s['bwd']}")
    return summary


if __name__ == "__main__":
    main()
