"""Expert parallelism compiled and selectively checkpointed (diffv2/parallel/expert.py, activation_checkpoint.py).

Each test spawns gloo ranks on the CPU; a small DIFF V2 MoE model runs one training step (loss, backward) under
EP=2 and is compared with the same model in another setting on the same ranks. tests/test_moe.py checks EP=2 and
EP=4 against EP=1 on one layer.
Legend: B batch, N sequence.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from diffv2.config import ModelConfig, MoEConfig
from gloo import spawn
from diffv2.model.transformer import Transformer
from diffv2.parallel.activation_checkpoint import apply_activation_checkpointing
from diffv2.parallel.compile import apply_compile
from diffv2.parallel.parallelize import sum_over_ranks

RANKS = 2


def _model(n_layers: int = 2) -> Transformer:
    cfg = ModelConfig(d_model=32, n_layers=n_layers, n_heads=2, n_kv_heads=1, head_dim=16, vocab_size=64,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1,
                                    aux_loss_coef=0.1, z_loss_coef=1e-2, experts_impl="loop"))
    torch.manual_seed(0)  # the same weights on every rank
    return Transformer(cfg).train()


def _expert_parallel(model: Transformer) -> Transformer:
    from diffv2.parallel.expert import apply_expert_parallel

    apply_expert_parallel(model, dist.group.WORLD)
    for moe in model.moe_layers():
        moe.count_reducer = sum_over_ranks  # as parallelize sets it with several ranks
    return model


def _step(model: Transformer, rank: int):
    """One training step's loss and gradients on this rank's tokens."""
    torch.manual_seed(100 + rank)  # every rank routes different tokens
    tokens_BN = torch.randint(0, 64, (2, 12))
    loss, _, _ = model.loss(tokens_BN, tokens_BN)
    loss.backward()
    counts = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, counts


def _assert_same_step(a, b, **tol) -> None:
    (loss_a, grads_a, counts_a), (loss_b, grads_b, counts_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, **tol)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **tol, msg=name)
    assert all(torch.equal(x, y) for x, y in zip(counts_a, counts_b))  # tokens counted once per forward


class _CountCommunication(TorchDispatchMode):
    """Counts the all-to-alls, the all-reduces (the load-balancing counts) and the copies of split sizes to the host
    (each one host sync) that really run: a selective-checkpoint cache hit never reaches here."""

    def __init__(self):
        super().__init__()
        self.all_to_alls = self.all_reduces = self.host_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.all_to_alls += func.overloadpacket is torch.ops._c10d_functional.all_to_all_single
        self.all_reduces += func.overloadpacket is torch.ops._c10d_functional.all_reduce
        self.host_copies += func.overloadpacket is torch.ops.diffv2.splits_to_host
        return func(*args, **(kwargs or {}))


def _spawn(worker) -> None:
    spawn(worker, RANKS)


def _compiled_equals_eager(rank: int) -> None:
    from torch._dynamo.utils import counters

    eager = _expert_parallel(_model(n_layers=1))
    compiled = copy.deepcopy(eager)
    compiled.blocks[0].compile(fullgraph=True)  # any graph break (a host sync, an untraceable collective) fails
    _assert_same_step(_step(eager, rank), _step(compiled, rank), rtol=1e-5, atol=1e-6)  # kernels fuse differently
    graphs = counters["stats"]["unique_graphs"]
    # Other tokens, other split sizes: the same graph (the sizes are unbacked symbols, not specialised on).
    eager.zero_grad(), compiled.zero_grad()
    _assert_same_step(_step(eager, rank + RANKS), _step(compiled, rank + RANKS), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs == 1


def test_moe_blocks_compile_with_fullgraph_under_expert_parallelism_and_equal_eager():
    _spawn(_compiled_equals_eager)


def _compiled_selective_moe_equals_eager(rank: int) -> None:
    eager = _expert_parallel(_model())
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled, "selective_moe")
    for block in compiled.blocks:
        block.compile()
    reference, step = _step(eager, rank), _step(compiled, rank)
    _assert_same_step(reference, step, rtol=1e-5, atol=1e-6)  # router losses and counts taken once, too
    assert all(m.router_loss.grad_fn is not None for m in compiled.moe_layers())


def test_compiled_selective_moe_checkpointing_under_expert_parallelism_equals_eager():
    """With compiled blocks selective_moe traces the checkpoint as well (the recomputation is part of the compiled
    backward): one step equals the eager model without checkpointing."""
    _spawn(_compiled_selective_moe_equals_eager)


def _selective_moe_recomputes_no_all_to_all(rank: int) -> None:
    plain = _expert_parallel(_model())
    layers = len(plain.moe_layers())
    steps, counts = {}, {}
    for mode in ("none", "full", "selective_moe"):
        model = copy.deepcopy(plain)
        apply_activation_checkpointing(model, mode)
        with _CountCommunication() as counter:
            steps[mode] = _step(model, rank)
        counts[mode] = counter.all_to_alls, counter.host_copies, counter.all_reduces
    # Per MoE layer: forward exchanges the counts, the tokens there and back (3), copies the split sizes to the host
    # once and sums the load-balancing counts over the ranks (1 all-reduce); backward sends the tokens' gradients
    # back both ways (2). Full checkpointing repeats the forward.
    assert counts["none"] == (5 * layers, layers, layers), counts
    assert counts["full"] == (8 * layers, 2 * layers, 2 * layers), counts
    assert counts["selective_moe"] == counts["none"], counts
    _assert_same_step(steps["none"], steps["full"], rtol=0, atol=0)
    _assert_same_step(steps["none"], steps["selective_moe"], rtol=0, atol=0)


def test_selective_moe_checkpointing_repeats_no_all_to_all_and_equals_no_checkpointing():
    _spawn(_selective_moe_recomputes_no_all_to_all)


def _sharded(model: Transformer, ep: bool = True, own_experts: bool = True) -> Transformer:
    """parallelize's step 5 on 2 ranks: each layer's experts their own FSDP2 unit, under EP=2 over the ranks holding
    the same experts (itself), else (parallel.expert_fsdp=own) over both ranks, or (`own_experts=False`, ep=1 only)
    part of their block's unit; every block and the root sharded over both ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    ep_mesh = init_device_mesh("cpu", (1, RANKS), mesh_dim_names=("dp_mod_ep", "ep"))
    dp_mesh = init_device_mesh("cpu", (RANKS,))
    for moe in model.moe_layers() if own_experts else ():
        fully_shard(moe.experts, mesh=ep_mesh["dp_mod_ep"] if ep else dp_mesh)
        if ep:
            moe.experts.set_gradient_divide_factor(float(RANKS))
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    for method in ("loss", "hidden"):
        register_fsdp_forward_method(model, method)
    return model


