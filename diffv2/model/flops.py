"""Parameter and FLOP accounting (spec §5), the one source for tests, presets and MFU logging.

Convention: 1 multiply-add = 2 FLOPs; training = 3x forward; causal attention averages (N+1)/2 keys per query.
MoE: `total` counts every expert, `active` the parameters one token uses (router, top_k routed and the shared
experts, attention, embeddings); FLOPs, hence MFU, follow the active ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from diffv2.config import ModelConfig
from diffv2.model.heads import output_heads, query_heads

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense datasheet peaks


def attention_params(cfg: ModelConfig) -> int:
    """Per-layer attention parameters: D*d*(3h + 2h_kv) + D*h for DIFF V2, D*d*(2h + 2h_kv) for the baseline."""
    m, d, a = cfg.d_model, cfg.head_dim, cfg.attention
    n = m * d * (query_heads(cfg) + 2 * cfg.n_kv_heads + output_heads(cfg))
    if a.variant == "diffv2" and a.lambda_mode != "none":
        n += m * cfg.n_heads  # lambda_proj
    if a.variant == "diffv1":
        n += 4 * d + 2 * d  # lambda_{q1,k1,q2,k2} and the shared subln weight
    if a.qk_norm:
        n += 2 * d
    return n


def mlp_params(cfg: ModelConfig) -> int:
    """Per-layer FFN parameters: dense SwiGLU, or router + every routed expert + the shared experts."""
    e = cfg.moe
    if e.n_experts == 0:
        return 3 * cfg.d_model * cfg.ffn_hidden
    return cfg.d_model * e.n_experts + 3 * cfg.d_model * e.expert_hidden * (e.n_experts + e.n_shared_experts)


def active_mlp_params(cfg: ModelConfig) -> int:
    """Per-layer FFN parameters one token passes through (router, top_k routed experts, shared experts)."""
    e = cfg.moe
    if e.n_experts == 0:
        return mlp_params(cfg)
    return cfg.d_model * e.n_experts + 3 * cfg.d_model * e.expert_hidden * (e.top_k + e.n_shared_experts)


def matched_ffn_hidden(cfg: ModelConfig, multiple: int = 8) -> int:
    """ffn_hidden for which this config's non-embedding parameters match the h-head baseline's (spec A2)."""
    baseline = replace(cfg, attention=replace(cfg.attention, variant="baseline", head_multiplier=1.0,
                                              pairing="interleave", lambda_mode="sigmoid"))
    extra = attention_params(cfg) - attention_params(baseline)
    hidden = cfg.ffn_hidden - extra / (3 * cfg.d_model)
    return max(multiple, int(round(hidden / multiple)) * multiple)


def effective_config(cfg: ModelConfig) -> ModelConfig:
    """The config the model is built with: param_match resolved into ffn_hidden."""
    if cfg.param_match and cfg.attention.variant != "baseline":
        return replace(cfg, ffn_hidden=matched_ffn_hidden(cfg), param_match=False)
    return cfg


@dataclass(frozen=True)
class Counts:
    total: int
    active: int  # parameters one token uses (= total for dense models)
    embedding: int  # token embedding + untied lm_head
    non_embedding: int
    attention: int  # all layers
    flops_per_token: float  # training (fwd + bwd) FLOPs per token at seq_len

    def table(self) -> str:
        return (f"params total {self.total:,} | active {self.active:,} | non-embedding {self.non_embedding:,} "
                f"| attention {self.attention:,} | train GFLOP/token {self.flops_per_token / 1e9:.3f}")


def attention_core_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token per layer of QK^T and AV under the causal mask."""
    ctx = (seq_len + 1) / 2
    d = cfg.head_dim
    if cfg.attention.variant == "diffv1":
        return 6 * cfg.n_heads * d * ctx  # h/2 pairs x 2 maps x (QK^T over d + AV over 2d)
    return 4 * query_heads(cfg) * d * ctx


def count(cfg: ModelConfig, seq_len: int) -> Counts:
    cfg = effective_config(cfg)
    m, v, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    attn = attention_params(cfg)
    per_layer = attn + mlp_params(cfg) + 2 * m  # + two RMSNorm weights
    embedding = v * m * (1 if cfg.tie_embeddings else 2)
    non_embedding = L * per_layer + m  # + final norm
    matmul_params = L * (attn + active_mlp_params(cfg)) + v * m  # lm_head is a matmul, the embedding lookup is not
    forward = 2 * matmul_params + L * attention_core_flops(cfg, seq_len)
    if cfg.attention.variant == "diffv2":
        forward += L * 2 * cfg.n_heads * cfg.head_dim  # the multiply-subtract, negligible (spec §5.3)
    total = non_embedding + (v * m if cfg.tie_embeddings else 2 * v * m)
    active = total - L * (mlp_params(cfg) - active_mlp_params(cfg))
    return Counts(total=total, active=active, embedding=embedding, non_embedding=non_embedding, attention=L * attn,
                  flops_per_token=3 * forward)


def peak_flops(device_name: str) -> float:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return 0.0
