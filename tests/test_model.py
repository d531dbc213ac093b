"""Model-library tests beyond the spec's §8 list: combine precision (A5), DIFF V1 (§3, A24), QK-norm (A8), the fused
chunked cross-entropy, `Transformer.loss`, initialization (A3/A4), tied embeddings, parameter / FLOP accounting
(§5, A2) and document masking (A9). References are tests/reference.py (fp64) or plain autograd on full logits.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffv2.infer.fused_combine import FusedCombine, _compiled_combine  # noqa: E402
from diffv2.model.attention import Attention, combine, lambda_init  # noqa: E402
from diffv2.config import AttentionConfig, ModelConfig  # noqa: E402
from diffv2.model.flops import attention_core_flops, attention_params, count, mlp_params  # noqa: E402
from diffv2.model.heads import validate_heads  # noqa: E402
from diffv2.model.kernels import causal_attention, doc_ids_from_tokens, resolve_backend  # noqa: E402
from diffv2.model.loss import linear_cross_entropy  # noqa: E402
from diffv2.model.transformer import Transformer  # noqa: E402
from diffv2.parallel.parallelize import materialize_model  # noqa: E402
from tests.builders import with_attention  # noqa: E402
from tests import reference as ref  # noqa: E402
from tests.builders import make_attention, model_cfg  # noqa: E402
from tests.reference import assert_rel_close, weights  # noqa: E402

FLEX_WARNING = "ignore:flex_attention called without torch.compile"


def reference_forward(m: Attention, x, W=None, **kw):
    a = m.cfg
    return ref.attention(x.double(), W if W is not None else weights(m), variant=a.variant, n_heads=m.n_out,
                         n_kv_heads=m.n_kv, head_dim=m.head_dim, theta=a.rope_theta, rope_style=a.rope_style,
                         lambda_mode=a.lambda_mode, pairing=a.pairing, norm_eps=1e-6, depth=m.layer_idx, **kw)


def record(m: Attention) -> dict:
    stats: dict = {}
    m.observer = lambda layer_idx, s: stats.update(s)
    return stats


def tiny_cfg(variant="diffv2", attn=None, **kw) -> ModelConfig:
    base = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden=256, vocab_size=101,
                max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base, attention=AttentionConfig(variant=variant, **(attn or {})))


# =============================================================================================== combine precision
def test_combine_fp32_closer_to_fp64_than_activation_dtype():
    """A5: in bf16, the fp32 combination (combine_fp32=True) differs from the bf16 one and is closer to the fp64
    combination of the same kernel outputs; its only error is the final bf16 rounding. In fp32 the flag is a no-op."""
    B, N, h, h_kv, d = 2, 64, 8, 2, 64
    torch.manual_seed(0)
    q = torch.randn(B, N, 2 * h, d)
    q[:, :, 1::2] = q[:, :, 0::2] + 0.1 * torch.randn(B, N, h, d)  # near-identical pairs: cancellation regime
    k, v = torch.randn(2, B, N, h_kv, d)
    lam = torch.empty(B, N, h).uniform_(2.0, 5.0)  # sigma in (0.88, 0.994), where bf16 sigmoid has 2^-8 steps
    qb, kb, vb, lb = (t.bfloat16() for t in (q, k, v, lam))
    out, maps = {}, {}
    for fp32 in (True, False):
        m = make_attention(256, h, h_kv, d, dtype=torch.bfloat16, combine_fp32=fp32)
        stats = record(m)
        out[fp32] = m.core(qb, kb, vb, lb).double()
        maps[fp32] = (stats["attn1"], stats["attn2"])
    assert all(torch.equal(a, b) for a, b in zip(maps[True], maps[False]))  # same kernel output, only combine differs
    a1, a2 = (t.double() for t in maps[True])
    exact = a1 - torch.sigmoid(lb.double())[..., None] * a2
    err32, err16 = (out[True] - exact).abs(), (out[False] - exact).abs()
    assert not torch.equal(out[True], out[False])
    assert err32.mean() < 0.5 * err16.mean(), (err32.mean().item(), err16.mean().item())
    # only the final rounding to bf16 (half an ulp = 2^-9 relative, with margin) plus fp32 arithmetic
    assert (err32 <= 2.0 ** -8 * exact.abs() + 1e-6 * (a1.abs() + a2.abs())).all()
    # Against the full fp64 reference (kernel error included) fp32 combination is still closer.
    full = ref.diffv2_core(qb.double(), kb.double(), vb.double(), lb.double())
    assert (out[True] - full).abs().mean() < (out[False] - full).abs().mean()
    # fp32 activations: both flags compute the same thing.
    a1f, a2f, lf = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4)
    assert torch.equal(combine(a1f, a2f, lf, "sigmoid", True)[0], combine(a1f, a2f, lf, "sigmoid", False)[0])


def test_combine_fp32_flag_changes_bf16_module_output():
    """A5: the flag is wired through the module (bf16 outputs differ between combine_fp32 True / False)."""
    x = torch.randn(2, 33, 256).bfloat16()
    y = [make_attention(256, 4, 2, 64, dtype=torch.bfloat16, combine_fp32=f)(x) for f in (True, False)]
    assert not torch.equal(y[0], y[1])


@pytest.mark.parametrize("lambda_mode", ["sigmoid", "raw", "none"])
def test_fused_combine_matches_eager_on_strided_pair_views(lambda_mode):
    """The compiled combine that GPU inference uses (one kernel, fp32 inside; only with combine_fp32, the default)
    gives the eager result on the module's strided pair views within one bf16 rounding step (the compiler's fp32
    sigmoid may differ in the last fp32 bit), for every lambda mode; and λ's scale. Run on CPU here (the same
    compiled function)."""
    fp32 = True
    torch.manual_seed(0)
    attn_BNQD = torch.randn(3, 5, 8, 16).bfloat16()
    lam_BNH = torch.randn(3, 5, 4).bfloat16()
    a1, a2 = attn_BNQD[:, :, 0::2], attn_BNQD[:, :, 1::2]
    fused = FusedCombine()
    assert fused(a1, a2, lam_BNH, lambda_mode, fp32)[0].equal(combine(a1, a2, lam_BNH, lambda_mode, fp32)[0]), \
        "off a GPU FusedCombine is the eager function"
    ctx, scale = _compiled_combine()(a1, a2, lam_BNH, lambda_mode, fp32)
    ctx_ref, scale_ref = combine(a1, a2, lam_BNH, lambda_mode, fp32)
    assert ctx.dtype == ctx_ref.dtype == torch.bfloat16 and ctx.shape == ctx_ref.shape == (3, 5, 4, 16)
    torch.testing.assert_close(ctx.float(), ctx_ref.float(), rtol=2**-7, atol=1e-6)
    assert (ctx.float() - ctx_ref.float()).abs().max() <= 2**-7 * ctx_ref.float().abs().max()
    if lambda_mode == "none":
        assert scale is None and scale_ref is None
    else:
        torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=1e-7)


# ========================================================================================================= DIFF V1
@pytest.mark.parametrize("depth,expected", [(0, 0.200), (1, 0.3555), (5, 0.6661), (10, 0.7701)])
def test_diffv1_lambda_init_schedule(depth, expected):
    """§3: lambda_init = 0.8 - 0.6 exp(-0.3 depth), depth = 0-based layer index."""
    assert round(lambda_init(depth), 4) == pytest.approx(expected, abs=1e-12)
    m = make_attention(128, 4, 2, 32, variant="diffv1", layer_idx=depth)
    assert m.lambda_init == pytest.approx(ref.diffv1_lambda_init(depth), abs=1e-15)
    model = Transformer(tiny_cfg("diffv1", n_layers=3))
    assert [b.attn.lambda_init for b in model.blocks] == pytest.approx([ref.diffv1_lambda_init(i) for i in range(3)])


def test_diffv1_parameters():
    """§3 / §5.1: V1 has the baseline's projections (V as h_kv/2 heads of 2d), four d-vectors lambda_{q1,k1,q2,k2},
    one shared 2d subln weight and no lambda_proj: baseline + 6d parameters."""
    D, h, h_kv, d = 256, 4, 2, 64
    m = make_attention(D, h, h_kv, d, variant="diffv1")
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"q_proj.weight": (h * d, D), "k_proj.weight": (h_kv * d, D), "v_proj.weight": (h_kv * d, D),
                      "o_proj.weight": (D, h * d), "lambda_q1": (d,), "lambda_k1": (d,), "lambda_q2": (d,),
                      "lambda_k2": (d,), "subln.weight": (2 * d,)}
    base = attention_params(model_cfg(D, h, h_kv, d, variant="baseline"))
    assert attention_params(model_cfg(D, h, h_kv, d, variant="diffv1")) == base + 6 * d == sum(
        p.numel() for p in m.parameters())


V1_GRID = [(2, 37, 256, 4, 2, 64), (1, 128, 512, 8, 8, 64), (1, 257, 1024, 16, 4, 64)]


@pytest.mark.parametrize("B,N,D,h,h_kv,d", V1_GRID, ids=[f"h{g[3]}-kv{g[4]}" for g in V1_GRID])
@pytest.mark.parametrize("depth", [0, 5])
def test_diffv1_matches_reference(B, N, D, h, h_kv, d, depth):
    """§3 / A24: DIFF V1 (flash semantics: q1/k1 = even heads, q2/k2 = odd heads, V of width 2d, scalar
    lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init, shared-affine subln, x (1 - lambda_init)) matches the fp64
    reference in value and in gradients w.r.t. x and every parameter (fp32: 1e-5 / 1e-4 relative)."""
    m = make_attention(D, h, h_kv, d, variant="diffv1", layer_idx=depth)
    torch.manual_seed(1)
    x = torch.randn(B, N, D, requires_grad=True)
    g = torch.randn(B, N, D)
    y = m(x)
    W = {k: v.clone().requires_grad_(True) for k, v in weights(m).items()}
    x64 = x.detach().double().requires_grad_(True)
    y_ref, _ = reference_forward(m, x64, W=W)
    assert_rel_close(y, y_ref, 1e-5, 1e-6, "V1 forward")
    (y * g).sum().backward()
    (y_ref * g.double()).sum().backward()
    assert_rel_close(x.grad, x64.grad, 1e-4, 0.0, "dL/dx")
    for name, p in m.named_parameters():
        assert_rel_close(p.grad, W[name.removesuffix(".weight")].grad, 1e-4, 0.0, f"dL/d{name}")


def test_diffv1_gqa_uses_flash_pairing_not_naive():
    """A24: under GQA (n_rep > 1) V1 follows the flash versions, not `multihead_diffattn.py`'s repeat_kv pairing
    (which the reference below reproduces and which gives a different output)."""
    B, N, D, h, h_kv, d = 1, 40, 512, 8, 2, 64  # H = 4, H_kv = 1, n_rep = 4
    m = make_attention(D, h, h_kv, d, variant="diffv1", layer_idx=3)
    x = torch.randn(B, N, D)
    y = m(x).double()
    W = weights(m)
    y_ref, inter = reference_forward(m, x)
    assert_rel_close(y, y_ref, 1e-5, 1e-6, "flash semantics")
    # naive: repeat the 2 H_kv interleaved key heads n_rep times, then split q/k into 0::2 / 1::2
    q, k, v = inter["q"], inter["k"], inter["v"]
    n_rep = (h // 2) // (h_kv // 2)
    k_rep, v_rep = k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
    li = ref.diffv1_lambda_init(3)
    lam = ref.diffv1_lambda(W["lambda_q1"], W["lambda_k1"], W["lambda_q2"], W["lambda_k2"], li)
    heads = []
    for i in range(h // 2):
        p1 = ref.attention_map(q[:, :, 2 * i], k_rep[:, :, 2 * i])
        p2 = ref.attention_map(q[:, :, 2 * i + 1], k_rep[:, :, 2 * i + 1])
        heads.append(ref.rms_norm(ref.apply_map(p1 - lam * p2, v_rep[:, :, i]), W["subln"], 1e-5) * (1 - li))
    y_naive = ref.linear(torch.stack(heads, 2).reshape(B, N, -1), W["o_proj"])
    assert (y - y_naive).abs().max() > 1e-2 * y_naive.abs().max()


@pytest.mark.parametrize("h,h_kv", [(8, 1), (6, 4), (5, 5)])
def test_diffv1_rejects_odd_head_layouts(h, h_kv):
    """§3: V1 uses h/2 and h_kv/2 heads, so both must be even with h_kv/2 dividing h/2 (one-line ValueError)."""
    with pytest.raises(ValueError, match=rf"n_heads={h}, n_kv_heads={h_kv}") as exc:
        validate_heads(model_cfg(64 * h, h, h_kv, 64, variant="diffv1"))
    assert "\n" not in str(exc.value)


# ========================================================================================================= QK-norm
VARIANT_ATTN = {"diffv2": {}, "baseline": {"variant": "baseline"}, "diffv1": {"variant": "diffv1"}}


@pytest.mark.parametrize("variant", list(VARIANT_ATTN))
def test_qk_norm_before_rope_in_every_variant(variant):
    """A8: qk_norm is the same per-head RMSNorm over d (eps = norm_eps, own affine) on q and k, applied before RoPE,
    in every variant; the whole layer matches the reference."""
    B, N, D, h, h_kv, d = 2, 29, 256, 4, 2, 64
    m = make_attention(D, h, h_kv, d, qk_norm=True, **VARIANT_ATTN[variant])
    assert m.q_norm.weight.shape == m.k_norm.weight.shape == (d,)
    assert m.q_norm.eps == m.k_norm.eps == 1e-6
    seen = {}
    m.rope.register_forward_hook(lambda mod, args, out: seen.setdefault("rope", []).append((args[0], out)))
    x = torch.randn(B, N, D)
    y = m(x)
    y_ref, inter = reference_forward(m, x)
    assert_rel_close(y, y_ref, 1e-5, 1e-6, f"{variant} with qk_norm")
    (q_in, q_out), (k_in, k_out) = seen["rope"]
    assert_rel_close(q_in, inter["q_pre_rope"], 1e-5, 1e-6, "q normalized before RoPE")
    assert_rel_close(k_in, inter["k_pre_rope"], 1e-5, 1e-6, "k normalized before RoPE")
    assert_rel_close(q_out, inter["q"], 1e-5, 1e-6, "q rotated after the norm")
    # not vacuous: with a non-uniform affine, norm-after-RoPE is a different tensor
    W = weights(m)
    q_raw = ref.linear(x.double(), W["q_proj"]).view(B, N, -1, d)
    after = ref.rms_norm(ref.rope(q_raw, 10000.0, "interleaved"), W["q_norm"], 1e-6)
    assert (after - inter["q"]).abs().max() > 1e-2 * after.abs().max()
    cfg = model_cfg(D, h, h_kv, d, qk_norm=True, **VARIANT_ATTN[variant])
    n_real = sum(p.numel() for p in m.parameters())
    assert attention_params(cfg) == n_real == attention_params(with_attention(cfg, qk_norm=False)) + 2 * d


# ================================================================================================== cross-entropy
def reference_ce(h_TM, w_VM, labels_T, z_coef):
    logits = h_TM @ w_VM.T
    ce = F.cross_entropy(logits, labels_T)
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return ce + z_coef * z, ce, z


@pytest.mark.parametrize("chunk", [16, 37, 74, 8192], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("z_coef", [0.0, 1e-2])
def test_linear_cross_entropy_matches_full_logits(chunk, z_coef):
    """The fused chunked lm_head + CE (+ z-loss) equals F.cross_entropy on full logits (+ coef * mean logsumexp^2)
    in value and in gradients w.r.t. h and the weight; chunk 16 does not divide the 74 tokens."""
    torch.manual_seed(0)
    T, M, V = 74, 48, 97
    h = (torch.randn(T, M) * 2).requires_grad_(True)
    w = torch.randn(V, M).requires_grad_(True)
    y = torch.randint(0, V, (T,))
    loss, ce, z = linear_cross_entropy(h, w, y, chunk, z_coef)
    (1.7 * loss).backward()  # non-unit upstream gradient
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    loss_r, ce_r, z_r = reference_ce(h64, w64, y, z_coef)
    (1.7 * loss_r).backward()
    assert loss.item() == pytest.approx(loss_r.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ce_r.item(), rel=1e-5) and z.item() == pytest.approx(z_r.item(), rel=1e-5)
    assert_rel_close(h.grad, h64.grad, 1e-5, 0.0, "dL/dh")
    assert_rel_close(w.grad, w64.grad, 1e-5, 0.0, "dL/dW")
    assert not ce.requires_grad and not z.requires_grad


def test_linear_cross_entropy_under_autocast_keeps_the_weight_gradient_in_fp32():
    """bf16 autocast: the matmuls run in bf16, but the fp32 weight's gradient is the fp32 sum over chunks handed to
    the parameter as it is (not rounded to bf16 and cast back); it matches fp64 math on the bf16-rounded inputs."""
    torch.manual_seed(0)
    T, M, V = 96, 64, 128
    h = torch.randn(T, M).requires_grad_(True)
    w = (torch.randn(V, M) * 0.5).requires_grad_(True)
    y = torch.randint(0, V, (T,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, 32)[0]
    loss.backward()
    assert w.grad.dtype == torch.float32
    assert not torch.equal(w.grad, w.grad.bfloat16().float())  # more bits than a bf16 round trip keeps
    h64 = h.detach().bfloat16().double().requires_grad_(True)
    w64 = w.detach().bfloat16().double().requires_grad_(True)
    reference_ce(h64, w64, y, 0.0)[0].backward()
    assert_rel_close(w.grad, w64.grad, 2e-2, 0.0, "dL/dW")  # bf16 logits and chunk gradients, fp32 sums


@pytest.mark.parametrize("variant", list(VARIANT_ATTN))
def test_transformer_loss_equals_ce_of_forward_logits(variant):
    """`Transformer.loss` = CE (+ z-loss) of `Transformer.forward`'s logits, in value and every parameter gradient."""
    torch.manual_seed(0)
    cfg = tiny_cfg(variant, z_loss=1e-3, ce_chunk=16)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 37))
    labels = torch.randint(0, cfg.vocab_size, (2, 37))
    loss, ce, z = model.loss(tokens, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens).flatten(0, 1)
    ce_r = F.cross_entropy(logits, labels.flatten())
    z_r = torch.logsumexp(logits, -1).square().mean()
    (ce_r + cfg.z_loss * z_r).backward()
    assert ce.item() == pytest.approx(ce_r.item(), rel=1e-5) and z.item() == pytest.approx(z_r.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce_r + cfg.z_loss * z_r).item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert_rel_close(grads[n], p.grad, 1e-4, 1e-9, n)


