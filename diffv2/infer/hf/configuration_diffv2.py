"""Configuration of an exported DIFF V2 / baseline / DIFF V1 (dense or MoE) decoder (trust_remote_code=True).

Written next to model.safetensors by `python -m diffv2.infer.export_hf`; self-contained: imports only transformers.
Field meanings follow the training framework's ModelConfig (its name in brackets).
"""

from typing import Optional

from transformers import PretrainedConfig


class DiffV2Config(PretrainedConfig):
    model_type = "diffv2"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache: its transformers 5 and 4 names

    def __init__(
        self,
        vocab_size: int = 384,  # [vocab_size]
        hidden_size: int = 256,  # [d_model]
        num_hidden_layers: int = 4,  # [n_layers]
        num_attention_heads: int = 4,  # [n_heads] h: output heads; DIFF V2 has 2h query heads
        num_key_value_heads: int = 2,  # [n_kv_heads]
        head_dim: int = 64,  # [head_dim]
        intermediate_size: int = 768,  # [ffn_hidden] SwiGLU width
        max_position_embeddings: int = 4096,  # [max_seq_len] the training framework's RoPE table length
        rms_norm_eps: float = 1e-6,  # [norm_eps]
        initializer_range: float = 0.02,  # [init_std] only for weights missing from the checkpoint
        attention_variant: str = "diffv2",  # [attention.variant] diffv2 | baseline | diffv1
        head_multiplier: float = 1.0,  # [attention.head_multiplier] baseline query heads = multiplier * h
        pairing: str = "interleave",  # [attention.pairing] interleave (heads 2i, 2i+1) | half_split (ablation 1)
        lambda_mode: str = "sigmoid",  # [attention.lambda_mode] sigmoid | none (ablation 2) | raw (ablation 3)
        combine_fp32: bool = True,  # [attention.combine_fp32] sigmoid and subtraction in fp32
        qk_norm: bool = False,  # [attention.qk_norm] per-head RMSNorm on q and k before RoPE
        rope_style: str = "interleaved",  # [attention.rope_style] interleaved (GPT-J) | half (NeoX)
        rope_theta: float = 10000.0,  # [attention.rope_theta]
        tie_word_embeddings: bool = False,  # [tie_embeddings]
        tokenizer_vocab_size: Optional[int] = None,  # the tokenizer's ids; logits of ids >= it are -inf (None: none)
        num_experts: int = 0,  # [moe.n_experts] routed experts per block; 0 = dense SwiGLU blocks
        num_experts_per_tok: int = 2,  # [moe.top_k]
        moe_intermediate_size: int = 256,  # [moe.expert_hidden] SwiGLU width of each expert
        num_shared_experts: int = 0,  # [moe.n_shared_experts] always-on experts of moe_intermediate_size each
        moe_router: str = "softmax",  # [moe.router] softmax | sigmoid scores, top-k, renormalised
        moe_router_bias: bool = False,  # [moe.balance == aux_free] expert_bias added to the scores to select only
        moe_capacity_factor: float = 0.0,  # [moe.capacity_factor] 0 = dropless
        use_cache: bool = True,  # forward keeps a KV cache by default (generate() decodes with it)
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_variant = attention_variant
        self.head_multiplier = head_multiplier
        self.pairing = pairing
        self.lambda_mode = lambda_mode
        self.combine_fp32 = combine_fp32
        self.qk_norm = qk_norm
        self.rope_style = rope_style
        self.rope_theta = rope_theta
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.num_shared_experts = num_shared_experts
        self.moe_router = moe_router
        self.moe_router_bias = moe_router_bias
        self.moe_capacity_factor = moe_capacity_factor
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
