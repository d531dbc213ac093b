"""Padded-prefill precision check (issue #9): bf16 logits of each attention path vs an fp32 reference, with T4's bounds.

    python bench/padded_prefill_check.py [--device auto|cuda|cpu] [--variants diffv2 baseline diffv1] [--slot-positions]

The model is tests/test_inference.py's GPU one (2 layers, h=4, h_kv=2, d=16, sharp attention, sigma(lambda) spread
over (0, 1)) in bf16; the reference is the same bf16-cast weights in fp32 on the math backend, each row alone.
Four rows with 0, 3, 7, 1 left pads decode 40 tokens (prefill 31, then 9 single steps). Paths:
  unpadded/B  each row alone, full forward on backend B (GPU: sdpa_flash, cudnn, flex; CPU: math, flex)
  padded/B    the padded batch through the KV cache with prefill backend B (flex, flash_attn if importable, math);
              on a GPU, tests/test_inference.py's sdpa_flash prefill moves to flash_attn if installed, else flex
Columns: worst row's max|d|/max|ref| and mean|d|/mean|ref| against fp32 (T4: 2e-2 / 2e-3), and for padded paths
the worst row's mean relative distance to unpadded/<first backend> in bf16 (what the GPU test bounds by 2e-3).
--slot-positions rotates padded rows by their slot, as before issue #9's fix, to show its effect.
Results go to bench/results/padded-prefill-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffv2.config import AttentionConfig, ModelConfig  # noqa: E402
from diffv2.infer.inference import cast_weights, resolve_device  # noqa: E402
from diffv2.model.kernels import flash_attn_available  # noqa: E402
from diffv2.model.kv_cache import KVCache  # noqa: E402
from diffv2.model.transformer import Transformer  # noqa: E402
from diffv2.train.record import versions  # noqa: E402
from tests.reference import init_sharp_  # noqa: E402

VARIANTS = {"diffv2": {}, "baseline": {"variant": "baseline"}, "diffv1": {"variant": "diffv1"}}
PADS, WIDTH, PREFILL = [0, 3, 7, 1], 40, 31
MAX_REL, MEAN_REL = 2e-2, 2e-3  # spec T4 bf16 bounds


def tiny_model(variant: str) -> Transformer:
    """tests/test_inference.py's tiny_model(variant, dtype=bf16, max_seq_len=256), in fp32 weights rounded to bf16."""
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96, vocab_size=61,
                      max_seq_len=256, attention=AttentionConfig(**VARIANTS[variant]))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            init_sharp_(block.attn)
    return cast_weights(model, torch.bfloat16).eval()


def set_backend(model: Transformer, backend: str) -> None:
    for block in model.blocks:
        block.attn.backend = backend


@torch.no_grad()
def unpadded(model: Transformer, tokens: torch.Tensor, backend: str) -> list:
    set_backend(model, backend)
    return [model(tokens[i:i + 1, p:]).float() for i, p in enumerate(PADS)]


@torch.no_grad()
def padded(model: Transformer, tokens: torch.Tensor, backend: str) -> list:
    set_backend(model, backend)
    cache = KVCache.for_model(model, len(PADS), WIDTH, torch.tensor(PADS, device=tokens.device))
    out = [model(tokens[:, :PREFILL], cache=cache)]
    out += [model(tokens[:, t:t + 1], cache=cache) for t in range(PREFILL, WIDTH)]
    logits = torch.cat(out, dim=1).float()
    return [logits[i:i + 1, p:] for i, p in enumerate(PADS)]


def worst(rows: list, refs: list) -> tuple:
    """Worst row's (max|d|/max|ref|, mean|d|/mean|ref|)."""
    rel = [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(rows, refs)]
    mean = [((a - r).abs().mean() / r.abs().mean()).item() for a, r in zip(rows, refs)]
    return max(rel), max(mean)


def check(variant: str, device: torch.device) -> list:
    model = tiny_model(variant).to(device)
    ref_model = copy.deepcopy(model).float()
    tokens = torch.randint(0, 61, (len(PADS), WIDTH), generator=torch.Generator().manual_seed(0)).to(device)
    ref = unpadded(ref_model, tokens, "math")
    on_gpu = device.type == "cuda"
    paths = [("unpadded", b) for b in (("sdpa_flash", "cudnn", "flex") if on_gpu else ("math", "flex"))]
    paths += [("padded", b) for b in ("flex", "flash_attn", "math") if b != "flash_attn" or flash_attn_available()]
    rows, first = [], None
    for kind, backend in paths:
        row = {"variant": variant, "path": f"{kind}/{backend}"}
        try:
            logits = (unpadded if kind == "unpadded" else padded)(model, tokens, backend)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            rows.append({**row, "error": str(exc).splitlines()[0][:160]})
            continue
        row["max_rel"], row["mean_rel"] = worst(logits, ref)
        row["within_t4"] = row["max_rel"] <= MAX_REL and row["mean_rel"] <= MEAN_REL
        if kind == "unpadded" and first is None:
            first = (backend, logits)
        elif kind == "padded" and first is not None:
            row[f"mean_rel_vs_unpadded/{first[0]}"] = worst(logits, first[1])[1]
        rows.append(row)
    return rows


def print_table(rows: list) -> None:
    print(f"{'variant':<9} {'path':<20} {'max/max|ref|':>12} {'mean/mean|ref|':>14} {'T4 (2e-2/2e-3)':>14} "
          f"{'mean vs unpadded':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<9} {r['path']:<20} cannot run: {r['error']}")
            continue
        vs = next((v for k, v in r.items() if k.startswith("mean_rel_vs_")), None)
        print(f"{r['variant']:<9} {r['path']:<20} {r['max_rel']:>12.2e} {r['mean_rel']:>14.2e} "
              f"{'ok' if r['within_t4'] else 'over':>14} {'-' if vs is None else f'{vs:.2e}':>16}")
    print("errors vs fp32 (same bf16-cast weights, math backend, rows alone), worst of 4 rows; 'mean vs unpadded' = "
          "padded bf16 vs the first unpadded bf16 path, the quantity tests/test_inference.py bounds by 2e-3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda[:i] | cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--slot-positions", action="store_true", help="rotate padded rows by slot (before the fix)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":  # the fp32 reference must not run its matmuls in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.slot_positions:
        KVCache.positions = lambda self, n: None
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    rows = [r for v in args.variants for r in check(v, device)]
    print_table(rows)
    name = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"padded-prefill-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"command": " ".join(sys.argv), "env": versions(), "slot_positions": args.slot_positions,
              "bounds": {"max_rel": MAX_REL, "mean_rel": MEAN_REL}, "rows": rows}
    path.write_text(json.dumps(record, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
