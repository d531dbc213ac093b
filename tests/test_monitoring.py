"""Each training-health metric against a value computed by hand on a tiny model or a constructed tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffv2.model.attention import Attention, lambda_init
from diffv2.train.callbacks import StepResult, TrainContext, to_host
from diffv2.config import Config, ModelConfig
from diffv2.model.transformer import Transformer
from diffv2.parallel.activation_checkpoint import apply_activation_checkpointing
from tests.builders import with_attention
from diffv2.train.validate import validate_monitoring
from monitoring.activations import ActivationMonitor, residual_stats
from monitoring.attention_math import lambda_scale, logits, pairs, project_qk, sink_and_entropy
from monitoring.attention_sinks import AttentionSinkMonitor
from monitoring.build import build_monitors, schema
from monitoring.context_rms import ContextRMSMonitor, context_rms_H, floor_H
from monitoring import grad_norms
from monitoring.grad_norms import GradNormMonitor, kind_of, layer_of
from monitoring.lambda_stats import LambdaMonitor
from monitoring.moe import MoEMonitor

BASE = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=64, vocab_size=64,
                   max_seq_len=64)


def tiny(variant: str = "diffv2", **attention) -> Transformer:
    torch.manual_seed(0)
    cfg = with_attention(BASE, variant=variant, **attention)
    if variant == "diffv1":  # V1 halves heads: needs even n_heads and n_kv_heads
        cfg = with_attention(ModelConfig(**{**BASE.__dict__, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8}),
                             variant="diffv1")
    return Transformer(cfg)


def make_ctx(model, tmp_path, probe=None, optimizer=None, seq_len: int = 16) -> TrainContext:
    cfg = Config()
    cfg.data.seq_len = seq_len
    return TrainContext(cfg=cfg, model=model, optimizer=optimizer or torch.optim.AdamW(model.parameters()),
                        run_dir=tmp_path, device=torch.device("cpu"), flops_per_token=1.0, tokens_per_step=1,
                        probe_tokens=probe)


def observed(model) -> bool:
    """Some observer slot of the model holds a function (an attention observer or a block observer)."""
    return any((isinstance(m, Attention) and m.observer is not None) or getattr(m, "block_observer", None) is not None
               for m in model.modules())


def backward(model, seed: int = 1) -> None:
    torch.manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 17))
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()


def result(step: int, grad_norm: float = 1.0) -> StepResult:
    return StepResult(step, torch.tensor(2.0), torch.tensor(grad_norm), 1e-3, sample_index=0, batch_size=2)


# --- gradient norms -------------------------------------------------------------------------------------------

def test_every_parameter_has_a_module_kind():
    names = [n for v in ("diffv2", "baseline", "diffv1") for n, _ in tiny(v).named_parameters()]
    kinds = {n: kind_of(n) for n in names}
    assert "other" not in kinds.values(), [n for n, k in kinds.items() if k == "other"]
    assert kinds["blocks.0.attn.lambda_proj.weight"] == "lambda" and kinds["blocks.1.attn.lambda_q1"] == "lambda"
    assert kinds["blocks.0.mlp_norm.weight"] == "norm" and kinds["blocks.0.attn.subln.weight"] == "norm"
    assert kinds["embed.weight"] == "embed" and kinds["lm_head.weight"] == "embed"
    assert kind_of("blocks.3.moe.router.weight") == "router" and kind_of("blocks.3.moe.experts.w1") == "experts"
    assert layer_of("blocks.12.attn.q_proj.weight") == 12 and layer_of("norm.weight") is None


def test_kind_and_layer_norms_partition_the_global_norm(tmp_path):
    model = tiny()
    backward(model)
    monitor = GradNormMonitor(interval=1)
    monitor.on_train_start(make_ctx(model, tmp_path))
    monitor.on_before_optimizer_step(1)
    global_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    metrics = to_host(monitor.on_step_end(result(1, global_norm.item())))
    kinds = {k: v for k, v in metrics.items() if k.startswith("grad/norm_kind/")}
    assert math.isclose(math.sqrt(sum(v**2 for v in kinds.values())), global_norm.item(), rel_tol=1e-5)
    by_hand = {i: math.sqrt(sum(p.grad.square().sum().item() for n, p in model.named_parameters()
                                if n.startswith(f"blocks.{i}."))) for i in range(2)}
    for i in range(2):
        assert math.isclose(metrics[f"grad/norm_layer/L{i:02d}"], by_hand[i], rel_tol=1e-5)
    q = math.sqrt(sum(b.attn.q_proj.weight.grad.square().sum().item() for b in model.blocks))
    assert math.isclose(metrics["grad/norm_kind/q"], q, rel_tol=1e-5)


def test_clip_coefficient_and_post_clip_norm_follow_clip_grad_norm(tmp_path):
    model = tiny()
    backward(model)
    monitor = GradNormMonitor(interval=1, param_norms=False)
    ctx = make_ctx(model, tmp_path)
    ctx.cfg.optim.grad_clip = 0.05
    monitor.on_train_start(ctx)
    monitor.on_before_optimizer_step(1)
    pre = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    post = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    metrics = to_host(monitor.on_step_end(result(1, pre.item())))
    assert math.isclose(metrics["grad/clip_coef"], 0.05 / (pre.item() + 1e-6), rel_tol=1e-5)
    assert math.isclose(metrics["grad/norm_clipped"], post.item(), rel_tol=1e-4)


def test_update_ratio_is_update_norm_over_param_norm_per_layer(tmp_path):
    model = tiny()
    backward(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradNormMonitor(interval=1)
    monitor.on_train_start(make_ctx(model, tmp_path, optimizer=opt))
    monitor.on_before_optimizer_step(1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    metrics = to_host(monitor.on_step_end(result(1)))
    for i in range(2):
        layer = [n for n in grads if n.startswith(f"blocks.{i}.")]
        update = 0.1 * math.sqrt(sum(grads[n].square().sum().item() for n in layer))
        param = math.sqrt(sum(dict(model.named_parameters())[n].square().sum().item() for n in layer))
        assert math.isclose(metrics[f"grad/param_norm_layer/L{i:02d}"], param, rel_tol=1e-5)
        assert math.isclose(metrics[f"grad/update_ratio_layer/L{i:02d}"], update / param, rel_tol=1e-4)


class _Wide(nn.Module):
    """One 2048 x 1024 layer (2^21 elements: sampled) and one small one (exact), named as blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(1024, 2048, bias=False), nn.Linear(8, 8, bias=False)])


