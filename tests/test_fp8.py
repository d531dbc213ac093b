"""trainer.fp8 (diffv2/parallel/float8.py): which Linear layers run in FP8, the start-up refusals, unchanged
checkpoints, and (GPU, `pytest -m gpu`) FP8 against bf16 for every attention variant.

The layer choice and the config checks run without torchao (CI installs without it); tests that convert a model skip
without it. On CPU, torchao's emulation (`emulate=True`: the same FP8 casts, the matmul in high precision) stands in
for the FP8 GEMMs.

Legend: B batch, N sequence.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

from cli_runs import compose_cfg
from diffv2.config import AttentionConfig, ModelConfig
from diffv2.model.transformer import Transformer
from diffv2.parallel import float8
from diffv2.parallel.float8 import check_fp8, fp8_compatible, fp8_filter, fp8_gains
from diffv2.train.validate import validate

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (the fp8 extra)")
VARIANTS = ("diffv2", "baseline", "diffv1")

# FP8 against bf16, relative Frobenius errors. e4m3 keeps 3 mantissa bits: a cast's rounding error is <= 2^-4, RMS
# ~2^-4/sqrt(3) = 3.6%, so a GEMM of two cast operands is off by ~sqrt(2) x 3.6% = 5%; gradients also pass through
# e5m2 (2 mantissa bits, RMS ~7%), ~10%. Measured with torchao's emulation on this 2-layer model (CPU, bf16 autocast
# reference): final hidden states 5-7%, weight gradients 8-14%, DIFF V1's lambda vectors (sums over every head's
# scores) up to 24%, the loss 3e-4. The bounds are twice that: a wrong scale, a transposed operand or a dropped
# gradient path is off by O(1).
HIDDEN_BOUND, WEIGHT_GRAD_BOUND, VECTOR_GRAD_BOUND, LOSS_BOUND = 0.12, 0.25, 0.5, 5e-3


def small_cfg(variant: str = "diffv2", d_model: int = 256, head_dim: int = 32) -> ModelConfig:
    """Every dimension a multiple of 16, lambda_proj (d_model -> 16) included: only its name keeps it in bf16."""
    return ModelConfig(d_model=d_model, n_layers=2, n_heads=16, n_kv_heads=4, head_dim=head_dim,
                       ffn_hidden=3 * d_model, vocab_size=384, max_seq_len=256, attention=AttentionConfig(variant=variant))


def linear_names(model: nn.Module, kind: type = nn.Linear) -> set[str]:
    return {fqn.split(".", 2)[-1] if fqn.startswith("blocks.") else fqn
            for fqn, m in model.named_modules() if isinstance(m, kind)}


def chosen(model: nn.Module, module_filter) -> set[str]:
    return {fqn.split(".", 2)[-1] for fqn, m in model.named_modules() if module_filter(m, fqn)}


# --- which layers (pure functions of module and name: no torchao) ---

def test_lambda_projection_lm_head_and_router_are_never_fp8():
    model = Transformer(small_cfg())
    assert model.blocks[0].attn.lambda_proj.out_features % 16 == 0  # so its name alone keeps it out
    assert chosen(model, fp8_compatible) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    router = nn.Linear(256, 64, bias=False)
    assert not fp8_compatible(router, "blocks.0.mlp.router")
    assert not fp8_compatible(model.lm_head, "lm_head") and not fp8_compatible(model.embed, "embed")


def test_sizes_not_multiple_of_16_stay_bf16():
    assert fp8_compatible(nn.Linear(256, 32), "blocks.0.attn.q_proj")
    assert not fp8_compatible(nn.Linear(256, 24), "blocks.0.attn.q_proj")
    assert not fp8_compatible(nn.Linear(200, 256), "blocks.0.mlp.down_proj")


def test_layers_too_small_to_gain_stay_bf16_at_1b():
    """The 1b preset (D 2048, 32 heads of 64, 8 KV heads, FFN 8192) under torchao's H100 thresholds."""
    with torch.device("meta"):
        model = Transformer(compose_cfg("model=1b").model)
    assert chosen(model, fp8_filter("tensorwise")) == {"attn.q_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "mlp.down_proj"}  # k/v: 2048 -> 512
    assert chosen(model, fp8_filter("rowwise")) == {"mlp.gate_proj", "mlp.up_proj"}  # DIFF V2's q_proj: 2048 -> 4096


@needs_torchao
def test_size_thresholds_are_torchaos():
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    for recipe in ("tensorwise", "rowwise"):
        theirs = _auto_filter_for_recipe(recipe, filter_fqns=[])
        for k in (512, 1024, 1040, 2048, 2064, 4096, 4112, 8192):
            for n in (512, 1024, 1040, 2048, 2064, 4096, 4112, 8192):
                assert fp8_gains(recipe, k, n) == theirs(nn.Linear(k, n, device="meta"), "x"), (recipe, k, n)


# --- start-up refusals: one line each, before any expensive work ---

@pytest.mark.parametrize("overrides, world_size, message", [
    (["trainer.fp8=e4m3"], 1, "trainer.fp8='e4m3' is not one of off, tensorwise, rowwise"),
    (["trainer.fp8=tensorwise", "trainer.precision=fp32"], 1, "set trainer.precision=bf16"),
    (["trainer.fp8=rowwise", "trainer.device=cpu"], 1, "needs an H100-class GPU (SM89+), not trainer.device=cpu"),
    (["trainer.fp8=tensorwise", "parallel.engine=deepspeed"], 2, "not supported with parallel.engine=deepspeed"),
    (["trainer.fp8=tensorwise", "trainer.bf16_weights=true"], 1, "set trainer.bf16_weights=false"),
], ids=["recipe", "fp32", "cpu", "deepspeed", "bf16_weights"])
def test_bad_fp8_config_is_one_line(overrides, world_size, message):
    with pytest.raises(ValueError) as err:
        validate(compose_cfg(*overrides), world_size=world_size)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fp8_config_that_can_run_passes_validation():
    validate(compose_cfg("trainer.fp8=tensorwise", "trainer.precision=bf16"), world_size=1)
    validate(compose_cfg("trainer.fp8=rowwise", "parallel.tp=2"), world_size=2)  # composes with TP


def test_off_needs_nothing():
    check_fp8("off", torch.device("cpu"))


def test_no_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr(float8.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"install the fp8 extra: pip install -e '\.\[fp8\]'"):
        check_fp8("tensorwise", torch.device("cuda"))


def test_no_gpu_or_an_old_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(float8.importlib.util, "find_spec", lambda name: object())  # torchao "installed"
    with pytest.raises(ValueError, match=r"needs an H100-class GPU \(SM89\+\); this run is on cpu"):
        check_fp8("tensorwise", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"SM89\+\); NVIDIA A100 is SM80: set trainer.fp8=off"):
        check_fp8("rowwise", torch.device("cuda"))


# --- conversion (torchao; its emulation on CPU) ---

def emulated(recipe: str, fsdp: bool = False):
    return dataclasses.replace(float8.float8_config(recipe, fsdp), emulate=True)


@needs_torchao
@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fp8_all_gather"])
def test_checkpoint_keys_shapes_and_dtypes_do_not_change(fsdp):
    def build(seed: int, fp8: bool) -> Transformer:
        torch.manual_seed(seed)
        model = Transformer(small_cfg())
        if fp8:
            float8.convert(model, emulated("tensorwise", fsdp), fp8_compatible)
        return model

    plain, converted = build(0, fp8=False), build(0, fp8=True)
    assert type(converted.blocks[0].attn.q_proj).__name__ == "Float8Linear"
    before, after = plain.state_dict(), converted.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in before.items()] == [(k, v.shape, v.dtype) for k, v in after.items()]
    # Resume across trainer.fp8 switched on or off: each loads the other's state dict strictly, into other weights.
    converted_resumed, plain_resumed = build(1, fp8=True), build(1, fp8=False)
    converted_resumed.load_state_dict(before)
    plain_resumed.load_state_dict(after)
    for k, v in before.items():
        assert torch.equal(converted_resumed.state_dict()[k], v) and torch.equal(plain_resumed.state_dict()[k], v), k


