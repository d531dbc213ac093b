"""trainer.bf16_weights: bf16 weight copies cast once per optimizer step give the training run of plain autocast."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from cli_runs import checkpoint_tensors, differing_tensors, error_line, metrics, train
from diffv2.train.compute_weights import ComputeWeights
from diffv2.config import AttentionConfig, ModelConfig, MoEConfig
from diffv2.model.transformer import Transformer
from diffv2.parallel.activation_checkpoint import apply_activation_checkpointing

BF16 = torch.bfloat16


def tiny(variant: str, moe: bool = False) -> ModelConfig:
    kw = dict(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32, n_shared_experts=1)) if moe else {}
    return ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=128, vocab_size=97,
                       max_seq_len=32, attention=AttentionConfig(variant=variant), **kw)


def micro_batches(n: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (2, 17), generator=g) for _ in range(n)]


def grads_after(model, batches, weights=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One optimizer step's worth of micro-batches under bf16 autocast, as the trainer runs them."""
    losses = []
    device = next(model.parameters()).device
    if weights is not None:
        weights.refresh()
    for tokens in batches:
        tokens = tokens.to(device)
        with weights.swapped() if weights is not None else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=BF16):
                loss = model.loss(tokens[:, :-1], tokens[:, 1:])[0]
            (loss / len(batches)).backward()
        if weights is not None:
            weights.accumulate()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant, moe, ac, fused", [("diffv2", False, "none", True), ("baseline", False, "none", True),
                                                    ("diffv1", False, "none", True), ("diffv2", False, "full", True),
                                                    ("diffv2", True, "none", True), ("diffv2", True, "full", False)])
def test_bf16_weight_copies_give_autocast_losses_and_gradients_bit_for_bit(variant, moe, ac, fused):
    torch.manual_seed(0)
    plain = Transformer(tiny(variant, moe))
    apply_activation_checkpointing(plain, ac)
    swapped = copy.deepcopy(plain)
    weights = ComputeWeights(swapped, BF16, fused_wgrad=fused)
    names = set(weights.names)
    assert names and all(".attn." in n or ".mlp." in n for n in names)
    assert moe == any(n.endswith("experts.w1") for n in names)  # the grouped expert weights too
    assert not any("router" in n or "lm_head" in n for n in names)  # fp32 router logits; the CE casts the lm_head
    batches = micro_batches(3, plain.cfg.vocab_size)
    losses_a, grads_a = grads_after(plain, batches)
    losses_b, grads_b = grads_after(swapped, batches, weights)
    assert losses_a == losses_b
    assert grads_a.keys() == grads_b.keys() and differing_tensors(grads_a, grads_b) == []
    assert all(g.dtype == torch.float32 for g in grads_b.values())
    assert all(c.grad is None for c in weights.copies)  # handed over: nothing carries into the next micro-batch
    params = dict(swapped.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in names)  # the model's own parameters are back after the swap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_weight_copies_on_a_gpu_with_compiled_blocks():
    """The GPU path (cuDNN attention, compiled blocks, grouped-GEMM experts): the same losses and gradients as plain
    autocast, up to run-to-run noise of the CUDA kernels (atomics); a missing or doubled micro-batch is far off."""
    torch.manual_seed(0)
    base = Transformer(tiny("diffv2", moe=True), backend="cudnn").cuda()

    def compiled():  # a copy taken before compiling (a compiled block's copy would still call the original's blocks)
        model = copy.deepcopy(base)
        for block in model.blocks:
            block.compile()
        return model

    batches = micro_batches(3, base.cfg.vocab_size)
    losses_a, grads_a = grads_after(compiled(), batches)
    for fused_wgrad in (False, True):
        model = compiled()
        weights = ComputeWeights(model, BF16, fused_wgrad=fused_wgrad)
        losses_b, grads_b = grads_after(model, batches, weights)
        assert losses_a == pytest.approx(losses_b, rel=1e-5)
        assert grads_a.keys() == grads_b.keys()
        fused = [n for n, m in zip(weights.names, weights.linears) if m is not None]
        assert bool(fused) == fused_wgrad
        for name in grads_a:
            if name in fused:  # autocast rounds each micro-batch's dW to bf16 (<= 2^-9 relative); the fused GEMM not
                scale = grads_a[name].abs().max().item()
                torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-2, atol=1e-2 * scale, msg=name)
            else:
                torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_weight_gradient_goes_into_fp32_in_one_gemm_on_a_gpu():
    """diffv2::wgrad_into_ on CUDA: grad += dy^T x summed in fp32 (no bf16 rounding of the product), by the fused
    GEMM itself (not the fallback), within fp32 summation-order noise of the exact sum."""
    from diffv2.train import compute_weights

    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(4096, 512, device="cuda", generator=g).to(BF16)
    x = torch.randn(4096, 768, device="cuda", generator=g).to(BF16)
    grad = torch.randn(512, 768, device="cuda", generator=g)
    exact = dy.double().t() @ x.double()
    want = grad.double() + exact
    assert compute_weights.probe_fused_gemm(torch.device("cuda"))
    compute_weights.wgrad_into_(grad, dy, x, True)
    # fp32 sums of 4096 products of size ~1 (sums ~64): ~1e-3 of summation-order noise; bf16 rounding is ~0.1
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=5e-3)
    err_bf16 = ((dy.t() @ x).double() - exact).abs().max()  # autocast's bf16 dW: rounded before the fp32 add
    assert (grad.double() - want).abs().max() < 0.1 * err_bf16