def test_update_ratio_of_a_large_tensor_is_estimated_from_a_coprime_sample_of_it(tmp_path):
    model = _Wide()
    torch.manual_seed(0)
    # Updates 10x larger in every 16th column: a plain stride of 16 would see those columns only (ratio 10x off).
    col_scale = torch.where(torch.arange(1024) % 16 == 0, 10.0, 1.0)
    model.blocks[0].weight.grad = torch.randn(2048, 1024) * col_scale
    model.blocks[1].weight.grad = torch.randn(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradNormMonitor(interval=1, update_sample=16)
    monitor.on_train_start(make_ctx(model, tmp_path, optimizer=opt))
    monitor.on_before_optimizer_step(1)
    assert grad_norms.sample_stride(model.blocks[0].weight, 16) == 17  # gcd(16, 1024) = 16, gcd(17, 1024) = 1
    kept = sum(old.numel() for old, _, _ in monitor._before)
    assert kept == math.ceil(2048 * 1024 / 17) + 64  # 1/17 of the large tensor, all of the small one
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    metrics = to_host(monitor.on_step_end(result(1)))
    for i, g in enumerate(grads):
        w = model.blocks[i].weight
        exact = 0.1 * g.norm().item() / w.norm().item()
        assert math.isclose(metrics[f"grad/param_norm_layer/L{i:02d}"], w.norm().item(), rel_tol=1e-5)
        # the small tensor is copied whole (exact); the large one is a 123k-element sample: within 1%
        assert math.isclose(metrics[f"grad/update_ratio_layer/L{i:02d}"], exact, rel_tol=1e-2 if i == 0 else 1e-4)


def test_update_sample_must_be_positive():
    """One rule (GradNormMonitorConfig.validate) for the monitor and the start-up check, with one message."""
    with pytest.raises(ValueError, match="monitoring.grad_norms.update_sample=0 must be >= 1"):
        GradNormMonitor(interval=1, update_sample=0)
    cfg = schema()()
    cfg.grad_norms.update_sample = 0
    with pytest.raises(ValueError, match="monitoring.grad_norms.update_sample=0 must be >= 1"):
        validate_monitoring(cfg)


def _sharded_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from diffv2.parallel.norms import bucket_sum_squares, local_piece

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    a, b, c = torch.randn(8, 4), torch.randn(6), torch.randn(5)
    pieces = [(*local_piece(distribute_tensor(a, mesh, [Shard(0)])), [0, 2]),  # FSDP-style shard
              (*local_piece(distribute_tensor(b, mesh, [Replicate()])), [1, 2]),  # replicated DTensor
              (*local_piece(c), [1, 2])]  # plain tensor, identical on both ranks (DDP)
    sums = bucket_sum_squares(pieces, 3, torch.device("cpu"))
    want = torch.stack([a.square().sum(), b.square().sum() + c.square().sum(),
                        a.square().sum() + b.square().sum() + c.square().sum()])
    if rank == 0:
        torch.save({"got": sums, "want": want}, out)
    dist.destroy_process_group()


def test_sharded_norms_equal_the_unsharded_norms(tmp_path):
    """Two gloo ranks: a Shard(0) DTensor, a replicated DTensor and a plain replicated tensor count once each."""
    torch.multiprocessing.spawn(_sharded_worker, args=(f"file://{tmp_path}/init", str(tmp_path / "out.pt")), nprocs=2)
    res = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(res["got"], res["want"], rtol=1e-5, atol=0)


# --- activation outliers ----------------------------------------------------------------------------------------

def test_kurtosis_of_known_distributions():
    assert math.isclose(residual_stats(torch.tensor([-1.0, 1.0] * 50), 1)["kurtosis"].item(), 1.0, rel_tol=1e-6)
    assert math.isclose(residual_stats(torch.tensor([-3.0, 0.0, 0.0, 3.0] * 25), 1)["kurtosis"].item(), 2.0,
                        rel_tol=1e-6)
    gaussian = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    assert abs(residual_stats(gaussian, 1)["kurtosis"].item() - 3.0) < 0.03


def test_outlier_share_and_top_k():
    x = torch.zeros(1000)
    x[0], x[1] = 100.0, -50.0  # mean 0.05, var 12.4975, 6 std = 21.2: both entries are outliers
    stats = residual_stats(x, 3)
    assert stats["top_k"].tolist() == [100.0, 50.0, 0.0]
    assert math.isclose(stats["frac_gt_6std"].item(), 0.002, rel_tol=1e-6)


def test_activation_monitor_reads_block_outputs_only_on_interval_steps(tmp_path):
    model = tiny()
    ctx = make_ctx(model, tmp_path)
    monitor = ActivationMonitor(interval=2, top_k=2)
    monitor.on_train_start(ctx)
    outputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach()))
    monitor.on_step_start(1)
    assert model.block_observer is None and not observed(model)
    monitor.on_step_start(2)
    assert model.block_observer is not None
    backward(model)
    metrics = to_host(monitor.on_before_optimizer_step(2))
    assert model.block_observer is None
    for i, out in outputs.items():
        top = out.abs().amax(-1).flatten().topk(2).values  # tokens ranked by their max |h|
        assert metrics[f"act/max_abs/L{i:02d}"] == pytest.approx(top[0].item())
        assert metrics[f"act/top2_abs/L{i:02d}"] == pytest.approx(top[1].item())