@needs_torchao
def test_meta_init_draws_the_weights_of_a_normal_build():
    """parallel.meta_init: converted on the meta device (step 0), materialised after sharding (step 6)."""
    from diffv2.parallel.parallelize import materialize_model

    torch.manual_seed(0)
    normal = Transformer(small_cfg())
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(small_cfg())
    float8.convert(model, emulated("tensorwise", fsdp=True), fp8_compatible)
    materialize_model(model, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), normal.state_dict().values()))


@needs_torchao
def test_parallelize_converts_in_step_0(monkeypatch):
    from torchao.float8.float8_linear import Float8Linear

    from diffv2.parallel.parallelize import parallelize

    monkeypatch.setattr(float8, "check_fp8", lambda recipe, device: None)  # a CPU stands in for the GPU
    cfg = compose_cfg("trainer.fp8=tensorwise")
    cfg.model = small_cfg(d_model=1024, head_dim=64)  # tensorwise gains from N > 1024: q_proj (2048), gate/up (3072)
    model = Transformer(cfg.model)
    parallelize(model, cfg, torch.device("cpu"))
    assert linear_names(model, Float8Linear) == {"attn.q_proj", "mlp.gate_proj", "mlp.up_proj"}
    assert not model.embed._forward_pre_hooks  # one process: no FSDP2, no FP8 all-gather scales


