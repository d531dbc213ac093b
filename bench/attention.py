"""Attention benchmark (GPU): fwd+bwd time of the attention module and of its kernel core.

Arms: baseline h, DIFF V2 (2h query heads, h outputs), baseline 2h; every available backend; S in 2048/4096/8192.
Kernel TFLOP/s use the flash-attention convention (causal fwd = 2*B*S^2*Q*D, fwd+bwd = 3.5x fwd). The core (the kernel
alone, fwd+bwd) is timed --repeats times per case, round-robin over the cases; the table gives the median and range.

    python bench/attention.py [--seqs 2048 4096 8192] [--tokens 32768] [--compile]
    python bench/attention.py --heads 32 --kv-heads 8 --head-dim 64    # the 1b preset's layer (head_dim 64)
    python bench/attention.py --docs 8 --backends fa4 flash_attn flex  # packed documents, masked across boundaries

With --docs, the varlen backends (fa4, flash_attn) sync the host once per call or more (the number of documents
sets a tensor's size), so their times include the launch gaps after each sync; flex builds its mask without one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffv2.model.attention import Attention  # noqa: E402
from diffv2.config import AttentionConfig, ModelConfig  # noqa: E402
from diffv2.model.kernels import (  # noqa: E402
    causal_attention, doc_cu_seqlens, doc_ids_from_tokens, fa4_available, flash_attn_available, resolve_backend,
)
from diffv2.train.record import versions  # noqa: E402

ARMS = {
    "baseline_h": dict(variant="baseline"),
    "diffv2": dict(variant="diffv2"),
    "baseline_2h": dict(variant="baseline", head_multiplier=2.0),
}


def bench_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median device time of fn() in ms, from CUDA events around each rep.

    The reps are queued back to back with no host sync between them, as a training loop runs: once the host is ahead
    of the GPU, a rep's events bracket its kernels only. (A sync after every rep made each rep start on an idle GPU,
    so the host time to its first launch was timed too: ~0.2 ms per FA4 call, whose launcher is Python.) A host-bound
    fn still shows its host time, because its kernels then wait for their launches."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def packed_doc_ids(batch: int, seq: int, docs: int) -> Optional[torch.Tensor]:
    """Document ids of rows packed with `docs` documents each: an EOD at random (seeded) positions; None when docs
    is 0."""
    if docs <= 0:
        return None
    gen = torch.Generator().manual_seed(0)
    tokens = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        tokens[row, torch.randperm(seq - 1, generator=gen)[: docs - 1]] = 0  # never the last token: docs documents
    return doc_ids_from_tokens(tokens, 0).to("cuda" if torch.cuda.is_available() else "cpu")


def causal_pairs(batch: int, seq: int, doc_ids: Optional[torch.Tensor]) -> int:
    """Sum over sequences of length^2 (the flash-attention convention's S^2, per document when packed)."""
    if doc_ids is None:
        return batch * seq * seq
    cu = doc_cu_seqlens(doc_ids).long()
    return int(((cu[1:] - cu[:-1]) ** 2).sum())


def module_case(cfg: ModelConfig, backend: str, batch: int, seq: int, compile_: bool,
                doc_ids: Optional[torch.Tensor] = None):
    module = Attention(cfg, layer_idx=0, backend=backend).cuda().bfloat16()
    if compile_:
        torch._dynamo.reset()  # each arm is a fresh compile, not a recompile against the last arm's guards
    fwd = torch.compile(module) if compile_ else module
    x = torch.randn(batch, seq, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step():  # x stands for the residual stream: its gradient is not accumulated; the weights' are, as in training
        x.grad = None
        fwd(x, doc_ids).backward(grad)

    return step


def arm_config(base: ModelConfig, arm: str, docs: bool = False) -> tuple[ModelConfig, int]:
    """The arm's model config and its number of query heads."""
    cfg = ModelConfig(**{**base.__dict__, "attention": AttentionConfig(**ARMS[arm], doc_mask=docs)})
    return cfg, (2 * cfg.n_heads if arm != "baseline_h" else cfg.n_heads)


def core_case(n_q: int, cfg: ModelConfig, backend: str, batch: int, seq: int,
              doc_ids: Optional[torch.Tensor] = None):
    d = cfg.head_dim
    q = torch.randn(batch, seq, n_q, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, seq, cfg.n_kv_heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)

    def step():  # autograd.grad: q, k, v stand for projection outputs, so no .grad accumulation is timed
        torch.autograd.grad(causal_attention(q, k, v, backend, doc_ids), (q, k, v), grad)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=32768, help="batch * seq per measurement")
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd modules")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16, help="h: output heads (DIFF V2 has 2h query heads)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="core timings per case (median reported)")
    p.add_argument("--docs", type=int, default=0,
                   help="pack each row with this many documents (random boundaries) and mask across them")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    if args.repeats < 1:
        sys.exit("bench/attention.py: --repeats must be >= 1")
    backends = args.backends or (["fa4"] if fa4_available() else []) + ["cudnn", "sdpa_flash", "flex"] + (
        ["flash_attn"] if flash_attn_available() else [])
    base = ModelConfig(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                       max_seq_len=max(args.seqs))
    print(f"layer: d_model {args.d_model}, h {args.heads}, h_kv {args.kv_heads}, head_dim {args.head_dim}; "
          f"backends {backends}" + (f"; {args.docs} documents per row" if args.docs else ""), flush=True)
    docs = args.docs > 0
    doc_ids = {seq: packed_doc_ids(max(1, args.tokens // seq), seq, args.docs) for seq in args.seqs}
    rows = []
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        for backend in backends:
            for arm in ARMS:
                cfg, n_q = arm_config(base, arm, docs)
                try:
                    resolve_backend(backend, torch.device("cuda"), docs, torch.bfloat16)  # e.g. cudnn cannot mask docs
                    core = bench_ms(core_case(n_q, cfg, backend, batch, seq, doc_ids[seq]))
                    eager = bench_ms(module_case(cfg, backend, batch, seq, False, doc_ids[seq]))
                    comp = (bench_ms(module_case(cfg, backend, batch, seq, True, doc_ids[seq])) if args.compile
                            else float("nan"))
                except Exception as e:  # a backend may not support a shape; record why
                    rows.append(dict(seq=seq, backend=backend, arm=arm, error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(dict(seq=seq, batch=batch, backend=backend, arm=arm, core_runs=[core],
                                 module_ms=eager, module_compiled_ms=comp))
                torch.cuda.empty_cache()
    # The cores again, round-robin over every case, so that a drift of the GPU clock (power, temperature) spreads over
    # all arms instead of landing on whichever ran last; the table reports the median and the range.
    for _ in range(args.repeats - 1):
        for r in rows:
            if "error" not in r:
                cfg, n_q = arm_config(base, r["arm"], docs)
                try:
                    r["core_runs"].append(bench_ms(core_case(n_q, cfg, r["backend"], r["batch"], r["seq"],
                                                             doc_ids[r["seq"]])))
                except Exception as e:  # e.g. out of memory: keep the timings so far
                    r["repeat_error"] = f"{type(e).__name__}: {e}"[:200]
                torch.cuda.empty_cache()
    for r in rows:
        if "error" not in r:
            _, n_q = arm_config(base, r["arm"])
            flops = 3.5 * 2 * causal_pairs(r["batch"], r["seq"], doc_ids[r["seq"]]) * n_q * base.head_dim
            r["core_ms"] = statistics.median(r["core_runs"])
            r["core_tflops"] = flops / r["core_ms"] / 1e9
            r["core_tflops_min"], r["core_tflops_max"] = (flops / max(r["core_runs"]) / 1e9,
                                                          flops / min(r["core_runs"]) / 1e9)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"command": " ".join(sys.argv), "env": versions(), "rows": rows,
              "layer": dict(d_model=args.d_model, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim),
              "docs_per_row": args.docs}
    path = out / f"attention-{torch.cuda.get_device_name().replace(' ', '_')}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"results: {path}")


def _best_ms(row: dict) -> float:
    """Fastest of eager and compiled (compiled is NaN when not measured)."""
    compiled = row["module_compiled_ms"]
    return row["module_ms"] if math.isnan(compiled) else min(row["module_ms"], compiled)


def print_table(rows: list[dict]) -> None:
    print(f"{'seq':>5} {'backend':<11} {'arm':<12} {'core ms':>8} {'core TF/s':>9} {'range':>11} {'module ms':>9} "
          f"{'compiled':>9} {'vs 2h':>6}")
    ref = {(r["seq"], r["backend"]): r for r in rows if r["arm"] == "baseline_2h" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['seq']:>5} {r['backend']:<11} {r['arm']:<12} {r['error']}")
            continue
        two_h = ref.get((r["seq"], r["backend"]))
        ratio = _best_ms(r) / _best_ms(two_h) if two_h else float("nan")
        spread = f"{r['core_tflops_min']:.0f}-{r['core_tflops_max']:.0f}"
        print(f"{r['seq']:>5} {r['backend']:<11} {r['arm']:<12} {r['core_ms']:>8.3f} {r['core_tflops']:>9.1f} "
              f"{spread:>11} {r['module_ms']:>9.3f} {r['module_compiled_ms']:>9.3f} {ratio:>6.3f}")


if __name__ == "__main__":
    main()