# --- context RMS (spec §6, T15) ----------------------------------------------------------------------------------

def _context(w_N: torch.Tensor, d: int = 16) -> torch.Tensor:
    """Context of weights w over orthonormal values with |v_j|^2 = d, as (B=1, N=1, H=1, D)."""
    values_ND = math.sqrt(d) * torch.eye(d)[: w_N.numel()]
    return (w_N @ values_ND).view(1, 1, 1, d)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9])
def test_context_rms_is_the_norm_of_the_differential_weights(sigma):
    n = 8
    a1, a2 = torch.softmax(torch.randn(n), 0), torch.softmax(torch.randn(n), 0)
    w = a1 - sigma * a2
    assert context_rms_H(_context(w)).item() == pytest.approx(w.norm().item(), rel=1e-6)
    uniform = torch.full((n,), 1 / n)
    assert context_rms_H(_context(uniform - sigma * uniform)).item() == pytest.approx((1 - sigma) / math.sqrt(n))
    one_hot1, one_hot2 = torch.eye(n)[0], torch.eye(n)[3]
    assert context_rms_H(_context(one_hot1 - sigma * one_hot2)).item() == pytest.approx(math.sqrt(1 + sigma**2))


def test_context_rms_floor_is_the_position_averaged_bound():
    scale = torch.full((2, 5, 3), 0.25)
    assert floor_H(scale).mean().item() == pytest.approx(sum(0.75 / math.sqrt(t + 1) for t in range(5)) / 5)