@needs_torchao
def test_fp8_all_gather_scales_are_refreshed_before_every_forward(monkeypatch):
    monkeypatch.setattr(float8, "check_fp8", lambda recipe, device: None)
    calls = []
    monkeypatch.setattr(float8, "refresh_scales", lambda model: calls.append(model))
    model = Transformer(small_cfg())
    float8.apply_float8(model, "tensorwise", torch.device("cpu"), fsdp=True, compiled=True)
    model.embed(torch.zeros(1, 4, dtype=torch.long))
    assert calls == [model]
    rowwise = Transformer(small_cfg())
    float8.apply_float8(rowwise, "rowwise", torch.device("cpu"), fsdp=True, compiled=True)
    assert not rowwise.embed._forward_pre_hooks  # torchao gathers rowwise weights in bf16: no scales to refresh


def fp8_against_bf16(variant: str, recipe: str, device: str, config) -> None:
    """One training forward/backward of a 2-layer model in bf16 autocast, converted and not; asserts the bounds."""
    torch.manual_seed(0)
    ref = Transformer(small_cfg(variant)).to(device)
    fp8 = copy.deepcopy(ref)
    converted = float8.convert(fp8, config, fp8_compatible)
    assert len(converted) == 7 * 2 and not any(n.endswith(("lambda_proj", "lm_head")) for n in converted)
    for module in (fp8.lm_head, *(b.attn.lambda_proj for b in fp8.blocks if b.attn.lambda_proj is not None)):
        assert type(module) is nn.Linear
    tokens_BN = torch.randint(0, 384, (2, 129), device=device)
    results = []
    for model in (ref, fp8):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model.loss(tokens_BN[:, :-1], tokens_BN[:, 1:])[0]
            hidden = model.hidden(tokens_BN[:, :-1]).detach()
        loss.backward()
        results.append((loss.detach(), hidden, dict(model.named_parameters())))
    (loss_ref, hidden_ref, params_ref), (loss_fp8, hidden_fp8, params_fp8) = results
    assert abs(loss_fp8 - loss_ref).item() <= LOSS_BOUND * loss_ref.item()
    assert rel_err(hidden_fp8, hidden_ref) <= HIDDEN_BOUND
    for name, p in params_ref.items():
        bound = WEIGHT_GRAD_BOUND if p.ndim == 2 else VECTOR_GRAD_BOUND
        assert torch.isfinite(params_fp8[name].grad).all() and rel_err(params_fp8[name].grad, p.grad) <= bound, name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_torchao
def test_emulated_fp8_stays_within_the_bounds_on_cpu():
    fp8_against_bf16("diffv2", "tensorwise", "cpu", emulated("tensorwise"))


# --- tensor parallelism: 2 gloo ranks, emulated FP8 ---

TP_CASES = [(variant, recipe) for variant in VARIANTS for recipe in ("tensorwise", "rowwise")]


def tp_cfg(variant: str) -> ModelConfig:
    """Every Linear a multiple of 16; 4 KV heads so that DIFF V1 (tp | n_kv_heads/2) shards too."""
    return ModelConfig(d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16, ffn_hidden=96, vocab_size=64,
                       max_seq_len=32, attention=AttentionConfig(variant=variant))