# ============================================================================================================ init
def expected_init(name: str, cfg: ModelConfig):
    """("normal", std) or ("ones",) for every parameter: the single rule table for all variants (A3/A4)."""
    if name.endswith(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")):
        return ("normal", 0.1)  # DIFF V1 reference init
    if "norm" in name or "subln" in name:
        return ("ones",)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return ("normal", cfg.init_std / math.sqrt(2 * cfg.n_layers))
    return ("normal", cfg.init_std)  # embed, lm_head, q/k/v, lambda_proj (same as q_proj), gate/up


def check_normal(x: torch.Tensor, std: float, what: str):
    x = x.double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 5 * std / math.sqrt(n), f"{what}: mean {x.mean().item():.2e}"
    s = x.std().item()
    assert abs(s / std - 1) < 5 / math.sqrt(2 * n) + 1e-3, f"{what}: std {s:.4e} vs {std:.4e}"
    kurt = ((x - x.mean()) ** 4).mean().item() / s ** 4  # 3 for a normal, 1.8 for a uniform
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n), f"{what}: kurtosis {kurt:.2f}"


@pytest.mark.parametrize("variant", list(VARIANT_ATTN))
def test_init_distribution(variant):
    """Init (A3/A4): every matrix ~ N(0, 0.02); o_proj / down_proj ~ N(0, 0.02 / sqrt(2L)); norm weights 1; V1 lambda
    vectors N(0, 0.1^2); the same rule table for every variant, lambda_proj as q_proj (statistical check)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=4, attention=AttentionConfig(**VARIANT_ATTN[variant]))  # the tiny preset
    model = Transformer(cfg)
    pooled: dict = {}
    for name, p in model.named_parameters():
        key = ".".join(part for part in name.split(".") if not part.isdigit())  # pool the layers
        pooled.setdefault(key, []).append(p.detach().flatten())
    assert pooled, "no parameters"
    for key, tensors in pooled.items():
        x = torch.cat(tensors)
        rule = expected_init(key, cfg)
        if rule[0] == "ones":
            assert torch.equal(x, torch.ones_like(x)), key
        else:
            check_normal(x, rule[1], key)
    if variant == "diffv2":
        assert expected_init("blocks.attn.lambda_proj.weight", cfg) == expected_init("blocks.attn.q_proj.weight", cfg)
    # not vacuous: PyTorch's default init (kaiming-uniform, spec §2.1) is rejected by the check
    with pytest.raises(AssertionError):
        check_normal(torch.nn.Linear(256, 512).weight.detach(), 0.02, "default init")


def test_init_without_residual_scaling():
    """scale_residual_init=False gives o_proj / down_proj the plain init_std."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=4, scale_residual_init=False, init_std=0.03))
    o = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks])
    check_normal(o.detach(), 0.03, "o_proj")


