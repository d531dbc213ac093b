"""Start-up validation of a composed config: `validate(cfg, world_size)` turns every user mistake we can see
before loading data or building the model into one ValueError line that names the key, the value and the fix.

train.py runs it before anything else, and launch/ runs it for the job's task count before submitting; the schema it
checks lives in diffv2/config.py, the head-count and tensor-parallel rules it shares with the model in
diffv2/model/heads.py and diffv2/parallel/tensor.py, the batch rule it shares with DeepSpeed's JSON in
diffv2/parallel/dist.py (`accumulation_steps`). Each monitor's own keys are checked by its config class in
monitoring/ (monitoring/spec.py), which `validate_monitoring` calls.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from diffv2.config import (AC_MODES, ATTENTION_VARIANTS, BACKENDS, FP8_RECIPES, LAMBDA_MODES, MOE_BALANCE,
                           MOE_EXPERT_IMPLS, MOE_ROUTERS, PAIRINGS, ROPE_STYLES, Config, ModelConfig, MonitoringConfig, run_name_problem)
from diffv2.model.heads import validate_heads


def _choice(key: str, value: str, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(options)}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Reject every inconsistent setting we can see before loading data or building the model."""
    a, m, t, o = cfg.model.attention, cfg.model, cfg.trainer, cfg.optim
    _choice("model.attention.variant", a.variant, ATTENTION_VARIANTS)
    _choice("model.attention.pairing", a.pairing, PAIRINGS)
    _choice("model.attention.lambda_mode", a.lambda_mode, LAMBDA_MODES)
    _choice("model.attention.backend", a.backend, BACKENDS)
    _choice("model.attention.rope_style", a.rope_style, ROPE_STYLES)
    _choice("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
    _choice("optim.fused", o.fused, ("auto", "on", "off"))
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.precision", t.precision, ("auto", "fp32", "bf16"))
    _choice("trainer.nonfinite", t.nonfinite, ("skip", "stop", "ignore"))
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, ("auto", "online", "offline", "disabled"))
    for key in ("d_model", "n_layers", "head_dim", "ffn_hidden", "vocab_size", "max_seq_len", "ce_chunk"):
        positive(f"model.{key}", getattr(m, key))
    for key in ("micro_batch_size", "global_batch_size", "max_steps", "log_interval", "eval_batches", "max_bad_steps",
                "preempt_check_interval"):
        positive(f"trainer.{key}", getattr(t, key))
    for key in ("eval_interval", "ckpt_interval"):
        if getattr(t, key) < -1:
            raise ValueError(f"trainer.{key}={getattr(t, key)} must be >= -1 (-1 = never, 0 = only at the end)")
    positive("monitoring.observed_micro_batches", cfg.monitoring.observed_micro_batches, allow_zero=True)
    for key in ("keep_last", "profile_start"):
        positive(f"trainer.{key}", getattr(t, key), allow_zero=True)
    positive("trainer.profile_steps", t.profile_steps)
    if t.profile_start and t.profile_start + t.profile_steps - 1 > t.max_steps:
        raise ValueError(f"trainer.profile_start={t.profile_start} with trainer.profile_steps={t.profile_steps} ends "
                         f"after trainer.max_steps={t.max_steps}; start the profile earlier or profile fewer steps")
    positive("optim.lr", o.lr)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    positive("data.seq_len", cfg.data.seq_len)
    positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    positive("optim.eps", o.eps)
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ValueError(f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if not 0 < a.head_multiplier <= 4:
        raise ValueError(f"model.attention.head_multiplier={a.head_multiplier} must be in (0, 4]")
    validate_heads(m)
    if cfg.data.seq_len > m.max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len} (the RoPE table); "
            f"lower data.seq_len or raise model.max_seq_len"
        )
    validate_parallel(cfg, world_size)
    validate_fp8(cfg)
    from diffv2.parallel.dist import accumulation_steps  # local: dist imports torch, this module does not

    accumulation_steps(t.global_batch_size, t.micro_batch_size, world_size, cfg.parallel.tp)
    dp = world_size // cfg.parallel.tp
    if (t.eval_batches * t.micro_batch_size) % dp:
        raise ValueError(
            f"validation reads trainer.eval_batches x micro_batch_size = {t.eval_batches} x {t.micro_batch_size} "
            f"samples, which the {dp} data-parallel ranks cannot share evenly; make it a multiple of {dp}"
        )
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.prefixes):
        raise ValueError(
            f"data.weights has {len(cfg.data.weights)} entries but data.prefixes has {len(cfg.data.prefixes)}"
        )
    validate_moe(m)
    validate_monitoring(cfg.monitoring)
    if problem := run_name_problem(cfg.run_name):
        raise ValueError(problem)
    if t.resume not in ("auto", "none") and not t.resume:
        raise ValueError("trainer.resume must be auto, none or a checkpoint path")
    if t.init_from:
        if not os.path.exists(os.path.expanduser(t.init_from)):
            raise ValueError(f"trainer.init_from={t.init_from} does not exist; give a safetensors file written by "
                             f"`python -m diffv2.infer.weights export` or an HF export directory")
        if cfg.parallel.meta_init:
            raise ValueError("trainer.init_from loads whole weights into the model before sharding; set "
                             "parallel.meta_init=false (or resume from a DCP checkpoint instead)")


