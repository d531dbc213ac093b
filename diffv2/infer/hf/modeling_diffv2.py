"""DIFF V2 / baseline / DIFF V1 pre-norm decoder for transformers (AutoModelForCausalLM, trust_remote_code=True).

Written next to model.safetensors by `python -m diffv2.infer.export_hf`. Self-contained (pure torch + transformers): it
re-implements the training framework's forward pass with the same parameter names and the same arithmetic, so
logits match the framework's to float rounding.

DIFF V2 attention: 2h query heads and h_kv KV heads run one causal attention; adjacent heads (2i, 2i+1) of one GQA
group are combined as attn[2i] - sigmoid(lambda_i) * attn[2i+1], with lambda = x W_lambda per token and head; then
o_proj. The KV cache holds h_kv heads of keys and values, the same as a standard GQA Transformer.

Works with transformers 4.56 to 5.x: the KV cache argument and output field are `past_key_values` in transformers 4
and `cache` from transformers 5 on (as in its own models, e.g. models/llama/modeling_llama.py); forward takes either
name, and the output carries the cache under the installed version's name, where generate() reads it back.

Legend: B batch, N new tokens, L keys (cached + new), M hidden size, Q query heads, K kv heads, H output heads,
D head_dim, F rotary frequencies (SwiGLU hidden width in the MLPs), T tokens (B*N), E experts, K top_k (in the
router), A = T*K routing slots, S slots kept after the capacity limit, V vocab.
"""

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_diffv2 import DiffV2Config

# The output field generate() reads the cache back from: `cache` from transformers 5 on, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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
    tokens never see pads and pad queries see only pads (no empty softmax row, hence no NaN). None = plain causal.
    mask_BL: transformers' 2D attention_mask over every position, cached and new (1 = token, 0 = pad)."""
    if mask_BL is not None and (mask_BL.dim() != 2 or mask_BL.shape[-1] != L):
        raise ValueError(f"attention_mask must be 2D (batch, cached + new tokens) = (B, {L}), 1 = token, 0 = pad; "
                         f"got shape {tuple(mask_BL.shape)}")
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


class DiffV2Experts(nn.Module):
    """E SwiGLU experts stored as (E, in, out) stacks, run one expert at a time over its contiguous rows."""

    def __init__(self, n_experts: int, m: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, m, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, m, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, m))  # down

    def forward(self, x_SM: torch.Tensor, tokens_E: torch.Tensor) -> torch.Tensor:
        outs = [(F.silu(x_sM @ self.w1[e]) * (x_sM @ self.w3[e])) @ self.w2[e]
                for e, x_sM in enumerate(x_SM.split(tokens_E.tolist()))]
        return torch.cat(outs) if outs else x_SM.new_zeros(0, self.w2.shape[-1])