# ============================================================================================ embeddings / counts
def test_tied_embeddings_share_weight():
    """tie_embeddings: lm_head is the embedding matrix (same storage), logits = h E^T, one gradient from both uses."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tie_embeddings=True))
    assert model.lm_head is None and model.lm_head_weight is model.embed.weight
    untied = Transformer(tiny_cfg())
    n = lambda mdl: sum(p.numel() for p in mdl.parameters())  # noqa: E731
    assert n(untied) - n(model) == 101 * 128
    tokens = torch.randint(0, 101, (2, 11))
    logits = model(tokens)
    torch.testing.assert_close(logits, model.hidden(tokens) @ model.embed.weight.T)
    model.loss(tokens, tokens)[0].backward()
    assert model.embed.weight.grad is not None
    unused = torch.ones(101, dtype=torch.bool)
    unused[tokens.unique()] = False
    assert model.embed.weight.grad[unused].abs().sum() > 0  # lm_head gradient reaches rows never looked up


COUNT_CASES = {
    "diffv2": tiny_cfg(),
    "baseline": tiny_cfg("baseline"),
    "baseline_1.5h": tiny_cfg("baseline", {"head_multiplier": 1.5}),
    "baseline_2h": tiny_cfg("baseline", {"head_multiplier": 2.0}),
    "diffv1": tiny_cfg("diffv1"),
    "diffv2_none": tiny_cfg(attn={"lambda_mode": "none"}),
    "diffv2_raw": tiny_cfg(attn={"lambda_mode": "raw"}),
    "diffv2_half_split": tiny_cfg(attn={"pairing": "half_split"}),
    "diffv2_tied": tiny_cfg(tie_embeddings=True),
    "baseline_tied": tiny_cfg("baseline", tie_embeddings=True),
    "diffv2_qk_norm": tiny_cfg(attn={"qk_norm": True}),
    "diffv1_qk_norm": tiny_cfg("diffv1", {"qk_norm": True}),
    "diffv2_param_match": tiny_cfg(param_match=True),
    "diffv1_param_match": tiny_cfg("diffv1", param_match=True),
    "diffv2_param_match_tied_qk": tiny_cfg(attn={"qk_norm": True}, param_match=True, tie_embeddings=True),
    "diffv2_mqa": tiny_cfg(n_kv_heads=1),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_flops_count_equals_real_parameters(case):
    """§5: `flops.count` total / embedding / non-embedding / attention equal the built Transformer's real counts."""
    cfg = COUNT_CASES[case]
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embedding = model.embed.weight.numel() + (0 if model.lm_head is None else model.lm_head.weight.numel())
    attn = sum(p.numel() for b in model.blocks for p in b.attn.parameters())
    c = count(cfg, seq_len=64)
    assert (c.total, c.embedding, c.non_embedding, c.attention) == (total, embedding, total - embedding, attn)


