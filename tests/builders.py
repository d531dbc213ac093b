"""Builders shared by the test files: the attention module under test from spec-grid shapes, config variants."""

from __future__ import annotations

from dataclasses import replace

import torch

from diffv2.model.attention import Attention
from diffv2.config import AttentionConfig, ModelConfig
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
