"""Builders shared by the test files: the attention module under test from spec-grid shapes, config variants, the
tiny inference model of every attention variant."""

from __future__ import annotations

from dataclasses import replace

import torch

from diffv2.model.attention import Attention
from diffv2.config import AttentionConfig, ModelConfig
from diffv2.infer.inference import cast_weights
from diffv2.model.transformer import Transformer
from tests.reference import init_sharp_


def model_cfg(D, h, h_kv, d, max_seq_len=512, **attn) -> ModelConfig:
    return ModelConfig(d_model=D, n_heads=h, n_kv_heads=h_kv, head_dim=d, max_seq_len=max_seq_len,
                       attention=AttentionConfig(**attn))


def make_attention(D, h, h_kv, d, seed=0, dtype=torch.float32, layer_idx=0, backend="math", **attn) -> Attention:
    torch.manual_seed(seed)
    return init_sharp_(Attention(model_cfg(D, h, h_kv, d, **attn), layer_idx, backend)).to(dtype)


def with_attention(cfg: ModelConfig, **overrides) -> ModelConfig:
    """A copy of cfg with attention fields replaced (several arms from one config)."""
    return replace(cfg, attention=replace(cfg.attention, **overrides))


VARIANTS = {
    "diffv2": {},
    "diffv2_half_split": {"pairing": "half_split"},
    "diffv2_no_lambda": {"lambda_mode": "none"},
    "diffv2_raw_lambda": {"lambda_mode": "raw"},
    "diffv2_qk_norm_neox": {"qk_norm": True, "rope_style": "half"},
    "baseline": {"variant": "baseline"},
    "baseline_1p5h": {"variant": "baseline", "head_multiplier": 1.5},
    "baseline_2h": {"variant": "baseline", "head_multiplier": 2.0},
    "diffv1": {"variant": "diffv1"},
}


def tiny_model(variant: str = "diffv2", seed: int = 0, dtype=torch.float32, **kw) -> Transformer:
    """2 layers, h=4, h_kv=2, d=16; attention weights give peaked maps and sigma(lambda) spread over (0, 1)."""
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96, vocab_size=61,
                max_seq_len=64)
    base.update(kw)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**base, attention=AttentionConfig(**VARIANTS[variant])))
    with torch.no_grad():
        for block in model.blocks:
            init_sharp_(block.attn)
    return cast_weights(model, dtype).eval()