def _tp_worker(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    from diffv2.parallel.parallelize import parallelize
    from diffv2.parallel.tensor import head_shared, sum_head_shared_grads

    # parallelize's own path (step 0 converts, step 1 shards), with the CPU standing in for an SM89+ GPU:
    # torchao's emulated FP8 casts, and every FP8-compatible layer converted (the size rule would skip them all)
    float8.check_fp8 = lambda recipe, device: None
    make_config = float8.float8_config
    float8.float8_config = lambda recipe, fsdp: dataclasses.replace(make_config(recipe, fsdp), emulate=True)
    float8.fp8_filter = lambda recipe: fp8_compatible
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    for variant, recipe in TP_CASES:
        torch.manual_seed(0)
        ref = Transformer(tp_cfg(variant))
        model = copy.deepcopy(ref)
        float8.convert(ref, emulated(recipe), fp8_compatible)  # tp=1, FP8
        cfg = compose_cfg(f"trainer.fp8={recipe}", "parallel.tp=2")
        layout = parallelize(model, cfg, torch.device("cpu"))
        q_proj = model.blocks[0].attn.q_proj
        assert type(q_proj).__name__ == "Float8Linear" and isinstance(q_proj.weight, DTensor), variant
        assert not q_proj.config.enable_fsdp_float8_all_gather  # FSDP2 gathers bf16 under TP
        g = torch.Generator().manual_seed(1)
        tokens_BN = torch.randint(0, 64, (2, 17), generator=g)
        losses = []
        for m in (ref, model):
            loss = m.loss(tokens_BN[:, :-1], tokens_BN[:, 1:])[0]
            loss.backward()
            losses.append(loss.detach())
        params = dict(model.named_parameters())
        sum_head_shared_grads([params[n] for n in head_shared(model)], layout.mesh["tp"].get_group())
        torch.testing.assert_close(full(losses[1]), losses[0], rtol=1e-5, atol=1e-6)
        want = dict(ref.named_parameters())
        for name, p in params.items():  # the same FP8 casts (scales of whole tensors), other summation order
            torch.testing.assert_close(full(p.grad), want[name].grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda msg: f"{variant} {recipe} {name}: {msg}")


@needs_torchao
def test_tensor_parallel_fp8_equals_one_rank_fp8():
    """trainer.fp8 with parallel.tp=2 through parallelize gives the loss and gradients of the unsharded FP8 model,
    for DIFF V2, the baseline and DIFF V1, both recipes. The plain TP styles shard the FP8 layers: a tensorwise
    scale is the amax of the whole DTensor (reduced over the shards), so every cast equals tp=1's."""
    from gloo import spawn

    spawn(_tp_worker, 2)


# --- GPU: the FP8 GEMMs themselves ---

def fp8_gpu_problem() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if not HAS_TORCHAO:
        return "torchao is not installed (the fp8 extra)"
    if torch.cuda.get_device_capability() < (8, 9):
        return "FP8 GEMMs need SM89+"
    return None


on_fp8_gpu = pytest.mark.skipif(fp8_gpu_problem() is not None, reason=str(fp8_gpu_problem()))


@pytest.mark.gpu
@on_fp8_gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_matches_bf16_within_bounds_on_gpu(variant, recipe):
    fp8_against_bf16(variant, recipe, "cuda", float8.float8_config(recipe, fsdp=False))


@pytest.mark.gpu
@on_fp8_gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_fp8_training_step_on_gpu(recipe):
    """The trainer's path: parallelize's step 0 with the size rule, compiled blocks, a finite step."""
    from torchao.float8.float8_linear import Float8Linear

    from diffv2.parallel.parallelize import parallelize

    cfg = compose_cfg(f"trainer.fp8={recipe}", "trainer.compile=true")
    cfg.model = small_cfg(d_model=2048, head_dim=128)  # both recipes convert at least gate/up (2048 -> 6144)
    torch.manual_seed(0)
    model = Transformer(cfg.model).cuda()
    parallelize(model, cfg, torch.device("cuda"))
    assert {"mlp.gate_proj", "mlp.up_proj"} <= linear_names(model, Float8Linear)
    assert "lm_head" not in linear_names(model, Float8Linear)
    tokens_BN = torch.randint(0, 384, (2, 257), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(tokens_BN[:, :-1], tokens_BN[:, 1:])[0]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
