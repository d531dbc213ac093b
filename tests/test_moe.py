"""MoE (issue 6): router and top-k, grouped experts, load balancing, expert parallelism, presets, monitoring, a run.

References are naive per-token / per-expert loops; everything runs in fp32 or fp64 on CPU.
Legend: T tokens, M d_model, E experts, K top_k.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cli_runs import train
from gloo import spawn
from diffv2.train.callbacks import TrainContext, to_host
from diffv2.config import Config, ModelConfig, MoEConfig, register_configs
from diffv2.parallel.activation_checkpoint import apply_activation_checkpointing
from diffv2.parallel.parallelize import sum_over_ranks
from monitoring.build import schema
from diffv2.model.flops import count
from diffv2.model.transformer import Transformer
from diffv2.model.moe import GroupedExperts, MoE, balanced_route, load_balance_loss, route
from diffv2.train.validate import validate
from monitoring.moe import MoEMonitor

ROOT = Path(__file__).resolve().parents[1]
register_configs(monitoring=schema())
M = 16


def make_moe(dtype=torch.float32, seed: int = 0, **overrides) -> MoE:
    cfg = MoEConfig(**{"n_experts": 4, "top_k": 2, "expert_hidden": 8, "experts_impl": "loop", **overrides})
    torch.manual_seed(seed)
    moe = MoE(M, cfg, layer_idx=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe.to(dtype)


def naive_moe(moe: MoE, x_TM: torch.Tensor) -> torch.Tensor:
    """Token by token: score every expert, take the k best, renormalise, sum the weighted expert SwiGLUs."""
    w = moe.experts
    out = []
    for x_M in x_TM:
        logits_E = moe.router.weight.to(torch.float64) @ x_M.to(torch.float64)
        scores_E = logits_E.softmax(-1) if moe.cfg.router == "softmax" else logits_E.sigmoid()
        select_E = scores_E + moe.expert_bias.double() if moe.cfg.balance == "aux_free" else scores_E
        chosen = sorted(range(moe.n_experts), key=lambda e: -select_E[e].item())[: moe.top_k]
        total = sum(scores_E[e] for e in chosen)
        y_M = sum((scores_E[e] / total).to(x_M.dtype) * ((F.silu(x_M @ w.w1[e]) * (x_M @ w.w3[e])) @ w.w2[e])
                  for e in chosen)
        out.append(y_M)
    return torch.stack(out)


# --- router ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_router_top_k_matches_a_per_token_loop(score, with_bias):
    torch.manual_seed(0)
    logits_TE = torch.randn(32, 8, dtype=torch.float64)
    bias_E = torch.randn(8, dtype=torch.float64) * 0.2 if with_bias else None
    scores_TE, experts_TK, weights_TK = route(logits_TE, 3, score, bias_E)
    for t in range(32):
        scores_E = logits_TE[t].softmax(-1) if score == "softmax" else logits_TE[t].sigmoid()
        select_E = scores_E + bias_E if with_bias else scores_E
        best = sorted(range(8), key=lambda e: -select_E[e].item())[:3]
        assert sorted(experts_TK[t].tolist()) == sorted(best)
        expected = {e: (scores_E[e] / scores_E[best].sum()).item() for e in best}  # bias selects, never weights
        got = dict(zip(experts_TK[t].tolist(), weights_TK[t].tolist()))
        assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_moe_layer_matches_a_naive_per_token_loop(score):
    moe = make_moe(torch.float64, router=score, n_shared_experts=0)
    x_BNM = torch.randn(2, 5, M, dtype=torch.float64)
    torch.testing.assert_close(moe(x_BNM).view(10, M), naive_moe(moe, x_BNM.view(10, M)), rtol=1e-10, atol=1e-12)


def test_forced_balance_gives_every_expert_the_same_load_and_trains_the_router():
    moe = make_moe(force_balance=True)
    x_BNM = torch.randn(2, 8, M) + 2 * moe.router.weight[0].detach()  # the router itself would favour expert 0
    moe(x_BNM).square().sum().backward()
    assert moe.tokens_per_expert.tolist() == [8.0] * 4  # 16 tokens x top-2 / 4 experts
    assert moe.router.weight.grad.abs().sum() > 0  # the weights still come from the router's scores
    scores_TE = torch.rand(5, 4).softmax(-1)
    experts_TK, weights_TK = balanced_route(scores_TE, 3)
    assert all(len(set(row)) == 3 for row in experts_TK.tolist())  # distinct experts per token
    torch.testing.assert_close(weights_TK.sum(-1), torch.ones(5))


def test_shared_expert_adds_a_dense_swiglu_on_every_token():
    moe = make_moe(torch.float64, n_shared_experts=2)
    x_TM = torch.randn(6, M, dtype=torch.float64)
    s = moe.shared_expert
    shared_TM = s.down_proj(F.silu(s.gate_proj(x_TM)) * s.up_proj(x_TM))
    assert s.gate_proj.out_features == 2 * 8
    torch.testing.assert_close(moe(x_TM[None])[0], naive_moe(moe, x_TM) + shared_TM)


def test_router_logits_are_fp32_under_bf16_autocast():
    moe = make_moe()
    seen = []
    moe.register_forward_hook(lambda mod, inp, out: seen.append(mod.last_z_loss.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(torch.randn(1, 4, M))
    assert seen == [torch.float32]


def test_capacity_factor_drops_the_latest_tokens_of_a_full_expert():
    moe = make_moe(torch.float64, capacity_factor=0.5, top_k=1)
    x_TM = torch.randn(16, M, dtype=torch.float64)
    _, experts_TK, _ = route(F.linear(x_TM, moe.router.weight), 1, "softmax")
    capacity = 2  # ceil(0.5 * 16 * 1 / 4)
    kept_T = torch.tensor([(experts_TK[:t, 0] == experts_TK[t, 0]).sum() < capacity for t in range(16)])
    expected_TM = naive_moe(moe, x_TM) * kept_T[:, None]
    torch.testing.assert_close(moe(x_TM[None])[0], expected_TM)
    assert not kept_T.all()  # the input does overflow some expert


# --- grouped experts ---------------------------------------------------------------------------------------------

def test_grouped_mm_equals_the_per_expert_loop_forward_and_backward():
    torch.manual_seed(0)
    experts = GroupedExperts(4, M, 8, impl="loop")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    grouped = copy.deepcopy(experts)
    grouped.impl = "grouped_mm"
    tokens_E = torch.tensor([5, 0, 3, 4])  # an expert with no token must work too
    x_SM = torch.randn(12, M, requires_grad=True)
    x2_SM = x_SM.detach().clone().requires_grad_()
    grad_SM = torch.randn(12, M)  # a real upstream gradient (zero strides break CPU grouped_mm in bf16)
    (experts(x_SM, tokens_E) * grad_SM).sum().backward()
    (grouped(x2_SM, tokens_E) * grad_SM).sum().backward()
    torch.testing.assert_close(grouped(x2_SM, tokens_E), experts(x_SM, tokens_E))
    torch.testing.assert_close(x2_SM.grad, x_SM.grad)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(grouped, name).grad, getattr(experts, name).grad)


def test_auto_uses_the_loop_on_cpu():
    assert not GroupedExperts(2, M, 8, impl="auto").use_grouped_mm(torch.zeros(1, M))


# --- load balancing ----------------------------------------------------------------------------------------------

def test_aux_loss_on_a_hand_computed_example():
    # Two tokens, both routed to expert 0 (k=1): f = (1, 0); mean scores P = (0.75, 0.25); E * sum f*P = 1.5.
    scores_TE = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert load_balance_loss(scores_TE, torch.tensor([2.0, 0.0]), k=1).item() == pytest.approx(1.5)
    # Perfect balance gives 1: f = P = 1/E.
    assert load_balance_loss(torch.full((4, 4), 0.25), torch.full((4,), 2.0), k=2).item() == pytest.approx(1.0)


def test_aux_loss_in_the_layer_uses_its_own_routing():
    moe = make_moe(torch.float64, aux_loss_coef=1e-2, z_loss_coef=1e-3)
    x_TM = torch.randn(8, M, dtype=torch.float64)
    moe(x_TM[None])
    logits_TE = F.linear(x_TM, moe.router.weight)
    scores_TE, experts_TK, _ = route(logits_TE, 2, "softmax")
    f_E = torch.bincount(experts_TK.flatten(), minlength=4).double() / 16
    aux = 4 * (f_E * scores_TE.mean(0)).sum()
    z = torch.logsumexp(logits_TE, -1).square().mean()
    assert moe.last_aux_loss.item() == pytest.approx(aux.item(), rel=1e-12)
    assert moe.router_loss.item() == pytest.approx(1e-2 * aux.item() + 1e-3 * z.item(), rel=1e-12)


def test_aux_free_bias_update_moves_load_toward_balance():
    moe = make_moe(balance="aux_free", bias_update_rate=0.01, top_k=1)
    torch.manual_seed(1)
    x_TM = torch.randn(256, M) + 2 * moe.router.weight[0].detach()  # skewed: most tokens prefer expert 0
    imbalance = []
    for _ in range(60):
        moe(x_TM[None])
        load_E = moe.load_since_update.clone()
        imbalance.append((load_E.max() / load_E.mean()).item())
        moe.update_expert_bias()
    assert imbalance[0] > 2.0 and imbalance[-1] < 1.5 and max(imbalance[-5:]) < imbalance[0] / 2
    assert moe.expert_bias[0] < 0 and moe.load_since_update.sum() == 0


def test_router_losses_enter_the_trained_loss_and_ce_stays_pure():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, vocab_size=64,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, aux_loss_coef=0.5, z_loss_coef=1e-2))
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens_BN = torch.randint(0, 64, (2, 12))
    loss, ce, _ = model.loss(tokens_BN, tokens_BN)
    router = sum(m.router_loss for m in model.moe_layers())
    assert loss.item() == pytest.approx(ce.item() + router.item(), rel=1e-6) and router.item() > 0.5
    loss.backward()
    none = Transformer(replace(cfg, moe=replace(cfg.moe, balance="none", z_loss_coef=0.0)))
    loss_none, ce_none, _ = none.loss(tokens_BN, tokens_BN)
    assert loss_none.item() == ce_none.item()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("ac, compiled", [("full", False), ("selective", False), ("selective_moe", False),
                                          ("full", True), ("selective_moe", True)])
def test_activation_checkpointing_recomputation_leaves_no_trace(ac, compiled):
    """A checkpointed MoE block runs its forward again in backward. That second run must not replace the router
    loss (the replacement's graph of recomputed activations, never backpropagated, stayed alive until the next
    forward: ~20 GiB on 30A3 at 4 GPUs), count its tokens again, or reach the monitoring observers; gradients and
    the loss equal those without checkpointing."""
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, vocab_size=64,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, aux_loss_coef=0.5, z_loss_coef=1e-2,
                                    experts_impl="loop"))
    torch.manual_seed(0)
    plain = Transformer(cfg).train()
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, ac, every=2)
    assert checkpointed.block_runner is not None
    if compiled:  # as trainer.compile: per block; the forward and its recomputation must save the same tensors
        for block in checkpointed.blocks:
            block.compile()
    tokens_BN = torch.randint(0, 64, (2, 12))
    seen = []
    for block in checkpointed.blocks:
        block.attn.observer = lambda layer, stats: seen.append(layer)
    results = []
    for model in (plain, checkpointed):
        loss, ce, _ = model.loss(tokens_BN, tokens_BN)
        taken = [m.router_loss for m in model.moe_layers()]
        loss.backward()
        assert all(m.router_loss is t for m, t in zip(model.moe_layers(), taken))  # not replaced in backward
        assert all(m.tokens_per_expert.sum().item() == tokens_BN.numel() * cfg.moe.top_k for m in model.moe_layers())
        assert all(m.load_since_update.sum().item() == tokens_BN.numel() * cfg.moe.top_k for m in model.moe_layers())
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert seen == [0, 1]  # one observation per layer and forward
    (loss_a, grads_a), (loss_b, grads_b) = results
    tol = dict(rtol=1e-5, atol=1e-6) if compiled else dict(rtol=1e-6, atol=1e-7)  # compiled kernels fuse differently
    if compiled:
        torch.testing.assert_close(loss_b, loss_a, **tol)
    else:
        assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **tol, msg=name)


def test_compiled_moe_breaks_only_where_it_must():
    """Under torch.compile the MoE layer breaks its graph only in the CPU loop path, at the per-expert split sizes;
    routing (the token counts) and the router loss and statistics (`_record`) trace. With the sizes captured as
    symbolic ints (as expert parallelism sets dynamo up) the layer is one graph and equals eager."""
    moe = make_moe(n_shared_experts=1, aux_loss_coef=0.1)
    x_BNM = torch.randn(2, 6, M)
    explained = torch._dynamo.explain(moe)(x_BNM)
    where = {(b.user_stack[-1].name if b.user_stack else None) for b in explained.break_reasons}
    assert where <= {"_loop"}, where
    reasons = " ".join(b.reason for b in explained.break_reasons)
    assert "bincount" not in reasons and "Dynamic shape operator" not in reasons
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        y_BNM = torch.compile(moe, fullgraph=True)(x_BNM)
    compiled_loss = moe.router_loss
    torch.testing.assert_close(y_BNM, moe(x_BNM), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_loss, moe.router_loss, rtol=1e-5, atol=1e-6)


def test_recomputing_is_true_only_inside_the_recomputation():
    from torch.utils.checkpoint import checkpoint

    from diffv2.model.recompute import checkpoint_contexts, recomputing

    flags = []

    def fn(x):
        flags.append(recomputing())
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    y = checkpoint(fn, x, use_reentrant=False, context_fn=checkpoint_contexts)
    assert flags == [False] and not recomputing()
    y.sum().backward()
    assert flags == [False, True] and not recomputing()
    torch.testing.assert_close(x.grad, x.detach().cos())


def test_moe_block_gradcheck_fp64():
    moe = make_moe(torch.float64, n_shared_experts=1, aux_loss_coef=0.1, z_loss_coef=0.1)
    x_BNM = torch.randn(1, 6, M, dtype=torch.float64, requires_grad=True)

    def f(x):
        return moe(x), moe.router_loss  # output and the router losses, as the trainer backpropagates both

    assert torch.autograd.gradcheck(f, (x_BNM,), eps=1e-6, atol=1e-6)


# --- expert parallelism ------------------------------------------------------------------------------------------

EP_CASES = [dict(n_shared_experts=1, aux_loss_coef=0.1, z_loss_coef=0.01),
            dict(router="sigmoid", balance="aux_free", capacity_factor=1.0, z_loss_coef=0.01)]


def _ep_worker(rank: int, world: int) -> None:
    from diffv2.parallel.expert import apply_expert_parallel

    for case in EP_CASES:
        full = make_moe(n_experts=2 * world, top_k=2, **case)  # two local experts per rank: regrouping matters
        full.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]).repeat(world // 2))
        sharded = copy.deepcopy(full)
        apply_expert_parallel(sharded, dist.group.WORLD)
        for moe in (full, sharded):  # global-batch balance, as parallelize sets it with several ranks
            moe.count_reducer = sum_over_ranks
        _check_ep_matches_ep1(rank, full, sharded)


def _check_ep_matches_ep1(rank: int, full: MoE, sharded: MoE) -> None:
    torch.manual_seed(100 + rank)  # every rank routes different tokens
    x_BNM, grad_BNM = torch.randn(2, 7, M), torch.randn(2, 7, M)
    outs = []
    for moe in (full, sharded):
        x = x_BNM.clone().requires_grad_()
        y = moe(x)
        ((y * grad_BNM).sum() + moe.router_loss).backward()
        outs.append((y.detach(), x.grad))
        moe.update_expert_bias()  # all-reduced loads: every rank and both layouts move the bias alike
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    torch.testing.assert_close(sharded.router.weight.grad, full.router.weight.grad)
    torch.testing.assert_close(sharded.expert_bias, full.expert_bias)
    for name in ("w1", "w2", "w3"):
        g = getattr(full.experts, name).grad.clone()
        dist.all_reduce(g)  # EP=1 reference: each expert's gradient summed over the ranks' tokens
        torch.testing.assert_close(getattr(sharded.experts, name).grad, g[2 * rank:2 * rank + 2])
    assert sharded.experts.w1.shape[0] == 2


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_equals_ep1_outputs_and_gradients(ranks):
    spawn(functools.partial(_ep_worker, world=ranks), ranks)


# --- presets and accounting --------------------------------------------------------------------------------------

def compose_cfg(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_30a3_preset_has_qwen3_30b_a3b_counts():
    cfg = compose_cfg("+experiment=moe_30a3", "attention=baseline")
    validate(cfg)
    c = count(cfg.model, 4096)
    assert c.total == pytest.approx(30.5e9, rel=0.01) and c.active == pytest.approx(3.3e9, rel=0.03)
    assert cfg.model.attention.qk_norm and cfg.model.attention.rope_theta == 1e6
    assert c.flops_per_token == pytest.approx(23.0e9, rel=0.01)  # published 30A3 figure: 6 x 3.05B active + attention


@pytest.mark.parametrize("preset", ["moe_tiny", "moe_1gpu", "moe_30a3"])
@pytest.mark.parametrize("attention", ["diffv2", "baseline"])
def test_moe_presets_accept_diffv2_and_baseline(preset, attention):
    cfg = compose_cfg(f"model={preset}", f"attention={attention}", "data.seq_len=1024")
    validate(cfg)
    total = count(cfg.model, 1024).total
    assert {"moe_tiny": (1e6, 5e6), "moe_1gpu": (1e9, 2e9), "moe_30a3": (30e9, 32e9)}[preset][0] < total
    assert total < {"moe_tiny": (1e6, 5e6), "moe_1gpu": (1e9, 2e9), "moe_30a3": (30e9, 32e9)}[preset][1]


@pytest.mark.parametrize("variant", ["diffv2", "baseline"])
def test_counts_equal_the_real_parameters_of_a_scaled_down_model(variant):
    cfg = compose_cfg("model=moe_tiny", f"attention={variant}", "model.moe.n_shared_experts=1").model
    model = Transformer(cfg)
    c = count(cfg, 64)
    assert c.total == sum(p.numel() for p in model.parameters())
    e = cfg.moe
    unused_per_layer = sum(p[0].numel() for p in model.blocks[0].mlp.experts.parameters()) * (e.n_experts - e.top_k)
    assert c.active == c.total - cfg.n_layers * unused_per_layer


@pytest.mark.parametrize(
    "override, message",
    [("model.moe.top_k=9", "model.moe.top_k=9 must be in [1, model.moe.n_experts=8]"),
     ("model.moe.router=relu", "model.moe.router='relu' is not one of"),
     ("model.moe.balance=aux_free model.moe.bias_update_rate=0", "model.moe.bias_update_rate=0"),
     ("model.param_match=true", "model.param_match=true")],
)
def test_invalid_moe_config_is_one_clear_error(override, message):
    with pytest.raises(ValueError) as err:
        validate(compose_cfg("model=moe_tiny", *override.split()))
    assert message in str(err.value) and "\n" not in str(err.value)


# --- monitoring and a real run -----------------------------------------------------------------------------------

def test_moe_layers_fill_the_monitor_contract(tmp_path):
    cfg = compose_cfg("model=moe_tiny", "model.moe.balance=aux_free").model
    model = Transformer(cfg)
    monitor = MoEMonitor(interval=1)
    monitor.on_train_start(TrainContext(cfg=Config(), model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                        run_dir=tmp_path, device=torch.device("cpu"), flops_per_token=1.0,
                                        tokens_per_step=1))
    tokens_BN = torch.randint(0, cfg.vocab_size, (2, 16))
    model.loss(tokens_BN, tokens_BN)[0].backward()
    model.update_expert_bias()
    metrics = to_host(monitor.on_before_optimizer_step(1))
    assert sorted(k for k in metrics if k.startswith("moe/imbalance/")) == [f"moe/imbalance/L{i:02d}" for i in
                                                                            range(4)]
    assert [sum(row) for row in metrics["moe/tokens_per_expert"]] == [2 * 16 * 2] * 4  # T * top_k per layer
    assert len(metrics["moe/expert_bias"]) == 4 and any(b != 0 for b in metrics["moe/expert_bias"][0])
    assert {"moe/aux_loss/L00", "moe/z_loss/L03", "moe/dead_experts/L02"} <= set(metrics)


def _train_moe_tiny(run_dir: Path, cache: Path) -> list[dict]:
    proc = train(run_dir, cache, "model=moe_tiny", "data.seq_len=64", "trainer.micro_batch_size=4",
                 "trainer.global_batch_size=4", "trainer.max_steps=6", "trainer.log_interval=1",
                 "logging.progress=false", "data.num_workers=0", "monitoring.moe.interval=2", "optim.warmup_steps=2",
                 "trainer.ckpt_interval=3", "trainer.eval_interval=-1",
                 "model.moe.balance=aux_free", base=())  # also exercises the trainer's bias update after optimizer.step
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_moe_tiny_end_to_end_and_resume_exactly(tmp_path):
    rows = _train_moe_tiny(tmp_path / "run", tmp_path / "cache")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert any(k.startswith("moe/imbalance/") for r in rows for k in r)
    assert any("moe/tokens_per_expert" in r for r in rows)
    biases = [r["moe/expert_bias"] for r in rows if "moe/expert_bias" in r]
    assert biases and any(b != 0 for b in biases[-1][0])  # 5 updates had moved layer 0's bias by the last read
    # Resume from step 3: the expert bias is a persistent buffer, so steps 4-6 repeat bit for bit.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    resumed = _train_moe_tiny(tmp_path / "resumed", tmp_path / "cache")
    assert [r["train/loss"] for r in resumed if "train/loss" in r] == losses


def test_checkpoint_model_config_round_trips_moe():
    from dataclasses import asdict

    from diffv2.infer.inference import model_config

    cfg = compose_cfg("model=moe_tiny", "model.moe.balance=aux_free").model
    assert model_config(asdict(cfg)) == cfg
    dense = asdict(compose_cfg().model)
    dense.pop("moe")  # meta.json written before MoE support
    assert model_config(dense).moe.n_experts == 0


def test_dense_checkpoints_from_before_moe_support_still_resume():
    from dataclasses import asdict

    from diffv2.train.trainer import Trainer

    def check(cfg: Config, saved_model: dict) -> None:
        trainer = Trainer.__new__(Trainer)  # only the compatibility check, no run directory
        trainer.cfg, trainer.resume_from = cfg, "ckpt"
        meta = {"model": saved_model, "seq_len": cfg.data.seq_len, "seed": cfg.seed,
                "train_samples": cfg.trainer.max_steps * cfg.trainer.global_batch_size}
        trainer._check_compatible(meta)

    dense = compose_cfg()
    old_meta = {k: v for k, v in asdict(dense.model).items() if k != "moe"}
    check(dense, old_meta)
    with pytest.raises(ValueError, match="moe"):
        check(compose_cfg("model.moe.n_experts=4"), old_meta)