def _full(step):
    loss, grads, counts = step
    return loss, {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}, counts


def _regions_compiled_equal_eager(rank: int, ep: bool, ac: str) -> None:
    """Two steps (the second observed: the attention's statistics leave its graph) of an eager and a compiled sharded
    model, with the experts their own FSDP2 unit: under EP=2, or (ep=False) over both ranks with every rank holding
    them all, as parallel.expert_fsdp=own."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _model()
    if ep:
        eager = _expert_parallel(eager)
    else:
        for moe in eager.moe_layers():
            moe.count_reducer = sum_over_ranks
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(eager, ac)
    apply_activation_checkpointing(compiled, ac)
    apply_compile(compiled, regions=True)  # as parallelize: AC, compile, then FSDP2
    _sharded(eager, ep), _sharded(compiled, ep)
    _assert_same_step(_full(_step(eager, rank)), _full(_step(compiled, rank)), rtol=1e-5, atol=1e-6)
    seen, steps = {"eager": [], "compiled": []}, {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        for block in model.blocks:  # without autograd, as the monitors' hub calls them (diffv2/train/observers.py)
            block.attn.observer = torch.no_grad()(lambda layer, stats, name=name: seen[name].append(
                (layer, stats["context"].float().square().mean().item())))
        model.zero_grad()
        steps[name] = _full(_step(model, rank + RANKS))
    _assert_same_step(steps["eager"], steps["compiled"], rtol=1e-5, atol=1e-6)
    assert [layer for layer, _ in seen["compiled"]] == [0, 1]  # each layer once: not again in a recomputation
    for (layer_a, a), (layer_b, b) in zip(seen["eager"], seen["compiled"]):
        assert layer_a == layer_b and abs(a - b) <= 1e-5 * abs(a), (seen["eager"], seen["compiled"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # selective_moe's checkpointed MoE blocks run eagerly here (compiled regions would write to its cached tensors)
    assert (counters["stats"]["unique_graphs"] > 0) == (ac != "selective_moe")


@pytest.mark.parametrize("ep, ac", [(True, "none"), (False, "none"), (True, "full"), (True, "selective_moe")])
def test_moe_blocks_compile_with_fullgraph_under_fsdp2_by_regions_and_equal_eager(ep, ac):
    """With the experts their own FSDP2 unit (EP=2, or parallel.expert_fsdp=own) an MoE block is compiled by regions
    (diffv2/parallel/compile.py), each with fullgraph=True, so FSDP2's hooks on the experts sit between graphs, not
    inside one: no graph breaks; loss, full gradients, counts and the observed statistics equal the eager sharded
    model, with and without activation checkpointing. Under selective_moe the MoE blocks run eagerly (README): a
    fullgraph compiled checkpoint cannot trace FSDP2's hooks (it crashed with torch._dynamo.exc.Unsupported once),
    and compiled regions inside the eager checkpoint would write to the tensors it caches."""
    _spawn(functools.partial(_regions_compiled_equal_eager, ep=ep, ac=ac))


def _fsdp_compiled_selective_moe_equals_eager(rank: int) -> None:
    eager = _model()
    for moe in eager.moe_layers():
        moe.count_reducer = sum_over_ranks
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled, "selective_moe")
    apply_compile(compiled)  # experts in their block's unit: blocks compiled whole
    _sharded(eager, ep=False, own_experts=False), _sharded(compiled, ep=False, own_experts=False)
    _assert_same_step(_full(_step(eager, rank)), _full(_step(compiled, rank)), rtol=1e-5, atol=1e-6)


def test_compiled_selective_moe_checkpointing_under_fsdp2_equals_eager():
    """Whole compiled blocks under FSDP2 (parallel.expert_fsdp=block): a block's call runs FSDP2's hooks, which a
    fullgraph compiled checkpoint cannot trace, so such blocks take the eager checkpoint (it crashed with
    torch._dynamo.exc.Unsupported before) and equal no checkpointing."""
    _spawn(_fsdp_compiled_selective_moe_equals_eager)