PARAM_MATCH_CFGS = {
    "tiny": ModelConfig(),
    "tiny_qk_norm": ModelConfig(attention=AttentionConfig(qk_norm=True)),
    "spec_5.2": ModelConfig(d_model=2048, n_layers=2, n_heads=16, n_kv_heads=4, head_dim=128, ffn_hidden=5632,
                            vocab_size=32000),
    "mqa": ModelConfig(d_model=512, n_layers=3, n_heads=8, n_kv_heads=1, head_dim=64, ffn_hidden=1536),
}


@pytest.mark.parametrize("name", list(PARAM_MATCH_CFGS))
def test_param_match_within_one_percent(name):
    """A2: param_match shrinks DIFF V2's FFN so its non-embedding parameters are within 1% of the h-head baseline's
    (counted on the built models); without it they differ by more than 1%."""
    cfg = PARAM_MATCH_CFGS[name]

    def non_embedding(c):
        with torch.device("meta"):
            mdl = Transformer(c)
        return sum(p.numel() for n, p in mdl.named_parameters() if not n.startswith(("embed", "lm_head")))

    base = non_embedding(with_attention(cfg, variant="baseline"))
    matched = replace_model(cfg, param_match=True)
    assert abs(non_embedding(matched) - base) <= 0.01 * base
    assert abs(non_embedding(cfg) - base) > 0.01 * base
    with torch.device("meta"):
        assert Transformer(matched).cfg.ffn_hidden < cfg.ffn_hidden
    assert count(matched, 256).non_embedding == non_embedding(matched)