def validate_parallel(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    _choice("parallel.engine", p.engine, ("fsdp", "deepspeed"))
    _choice("parallel.data_parallel", p.data_parallel, ("shard", "hybrid", "replicate"))
    _choice("parallel.activation_checkpoint", p.activation_checkpoint, AC_MODES)
    _choice("parallel.meta_init_draw", p.meta_init_draw, ("cpu", "device"))
    _choice("parallel.expert_fsdp", p.expert_fsdp, ("block", "own"))  # ep>1 implies own, whatever it says
    positive("parallel.tp", p.tp)
    positive("parallel.ac_every", p.ac_every)
    positive("parallel.timeout_s", p.timeout_s)
    positive("parallel.shard_group_size", p.shard_group_size, allow_zero=True)
    if world_size % p.tp:
        raise ValueError(f"parallel.tp={p.tp} does not divide the world size {world_size}; launch a multiple of "
                         f"{p.tp} processes or change parallel.tp")
    if p.tp > 1:
        if p.engine != "fsdp":
            raise ValueError(f"parallel.tp={p.tp} needs parallel.engine=fsdp (DeepSpeed ZeRO here is data-parallel only)")
        from diffv2.parallel.tensor import validate_tp

        validate_tp(cfg.model, p.tp)
    positive("parallel.ep", p.ep)
    if p.ep > 1:
        dp = world_size // p.tp
        if p.engine != "fsdp" or p.data_parallel != "shard" or p.tp > 1:
            raise ValueError(f"parallel.ep={p.ep} needs parallel.engine=fsdp with data_parallel=shard and tp=1")
        if cfg.model.moe.n_experts == 0:
            raise ValueError(f"parallel.ep={p.ep} needs an MoE model (model.moe.n_experts > 0); set parallel.ep=1")
        if dp % p.ep or cfg.model.moe.n_experts % p.ep:
            raise ValueError(f"parallel.ep={p.ep} must divide the {dp} data-parallel ranks and model.moe.n_experts="
                             f"{cfg.model.moe.n_experts}")
    if p.data_parallel == "hybrid" and p.shard_group_size:  # (0, the GPUs per node, is checked once they are known)
        from diffv2.parallel.parallelize import dp_layout  # the mesh's own rule and message

        dp_layout(p.data_parallel, world_size // p.tp, p.shard_group_size)
    if p.engine == "deepspeed":
        if p.deepspeed.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.deepspeed.zero_stage={p.deepspeed.zero_stage} must be 1, 2 or 3")
        if p.deepspeed.config_file and not Path(p.deepspeed.config_file).is_file():
            raise ValueError(f"parallel.deepspeed.config_file={p.deepspeed.config_file!r} does not exist")
        if p.async_checkpoint:
            raise ValueError("parallel.async_checkpoint applies to engine=fsdp (DCP); DeepSpeed saves synchronously")
        if p.meta_init:
            raise ValueError("parallel.meta_init applies to engine=fsdp; DeepSpeed builds the model itself")
        if p.expert_fsdp != "block":
            raise ValueError(f"parallel.expert_fsdp={p.expert_fsdp} applies to engine=fsdp (FSDP2 units); DeepSpeed "
                             f"partitions every parameter itself: set parallel.expert_fsdp=block")


def validate_fp8(cfg: Config) -> None:
    """trainer.fp8's settings the config shows; torchao and the GPU are checked where the device is known
    (diffv2.parallel.float8.check_fp8, at trainer start-up)."""
    t, p = cfg.trainer, cfg.parallel
    _choice("trainer.fp8", t.fp8, FP8_RECIPES)
    if t.fp8 == "off":
        return
    if t.device == "cpu":
        raise ValueError(f"trainer.fp8={t.fp8} needs an H100-class GPU (SM89+), not trainer.device=cpu; set "
                         f"trainer.fp8=off or trainer.device=cuda")
    if t.precision == "fp32":
        raise ValueError(f"trainer.fp8={t.fp8} computes around its FP8 matmuls in bf16; set trainer.precision=bf16 "
                         f"(or auto) or trainer.fp8=off")
    if p.engine == "deepspeed":
        raise ValueError(f"trainer.fp8={t.fp8} is not supported with parallel.engine=deepspeed (its ZeRO wrapping "
                         f"does not know torchao's FP8 layers); use parallel.engine=fsdp or trainer.fp8=off")
    if t.bf16_weights:
        raise ValueError(f"trainer.fp8={t.fp8} casts its layers' weights itself, which trainer.bf16_weights would "
                         f"replace; set trainer.bf16_weights=false (or trainer.fp8=off)")


def validate_moe(m: ModelConfig) -> None:
    e = m.moe
    positive("model.moe.n_experts", e.n_experts, allow_zero=True)
    if e.n_experts == 0:
        return
    _choice("model.moe.router", e.router, MOE_ROUTERS)
    _choice("model.moe.balance", e.balance, MOE_BALANCE)
    _choice("model.moe.experts_impl", e.experts_impl, MOE_EXPERT_IMPLS)
    if not 1 <= e.top_k <= e.n_experts:
        raise ValueError(f"model.moe.top_k={e.top_k} must be in [1, model.moe.n_experts={e.n_experts}]")
    positive("model.moe.expert_hidden", e.expert_hidden)
    for key in ("n_shared_experts", "capacity_factor", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        positive(f"model.moe.{key}", getattr(e, key), allow_zero=True)
    if e.balance == "aux_free" and e.bias_update_rate == 0:
        raise ValueError("model.moe.bias_update_rate=0 never moves the expert bias; set it > 0 (e.g. 1e-3) for "
                         "model.moe.balance=aux_free")
    if m.param_match:
        raise ValueError("model.param_match=true resizes the dense ffn_hidden, which MoE blocks do not use; "
                         "set model.param_match=false with model.moe.n_experts > 0")


def validate_monitoring(mon: MonitoringConfig) -> None:
    """The fields every monitor shares, then each monitor's own checks (its config's `validate`, declared beside
    the monitor in monitoring/: the core names no monitor)."""
    positive("monitoring.probe_sequences", mon.probe_sequences)
    for f in dataclasses.fields(mon):
        sub = getattr(mon, f.name)
        if dataclasses.is_dataclass(sub) and hasattr(sub, "validate"):
            sub.validate(f"monitoring.{f.name}")
