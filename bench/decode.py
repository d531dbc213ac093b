"""Decode benchmark (GPU): tokens/s of DIFF V2 vs the baseline with the same d_model, h and h_kv (spec §5.4, A21).

    python bench/decode.py [--batches 1 16 64] [--contexts 1024 8192 32768] [--layers 16] [--eager] [--compile]
                            [--eager-combine]

A cell times one decode step at a fixed context: B new tokens attend to `context` cached tokens, then lm_head and
argmax. Weights are random bf16 (a 1b-like stack: d_model 2048, h 16, h_kv 4, d 128, ffn 8192, vocab 128256) and
the cache is filled with random keys and values, so no prefill is run. Each step is a CUDA graph replay (--eager
times plain launches), median of several timed runs.

Why a cell can miss parity: a step reads every matmul weight once and the whole KV cache once. The KV cache is
identical in both arms (2·h_kv·d per token per layer), the weights are not: DIFF V2 adds h·d·D + D·h per layer
(+40% attention weights at this shape). With bytes as the cost, ratio ≈ (W_base + KV) / (W_diff + KV); the table
prints W, KV, that predicted ratio and the bandwidth each arm reached, so a cell below 0.95 reads as either
"weights dominate" (predicted < 0.95) or "the kernel does not reach the byte bound" (measured below predicted).
Attention intensity is 2·n_q/(h_kv·2 bytes) FLOP/byte: 8 for DIFF V2 vs 4 for the baseline, both far below a GPU's
ridge point, so the doubled query heads cost no time when the kernel streams K/V once per GQA group.

Results go to bench/results/decode-<gpu>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffv2.infer.fused_combine import install_fused_combine  # noqa: E402
from diffv2.config import AttentionConfig, ModelConfig  # noqa: E402
from diffv2.model.flops import attention_params, effective_config, mlp_params  # noqa: E402
from diffv2.infer.inference import cast_weights  # noqa: E402
from diffv2.model.kernels import resolve_backend  # noqa: E402
from diffv2.model.kv_cache import KVCache  # noqa: E402
from diffv2.model.transformer import Transformer  # noqa: E402
from diffv2.train.record import versions  # noqa: E402

ARMS = {"baseline": AttentionConfig(variant="baseline"), "diffv2": AttentionConfig(variant="diffv2")}
GIB = 2**30


def bench_config(layers: int, max_context: int, arm: str) -> ModelConfig:
    return ModelConfig(name="decode-1b", d_model=2048, n_layers=layers, n_heads=16, n_kv_heads=4, head_dim=128,
                       ffn_hidden=8192, vocab_size=128256, max_seq_len=max_context + 1, attention=ARMS[arm])


def step_bytes(cfg: ModelConfig, batch: int, context: int, dtype_bytes: int = 2) -> dict:
    """Bytes one decode step must read: every matmul weight once (lm_head incl.; the embedding lookup reads only
    B rows) and the whole KV cache once."""
    cfg = effective_config(cfg)
    weights = (cfg.n_layers * (attention_params(cfg) + mlp_params(cfg)) + cfg.vocab_size * cfg.d_model) * dtype_bytes
    kv = batch * context * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    return {"weight_bytes": weights, "kv_bytes": kv}


def timed_ms(fn, device: torch.device, reps: int, runs: int = 5) -> float:
    """Median over `runs` of the mean time of `reps` calls, CUDA events on GPU (wall clock on CPU)."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times)


def decode_step(model: Transformer, cache: KVCache, tokens_B1: torch.Tensor, context: int):
    """One step at a fixed context: the cache length is reset, so replays overwrite the same slot."""

    def step() -> torch.Tensor:
        cache.length = context
        h_BM = model.hidden(tokens_B1, cache=cache)[:, -1]
        return F.linear(h_BM, model.lm_head_weight).argmax(dim=-1)

    return step