def replace_model(cfg: ModelConfig, **kw) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


SPEC_53 = ModelConfig(d_model=2048, n_heads=16, n_kv_heads=4, head_dim=128)
ARMS_53 = {
    "baseline_h": ({"variant": "baseline"}, 20.97, 16.8, 33.6),
    "diffv2": ({}, 29.43, 33.6, 67.1),
    "baseline_1.5h": ({"variant": "baseline", "head_multiplier": 1.5}, 29.36, None, None),
    "baseline_2h": ({"variant": "baseline", "head_multiplier": 2.0}, 37.75, 33.6, 67.1),
}


@pytest.mark.parametrize("arm", list(ARMS_53))
def test_flops_formula_spec_examples(arm):
    """§5.3 (D=2048, h=16, h_kv=4, d=128): projection MFLOP/token 20.97 / 29.43 / 29.36 / 37.75 = 2 x attention_params;
    attention core 16.8 / 33.6 MFLOP at N=4096 and 33.6 / 67.1 at N=8192 (4 d L_ctx per query head, L_ctx = (N+1)/2)."""
    attn, proj_mflop, core_4096, core_8192 = ARMS_53[arm]
    cfg = with_attention(SPEC_53, **attn)
    assert round(2 * attention_params(cfg) / 1e6, 2) == proj_mflop
    if core_4096 is not None:
        assert round(attention_core_flops(cfg, 4096) / 1e6, 1) == core_4096
        assert round(attention_core_flops(cfg, 8192) / 1e6, 1) == core_8192


