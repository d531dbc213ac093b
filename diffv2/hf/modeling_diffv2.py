"""DIFF V2 / baseline / DIFF V1 pre-norm decoder for transformers (AutoModelForCausalLM, trust_remote_code=True).

Written next to model.safetensors by `python -m diffv2.export_hf`. Self-contained (pure torch + transformers): it
re-implements the training framework's forward pass with the same parameter names and the same arithmetic, so
logits match the framework's to float rounding.

DIFF V2 attention: 2h query heads and h_kv KV heads run one causal attention; adjacent heads (2i, 2i+1) of one GQA
group are combined as attn[2i] - sigmoid(lambda_i) * attn[2i+1], with lambda = x W_lambda per token and head; then
o_proj. The KV cache holds h_kv heads of keys and values, the same as a standard GQA Transformer.

Legend: B batch, N new tokens, L keys (cached + new), M hidden size, Q query heads, K kv heads, H output heads,
D head_dim, F rotary frequencies.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_diffv2 import DiffV2Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (x.shape[-1],), eps=self.eps).type_as(x)
        return y * self.weight


def rope_cos_sin(positions_BN: torch.Tensor, head_dim: int, theta: float):
    """cos/sin (B, N, 1, F) in fp32, computed in fp64 exactly as the framework's tables are."""
    inv_freq_F = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions_BN.device) / head_dim)
    angle_BNF = positions_BN.to(torch.float64)[..., None] * inv_freq_F
    return angle_BNF.cos().float()[:, :, None], angle_BNF.sin().float()[:, :, None]


def rotate(x_BNHD: torch.Tensor, cos, sin, style: str) -> torch.Tensor:
    x = x_BNHD.to(torch.promote_types(x_BNHD.dtype, torch.float32))
    if style == "interleaved":  # GPT-J pairs (x[2m], x[2m+1]), the DIFF V2 reference
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:  # NeoX pairs (x[m], x[m + D/2])
        x0, x1 = x.chunk(2, dim=-1)
        out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.type_as(x_BNHD)


def attention_mask_4d(mask_BL: Optional[torch.Tensor], n: int, L: int, device) -> Optional[torch.Tensor]:
    """Causal mask aligned bottom-right (queries are the last n of L positions); padding is its own segment, so real
    tokens never see pads and pad queries see only pads (no empty softmax row, hence no NaN). None = plain causal."""
    if n == L and (mask_BL is None or bool(mask_BL.all())):
        return None
    causal_NL = torch.arange(L, device=device)[None, :] <= torch.arange(L - n, L, device=device)[:, None]
    if mask_BL is None:
        return causal_NL[None, None]
    valid_BL = mask_BL.bool()
    return causal_NL[None, None] & (valid_BL[:, None, None, :] == valid_BL[:, None, L - n:, None])