class DiffV2MoE(nn.Module):
    """Token-choice top-k router (fp32) over fine-grained SwiGLU experts, plus always-on shared experts.

    Scores are softmax or sigmoid of the router logits; the expert bias (aux-loss-free balancing) only selects, never
    weights; the top-k weights are renormalised. With a capacity factor an expert takes at most
    ceil(cf * T * K / E) of the T tokens of a forward, in token order (later ones are dropped)."""

    def __init__(self, config: DiffV2Config):
        super().__init__()
        m, e, hidden = config.hidden_size, config.num_experts, config.moe_intermediate_size
        self.n_experts, self.top_k = e, config.num_experts_per_tok
        self.score, self.use_bias, self.capacity_factor = (config.moe_router, config.moe_router_bias,
                                                           config.moe_capacity_factor)
        self.router = nn.Linear(m, e, bias=False)
        self.experts = DiffV2Experts(e, m, hidden)
        shared = config.num_shared_experts * hidden  # n shared experts = one SwiGLU n times as wide
        self.shared_expert = SwiGLU(m, shared) if shared else None
        self.register_buffer("expert_bias", torch.zeros(e))

    def forward(self, x_BNM: torch.Tensor) -> torch.Tensor:
        x_TM = x_BNM.reshape(-1, x_BNM.shape[-1])
        t, m = x_TM.shape
        dtype = torch.promote_types(x_TM.dtype, torch.float32)
        logits_TE = F.linear(x_TM.to(dtype), self.router.weight.to(dtype))
        scores_TE = logits_TE.softmax(-1) if self.score == "softmax" else logits_TE.sigmoid()
        select_TE = scores_TE + self.expert_bias.to(dtype) if self.use_bias else scores_TE
        experts_TK = select_TE.topk(self.top_k, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(-1, experts_TK)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)

        expert_A = experts_TK.flatten()
        tokens_E = torch.zeros(self.n_experts, dtype=torch.long, device=x_TM.device).scatter_add_(
            0, expert_A, torch.ones_like(expert_A))
        order_A = expert_A.argsort(stable=True)  # slots grouped by expert, token order within an expert
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * t * self.top_k / self.n_experts)
            first_E = tokens_E.cumsum(0) - tokens_E
            rank_A = torch.arange(order_A.numel(), device=x_TM.device) - first_E[expert_A[order_A]]
            order_A = order_A[rank_A < capacity]
            tokens_E = tokens_E.clamp(max=capacity)
        y_SM = self.experts(x_TM[order_A // self.top_k], tokens_E)
        y_AM = y_SM.new_zeros(t * self.top_k, m).index_copy(0, order_A, y_SM)  # dropped slots stay 0
        y_TKM = y_AM.view(t, self.top_k, m)
        y_TM = (y_TKM * weights_TK.unsqueeze(-1).to(y_TKM.dtype)).sum(1).to(x_TM.dtype)
        if self.shared_expert is not None:
            y_TM = y_TM + self.shared_expert(x_TM)
        return y_TM.view_as(x_BNM)


class DiffV2Block(nn.Module):
    def __init__(self, config: DiffV2Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = DiffV2Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (DiffV2MoE(config) if config.num_experts
                    else SwiGLU(config.hidden_size, config.intermediate_size))

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
        elif isinstance(module, DiffV2Experts):
            for w in (module.w1, module.w3, module.w2):
                w.normal_(0.0, self.config.initializer_range)
        elif isinstance(module, DiffV2MoE):
            module.expert_bias.zero_()
        elif isinstance(module, DiffV2Attention) and module.variant == "diffv1":
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(module, name).normal_(0.0, 0.1)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of the new tokens; argument names as transformers' own decoders (models/llama).

        cache: the KV cache (a transformers Cache, e.g. DynamicCache): the keys and values of the tokens before
            input_ids; this call appends its tokens. `past_key_values` is the same argument under its transformers 4
            name (generate() of transformers 4 passes that one). With use_cache and no cache, a new DynamicCache.
        attention_mask: 2D (B, cached + new tokens), 1 = token, 0 = (left) pad.
        position_ids: RoPE positions of the new tokens; default per row from attention_mask (left pads do not shift
            a sequence), else consecutive after the cache.
        logits_to_keep: an int keeps the last that many positions (0 = all), a 1D tensor those positions.
        Ids at or beyond config.tokenizer_vocab_size (embedding rows padded past the tokenizer) get -inf logits.
        """
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass the KV cache as `cache` or as `past_key_values` (its transformers 4 name), "
                                 "not both")
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None and cache.is_compileable:  # keys of every slot, filled or not: masks would not match
            raise ValueError(f"{type(self).__name__} decodes with a DynamicCache (generate()'s default); "
                             f"{type(cache).__name__} is not supported")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        x_BNM = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x_BNM.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        L = past + n
        if position_ids is None:  # per-sequence positions: left padding does not shift a sequence
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
            else:
                position_ids = torch.arange(past, L, device=x_BNM.device)[None].expand(b, n)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = attention_mask_4d(attention_mask, n, L, x_BNM.device)
        for block in self.blocks:
            x_BNM = block(x_BNM, cos, sin, mask, cache)
        h_BNM = self.norm(x_BNM)
        if isinstance(logits_to_keep, int):
            h_BNM = h_BNM[:, -logits_to_keep:] if logits_to_keep else h_BNM
        else:
            h_BNM = h_BNM[:, logits_to_keep]
        logits_BNV = F.linear(h_BNM, self.embed.weight if self.lm_head is None else self.lm_head.weight)
        vocab = self.config.tokenizer_vocab_size
        if vocab is not None and vocab < logits_BNV.shape[-1]:  # rows past the tokenizer: never predicted
            logits_BNV[..., vocab:] = float("-inf")
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BNV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits_BNV, **{CACHE_FIELD: cache})
        return out if kwargs.get("return_dict", True) else out.to_tuple()
