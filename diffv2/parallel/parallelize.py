"""Parallelism applied to the single-device model from outside, in one place and one order (torchtitan's
`parallelize_llama`):

    0. float8              (trainer.fp8 != off: large dense Linear layers become torchao Float8Linear, tp = 1
                            only for now; diffv2/parallel/float8.py)
    1. tensor parallelism  (parallel.tp > 1: diffv2/parallel/tensor.py, on the mesh's innermost "tp" dimension)
    2. expert parallelism  (parallel.ep > 1: diffv2/parallel/expert.py, over (dp_mod_ep, ep) of the dp ranks)
    3. activation checkpointing  (parallel.activation_checkpoint: none | full | selective every ac_every blocks;
                                  diffv2/parallel/activation_checkpoint.py)
    4. compile             (trainer.compile: every block, whole, or by regions with fullgraph=True where the
                            experts become an FSDP2 unit of their own; diffv2/parallel/compile.py)
    5. FSDP2               (fully_shard each MoE layer's experts as their own unit under EP or
                            parallel.expert_fsdp=own, each block, then the root)
    6. materialise         (parallel.meta_init: allocate and draw the weights after sharding, before the optimizer)

With several ranks (any engine) every MoE layer's load-balancing token counts are summed over them
(`MoE.count_reducer`). `parallelize(model, cfg, device, param_dtype)` returns the `Layout` the engine needs (the mesh, this rank's data
shard, the expert-parallel meshes for sharded gradient norms, the checkpoint suffix of expert shards). One process
with tp=1 gets steps 0, 3 and 4 only: with trainer.fp8=off, the plain single-device loop, bit for bit. DeepSpeed
(parallel.engine=deepspeed, which refuses trainer.fp8) gets steps 3 and 4 too and does its own data-parallel wrapping
at `deepspeed.initialize`.

Why this order: float8 conversion swaps modules and, under FSDP2 with tensorwise scales, wraps their weights in
torchao's FP8-all-gather tensor; it must see plain weights, before TP and FSDP2 turn them into DTensors (torchao's
order: convert, TP, FSDP2), and the blocks that activation checkpointing and compile act on must already hold the
converted layers. TP and EP replace parameters (DTensors, expert slices), so they come before FSDP2 shards what is
left; activation checkpointing and compile act on the blocks FSDP2 then wraps (FSDP2's hooks stay outside the
checkpointed, compiled block, so a recomputation re-gathers the block's parameters through those hooks). FSDP2 wraps
every block before the root, so the root's parameters (embedding, final norm, lm_head) form the last group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from diffv2.parallel import dist as pdist
from diffv2.parallel.activation_checkpoint import apply_activation_checkpointing
from diffv2.parallel.compile import apply_compile
from diffv2.parallel.norms import DisjointMeshes


@dataclass
class Layout:
    """Where this rank sits once the model is parallelised (what the engines and the loop need to know)."""

    dp_rank: int = 0  # this rank's data shard: ranks of one TP group read the same data
    dp_size: int = 1  # how many data shards there are
    mesh: Optional[object] = None  # the (dp_replicate, dp_shard, tp) DeviceMesh; None on one device / DeepSpeed
    disjoint: DisjointMeshes = field(default_factory=DisjointMeshes)  # meshes whose outside ranks hold other values
    ep_suffix: str = ""  # ".ep<rank>of<ep>": expert parameters' names in checkpoints under expert parallelism
    head_shared: tuple[str, ...] = ()  # under TP: parameters whose gradients the engine sums over mesh["tp"]
    text: str = "single device"  # for the start-up line

    @property
    def sharded(self) -> bool:
        return self.mesh is not None


def wants_bf16(cfg, device_type: Optional[str] = None) -> bool:
    """The precision rule, for every engine and the loop: bf16 autocast when trainer.precision=bf16, or `auto` on a
    GPU; `device_type` defaults to the device trainer.device picks."""
    t = cfg.trainer
    if device_type is None:
        device_type = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    return t.precision == "bf16" or (t.precision == "auto" and device_type == "cuda")


def uses_fsdp(cfg) -> bool:
    """FSDP2 (with TP / EP) wraps the model: several processes, or tensor parallelism, with engine=fsdp."""
    return cfg.parallel.engine != "deepspeed" and (pdist.world_size() > 1 or cfg.parallel.tp > 1)


def parallelize(model: nn.Module, cfg, device: torch.device, param_dtype: Optional[torch.dtype] = None,
                materialize: bool = False) -> Layout:
    """Apply cfg.parallel (and trainer.compile) to `model` in place, in the order of the module docstring.
    `param_dtype`: the compute dtype FSDP2 casts parameters to (bf16 when training in bf16, else None = fp32).
    `materialize`: the model was built on the meta device; it is allocated and drawn after sharding."""
    p = cfg.parallel
    layout = Layout()
    ep_mesh = None
    if cfg.trainer.fp8 != "off":  # 0. float8
        from diffv2.parallel.float8 import apply_float8

        # FP8 all-gather only without TP (FSDP2 gathers the TP shards in bf16 and the FP8 layers cast them)
        apply_float8(model, cfg.trainer.fp8, device, fsdp=uses_fsdp(cfg) and p.tp == 1, compiled=cfg.trainer.compile)
    if uses_fsdp(cfg):
        from torch.distributed.device_mesh import init_device_mesh

        dp = pdist.world_size() // p.tp
        replicate, shard = dp_layout(p.data_parallel, dp, p.shard_group_size)
        mesh = init_device_mesh(device.type, (replicate, shard, p.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        # Mesh ranks are row-major over (dp_replicate, dp_shard, tp): the ranks of one TP group read the same data.
        layout = Layout(pdist.rank() // p.tp, dp, mesh,
                        text=f"FSDP2 {p.data_parallel} (replicate {replicate} x shard {shard}) x tp {p.tp}, "
                             f"{pdist.world_size()} ranks")
        if p.tp > 1:  # 1. tensor parallelism
            from diffv2.parallel.tensor import apply_tensor_parallel, head_shared

            apply_tensor_parallel(model, mesh["tp"])
            layout.head_shared = tuple(head_shared(model))
        if p.ep > 1:  # 2. expert parallelism
            from diffv2.parallel.expert import apply_expert_parallel

            ep_mesh = init_device_mesh(device.type, (dp // p.ep, p.ep), mesh_dim_names=("dp_mod_ep", "ep"))
            apply_expert_parallel(model, ep_mesh["ep"].get_group())
            layout.ep_suffix = f".ep{ep_mesh['ep'].get_local_rank()}of{p.ep}"
    if pdist.world_size() > 1:  # MoE load balance over the global batch: token counts summed over the ranks
        for moe in model.moe_layers():
            moe.count_reducer = sum_over_ranks
    apply_activation_checkpointing(model, p.activation_checkpoint, p.ac_every)  # 3. activation checkpointing
    if cfg.trainer.compile:  # 4. compile: by regions where the experts will be an FSDP2 unit of their own
        regions = apply_compile(model, regions=layout.sharded and (p.ep > 1 or p.expert_fsdp == "own"))
        layout.text += f", {regions}" if regions else ""
    if layout.sharded:  # 5. FSDP2
        _fully_shard(model, layout, ep_mesh, p, param_dtype)
    if materialize:  # 6. a meta-device build gets its memory and weights now, sharded
        materialize_model(model, device, p.meta_init_draw, cfg.seed)
    return layout


@torch.no_grad()
def materialize_model(model: nn.Module, device: torch.device, draw: str = "cpu", seed: int = 0) -> None:
    """After a build under `torch.device("meta")` and any sharding: allocate on `device`, recompute the buffers,
    draw the weights. Every parameter is drawn in full by the model's `init_rule`, in the order of an unsharded
    build, and this rank keeps its piece (a DTensor shard of FSDP2 / TP, a slice of the experts under expert
    parallelism): the weights are the same whatever the layout. draw="cpu": from the global generator on the CPU,
    after replaying the constructors' draws, bit-identical to a normal build; draw="device": from a generator on
    `device` seeded with `seed` (alike on every rank, so shards agree; seconds instead of minutes for tens of
    billions of parameters, but not the numbers of a CPU build)."""
    from torch.distributed.tensor import distribute_tensor

    model.to_empty(device=device)
    model.reset_buffers()
    generator = torch.Generator(device=device).manual_seed(seed) if draw == "device" else None
    if generator is None:
        _replay_constructor_draws(model)
    draw_device = "cpu" if generator is None else generator.device
    slices = {f"blocks.{i}.mlp.experts.": moe.expert_slice for i, moe in
              ((i, b.mlp) for i, b in enumerate(model.blocks)) if getattr(moe, "expert_slice", None) is not None}
    for name, p in model.named_parameters():
        sliced = next((s for prefix, s in slices.items() if name.startswith(prefix)), None)
        full_shape = p.shape if sliced is None else (model.cfg.moe.n_experts, *p.shape[1:])
        full = model.init_rule(name, p.ndim)(torch.empty(full_shape, dtype=p.dtype, device=draw_device), generator)
        if sliced is not None:
            full = full[sliced[0]:sliced[1]]
        if hasattr(p, "to_local"):  # a DTensor: this rank's shard of the full tensor
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        (p.to_local() if hasattr(p, "to_local") else p).copy_(full)


def _replay_constructor_draws(model: nn.Module) -> None:
    """A normal build's nn.Linear / nn.Embedding constructors draw their default init from the global generator
    before `init_weights` overwrites it; on the meta device they draw nothing. Constructing the same layers again on
    the CPU, one at a time in construction order, advances the generator exactly as the normal build did, so the
    draws that follow are the same numbers (checked by tests/test_model.py)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="cpu")
        elif isinstance(m, nn.Embedding):
            nn.Embedding(m.num_embeddings, m.embedding_dim, device="cpu")


