"""Pre-norm decoder-only Transformer; the attention variant is one config switch (spec A14: every layer).

Legend: B batch, N sequence, M d_model, V vocab, F ffn hidden.
With model.moe.n_experts > 0 every block's FFN is a mixture of experts (diffv2/model/moe.py) and `loss` adds the
router losses (load balance, z-loss) to the loss that is backpropagated; the returned ce stays pure.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffv2.model.attention import Attention, RMSNorm
from diffv2.model.ffn import SwiGLU
from diffv2.config import ModelConfig
from diffv2.model.loss import linear_cross_entropy
from diffv2.model.moe import MoE

if TYPE_CHECKING:
    from diffv2.model.kv_cache import KVCache


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx, backend)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        moe = cfg.moe.n_experts > 0
        self.mlp = MoE(cfg.d_model, cfg.moe, layer_idx) if moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x_BNM: torch.Tensor, doc_ids_BN: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, observe: Optional[bool] = None) -> torch.Tensor:
        """`observe`: see Attention.forward (the caller of a compiled block passes it)."""
        x_BNM = x_BNM + self.attn(self.attn_norm(x_BNM), doc_ids_BN, cache, observe=observe)
        return x_BNM + self.mlp(self.mlp_norm(x_BNM))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "math"):
        super().__init__()
        from diffv2.model.flops import effective_config

        cfg = effective_config(cfg)  # applies param_match (spec A2)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, backend) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Per-block outputs go here when set (activation monitoring); None costs nothing.
        self.block_observer = None
        # How `hidden` calls block i: None = block(x, doc_ids, cache, observe); activation checkpointing installs a
        # runner here from outside (diffv2/parallel/activation_checkpoint.py).
        self.block_runner: Optional[Callable] = None
        self.init_weights()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def init_rule(self, name: str, ndim: int) -> Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]:
        """How the parameter `name` with `ndim` dimensions is drawn (in place; returns it): N(0, init_std) everywhere,
        residual output projections / sqrt(2L), norm weights 1, DIFF V1's lambda vectors N(0, 0.1); every variant alike
        (spec A3/A4). Parallel materialisation (diffv2/parallel/parallelize.py) draws full tensors by it."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.scale_residual_init else std
        if ndim < 2:
            if name.endswith(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")):  # DIFF V1 (spec §3)
                return lambda t, generator: nn.init.normal_(t, std=0.1, generator=generator)
            return lambda t, generator: nn.init.ones_(t)  # norm weights
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
            return lambda t, generator: nn.init.normal_(t, std=out_std, generator=generator)
        return lambda t, generator: nn.init.normal_(t, std=std, generator=generator)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter by `init_rule`, in order, from the global generator. A meta-device build draws
        nothing here: it is materialised after sharding (diffv2/parallel/parallelize.py), in this same order."""
        for name, p in self.named_parameters():
            if not p.is_meta:
                self.init_rule(name, p.ndim)(p, None)

    def reset_buffers(self) -> None:
        """Buffers back to what a fresh build computes (RoPE tables, MoE routing state), after `to_empty`."""
        from diffv2.model.rope import RotaryEmbedding

        for module in self.modules():
            if isinstance(module, (RotaryEmbedding, MoE)):
                module.reset_buffers()

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After each optimizer step: aux-loss-free balancing moves the expert biases (no-op otherwise)."""
        for moe in self.moe_layers():
            moe.update_expert_bias()

    def hidden(self, tokens_BN: torch.Tensor, doc_ids_BN: Optional[torch.Tensor] = None,
               cache: Optional[KVCache] = None) -> torch.Tensor:
        """Final-norm hidden states; with a cache, tokens_BN are the next N tokens of every row and are appended."""
        assert cache is None or doc_ids_BN is None, "cached decoding masks left padding, not documents"
        x_BNM = self.embed(tokens_BN)
        for i, block in enumerate(self.blocks):
            # An argument, not an attribute read inside the block: a compiled block is then specialised on it for
            # sure (dynamo guards every bool argument), whatever a torch version does with module-attribute guards.
            observe = block.attn.observer is not None
            if self.block_runner is None:
                x_BNM = block(x_BNM, doc_ids_BN, cache, observe)
            else:
                x_BNM = self.block_runner(i, block, x_BNM, doc_ids_BN, cache, observe)
            if self.block_observer is not None:
                self.block_observer(block.attn.layer_idx, x_BNM)
        if cache is not None:
            cache.advance(tokens_BN.shape[1])
        return self.norm(x_BNM)

    def forward(self, tokens_BN: torch.Tensor, doc_ids_BN: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """Full logits (B, N, V); for inference and tests. Training uses `loss`."""
        return F.linear(self.hidden(tokens_BN, doc_ids_BN, cache), self.lm_head_weight)

    def loss(self, tokens_BN, labels_BN, doc_ids_BN=None):
        """(loss incl. z-loss and MoE router losses, cross-entropy, mean log(Z)^2); logits never materialised."""
        h_BNM = self.hidden(tokens_BN, doc_ids_BN)
        loss, ce, z = linear_cross_entropy(
            h_BNM.flatten(0, 1), self.lm_head_weight, labels_BN.flatten(), self.cfg.ce_chunk, self.cfg.z_loss
        )
        for moe in self.moe_layers():
            loss = loss + moe.router_loss
        return loss, ce, z

