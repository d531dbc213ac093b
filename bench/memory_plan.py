"""Memory plan for a preset under FSDP2 (+ expert parallelism) (CPU, no GPU needed): what each GPU holds, per
expert layout and activation checkpointing mode, and which fit the GPU.

    python bench/memory_plan.py --preset moe_30a3 --gpus 4 8 --seq 4096 --micro-batch 1

Expert layouts (MoE presets; docs/moe.md "Expert layouts"), every other parameter FSDP-sharded over all N GPUs:
  EP=N   parallel.ep=N: each GPU holds E/N experts whole (dp_mod_ep = 1); tokens travel to them by all-to-all
  EP=1   parallel.ep=1: the experts are FSDP-sharded over all N GPUs (parallel.expert_fsdp=own: their own unit, or
         block: inside the block's unit; the same bytes either way) and each block gathers all E of its experts:
         the gathered bytes per MoE block grow by (E - E/N) experts, no tokens travel

Per GPU:
  states      fp32 master parameters + fp32 gradients + AdamW m and v = 16 bytes per parameter / N
  gathered    bf16 parameters FSDP2 gathers: the block being computed and the next one (prefetched), x2, each its
              non-expert part plus E/N experts (EP=N) or all E (EP=1); plus the root's embedding and lm_head, which
              stay gathered through forward and backward (the root is not resharded after forward)
  grads       one block's unsharded gradients in backward: bf16 (the compute dtype) and the fp32 copy that the
              reduce-scatter reads (reduce_dtype fp32), 6 bytes per parameter of the block's units
  activations what backward keeps, estimated below: every block's (none); every block's saved op outputs plus one
              block's recomputation (selective_moe); every block's input plus one block's recomputation (full)
  logits      the fused chunked cross-entropy never materialises full logits: one chunk of fp32 logits

Activation estimate per block and token (bf16 = 2 bytes; M d_model, Q query heads x D, K kv heads, H output heads,
F = top_k x expert_hidden, E experts): all (none): norms 2M, q/k/v/o inputs and outputs ~ (M + Q*D + 2*K*D + H*D),
attention output (Q*D) + the kernel's log-sum-exp, router logits (E fp32), dispatched tokens top_k*M twice (there
and back), expert intermediates 3F. selective_moe keeps the outputs of the ops in
diffv2/parallel/activation_checkpoint.py's saved list: the block input M, the q/k/v/o GEMMs (Q*D + 2*K*D + M), the
attention output (Q*D, log-sum-exp 4Q bytes), the router logits (E fp32), the three grouped expert GEMMs (2F +
top_k*M) and, under EP=N, both all-to-alls (2*top_k*M): it saves the down-projection's output, which plain autograd
does not keep, so under EP=N it keeps about as much as no checkpointing (its gain is speed: nothing communicated or
GEMM recomputed). Not counted: the compiled graphs' buffers, the cross-entropy's chunks, kernel workspaces,
allocator fragmentation, NCCL buffers and the all-to-all receive buffers under imbalance. Against 7b on one H200 the
plan (before it counted grads and the root, 1.7 GiB there) ran 12-16% low (baseline 111.2 GiB planned, 124.6 measured;
DIFF V2 119.4 planned, out of memory with 138.8 allocated), so a layout "fits" only when 1.2 x the plan is within the
GPU's memory (`MARGIN`); against 30A3 with EP=4 on 4 H200s (full AC) it ran 3% high (121.9 planned, 118.5 measured:
bench/results/scaling-moe_30a3-H200.md), so a row just outside the margin is worth measuring.
Model construction itself needs `parallel.meta_init=true` for such presets (otherwise every rank first builds the
whole fp32 model on its GPU). Results (table + JSON) go to bench/results/memory-plan-<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffv2.config import AttentionConfig, ModelConfig  # noqa: E402
from diffv2.model.flops import count, effective_config  # noqa: E402
from diffv2.model.heads import output_heads, query_heads  # noqa: E402

GB = 2**30
HBM = {"H100": 79.6, "H200": 139.8}  # GiB a process can allocate (torch.cuda.mem_get_info totals)
MARGIN = 1.2  # what the plan leaves out, from the 7b measurements on one H200 (module doc)


def load_preset(name: str, variant: str) -> ModelConfig:
    import yaml

    from diffv2.config import MoEConfig

    raw = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    raw.pop("defaults", None)
    moe = MoEConfig(**raw.pop("moe", {}))
    cfg = ModelConfig(**raw, moe=moe)
    return effective_config(replace(cfg, attention=AttentionConfig(variant=variant)))


AC_MODES = ("none", "selective_moe", "full")  # parallel.activation_checkpoint values the plan estimates
TARGETS = ((4, "H200"), (8, "H100"), (8, "H200"))  # the machines the summary names (when --gpus includes them)


def plan(cfg: ModelConfig, gpus: int, seq: int, micro_batch: int, ep: int) -> dict:
    """GiB per GPU of `cfg` on `gpus` GPUs with expert-parallel degree `ep` (1 or `gpus`; 1 for a dense preset)."""
    c = count(cfg, seq)
    m, e = cfg.moe, max(cfg.moe.n_experts, 1)
    expert_params_layer = 3 * cfg.d_model * m.expert_hidden * m.n_experts if m.n_experts else 0
    per_layer = (c.total - c.embedding) / cfg.n_layers
    block_unit = per_layer - expert_params_layer + expert_params_layer / ep  # what one block gathers
    states = 16 * c.total / gpus
    gathered = 2 * 2 * block_unit + 2 * c.embedding
    grads = 6 * block_unit
    tokens = seq * micro_batch
    q, h, kv, d, mm = query_heads(cfg), output_heads(cfg), cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    f = (m.top_k * m.expert_hidden) if m.n_experts else cfg.ffn_hidden
    routed = 2 * m.top_k * mm if m.n_experts else 0
    mlp_out = m.top_k * mm if m.n_experts else mm
    router = 4 * (e if m.n_experts else 0)
    per_token = 2 * (2 * mm + mm + q * d + 2 * kv * d + h * d + q * d + routed + 3 * f) + router
    saved_per_token = 2 * (2 * mm + 2 * q * d + 2 * kv * d + mlp_out + 2 * f + (routed if ep > 1 else 0)) + router + 4 * q
    act_block = per_token * tokens
    act = {"none": act_block * cfg.n_layers,
           "selective_moe": saved_per_token * tokens * cfg.n_layers + act_block,
           "full": act_block + 2 * mm * tokens * cfg.n_layers}
    logits = 4 * cfg.ce_chunk * cfg.vocab_size
    total = {mode: (states + gathered + grads + a + logits) / GB for mode, a in act.items()}
    return {"gpus": gpus, "ep": ep, "params_total": c.total, "params_active": c.active, "states_gb": states / GB,
            "gathered_gb": gathered / GB, "grads_gb": grads / GB, "act_block_gb": act_block / GB,
            "act_gb": {mode: a / GB for mode, a in act.items()}, "logits_gb": logits / GB, "total_gb": total,
            "fits": {gpu: {mode: MARGIN * t <= hbm for mode, t in total.items()} for gpu, hbm in HBM.items()}}


def fitting(row: dict, gpu: str) -> str:
    return ", ".join(mode for mode, ok in row["fits"][gpu].items() if ok) or "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moe_30a3")
    p.add_argument("--variants", nargs="+", default=["diffv2", "baseline"])
    p.add_argument("--gpus", nargs="+", type=int, default=[4, 8])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    rows = []
    lines = [f"{args.preset}, seq {args.seq}, micro-batch {args.micro_batch} per GPU; GiB per GPU; usable memory "
             f"H100 {HBM['H100']}, H200 {HBM['H200']} GiB; fits: {MARGIN} x plan <= that; FSDP2 over all GPUs, "
             f"fp32 master/grads/AdamW; EP=N: experts split over the GPUs, EP=1: experts FSDP-sharded and gathered",
             f"{'variant':<9} {'GPUs':>4} {'layout':<6} {'states':>6} {'gathered':>8} {'grads':>5} {'act/blk':>7} "
             f"{'none':>6} {'sel_moe':>7} {'full':>6}  {'fits H100':<25} fits H200"]
    for variant in args.variants:
        cfg = load_preset(args.preset, variant)
        for gpus in args.gpus:
            for ep in ((gpus, 1) if cfg.moe.n_experts else (1,)):
                r = {"variant": variant, "layout": "dense" if not cfg.moe.n_experts else "EP=1" if ep == 1 else "EP=N",
                     **plan(cfg, gpus, args.seq, args.micro_batch, ep)}
                rows.append(r)
                t = r["total_gb"]
                lines.append(f"{variant:<9} {gpus:>4} {r['layout']:<6} {r['states_gb']:>6.1f} {r['gathered_gb']:>8.2f} "
                             f"{r['grads_gb']:>5.2f} {r['act_block_gb']:>7.2f} {t['none']:>6.1f} "
                             f"{t['selective_moe']:>7.1f} {t['full']:>6.1f}  {fitting(r, 'H100'):<25} "
                             f"{fitting(r, 'H200')}")
    for gpus, gpu in (t for t in TARGETS if t[0] in args.gpus):
        fits = "; ".join(f"{r['variant']} {r['layout']}: {fitting(r, gpu)}" for r in rows if r["gpus"] == gpus)
        lines.append(f"{gpus}x {gpu} fits (AC modes): {fits}")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory-plan-{args.preset}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "table": lines, "rows": rows}, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