def sum_over_ranks(t: torch.Tensor) -> None:
    """In place: `t` summed over every rank (MoE.count_reducer: the load-balancing counts of the global batch).
    A functional all-reduce copied back, not dist.all_reduce: selective activation checkpointing (selective_moe)
    saves the collective's output, and a saved in-place collective would not redo its write in the recomputation."""
    t.copy_(funcol.all_reduce(t, "sum", dist.group.WORLD))


def _fully_shard(model: nn.Module, layout: Layout, ep_mesh, p, param_dtype) -> None:
    """FSDP2 over the data-parallel ranks (HSDP when the mesh replicates too): each block is one unit, the root's
    parameters (embedding, final norm, lm_head) the last. Each MoE layer's experts are either part of their block's
    unit (parallel.expert_fsdp=block, ep=1: sharded on the expert dim over all dp ranks, gathered with the attention)
    or a unit of their own, gathered apart from the rest of the block so that their gather is prefetched on its own:
    over all dp ranks with expert_fsdp=own, over dp_mod_ep under expert parallelism (torchtitan's layout: the dp
    ranks form (dp/ep, ep); each of the ep ranks of a group holds E/ep experts and the dp/ep ranks holding the same
    experts FSDP-shard them). Every other parameter is sharded over all dp ranks. An expert's gradient under EP sums
    the losses of its ep group, so its reduction divides by dp, not dp/ep."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = layout.mesh
    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]  # 2-D = HSDP
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    experts_mesh = ep_mesh["dp_mod_ep"] if ep_mesh is not None else dp_mesh if p.expert_fsdp == "own" else None
    own_units = experts_mesh is not None and bool(model.moe_layers())
    if own_units:
        from torch.distributed.tensor import Shard

        shards = experts_mesh.mesh.shape[-1]  # the mesh's sharding dim (HSDP replicates over the first)
        dim = expert_shard_dim(model.moe_layers()[0].experts.w1.shape[0], shards)
        for moe in model.moe_layers():
            fully_shard(moe.experts, mesh=experts_mesh, mp_policy=policy, reshard_after_forward=p.reshard_after_forward,
                        shard_placement_fn=lambda param: Shard(dim))
            if ep_mesh is not None:
                moe.experts.set_gradient_divide_factor(float(layout.dp_size))
        layout.text += f", experts their own FSDP2 units (Shard({dim}) over {shards} ranks)"
    if ep_mesh is not None:
        layout.disjoint.mark(experts_mesh, p.ep)  # grad norms: the ep ranks outside this mesh hold other experts
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=p.reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    if own_units:
        _prefetch_explicitly(list(model.blocks))
    for method in ("loss", "hidden"):
        register_fsdp_forward_method(model, method)


def expert_shard_dim(n_experts: int, shards: int) -> int:
    """The dim an experts unit's (E, in, out) weights are sharded on over `shards` ranks: 0, whole experts per rank,
    when the ranks divide the experts; else 1, every expert split along its input dim (d_model for w1/w3, the
    hidden for w2: 2048 and 768 for 30A3, even over any power of two up to 256 ranks). Shard(0) of 8 experts over 16
    ranks would leave half the ranks empty and pad the gather, of 12 over 8 would pad four ranks; torchtitan switches
    to Shard(1) when efsdp x ep exceeds the experts, and since an uneven split pads too it switches then as well."""
    return 0 if n_experts % shards == 0 else 1


def _prefetch_explicitly(blocks: list) -> None:
    """With experts in their own FSDP2 unit, each block names the units it gathers next, in forward (the next block
    and its experts) and backward (the previous ones), so their all-gathers are issued before the block runs.
    FSDP2's implicit prefetch issues a unit's all-gather only when the host reaches it: the experts' gather would
    wait for the router, and under expert parallelism for the layer's host wait on its split sizes (torchtitan
    prefetches the same way)."""
    def units(block) -> list:
        experts = getattr(block.mlp, "experts", None)
        return [block] + ([experts] if experts is not None else [])

    for before, after in zip(blocks, blocks[1:]):
        before.set_modules_to_forward_prefetch(units(after))
        after.set_modules_to_backward_prefetch(units(before))


def dp_layout(mode: str, dp: int, group: int) -> tuple[int, int]:
    """(replicate, shard) sizes of the data-parallel mesh for parallel.data_parallel=`mode`: shard (one group,
    ZeRO-3-like), replicate (DDP semantics: shard size 1), hybrid (HSDP: shard inside groups of `group` ranks,
    parallel.shard_group_size, default the GPUs per node, and replicate across them)."""
    if mode == "shard":
        return 1, dp
    if mode == "replicate":
        return dp, 1
    group = group or torch.cuda.device_count() or 1  # hybrid: shard inside a node by default
    if dp % group:
        raise ValueError(f"parallel.shard_group_size={group} does not divide the {dp} data-parallel ranks; set "
                         f"parallel.shard_group_size to a divisor (usually the GPUs per node)")
    return dp // group, group