class DiffV2Attention(nn.Module):
    def __init__(self, config: DiffV2Config, layer_idx: int):
        super().__init__()
        c, h, d, m = config, config.num_attention_heads, config.head_dim, config.hidden_size
        self.variant, self.layer_idx, self.head_dim = c.attention_variant, layer_idx, d
        self.pairing, self.lambda_mode, self.combine_fp32 = c.pairing, c.lambda_mode, c.combine_fp32
        self.rope_style, self.rope_theta = c.rope_style, c.rope_theta
        self.n_q = {"diffv2": 2 * h, "baseline": round(c.head_multiplier * h), "diffv1": h}[self.variant]
        self.n_out = self.n_q if self.variant == "baseline" else h
        self.n_kv = c.num_key_value_heads
        self.q_proj = nn.Linear(m, self.n_q * d, bias=False)
        self.k_proj = nn.Linear(m, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(m, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_out * d, m, bias=False)
        if self.variant == "diffv2" and self.lambda_mode != "none":
            self.lambda_proj = nn.Linear(m, h, bias=False)
        if self.variant == "diffv1":
            self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.zeros(d)))
            self.subln = RMSNorm(2 * d, eps=1e-5)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, c.rms_norm_eps), RMSNorm(d, c.rms_norm_eps)
        self.qk_norm = c.qk_norm

    def forward(self, x_BNM, cos, sin, mask, cache) -> torch.Tensor:
        b, n, _ = x_BNM.shape
        d = self.head_dim
        q_BNQD = self.q_proj(x_BNM).view(b, n, self.n_q, d)
        k_BNKD = self.k_proj(x_BNM).view(b, n, self.n_kv, d)
        v_BNKD = self.v_proj(x_BNM).view(b, n, -1, 2 * d if self.variant == "diffv1" else d)
        if self.qk_norm:
            q_BNQD, k_BNKD = self.q_norm(q_BNQD), self.k_norm(k_BNKD)
        q_BNQD, k_BNKD = rotate(q_BNQD, cos, sin, self.rope_style), rotate(k_BNKD, cos, sin, self.rope_style)
        q, k, v = (t.transpose(1, 2) for t in (q_BNQD, k_BNKD, v_BNKD))  # (B, heads, N, D) for SDPA and the cache
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        def attend(q_, k_, v_):  # contiguous GQA mapping: query head j reads KV head j // (n_q / n_kv)
            out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            return out.transpose(1, 2)  # (B, N, heads, D)

        if self.variant == "diffv1":
            ctx_BNHD = self._diffv1(q, k, v, attend)
        else:
            attn_BNQD = attend(q, k, v)
            ctx_BNHD = attn_BNQD if self.variant == "baseline" else self._combine(attn_BNQD, x_BNM)
        return self.o_proj(ctx_BNHD.reshape(b, n, -1))

    def _combine(self, attn_BNQD, x_BNM):
        if self.pairing == "interleave":  # the pair shares a GQA group (K and V)
            attn1, attn2 = attn_BNQD[:, :, 0::2], attn_BNQD[:, :, 1::2]
        else:
            attn1, attn2 = attn_BNQD.chunk(2, dim=2)
        if self.lambda_mode == "none":
            return attn1 - attn2
        dtype = torch.float32 if self.combine_fp32 else attn1.dtype
        lam_BNH = self.lambda_proj(x_BNM).to(dtype)
        scale_BNH = torch.sigmoid(lam_BNH) if self.lambda_mode == "sigmoid" else lam_BNH
        return (attn1.to(dtype) - scale_BNH.unsqueeze(-1) * attn2.to(dtype)).to(attn1.dtype)

    def _diffv1(self, q, k, v, attend):
        """DIFF V1 (flash semantics): q1/k1 even heads, q2/k2 odd heads, values of width 2D, per-head subln."""
        d = self.head_dim
        q12 = torch.cat((q[:, 0::2], q[:, 1::2]), dim=1)
        k12 = torch.cat((k[:, 0::2], k[:, 1::2]), dim=1)
        attn = torch.cat([attend(q12, k12, torch.cat((vh, vh), dim=1)) for vh in (v[..., :d], v[..., d:])], dim=-1)
        attn1, attn2 = attn.chunk(2, dim=2)
        lam = (torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
               - torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float())) + self.lambda_init).to(q.dtype)
        return self.subln(attn1 - lam * attn2) * (1 - self.lambda_init)


class SwiGLU(nn.Module):
    def __init__(self, m: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(m, hidden, bias=False)
        self.up_proj = nn.Linear(m, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, m, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DiffV2Block(nn.Module):
    def __init__(self, config: DiffV2Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = DiffV2Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x_BNM, cos, sin, mask, cache):
        x_BNM = x_BNM + self.attn(self.attn_norm(x_BNM), cos, sin, mask, cache)
        return x_BNM + self.mlp(self.mlp_norm(x_BNM))


class DiffV2ForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DiffV2Config
    base_model_prefix = "diffv2"
    _no_split_modules = ["DiffV2Block"]

    def __init__(self, config: DiffV2Config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(DiffV2Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied embeddings: no lm_head module at all, the embedding matrix is the output matrix.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module):
        """Only weights absent from the checkpoint are initialised; the same N(0, std) as the framework."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DiffV2Attention) and module.variant == "diffv1":
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(module, name).normal_(0.0, 0.1)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values=None,
                use_cache: Optional[bool] = None, labels: Optional[torch.LongTensor] = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        b, n = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        L = past + n
        if position_ids is None:  # per-sequence positions: left padding does not shift a sequence
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
            else:
                position_ids = torch.arange(past, L, device=input_ids.device)[None].expand(b, n)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = attention_mask_4d(attention_mask, n, L, input_ids.device)
        x_BNM = self.embed(input_ids)
        for block in self.blocks:
            x_BNM = block(x_BNM, cos, sin, mask, past_key_values)
        h_BNM = self.norm(x_BNM)
        if logits_to_keep:
            h_BNM = h_BNM[:, -logits_to_keep:]
        logits = F.linear(h_BNM, self.embed.weight if self.lm_head is None else self.lm_head.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
        return out if kwargs.get("return_dict", True) else out.to_tuple()