@pytest.mark.parametrize("variant", ["diffv2", "baseline"])
def test_flops_per_token_training(variant):
    """§5.3: training FLOPs/token = 3 x forward; forward = 2 x matmul params (layers + lm_head) + L x core
    (+ 2 h d for the DIFF V2 multiply-subtract), recomputed here from the spec's formulas."""
    cfg = ModelConfig(d_model=512, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=64, ffn_hidden=1536, vocab_size=1000,
                      attention=AttentionConfig(variant=variant))
    D, h, kv, d, L, N = 512, 8, 2, 64, 3, 1024
    proj = 2 * D * d * (3 * h + 2 * kv) + 2 * D * h if variant == "diffv2" else 2 * D * d * (2 * h + 2 * kv)
    nq = 2 * h if variant == "diffv2" else h
    core = 4 * nq * d * (N + 1) / 2
    fwd = L * (proj + 2 * 3 * D * 1536 + core + (2 * h * d if variant == "diffv2" else 0)) + 2 * 1000 * D
    assert count(cfg, N).flops_per_token == pytest.approx(3 * fwd, rel=1e-12)
    assert mlp_params(cfg) == 3 * D * 1536


# ==================================================================================================== T9 at model
def test_lambda_reads_same_prenorm_input_as_qkv():
    """T9 / A6: lambda_proj reads exactly the normalized hidden state (attn_norm output) that feeds q/k/v_proj."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    seen: dict = {}
    block = model.blocks[1]
    block.attn_norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm_out", out))
    for name in ("q_proj", "k_proj", "v_proj", "lambda_proj"):
        getattr(block.attn, name).register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0]))
    model(torch.randint(0, 101, (2, 13)))
    for name in ("q_proj", "k_proj", "v_proj", "lambda_proj"):
        assert torch.equal(seen[name], seen["norm_out"]), name


# =================================================================================================== doc masking
def test_doc_ids_from_tokens():
    """A9: document index per token; the EOD token belongs to the document it closes."""
    eod = 0
    tokens = torch.tensor([[5, 3, 0, 7, 0, 0, 1, 2], [0, 4, 4, 4, 4, 0, 9, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 2, 2]])
    assert torch.equal(doc_ids_from_tokens(tokens, eod), expected)


DOC_IDS = torch.tensor([[0] * 11 + [1] * 17 + [2] * 12, [0] * 3 + [1] * 30 + [2] * 7])  # B=2, N=40


@pytest.mark.filterwarnings(FLEX_WARNING)
@pytest.mark.parametrize("backend", ["math", "flex"])
@pytest.mark.parametrize("n_q,n_kv", [(8, 2), (4, 4)])
def test_doc_mask_blocks_cross_document_attention(backend, n_q, n_kv):
    """A9 at the kernel (math and flex on CPU): with doc_ids, each document's output equals running that document
    alone; without them, later documents see earlier ones."""
    torch.manual_seed(0)
    B, N, d = DOC_IDS.shape[0], DOC_IDS.shape[1], 32
    q, k, v = torch.randn(B, N, n_q, d), torch.randn(B, N, n_kv, d), torch.randn(B, N, n_kv, d)
    out = causal_attention(q, k, v, backend, DOC_IDS)
    torch.testing.assert_close(out.double(), ref.gqa_core(q.double(), k.double(), v.double(), DOC_IDS),
                               atol=1e-5, rtol=1e-5)
    plain = causal_attention(q, k, v, backend)
    for b in range(B):
        for doc in DOC_IDS[b].unique():
            idx = (DOC_IDS[b] == doc).nonzero().flatten()
            s, e = idx[0].item(), idx[-1].item() + 1
            alone = causal_attention(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e], backend)
            torch.testing.assert_close(out[b:b + 1, s:e], alone, atol=1e-5, rtol=1e-5)
            if s > 0:
                assert (plain[b, s:e] - out[b, s:e]).abs().max() > 1e-3


@pytest.mark.filterwarnings(FLEX_WARNING)
@pytest.mark.parametrize("backend", ["math", "flex"])
@pytest.mark.parametrize("variant", list(VARIANT_ATTN))
def test_doc_mask_model_documents_independent(variant, backend):
    """A9 end to end: with doc ids from EOD tokens, the logits of each packed document equal the model run on that
    document alone (RoPE is relative, so the shifted start does not matter); tokens never attend across an EOD."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(variant, attn={"doc_mask": True}), backend=backend).eval()
    eod = 0
    tokens = torch.randint(1, 101, (1, 40))
    tokens[0, [9, 25]] = eod  # documents [0, 10), [10, 26), [26, 40)
    doc_ids = doc_ids_from_tokens(tokens, eod)
    with torch.no_grad():
        packed = model(tokens, doc_ids)
        unmasked = model(tokens)
        for s, e in ((0, 10), (10, 26), (26, 40)):
            alone = model(tokens[:, s:e])
            assert_rel_close(packed[:, s:e], alone, 1e-4, 1e-6, f"document [{s}, {e})")
            if s > 0:
                assert (unmasked[:, s:e] - alone).abs().max() > 1e-3