def as_graph(step, device: torch.device):
    """Capture `step` in a CUDA graph (decode at small batch is launch-bound without one)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside capture: lazy init, kernel selection
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@torch.no_grad()
def measure(model: Transformer, batch: int, context: int, device: torch.device, graphs: bool, reps: int,
            compile_: bool = False) -> float:
    """ms per decode step of `model` (already on device, bf16 on GPU) at batch x context."""
    cache = KVCache.for_model(model, batch, context + 1)
    for t in cache.k_BLKD + cache.v_BLKD:
        t.normal_()
    tokens_B1 = torch.randint(0, model.cfg.vocab_size, (batch, 1), device=device)
    step = decode_step(model, cache, tokens_B1, context)
    if compile_:
        step = torch.compile(step, mode="max-autotune-no-cudagraphs")
    fn = as_graph(step, device) if graphs else step
    ms = timed_ms(fn, device, reps)
    del cache, fn, step  # step holds the cache too: all three go before the memory is handed back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms


def run_cell(models: dict, batch: int, context: int, device: torch.device, graphs: bool = True, reps: int = 20,
             compile_: bool = False) -> dict:
    """Both arms at one (batch, context); models live on the CPU between cells on a GPU run."""
    row = {"batch": batch, "context": context}
    for arm, model in models.items():
        b = step_bytes(model.cfg, batch, context)
        row[arm] = dict(b)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last cell's cache, freed into the allocator, back to the device
            free = torch.cuda.mem_get_info(device)[0]
            cache = step_bytes(model.cfg, batch, context + 1)["kv_bytes"]
            need = b["weight_bytes"] + cache + 4 * batch * model.cfg.vocab_size + GIB  # + logits, workspace
            if need > free:
                row[arm]["skipped"] = f"needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
                continue
            model.to(device)
        ms = measure(model, batch, context, device, graphs, reps, compile_)
        if device.type == "cuda":
            model.to("cpu")  # park: the other arm's cache may need the memory
        row[arm].update(ms=ms, tokens_per_s=batch / ms * 1e3, gb_per_s=(b["weight_bytes"] + b["kv_bytes"]) / ms / 1e6)
    base, diff = row["baseline"], row["diffv2"]
    row["predicted_ratio"] = (base["weight_bytes"] + base["kv_bytes"]) / (diff["weight_bytes"] + diff["kv_bytes"])
    if "ms" in base and "ms" in diff:
        row["ratio"] = diff["tokens_per_s"] / base["tokens_per_s"]
        row["why"] = explain(row)
    return row


def explain(row: dict) -> str:
    kv_share = row["diffv2"]["kv_bytes"] / (row["diffv2"]["kv_bytes"] + row["diffv2"]["weight_bytes"])
    if row["ratio"] >= 0.95:
        return f"parity (KV {kv_share:.0%} of DIFF V2's bytes)"
    if row["predicted_ratio"] < 0.95:
        return f"weights dominate: KV only {kv_share:.0%} of bytes, bytes predict {row['predicted_ratio']:.2f}"
    return (f"below the byte bound {row['predicted_ratio']:.2f}: kernel/launch overhead (check GB/s columns; "
            f"try --compile, or flash-attn's split-KV decode)")


def print_table(rows: list) -> None:
    print(f"{'batch':>5} {'context':>7} {'base tok/s':>11} {'diff tok/s':>11} {'ratio':>6} {'bytes':>6} "
          f"{'W base GB':>9} {'W diff GB':>9} {'KV GB':>7} {'base GB/s':>9} {'diff GB/s':>9}  why")
    for r in rows:
        base, diff = r["baseline"], r["diffv2"]
        if "ratio" not in r:
            why = base.get("skipped") or diff.get("skipped")
            print(f"{r['batch']:>5} {r['context']:>7} {'-':>11} {'-':>11} {'-':>6} {r['predicted_ratio']:>6.3f} "
                  f"{base['weight_bytes'] / 1e9:>9.2f} {diff['weight_bytes'] / 1e9:>9.2f} "
                  f"{diff['kv_bytes'] / 1e9:>7.2f} {'-':>9} {'-':>9}  skipped: {why}")
            continue
        print(f"{r['batch']:>5} {r['context']:>7} {base['tokens_per_s']:>11,.0f} {diff['tokens_per_s']:>11,.0f} "
              f"{r['ratio']:>6.3f} {r['predicted_ratio']:>6.3f} {base['weight_bytes'] / 1e9:>9.2f} "
              f"{diff['weight_bytes'] / 1e9:>9.2f} {diff['kv_bytes'] / 1e9:>7.2f} {base['gb_per_s']:>9.0f} "
              f"{diff['gb_per_s']:>9.0f}  {r['why']}")
    print("ratio = DIFF V2 / baseline tokens/s; bytes = (W_base + KV) / (W_diff + KV), the ratio if both arms ran at "
          "the same bandwidth; W = matmul weights read per step, KV = cache read per step (same for both arms)")


def build_models(layers: int, max_context: int, device: torch.device) -> dict:
    """Random-weight arms in bf16, built on the CPU (run_cell moves each to the GPU in turn)."""
    backend = resolve_backend("auto", device, doc_mask=False)
    models = {}
    for arm in ARMS:
        torch.manual_seed(0)
        models[arm] = cast_weights(Transformer(bench_config(layers, max_context, arm), backend), torch.bfloat16).eval()
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--reps", type=int, default=20, help="decode steps per timed run")
    p.add_argument("--eager", action="store_true", help="no CUDA graph: time plain kernel launches")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step before capture")
    p.add_argument("--eager-combine", action="store_true",
                   help="DIFF V2's pair combination op by op (several kernels per layer), not the fused kernel "
                        "that inference uses: the A/B of that fusion")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU (it times bf16 decode steps in CUDA graphs); nothing was measured")
    device = torch.device("cuda")
    models = build_models(args.layers, max(args.contexts), device)
    if not args.eager_combine:  # as load_model does: DIFF V2's combine in one kernel (--eager-combine: op by op)
        for model in models.values():
            install_fused_combine(model)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            rows.append(run_cell(models, batch, context, device, not args.eager, args.reps, args.compile))
            print(f"measured batch {batch} context {context}", flush=True)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "env": versions(),
              "config": {"d_model": 2048, "n_heads": 16, "n_kv_heads": 4, "head_dim": 128, "ffn_hidden": 8192,
                         "vocab_size": 128256, "n_layers": args.layers, "dtype": "bfloat16",
                         "cuda_graphs": not args.eager, "compile": args.compile,
                         "fused_combine": not args.eager_combine}, "rows": rows}
    path = out / f"decode-{torch.cuda.get_device_name().replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
