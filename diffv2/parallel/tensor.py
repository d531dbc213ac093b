"""Tensor parallelism (Megatron-style, with DTensor) for the dense model: each TP rank holds whole GQA groups (spec R5).

`apply_tensor_parallel(model, mesh["tp"])` shards every block in place with `parallelize_module`:
- attention: q/k/v/lambda projections colwise, o_proj rowwise. Contiguous row shards of q_proj are whole GQA groups
  when tp divides the KV heads, so DIFF V2 pairs (2i, 2i+1), their lambda rows and o_proj's input columns are
  rank-local and the differential combination needs no communication (spec R5; T14 checks it);
- SwiGLU: gate/up colwise, down rowwise;
- weights shared by every head (QK-norm over head_dim, DIFF V1's lambda vectors and sub-LN) stay plain tensors,
  identical on every rank; each rank's heads give only part of their gradient, so the engine sums those gradients
  over the TP ranks once per optimizer step, after the last micro-batch's backward (`sum_head_shared_grads`, as
  Megatron's finalize_model_grads all-reduces its sequence-parallel norm weights). The model reads them like any
  other weight: no DTensor code in it.
Embedding, the final norm and lm_head stay plain replicated tensors, as do the blocks' pre-norms: every rank sees the
same residual stream (no sequence parallelism), and each attention / MLP input's gradient is all-reduced once, so
their gradients are already full (they are not summed again).

Refused (one-line ValueError from `validate_tp`): MoE blocks (shard them with expert parallelism instead,
diffv2/parallel/expert.py) and pairing=half_split (ablation 1 pairs head i with head i+h, which a contiguous shard
puts on different ranks; run that ablation with tp=1).

Composition with FSDP2 on a ("dp", "tp") mesh is the engine's job: apply TP first, then `fully_shard` over
mesh["dp"] (torchtitan order). After TP, an attention module's n_q / n_out / n_kv count this rank's heads and
its `tp` is the degree; KVCache.for_model sizes the cache from it. Monitors see the local heads only (the context
RMS monitor gathers the head shards of each TP group at its logging steps).
The model then mixes plain and DTensor parameters (on two meshes once FSDP2 shards it), which
torch.nn.utils.clip_grad_norm_ cannot stack: the engines clip with `diffv2.parallel.norms.clip_grad_norm`.

Legend: B batch, N sequence, M d_model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from diffv2.config import ModelConfig
from diffv2.model.flops import effective_config
from diffv2.model.heads import output_heads, query_heads, validate_heads


def _tp_divisors(cfg: ModelConfig) -> dict[str, int]:
    """Every count a TP degree must divide, by name (spec R5; DIFF V1 shards its h/2 and h_kv/2 heads of 2d)."""
    a, h, hkv = cfg.attention, cfg.n_heads, cfg.n_kv_heads
    counts = {"n_kv_heads": hkv, "n_heads": h, "query heads": query_heads(cfg), "output heads": output_heads(cfg)}
    if a.variant == "diffv1":
        counts.update({"n_kv_heads/2 (V1 kv heads of 2d)": hkv // 2, "n_heads/2 (V1 pairs)": h // 2})
    counts["ffn_hidden"] = cfg.ffn_hidden
    return counts


def validate_tp(model_cfg: ModelConfig, tp: int) -> None:
    """One-line ValueError when `tp` cannot shard this model so that outputs and gradients match tp=1 (spec T14)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor parallel degree tp={tp!r} must be a positive integer")
    validate_heads(model_cfg)
    if tp == 1:
        return
    cfg = effective_config(model_cfg)  # param_match resizes ffn_hidden: check what the model is built with
    if cfg.moe.n_experts > 0:
        raise ValueError(f"tensor parallelism (tp={tp}) shards dense SwiGLU blocks only, but model.moe.n_experts="
                         f"{cfg.moe.n_experts}; use tp=1 and shard the experts with expert parallelism")
    if cfg.attention.pairing == "half_split":
        raise ValueError(f"attention.pairing=half_split pairs head i with head i+n_heads, so a tp={tp} shard splits "
                         f"its pairs across ranks; run this ablation with tp=1")
    counts = _tp_divisors(cfg)
    bad = {name: n for name, n in counts.items() if n % tp}
    if bad:
        ok = [t for t in range(1, max(counts.values()) + 1) if all(n % t == 0 for n in counts.values())]
        found = ", ".join(f"{name}={n}" for name, n in bad.items())
        raise ValueError(f"tensor parallel degree tp={tp} must divide {found} (spec R5: each rank holds whole GQA "
                         f"groups, so differential pairs and their lambda stay rank-local); use tp in {ok}")


# Parameters of an attention module that every head uses (their gradient is summed over the TP ranks).
HEAD_SHARED = ("q_norm.weight", "k_norm.weight", "subln.weight", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def head_shared(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient each TP rank holds only part of (see the module docstring)."""
    return [name for name, _ in model.named_parameters()
            if ".attn." in name and name.split(".attn.", 1)[1] in HEAD_SHARED]


@torch.no_grad()
def sum_head_shared_grads(params: list[torch.Tensor], group) -> None:
    """Sum the gradients of `params` (the `head_shared` ones, possibly FSDP2 shards) over the TP `group`, in one
    all-reduce. Call it once per optimizer step, after the last micro-batch's backward."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


def _block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    attn = block.attn
    plan: dict[str, ParallelStyle] = {
        # x enters as one Replicate DTensor: the projections reading it add Partial gradients, all-reduced once.
        # Block calls attn(x, doc_ids, cache); only x is a tensor to distribute.
        "attn": PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                   desired_input_layouts=(Replicate(), None, None)),
        "attn.q_proj": ColwiseParallel(),  # whole GQA groups per rank (t | h_kv): pairs (2i, 2i+1) stay local
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),  # V1: h_kv/2 heads of 2d, sharded by whole heads (t | h_kv/2)
        "attn.o_proj": RowwiseParallel(),  # input columns of the local output heads; output all-reduced
        "mlp": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if attn.lambda_proj is not None:
        plan["attn.lambda_proj"] = ColwiseParallel()  # rows of the local output heads
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard every block's attention and MLP over the 1-D `tp_mesh` in place; returns the model.

    Every rank must hold the same weights (same seed or a loaded checkpoint); shards are taken from rank 0's copy.
    Call it before building the optimizer (the sharded parameters are new objects) and before `fully_shard`.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs the 1-D TP sub-mesh, got a {tp_mesh.ndim}-D mesh; "
                         f"pass mesh['tp']")
    tp = tp_mesh.size()
    validate_tp(model.cfg, tp)
    if tp == 1:
        return model
    for block in model.blocks:
        attn = block.attn
        parallelize_module(block, tp_mesh, _block_plan(block))
        attn.n_q, attn.n_out, attn.n_kv, attn.tp = attn.n_q // tp, attn.n_out // tp, attn.n_kv // tp, tp
        plain = [n for n, p in [*attn.named_parameters(), *block.mlp.named_parameters()]
                 if not isinstance(p, DTensor) and n not in HEAD_SHARED]
        if plain:  # a parameter no plan covers would silently get a partial gradient
            raise ValueError(f"tensor parallelism has no plan for {plain} in block {attn.layer_idx}; "
                             f"add it to diffv2/parallel/tensor.py")
    return model