def test_resolve_backend_on_cpu():
    """Backend dispatch on CPU: auto -> math (with or without doc_mask); GPU-only backends rejected with a one-line
    ValueError."""
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, False) == "math" and resolve_backend("auto", cpu, True) == "math"
    assert resolve_backend("flex", cpu, True) == "flex" and resolve_backend("math", cpu, True) == "math"
    for backend in ("cudnn", "sdpa_flash", "flash_attn", "fa4"):
        with pytest.raises(ValueError, match="CUDA") as exc:
            resolve_backend(backend, cpu, False)
        assert "\n" not in str(exc.value)


def testdoc_cu_seqlens_lists_every_document_of_every_row():
    """The varlen kernels' (fa4, flash_attn) view of packed documents: cumulative lengths over the flattened rows,
    one entry per document, the EOD token in the document it closes, a row's last document ending at the row."""
    from diffv2.model.kernels import doc_cu_seqlens, doc_ids_from_tokens

    tokens = torch.tensor([[5, 0, 3, 4, 0, 7], [1, 2, 3, 0, 5, 6], [0, 0, 1, 2, 3, 4]])
    cu = doc_cu_seqlens(doc_ids_from_tokens(tokens, 0))
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 5, 6, 10, 12, 13, 14, 18]
    # Rows without an EOD, or ending on one, still end their document: both rows' ids are 0 here.
    assert doc_cu_seqlens(doc_ids_from_tokens(torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), 0)).tolist() == [0, 4, 8]
    assert doc_cu_seqlens(doc_ids_from_tokens(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), 0)).tolist() == [0, 4, 8]


