"""Pre-norm decoder-only Transformer; the attention variant is one config switch (spec A14: every layer).

Legend: B batch, N sequence, M d_model, V vocab, F ffn hidden.
With model.moe.n_experts > 0 every block's FFN is a mixture of experts (diffv2/model/moe.py) and `loss` adds the
router losses (load balance, z-loss) to the loss that is backpropagated; the returned ce stays pure.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffv2.model.attention import Attention, FusedCombine, RMSNorm
from diffv2.model.ffn import SwiGLU
from diffv2.config import ModelConfig
from diffv2.model.loss import linear_cross_entropy
from diffv2.model.moe import MoE
from diffv2.model.recompute import checkpoint_contexts

if TYPE_CHECKING:
    from diffv2.model.kv_cache import KVCache


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: str,
                 fused_combine: Optional[FusedCombine] = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx, backend, fused_combine)
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
        self.fused_combine = FusedCombine()  # GPU inference's compiled DIFF V2 combine, shared by every layer
        self.blocks = nn.ModuleList(Block(cfg, i, backend, self.fused_combine) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Per-block outputs go here when set (activation monitoring); None costs nothing.
        self.block_observer = None
        self.checkpointed: frozenset[int] = frozenset()  # blocks whose activations are recomputed in backward
        self.init_weights()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """N(0, init_std) everywhere; residual output projections / sqrt(2L); same for every variant (spec A3/A4).

        Parameters that are shards (DTensors of FSDP2 / TP, expert-parallel slices after a meta-device build) are
        drawn in full on the CPU from the global generator, in the same order as an unsharded build, and this rank
        keeps its piece: the initial weights are bit-identical whatever the layout. With `generator` (a generator on
        the parameters' device, seeded alike on every rank) the full tensors are drawn from it on that device
        instead: as layout-independent, much faster on a GPU, but not the numbers of a CPU build."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.scale_residual_init else std
        expert_slices = {f"blocks.{i}.mlp.experts.": b.mlp.expert_slice for i, b in enumerate(self.blocks)
                         if isinstance(b.mlp, MoE) and b.mlp.expert_slice is not None}
        for name, p in self.named_parameters():
            if p.is_meta:
                continue  # a meta-device build draws nothing now; `materialize` draws later, in this same order
            if p.ndim < 2:
                if name.endswith(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")):
                    init = lambda t: nn.init.normal_(t, std=0.1, generator=generator)  # noqa: E731 - DIFF V1 (spec §3)
                else:
                    init = nn.init.ones_  # norm weights
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
                init = lambda t: nn.init.normal_(t, std=out_std, generator=generator)  # noqa: E731
            else:
                init = lambda t: nn.init.normal_(t, std=std, generator=generator)  # noqa: E731
            sliced = next((s for prefix, s in expert_slices.items() if name.startswith(prefix)), None)
            if not hasattr(p, "to_local") and sliced is None and (p.device.type == "cpu" or generator is not None):
                init(p)  # the plain single-device build (or an unsharded tensor drawn on its device)
                continue
            full_shape = p.shape if sliced is None else (self.cfg.moe.n_experts, *p.shape[1:])
            draw_device = "cpu" if generator is None else generator.device
            full = init(torch.empty(full_shape, dtype=p.dtype, device=draw_device))
            if sliced is not None:
                full = full[sliced[0]:sliced[1]]
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            (p.to_local() if hasattr(p, "to_local") else p).copy_(full)

    def _replay_constructor_draws(self) -> None:
        """A normal build's nn.Linear / nn.Embedding constructors draw their default init from the global generator
        before `init_weights` overwrites it; on the meta device they draw nothing. Constructing the same layers
        again on the CPU, one at a time in construction order, advances the generator exactly as the normal build
        did, so `init_weights` then draws the same numbers (checked by tests/test_model.py)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="cpu")
            elif isinstance(m, nn.Embedding):
                nn.Embedding(m.num_embeddings, m.embedding_dim, device="cpu")

    def materialize(self, device: torch.device, draw: str = "cpu", seed: int = 0) -> None:
        """After a build under `torch.device("meta")` (and any sharding): allocate on `device`, recompute the
        buffers, draw the weights. draw="cpu": as `init_weights` after the constructors, identical to a normal
        build; draw="device": every full tensor drawn on `device` from a generator seeded with `seed` (the same
        on every rank, so shards agree; seconds instead of minutes for tens of billions of parameters)."""
        self.to_empty(device=device)
        from diffv2.model.rope import RotaryEmbedding

        for module in self.modules():
            if isinstance(module, (RotaryEmbedding, MoE)):
                module.reset_buffers()
        if draw == "device":
            self.init_weights(torch.Generator(device=device).manual_seed(seed))
        else:
            self._replay_constructor_draws()
            self.init_weights()

    def set_activation_checkpointing(self, mode: str, every: int = 2) -> None:
        """none | full (every block) | selective (blocks 0, every, 2*every, ...): those blocks keep only their
        input during training and recompute the rest in backward (torch.utils.checkpoint, non-reentrant). Set from
        outside, in parallelize's order (diffv2/parallel/parallelize.py); `hidden` runs it around the (possibly
        compiled, FSDP2-wrapped) block call."""
        n = len(self.blocks)
        self.checkpointed = frozenset({"none": [], "full": range(n), "selective": range(0, n, every)}[mode])

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
        recompute = self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            # An argument, not an attribute read inside the block: a compiled block is then specialised on it for
            # sure (dynamo guards every bool argument), whatever a torch version does with module-attribute guards.
            observe = block.attn.observer is not None
            if recompute and i in self.checkpointed:
                x_BNM = checkpoint(block, x_BNM, doc_ids_BN, None, observe, use_reentrant=False,
                                   context_fn=checkpoint_contexts)
            else:
                x_BNM = block(x_BNM, doc_ids_BN, cache, observe)
            if self.block_observer is not None:
                self.block_observer(block.attn.layer_idx, x_BNM)
        if cache is not None:
            cache.advance(tokens_BN.shape[1])
        return self.norm(x_BNM)

    def forward(self, tokens_BN: torch.Tensor, doc_ids_BN: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, labels_BN: Optional[torch.Tensor] = None):
        """Full logits (B, N, V); for inference and tests. Training uses `loss`. With labels_BN: `loss`'s triple,
        for wrappers that can only call forward (DeepSpeed: ZeRO-3 gathers parameters in forward hooks)."""
        if labels_BN is not None:
            return Transformer.loss(self, tokens_BN, labels_BN, doc_ids_BN)  # the class's, even if patched per instance
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