def test_the_fused_gemm_probe_is_stored_and_passed_to_the_layers():
    """The "one GEMM into fp32" capability is probed once when ComputeWeights is built (False off CUDA), kept on it and
    handed to each fused Linear, so the custom op keeps no state of its own."""
    from diffv2.train import compute_weights

    assert compute_weights.probe_fused_gemm(torch.device("cpu")) is False
    weights = ComputeWeights(Transformer(tiny("diffv2")), BF16)
    fused = [m for m in weights.linears if m is not None]
    assert weights.fused_gemm is False and fused and all(m.fused_gemm is False for m in fused)
    forced = ComputeWeights(Transformer(tiny("diffv2")), BF16, fused_gemm=True)
    assert forced.fused_gemm is True and all(m.fused_gemm is True for m in forced.linears if m is not None)
    assert ComputeWeights(Transformer(tiny("diffv2")), BF16, fused_wgrad=False).fused_gemm is False


def test_refresh_follows_the_optimizer_step():
    torch.manual_seed(0)
    model = Transformer(tiny("diffv2"))
    weights = ComputeWeights(model, BF16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grads_after(model, micro_batches(1, 97), weights)
    optimizer.step()
    weights.refresh()
    for p, c in zip(weights.params, weights.copies):
        assert torch.equal(c, p.detach().to(BF16))


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


RUN = ["trainer.precision=bf16", "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=6",
       "trainer.log_interval=1", "trainer.ckpt_interval=4", "trainer.eval_interval=-1", "trainer.compile=true",
       "monitoring.activations.interval=2", "monitoring.context_rms.interval=2",
       "monitoring.context_rms.heatmap_interval=4"]


def test_a_bf16_weights_run_is_the_autocast_run(tmp_path, data_cache):
    """The CLI as on a GPU (compiled blocks, observed steps): 3 micro-batches per step, 4 steps; the same losses and
    the same checkpoint with and without the switch."""
    runs = {name: tmp_path / name for name in ("plain", "bf16_weights")}
    for name, extra in (("plain", []), ("bf16_weights", ["trainer.bf16_weights=true"])):
        proc = train(runs[name], data_cache, *RUN, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    loss = {name: [m["train/loss"] for m in metrics(run) if "train/loss" in m] for name, run in runs.items()}
    assert len(loss["plain"]) == 4 and loss["plain"] == loss["bf16_weights"]
    ckpt = {name: checkpoint_tensors(run / "checkpoints/step_00000004") for name, run in runs.items()}
    assert differing_tensors(ckpt["plain"], ckpt["bf16_weights"]) == []


def test_bf16_weights_without_bf16_autocast_is_refused(tmp_path, data_cache):
    proc = train(tmp_path / "fp32", data_cache, "trainer.precision=fp32", "trainer.bf16_weights=true")
    assert proc.returncode == 2
    assert error_line(proc).startswith("error: trainer.bf16_weights=true needs bf16 autocast: set trainer.precision=bf16")
    assert not (tmp_path / "fp32" / "checkpoints").exists()
