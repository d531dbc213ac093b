"""GPU checks of the MoE grouped-GEMM path (`pytest -m gpu`): the CPU tests force grouped_mm in fp32; here it runs
where it is used, in bf16 under autocast, against the per-expert loop in fp32.

Legend: S slots sorted by expert, M d_model, E experts.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffv2.config import MoEConfig
from diffv2.model.moe import GroupedExperts, MoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
M, F_HIDDEN = 256, 128  # multiples of 16 bytes in bf16, as grouped_mm requires


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_auto_picks_grouped_mm_on_cuda():
    assert GroupedExperts(2, M, F_HIDDEN).use_grouped_mm(torch.zeros(1, M, device="cuda"))


def test_grouped_mm_bf16_matches_the_fp32_loop_forward_and_backward():
    torch.manual_seed(0)
    loop = GroupedExperts(8, M, F_HIDDEN, impl="loop").cuda()
    for p in loop.parameters():
        torch.nn.init.normal_(p, std=0.05)
    grouped = copy.deepcopy(loop)
    grouped.impl = "grouped_mm"
    tokens_E = torch.tensor([100, 0, 37, 64, 1, 200, 30, 80], device="cuda")
    x_SM = torch.randn(int(tokens_E.sum()), M, device="cuda")
    grad_SM = torch.randn_like(x_SM)
    x_ref, x_bf = x_SM.clone().requires_grad_(), x_SM.clone().requires_grad_()
    y_ref = loop(x_ref, tokens_E)
    (y_ref * grad_SM).sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_bf = grouped(x_bf, tokens_E)
    (y_bf.float() * grad_SM).sum().backward()
    assert y_bf.dtype == torch.bfloat16 and rel_err(y_bf, y_ref) < 2e-2
    assert rel_err(x_bf.grad, x_ref.grad) < 2e-2
    for name in ("w1", "w2", "w3"):
        assert rel_err(getattr(grouped, name).grad, getattr(loop, name).grad) < 2e-2, name


def test_moe_layer_bf16_on_cuda_matches_fp32_loop():
    torch.manual_seed(0)
    ref = MoE(M, MoEConfig(n_experts=8, top_k=2, expert_hidden=F_HIDDEN, experts_impl="loop"), 0).cuda()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fast = copy.deepcopy(ref)
    fast.experts.impl = "auto"
    x_BNM = torch.randn(2, 64, M, device="cuda")
    y_ref = ref(x_BNM)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_fast = fast(x_BNM)
    assert fast.last_z_loss.dtype == torch.float32  # the router stays fp32 under autocast
    assert rel_err(y_fast, y_ref) < 3e-2


# --- host waits of a compiled MoE training step (docs/moe.md, "Host syncs") ---------------------------------------
# CUDA runtime calls that block the host until the device catches up.
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
N_LAYERS = 2


def _model(moe: bool):
    from diffv2.config import ModelConfig
    from diffv2.model.transformer import Transformer

    torch.manual_seed(0)
    experts = MoEConfig(n_experts=8, top_k=2, expert_hidden=F_HIDDEN, n_shared_experts=1) if moe else MoEConfig()
    cfg = ModelConfig(d_model=M, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=512, moe=experts)
    return Transformer(cfg).cuda().train()


def host_waits(step) -> dict:
    """The blocking CUDA runtime calls of `step()` by name, from the profiler's CPU-side runtime events."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    return Counter(e.name for e in prof.events() if e.name in BLOCKING)


@pytest.fixture
def one_rank_group():
    """A one-rank NCCL group: the all-to-all dispatcher's real path (counts exchange, split sizes to the host, token
    all-to-alls) on one GPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("dispatch", ["local", "all_to_all"])
def test_a_compiled_moe_step_waits_on_the_host_only_for_the_split_sizes(dispatch, request, capsys):
    """Blocks compiled with fullgraph=True, grouped-GEMM experts in bf16, forward and backward of a 2-layer model:
    the MoE model's blocking calls, less those of the same model with dense FFNs (the loss, the step's own), are
    none with the local dispatch, and one `cudaEventSynchronize` per layer (the split sizes' copy, nothing else)
    with the all-to-all dispatcher; its backward reuses the forward's sizes."""
    models = {"dense": _model(moe=False), "moe": _model(moe=True)}
    if dispatch == "all_to_all":
        from diffv2.parallel.expert import apply_expert_parallel

        apply_expert_parallel(models["moe"], request.getfixturevalue("one_rank_group"))
    tokens_BN = torch.randint(0, 512, (2, 256), device="cuda")
    waits = {}
    for name, model in models.items():
        for block in model.blocks:
            block.compile(fullgraph=True)  # a graph break (an untraced host sync) fails here

        def step(model=model):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _, _ = model.loss(tokens_BN, tokens_BN)
            loss.backward()

        step(), step()  # compile, then warm the caching allocators (pinned host memory included)
        torch.cuda.synchronize()
        waits[name] = host_waits(step)
    extra, missing = waits["moe"] - waits["dense"], waits["dense"] - waits["moe"]
    with capsys.disabled():
        print(f"\n{dispatch}: dense step {dict(waits['dense'])}, MoE step {dict(waits['moe'])}, "
              f"MoE adds {dict(extra)}")
    expected = {} if dispatch == "local" else {"cudaEventSynchronize": N_LAYERS}
    assert dict(extra) == expected and not missing, (dict(waits["dense"]), dict(waits["moe"]))


def test_moe_blocks_compiled_by_regions_under_fsdp2_equal_eager_on_cuda(one_rank_group):
    """What parallelize does under expert parallelism on GPUs, on one: the all-to-all dispatcher, the experts their
    own FSDP2 unit, the MoE blocks compiled by regions with fullgraph=True (grouped-GEMM experts in bf16, the slot
    count unbacked): two steps (the second observed) equal the same eager sharded model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from diffv2.parallel.compile import apply_compile
    from diffv2.parallel.expert import apply_expert_parallel

    models = {"eager": _model(moe=True), "compiled": _model(moe=True)}
    mesh = init_device_mesh("cuda", (1,))
    for name, model in models.items():  # parallelize's order: EP, compile, FSDP2
        apply_expert_parallel(model, one_rank_group)
        if name == "compiled":
            apply_compile(model, regions=True)
        for moe in model.moe_layers():
            fully_shard(moe.experts, mesh=mesh)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "loss")
    tokens_BN = torch.randint(0, 512, (2, 256), device="cuda")
    results = {}
    for name, model in models.items():
        seen = []
        for step in range(2):
            for block in model.blocks:
                block.attn.observer = torch.no_grad()(lambda layer, stats: seen.append(
                    stats["context"].float().square().mean().item())) if step else None
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _, _ = model.loss(tokens_BN, tokens_BN)
            loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        results[name] = loss.detach(), grads, seen
    (loss_e, grads_e, seen_e), (loss_c, grads_c, seen_c) = results["eager"], results["compiled"]
    assert abs(loss_c.item() - loss_e.item()) < 1e-2 * abs(loss_e.item())
    for name, grad in grads_e.items():
        assert rel_err(grads_c[name], grad) < 3e-2, name
    assert len(seen_c) == len(seen_e) == N_LAYERS
    assert seen_c == pytest.approx(seen_e, rel=3e-2)
