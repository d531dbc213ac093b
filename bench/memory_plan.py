"""Memory plan for a preset under FSDP2 + expert parallelism (CPU, no GPU needed): what each GPU holds.

    python bench/memory_plan.py --preset moe_30a3 --gpus 4 8 --seq 4096 --micro-batch 1

Per GPU, with every parameter sharded over all N GPUs (experts over their EP group x dp_mod_ep, EP = N):
  states      fp32 master parameters + fp32 gradients + AdamW m and v = 16 bytes per parameter / N
  gathered    the bf16 parameters FSDP2 gathers for the block being computed (x2: the next block is prefetched);
              for an MoE block that is its non-expert part plus this rank's E/N experts (experts are not gathered
              across the EP group: tokens travel to them)
  activations what backward keeps per block, estimated below, for all blocks without activation checkpointing
              and for one block's recomputation plus every block's input with `parallel.activation_checkpoint=full`
  logits      the fused chunked cross-entropy never materialises full logits: one chunk of fp32 logits

Activation estimate per block and token (bf16 = 2 bytes; M d_model, Q query heads x D, K kv heads, F = top_k x
expert_hidden): norms 2M, q/k/v/o inputs and outputs ~ (M + Q*D + 2*K*D + H*D), attention output (Q*D) + the
kernel's log-sum-exp, router logits (E fp32), dispatched tokens top_k*M twice (there and back), expert
intermediates 3F. Not counted: the compiled graphs' buffers, the cross-entropy's chunks, kernel workspaces, allocator
fragmentation, NCCL buffers and the all-to-all receive buffers under imbalance. Against 7b on one H200 the plan ran
12-16% low (baseline 111.2 GiB planned, 124.6 measured; DIFF V2 119.4 planned, out of memory with 138.8 allocated), so
a layout "fits" only when 1.2 x the plan is within the GPU's memory (`MARGIN`).
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


def plan(cfg: ModelConfig, gpus: int, seq: int, micro_batch: int) -> dict:
    c = count(cfg, seq)
    m, e = cfg.moe, max(cfg.moe.n_experts, 1)
    expert_params_layer = 3 * cfg.d_model * m.expert_hidden * m.n_experts if m.n_experts else 0
    per_layer = (c.total - c.embedding) / cfg.n_layers
    non_expert_layer = per_layer - expert_params_layer
    states = 16 * c.total / gpus
    gathered = 2 * 2 * (non_expert_layer + expert_params_layer / gpus)
    tokens = seq * micro_batch
    q, h, kv, d, mm = query_heads(cfg), output_heads(cfg), cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    f = (m.top_k * m.expert_hidden) if m.n_experts else cfg.ffn_hidden
    routed = 2 * m.top_k * mm if m.n_experts else 0
    per_token = 2 * (2 * mm + mm + q * d + 2 * kv * d + h * d + q * d + routed + 3 * f) + 4 * (e if m.n_experts else 0)
    act_block = per_token * tokens
    act_none = act_block * cfg.n_layers
    act_full = act_block + 2 * mm * tokens * cfg.n_layers
    logits = 4 * cfg.ce_chunk * cfg.vocab_size
    out = {"gpus": gpus, "params_total": c.total, "params_active": c.active, "states_gb": states / GB,
           "gathered_gb": gathered / GB, "act_block_gb": act_block / GB, "act_no_ac_gb": act_none / GB,
           "act_full_ac_gb": act_full / GB, "logits_gb": logits / GB}
    out["total_no_ac_gb"] = (states + gathered + act_none + logits) / GB
    out["total_full_ac_gb"] = (states + gathered + act_full + logits) / GB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moe_30a3")
    p.add_argument("--variants", nargs="+", default=["diffv2", "baseline"])
    p.add_argument("--gpus", nargs="+", type=int, default=[4, 8])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    rows, lines = [], [f"{args.preset}, seq {args.seq}, micro-batch {args.micro_batch} per GPU; GiB per GPU "
                       f"(H100 {HBM['H100']}, H200 {HBM['H200']}); FSDP2 over all GPUs + EP = GPUs, "
                       f"fp32 master/grads/AdamW"]
    lines.append(f"{'variant':<9} {'GPUs':>4} {'params':>8} {'active':>7} {'states':>7} {'gathered':>8} "
                 f"{'act/blk':>7} {'no AC':>7} {'full AC':>8}  fits ({MARGIN} x full AC <= HBM)")
    for variant in args.variants:
        cfg = load_preset(args.preset, variant)
        for gpus in args.gpus:
            r = {"variant": variant, **plan(cfg, gpus, args.seq, args.micro_batch)}
            rows.append(r)
            fits = ", ".join(f"{k}: {'yes' if MARGIN * r['total_full_ac_gb'] <= v else 'no'}" for k, v in HBM.items())
            lines.append(f"{variant:<9} {gpus:>4} {r['params_total'] / 1e9:>7.2f}B {r['params_active'] / 1e9:>6.2f}B "
                         f"{r['states_gb']:>7.1f} {r['gathered_gb']:>8.2f} {r['act_block_gb']:>7.2f} "
                         f"{r['total_no_ac_gb']:>7.1f} {r['total_full_ac_gb']:>8.1f}  {fits}")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory-plan-{args.preset}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "table": lines, "rows": rows}, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