@pytest.mark.parametrize("variant", ["diffv2", "baseline", "diffv1"])
@pytest.mark.parametrize("moe", [False, True])
def test_meta_device_build_materialises_to_the_same_model(variant, moe):
    """parallel.meta_init: a model built on the meta device and materialised draws the same weights and computes
    the same buffers (RoPE tables, MoE routing state) as a normal build with the same seed."""
    from dataclasses import replace

    from diffv2.config import MoEConfig

    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=128, vocab_size=96,
                      max_seq_len=64, attention=AttentionConfig(variant=variant))
    if moe:
        cfg = replace(cfg, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32, balance="aux_free"))
    torch.manual_seed(7)
    normal = Transformer(cfg)
    torch.manual_seed(7)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    materialize_model(lazy, torch.device("cpu"))
    a, b = normal.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for (name, x), y in zip(normal.named_buffers(), lazy.buffers()):
        assert torch.equal(x, y), name
    torch.manual_seed(8)
    assert not torch.equal(Transformer(cfg).embed.weight, normal.embed.weight)  # the seed matters


def _device_drawn(cfg, seed: int, device: str = "cpu") -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    materialize_model(model, torch.device(device), draw="device", seed=seed)
    return model


def _check_device_draws(device: str) -> None:
    from dataclasses import replace

    from diffv2.config import MoEConfig

    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=128, vocab_size=96,
                      max_seq_len=64, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32))
    cfg = replace(cfg, n_layers=4)
    torch.manual_seed(123)  # the global generator plays no part
    a = _device_drawn(cfg, seed=5, device=device).state_dict()
    torch.manual_seed(456)
    b = _device_drawn(cfg, seed=5, device=device).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _device_drawn(cfg, seed=6, device=device).state_dict()
    assert not torch.equal(a["embed.weight"], c["embed.weight"])  # the seed matters
    torch.manual_seed(5)
    normal = Transformer(cfg).state_dict()
    assert not torch.equal(normal["embed.weight"], a["embed.weight"].cpu())  # a stream of its own, documented
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, w in a.items():  # the same distributions as a normal build
        if name.endswith(("norm.weight",)):
            assert torch.equal(w, torch.ones_like(w)), name
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
            assert abs(w.float().std().item() / out_std - 1) < 0.15, name
        elif w.ndim >= 2:
            assert abs(w.float().std().item() / cfg.init_std - 1) < 0.15, name


def test_meta_init_device_draws_are_seeded_and_distributed_like_a_normal_build():
    """parallel.meta_init_draw=device: weights come from a generator seeded with `seed` (not the global one),
    with init_weights' distributions; a different stream from the CPU build's (the README says so)."""
    _check_device_draws("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_meta_init_device_draws_on_the_gpu():
    _check_device_draws("cuda")


def test_resolve_backend_for_fp32_inputs_on_a_gpu():
    """An fp32 run on a GPU (trainer.precision=fp32): `auto` takes flex, the bf16/fp16-only kernels are a one-line
    error naming the fix (no device is touched: the device is only named)."""
    gpu = torch.device("cuda")
    assert resolve_backend("auto", gpu, False, torch.float32) == "flex"
    assert resolve_backend("auto", gpu, True, torch.float32) == "flex"
    assert resolve_backend("flex", gpu, False, torch.float32) == "flex"
    for backend in ("cudnn", "sdpa_flash"):
        with pytest.raises(ValueError, match="trainer.precision=bf16") as exc:
            resolve_backend(backend, gpu, False, torch.float32)
        assert "\n" not in str(exc.value)
    assert resolve_backend("cudnn", gpu, False, torch.bfloat16) == "cudnn"


def test_fa4_backend_reports_why_it_cannot_run_and_flash_attn_needs_fa2(monkeypatch):
    """`fa4_unavailable` names the reason in one line on a machine without a Hopper/Blackwell GPU or without the
    package; `flash-attn-4` alone (a `flash_attn` namespace package without FA2's functions) is not FA2."""
    import types

    from diffv2.model import kernels

    reason = kernels.fa4_unavailable()
    if not torch.cuda.is_available():
        assert reason is not None and "\n" not in reason and "fa4" in reason
        assert not kernels.fa4_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fa4_alone, fa2 = types.ModuleType("flash_attn"), types.ModuleType("flash_attn")
    fa2.flash_attn_func = fa2.flash_attn_varlen_func = lambda *a, **k: None
    found = []
    for module in (fa4_alone, fa2):
        monkeypatch.setitem(sys.modules, "flash_attn", module)
        kernels.flash_attn_available.cache_clear()
        found.append(kernels.flash_attn_available())
    kernels.flash_attn_available.cache_clear()
    assert found == [False, True]