@pytest.mark.parametrize("variant", ["diffv2", "baseline"])
def test_context_rms_monitor_logs_the_observed_contexts(variant, tmp_path):
    model = tiny(variant)
    ctx = make_ctx(model, tmp_path)
    monitor = ContextRMSMonitor(interval=1, heatmap_interval=1)
    monitor.on_train_start(ctx)
    seen = {}
    monitor.on_step_start(1)
    ctx.observers.watch_attention("test", lambda layer, stats: seen.__setitem__(layer, dict(stats)))
    backward(model)
    ctx.observers.unwatch("test")
    metrics = to_host(monitor.on_before_optimizer_step(1))
    for layer, stats in seen.items():
        per_head = stats["context"].float().square().mean(-1).sqrt().mean((0, 1))
        assert metrics["attn/context_rms_heads"][layer] == pytest.approx(per_head.tolist(), rel=1e-5)
        assert metrics[f"attn/context_rms_max/L{layer:02d}"] == pytest.approx(per_head.max().item(), rel=1e-5)
    differential_keys = ("attn/context_rms_a1_heads" in metrics, "attn/context_rms_floor/L00" in metrics)
    assert differential_keys == (variant == "diffv2",) * 2
    assert metrics["attn/context_rms_uniform_ref"] == pytest.approx(sum((t + 1) ** -0.5 for t in range(16)) / 16)
    assert not observed(model)


@pytest.mark.parametrize("ac", ["none", "full"])
def test_observed_compiled_blocks_compile_once_for_every_layer(ac, tmp_path):
    """With trainer.compile (compiled blocks), an observed step runs compiled: the monitors see the same
    statistics as an eager model, every layer once per forward (not again in a checkpointed recomputation), and the
    observed and unobserved variants of a block are compiled once for all 8 layers (fewer graphs than layers: a
    per-layer specialisation would make one or more per layer), however often the monitors arm and disarm."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = with_attention(ModelConfig(**{**BASE.__dict__, "n_layers": 8}), variant="diffv2")
    eager, compiled = Transformer(cfg), Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(compiled, ac)
    for block in compiled.blocks:
        block.compile()
    seen = {"eager": [], "compiled": []}
    graphs, start = [], counters["stats"]["unique_graphs"]  # the counters are process-wide
    for step in range(1, 6):
        for name, model in (("eager", eager), ("compiled", compiled)):
            hub = make_ctx(model, tmp_path).observers
            if step % 2:  # observed steps 1, 3, 5; unobserved 2, 4
                hub.watch_attention("t", lambda layer, stats, name=name: seen[name].append(
                    (layer, stats["context"].float().square().mean().item(), stats["lambda_scale"].mean().item())))
                hub.watch_blocks("b", lambda layer, x, name=name: seen[name].append((layer, x.abs().max().item())))
            backward(model, seed=step)
            hub.unwatch("t")
            hub.unwatch("b")
        graphs.append(counters["stats"]["unique_graphs"] - start)
    assert [entry[0] for entry in seen["compiled"]] == [i for _ in range(3) for i in range(8) for _ in range(2)]
    for a, b in zip(seen["eager"], seen["compiled"]):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-4)
    assert graphs[0] > 0  # the first, observed, step ran through compiled graphs (not a forced-eager step)
    assert graphs[1] == graphs[-1] and graphs[-1] < 8  # nothing compiled after the first cycle; not one per layer


def test_a_compiled_block_observes_by_its_argument_and_never_calls_an_emptied_slot():
    """The model passes `observe` to each block: the compiled graph is chosen by that argument (a guard every torch
    version keeps), not by a guard on the `observer` attribute; a slot emptied after the decision drops the
    statistics instead of calling None (what a stale observed graph did on torch 2.11 on GPU)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = with_attention(ModelConfig(**{**BASE.__dict__, "n_layers": 1}), variant="diffv2")
    block = Transformer(cfg).blocks[0]
    block.compile()
    x = torch.randn(2, 8, cfg.d_model)
    calls = []
    block.attn.observer = lambda layer, stats: calls.append(sorted(stats))
    block(x, None, None, True)
    assert calls == [["attn1", "attn2", "context", "lambda_scale"]]
    block(x, None, None, False)  # observer installed, but the caller decided not to observe
    assert len(calls) == 1
    block.attn.observer = None
    block(x, None, None, True)  # the observed graph with an emptied slot: nothing is called
    assert len(calls) == 1


# --- explicit attention math (probe) -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant, attention", [
    ("baseline", {}), ("diffv2", {}), ("diffv2", {"qk_norm": True}), ("diffv2", {"pairing": "half_split"}),
    ("diffv2", {"lambda_mode": "raw"}), ("baseline", {"head_multiplier": 2.0})])
def test_probe_maps_reproduce_the_layer_context(variant, attention):
    """softmax(q k^T/sqrt(d)) v from the probe's recomputed q/k equals what the kernel produced (incl. RoPE, GQA)."""
    cfg = with_attention(ModelConfig(**{**BASE.__dict__, "n_heads": 4, "n_kv_heads": 2}), variant=variant, **attention)
    torch.manual_seed(0)
    attn = Attention(cfg, 0)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.3)
    seen = {}
    attn.observer = lambda layer, stats: seen.update(stats)
    x = torch.randn(2, 9, cfg.d_model)
    with torch.no_grad():
        attn(x)
        q, k = project_qk(attn, x)
        v = attn.v_proj(x).view(2, 9, attn.n_kv, attn.head_dim).repeat_interleave(attn.n_q // attn.n_kv, dim=2)
        out_BQND = torch.softmax(logits(q, k, list(range(attn.n_q))), -1) @ v.transpose(1, 2)
        pair_list = pairs(attn)
        if pair_list is None:
            want_BNHD = out_BQND.transpose(1, 2)
        else:
            first, second = [p[0] for p in pair_list], [p[1] for p in pair_list]
            want_BNHD = (out_BQND[:, first] - lambda_scale(attn, x).transpose(1, 2)[..., None] * out_BQND[:, second]
                         ).transpose(1, 2)
    torch.testing.assert_close(want_BNHD, seen["context"], rtol=1e-4, atol=1e-5)


def test_sink_mass_and_entropy_of_uniform_attention():
    """q = 0 makes every map uniform over the visible keys: mass 1/(t+1) and entropy log(t+1) at position t."""
    n = 12
    expected_mass = sum(1 / (t + 1) for t in range(1, n)) / (n - 1)
    expected_entropy = sum(math.log(t + 1) for t in range(1, n)) / (n - 1)
    for variant in ("baseline", "diffv2"):
        attn = Attention(with_attention(BASE, variant=variant), 0)
        nn.init.zeros_(attn.q_proj.weight)
        if attn.lambda_proj is not None:
            nn.init.zeros_(attn.lambda_proj.weight)  # sigma = 0.5
        with torch.no_grad():
            stats = sink_and_entropy(attn, torch.randn(3, n, BASE.d_model))
        if variant == "baseline":
            assert stats["sink_mass"] == pytest.approx([expected_mass] * 2)
            assert stats["entropy"] == pytest.approx([expected_entropy] * 2)
        else:
            assert stats["sink_mass_a1"] == pytest.approx([expected_mass] * 2)
            assert stats["entropy_a2"] == pytest.approx([expected_entropy] * 2)
            assert stats["sink_mass"] == pytest.approx([0.5 * expected_mass] * 2)  # rows of a1 - a2/2 sum to 1/2


def test_sink_monitor_runs_one_probe_pass_on_its_interval(tmp_path):
    model = tiny()
    probe = torch.randint(0, 64, (2, 13))
    ctx = make_ctx(model, tmp_path, probe=probe)
    monitor = AttentionSinkMonitor(interval=2)
    monitor.on_train_start(ctx)
    monitor.on_step_start(1)
    assert monitor.on_step_end(result(1)) == {}
    monitor.on_step_start(2)
    metrics = to_host(monitor.on_step_end(result(2)))
    assert len(metrics["attn/sink_mass_heads"]) == 2 and len(metrics["attn/sink_mass_heads"][0]) == 2
    assert all(len(m.attn._forward_pre_hooks) == 0 for m in model.blocks)  # probe hooks removed


# --- lambda ---------------------------------------------------------------------------------------------------------

def test_lambda_quantiles_and_per_head_means(tmp_path):
    monitor = LambdaMonitor(interval=1, heatmap_interval=1)
    monitor.on_train_start(make_ctx(tiny(), tmp_path))
    monitor.on_step_start(1)
    values = torch.linspace(0, 1, 101)  # p5 = 0.05, p50 = 0.5, p95 = 0.95
    monitor._observe(0, {"lambda_scale": torch.stack((values, 1 - values), dim=-1)[None]})  # (B=1, N=101, H=2)
    metrics = to_host(monitor.on_before_optimizer_step(1))
    assert metrics["attn/lambda_sigmoid_mean/L00"] == pytest.approx(0.5)
    assert [metrics[f"attn/lambda_sigmoid_{q}/L00"] for q in ("p05", "p50", "p95")] == pytest.approx([0.05, 0.5, 0.95])
    assert metrics["attn/lambda_sigmoid_heads"][0] == pytest.approx([0.5, 0.5])


def test_diffv1_lambda_per_layer(tmp_path):
    model = tiny("diffv1")
    for block in model.blocks:
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            nn.init.zeros_(getattr(block.attn, name))  # lambda = exp(0) - exp(0) + lambda_init
    monitor = LambdaMonitor(interval=1, heatmap_interval=1)
    monitor.on_train_start(make_ctx(model, tmp_path))
    monitor.on_step_start(1)
    backward(model)
    metrics = to_host(monitor.on_before_optimizer_step(1))
    assert metrics["attn/lambda_v1/L00"] == pytest.approx(lambda_init(0))
    assert metrics["attn/lambda_v1/L01"] == pytest.approx(0.8 - 0.6 * math.exp(-0.3))


# --- MoE interface -----------------------------------------------------------------------------------------------

class FakeMoE(nn.Module):
    """The moe_stats contract (monitoring/moe.py) on a module with no routing at all."""

    def __init__(self, layer_idx: int, tokens: list[float]):
        super().__init__()
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(torch.zeros(1))
        self.moe_stats = {"tokens_per_expert": torch.tensor(tokens), "aux_loss": torch.tensor(0.25),
                          "z_loss": torch.tensor(1e-3)}


def test_moe_monitor_reads_and_resets_tokens_per_expert(tmp_path):
    model = nn.Sequential(FakeMoE(0, [4.0, 0.0, 2.0, 2.0]), FakeMoE(1, [2.0, 2.0, 2.0, 2.0]))
    monitor = MoEMonitor(interval=1)
    monitor.on_train_start(make_ctx(model, tmp_path))
    metrics = to_host(monitor.on_before_optimizer_step(1))
    assert metrics["moe/imbalance/L00"] == 2.0 and metrics["moe/imbalance/L01"] == 1.0
    assert metrics["moe/dead_experts/L00"] == 1 and metrics["moe/dead_experts/L01"] == 0
    assert metrics["moe/aux_loss/L00"] == 0.25 and metrics["moe/z_loss/L01"] == pytest.approx(1e-3)
    assert metrics["moe/tokens_per_expert"] == [[4.0, 0.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]]
    assert model[0].moe_stats["tokens_per_expert"].sum() == 0  # the next window starts from zero


# --- plumbing ------------------------------------------------------------------------------------------------------

def test_monitors_off_install_nothing(tmp_path):
    off = schema()(enabled=False)
    assert [m.name for m in build_monitors(off)] == ["perf"]  # throughput only: no observer, no extra kernel
    off.perf.enabled = False
    assert build_monitors(off) == []
    model = tiny()
    monitors = build_monitors(schema()())
    ctx = make_ctx(model, tmp_path, probe=torch.randint(0, 64, (2, 9)))
    for m in monitors:
        m.on_train_start(ctx)
    for m in monitors:
        m.on_step_start(7)  # no default interval divides 7
    assert model.block_observer is None and all(b.attn.observer is None for b in model.blocks)


def test_to_host_converts_everything_in_one_pass():
    out = to_host({"a": torch.tensor(1.5), "b": torch.tensor([[1, 2], [3, 4]]), "c": 2.0, "d": torch.tensor(True)})
    assert out == {"a": 1.5, "b": [[1.0, 2.0], [3.0, 4.0]], "c": 2.0, "d": 1.0}


def test_heatmap_interval_must_be_a_multiple_of_the_interval():
    cfg = schema()()
    cfg.context_rms.heatmap_interval = 75
    with pytest.raises(ValueError, match="monitoring.context_rms.heatmap_interval=75 must be a positive multiple"):
        validate_monitoring(cfg)


def test_to_host_converts_every_value_once_per_device_and_dtype_group():
    metrics = {"a": torch.tensor(1.5), "n": 3, "b": torch.tensor([[1, 2], [3, 4]], dtype=torch.int64),
               "c": torch.tensor([0.25, 0.5], dtype=torch.float64), "d": torch.tensor(2 ** 40 + 1),
               "e": torch.tensor(-1.0, dtype=torch.bfloat16), "s": "text"}
    got = to_host(metrics)
    assert got == {"a": 1.5, "n": 3, "b": [[1.0, 2.0], [3.0, 4.0]], "c": [0.25, 0.5], "d": float(2 ** 40 + 1),
                   "e": -1.0, "s": "text"}
    assert isinstance(got["a"], float) and isinstance(got["b"][0][0], float)
