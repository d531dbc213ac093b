"""The config schema: every key, its type, default and one-line doc. YAML under configs/ only picks values.

Registered with Hydra's ConfigStore by `register_configs()`; `validate(cfg)` turns every user mistake we can
see before start-up into one ValueError line that names the key, the value and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ATTENTION_VARIANTS = ("diffv2", "baseline", "diffv1")
PAIRINGS = ("interleave", "half_split")
LAMBDA_MODES = ("sigmoid", "none", "raw")
BACKENDS = ("auto", "fa4", "flash_attn", "cudnn", "sdpa_flash", "flex", "math")
ROPE_STYLES = ("interleaved", "half")
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_BALANCE = ("aux_loss", "aux_free", "none")
MOE_EXPERT_IMPLS = ("auto", "grouped_mm", "loop")


@dataclass
class AttentionConfig:
    name: str = "${.variant}"  # the preset's name (configs/attention/), carried by run names; default: the variant
    variant: str = "diffv2"  # diffv2 | baseline | diffv1 (spec §2, §4, §3)
    head_multiplier: float = 1.0  # baseline only: query heads = multiplier*h (1.5 = ablation 4, 2.0 = 2h baseline)
    pairing: str = "interleave"  # diffv2 only: interleave = pairs (2i, 2i+1) per spec §2.4; half_split = ablation 1
    lambda_mode: str = "sigmoid"  # diffv2 only: sigmoid (spec) | none (sigma=1, ablation 2) | raw (no sigmoid, ablation 3)
    combine_fp32: bool = True  # diffv2: sigmoid and subtraction in fp32 (spec A5); False = bit-faithful activation dtype
    backend: str = "auto"  # auto | fa4 | flash_attn | cudnn | sdpa_flash | flex | math
    doc_mask: bool = False  # mask attention across EOD document boundaries in packed sequences
    qk_norm: bool = False  # per-head RMSNorm over head_dim on q and k before RoPE (Qwen3 style)
    rope_style: str = "interleaved"  # interleaved (GPT-J, reference) | half (NeoX)
    rope_theta: float = 10000.0  # RoPE base


@dataclass
class MoEConfig:
    n_experts: int = 0  # routed experts E per block (0 = dense: every block is a SwiGLU of model.ffn_hidden)
    top_k: int = 2  # experts each token is routed to
    expert_hidden: int = 256  # SwiGLU intermediate size of each (fine-grained) expert
    n_shared_experts: int = 0  # always-on experts of expert_hidden each, run on every token beside the routed ones
    router: str = "softmax"  # softmax over experts, top-k, renormalised (Qwen3) | sigmoid scores, top-k, renormalised
    capacity_factor: float = 0.0  # 0 = dropless; else an expert takes at most ceil(cf * tokens * top_k / E) tokens
    balance: str = "aux_loss"  # aux_loss (global-batch balance loss) | aux_free (expert bias, arXiv 2408.15664) | none
    aux_loss_coef: float = 1e-3  # weight of the load-balance loss E * sum_e f_e * P_e (balance=aux_loss)
    z_loss_coef: float = 0.0  # weight of the router z-loss mean(logsumexp(router logits)^2); 0 = logged, not trained
    bias_update_rate: float = 1e-3  # aux_free: bias += rate * sign(mean load - load) after every optimizer step
    experts_impl: str = "auto"  # auto (grouped GEMM on GPU, per-expert loop on CPU) | grouped_mm | loop


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name, used in run names and tags
    d_model: int = 256  # residual width D
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # h: output heads (= baseline query heads; DIFF V2 has 2h query heads)
    n_kv_heads: int = 2  # h_kv: key/value heads (GQA)
    head_dim: int = 64  # d: per-head dimension of q, k, v
    ffn_hidden: int = 768  # SwiGLU intermediate size
    vocab_size: int = 384  # embedding rows; must be >= the tokenizer's vocabulary
    max_seq_len: int = 4096  # RoPE table length; the training sequence length must not exceed it
    tie_embeddings: bool = False  # share the token embedding with the lm_head
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # N(0, init_std) for every linear and embedding weight
    scale_residual_init: bool = True  # residual output projections get init_std / sqrt(2 * n_layers)
    z_loss: float = 0.0  # coefficient of the log(Z)^2 auxiliary loss on the lm_head logits
    param_match: bool = False  # diffv2: shrink ffn_hidden so non-embedding params match the h-head baseline (spec A2)
    ce_chunk: int = 8192  # tokens per chunk of the fused lm_head + cross-entropy (never full fp32 logits)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts blocks (n_experts > 0) instead of SwiGLU


@dataclass
class DataConfig:
    name: str = "sample"  # dataset name for run names
    prefixes: List[str] = field(default_factory=list)  # Megatron .bin/.idx prefixes; empty = the shipped sample corpus
    weights: Optional[List[float]] = None  # blend weights, one per prefix (None = proportional to size)
    tokenizer: str = "byte"  # byte | path to an HF tokenizer.json (must match what the data was prepared with)
    seq_len: int = 256  # training sequence length in tokens
    split: str = "98,2,0"  # train,valid,test split of each prefix (Megatron convention)
    cache_dir: str = "${oc.env:DIFFV2_CACHE,${oc.env:HOME}/.cache/diffv2}"  # sample preparation + index caches
    num_workers: int = 1  # DataLoader worker processes (0 = in the training process)


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20  # linear warm-up steps
    decay_fraction: float = 0.2  # wsd: share of steps in the final decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay for matrices
    decay_norms_and_embeddings: bool = False  # also decay norms, biases and embeddings
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    fused: str = "auto"  # auto (fused on GPU) | on | off


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    micro_batch_size: int = 8  # sequences per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step (multiple of micro_batch_size * world size)
    max_steps: int = 200  # optimizer steps
    log_interval: int = 10  # steps between console/metrics lines
    eval_interval: int = 100  # steps between validation passes (0 = only at the end, -1 = never)
    eval_batches: int = 8  # micro-batches per validation pass
    ckpt_interval: int = 100  # steps between checkpoints (0 = only at the end, -1 = never)
    keep_last: int = 2  # checkpoints kept on disk
    resume: str = "auto"  # auto (latest valid checkpoint in the run dir) | none | path to a checkpoint
    init_from: Optional[str] = None  # a fresh run starts from these weights: a safetensors state dict (python -m
    # diffv2.weights export) or an HF export directory; ignored when resuming from a checkpoint
    compile: bool = False  # torch.compile each block
    bf16_weights: bool = False  # bf16 Linear weights cast once per optimizer step, not per micro-batch (one process,
    # bf16 autocast; see diffv2/compute_weights.py)
    # bf16_weights: each Linear's weight gradient is added into the fp32 .grad by its GEMM (CUDA: summed in fp32, not
    # rounded to bf16 first); false = a bf16 gradient, then the add (autocast's arithmetic exactly, on GPU too)
    fused_wgrad: bool = True
    deterministic: bool = True  # deterministic algorithms on CPU (exact resume); off on GPU for speed
    nonfinite: str = "skip"  # NaN/Inf loss or grad norm: skip (undo the step) | stop (at the first) | ignore (no check)
    max_bad_steps: int = 10  # nonfinite=skip: this many non-finite steps in a row save a checkpoint and stop the run
    preempt_check_interval: int = 1  # steps between the ranks' agreement on a received SIGUSR1/SIGTERM (save + stop)
    requeue: bool = True  # after a SIGUSR1 stop under SLURM, `scontrol requeue` the job (it resumes automatically)
    profile_start: int = 0  # > 0: profile optimizer steps profile_start .. + profile_steps - 1 (torch.profiler; trace
    # and operator table per rank under <run_dir>/profile/, see diffv2/profiling.py); 0 = off
    profile_steps: int = 3


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # ZeRO stage 1 (optimizer state) | 2 (+ gradients) | 3 (+ parameters)
    offload_optimizer: bool = False  # keep optimizer state and step on the CPU (ZeRO-Offload)
    config_file: str = ""  # a DeepSpeed JSON to use instead of the generated one (batch sizes must agree)


@dataclass
class ParallelConfig:
    engine: str = "fsdp"  # fsdp (PyTorch FSDP2) | deepspeed (ZeRO); one process with tp=1 wraps nothing
    data_parallel: str = "shard"  # fsdp: shard (FSDP) | hybrid (HSDP) | replicate (DDP semantics)
    shard_group_size: int = 0  # hybrid: ranks per shard group (0 = GPUs per node)
    tp: int = 1  # tensor-parallel degree (innermost mesh dimension; divides model.n_kv_heads)
    ep: int = 1  # expert-parallel degree (MoE): experts split over groups of ep data-parallel ranks (fsdp engine)
    meta_init: bool = False  # build the model on the meta device, shard it, then allocate and draw only this rank's
    # shards (identical weights; needed when the fp32 model does not fit one GPU, e.g. moe_30a3); engine fsdp only
    meta_init_draw: str = "cpu"  # meta_init: cpu (every full tensor drawn on the CPU from the global generator: bit-
    # identical to a normal build, ~125M samples/s, ~4 min per rank for moe_30a3) | device (drawn on this rank's
    # device from a generator seeded with `seed`: seconds; identical across layouts that use it, not to a CPU build)
    reshard_after_forward: bool = True  # fsdp: free gathered block parameters after forward (ZeRO-3) or keep them
    activation_checkpoint: str = "none"  # none | full (every block) | selective (every `ac_every`-th block)
    ac_every: int = 2  # selective: checkpoint blocks 0, k, 2k, ...
    async_checkpoint: bool = False  # fsdp: write checkpoints in the background (finished before the next one)
    timeout_s: int = 600  # a collective that waits longer (a dead or stalled rank) fails the run with an error
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "diffv2"  # W&B project
    entity: Optional[str] = None  # W&B entity (team)
    tags: List[str] = field(default_factory=list)  # extra tags (variant, size and lr are added automatically)
    name: Optional[str] = None  # run name (default: the run directory's name)


@dataclass
class LoggingConfig:
    progress: bool = True  # progress bar on the console
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class GradNormMonitorConfig:
    enabled: bool = True  # grad/: pre/post-clip global norm, clip coefficient, norms per layer and per module kind
    interval: int = 10  # steps between measurements
    param_norms: bool = True  # also parameter norms and update/parameter ratio per layer
    # update norm of tensors >= 2^20 local elements from every k-th element (a transient copy of 1/k of them);
    # 1 = exact, a transient copy of all parameters at every reading
    update_sample: int = 16


@dataclass
class ActivationMonitorConfig:
    enabled: bool = True  # act/: residual-stream max|h|, top-k, kurtosis, share of |x| > 6 std at each block output
    interval: int = 100  # steps between measurements (computed in the training forward of that step)
    top_k: int = 3  # largest |h| values logged per layer (V1 paper reports top-1/2/3, spec §7.5)


@dataclass
class AttentionLogitMonitorConfig:
    enabled: bool = True  # attn/logit_max_abs: max |q.k/sqrt(d)| per layer over all query heads on the probe batch
    interval: int = 200  # steps between probe passes


@dataclass
class ContextRMSMonitorConfig:
    enabled: bool = True  # attn/context_rms*: per-head RMS of the context before o_proj (spec §6)
    interval: int = 100  # steps between per-layer mean/min/max over heads
    heatmap_interval: int = 500  # steps between full layer x head matrices (a multiple of interval)


@dataclass
class LambdaMonitorConfig:
    enabled: bool = True  # attn/lambda_*: sigmoid(lambda) mean/p5/p50/p95 per layer (DIFF V2), lambda (DIFF V1)
    interval: int = 100  # steps between measurements
    heatmap_interval: int = 500  # steps between layer x head matrices of the per-head mean (a multiple of interval)


@dataclass
class AttentionSinkMonitorConfig:
    enabled: bool = True  # attn/sink_mass*, attn/entropy*: first-token attention mass and entropy per head (probe)
    interval: int = 200  # steps between probe passes


@dataclass
class SpikeMonitorConfig:
    enabled: bool = True  # spike/: loss and grad-norm spike detection, spike score, spikes.jsonl event log
    interval: int = 10  # steps between host reads: detection over the recorded steps, events, metrics, stop
    k: float = 6.0  # a value is a spike when it exceeds mean + k * std of the window
    window: int = 128  # past values in the rolling mean and std
    warmup_steps: int = 64  # steps observed before any value can be flagged
    score_window: int = 1000  # steps over which spike/score is the share of spike steps
    skip_step: bool = False  # action: undo the optimizer step of a spike step (params and optimizer state restored)
    stop: bool = False  # action: save a checkpoint and stop at the first host read after a spike


@dataclass
class MoEMonitorConfig:
    enabled: bool = True  # moe/: tokens per expert, imbalance max/mean, aux and z loss, dead experts (if MoE layers)
    interval: int = 10  # steps between reads of the layers' moe_stats


@dataclass
class PerfMonitorConfig:
    enabled: bool = True  # perf/: tokens/s, step time, data-loading share, MFU and memory (GPU), elapsed time
    interval: int = 0  # steps per throughput window (0 = trainer.log_interval)


@dataclass
class MonitoringConfig:
    enabled: bool = True  # health monitors (all but perf): false builds none and installs no observer (zero cost)
    # Every monitor also reads at the run's last step (trainer.max_steps), so each run ends with a full record.
    probe_sequences: int = 4  # validation sequences in the fixed probe batch of the attention probes
    # micro-batches per rank whose training forward an observed step observes (activations, context RMS, lambda):
    # the first k; 0 = all. The others run the unobserved graph (statistics from 1/accum of the step's tokens)
    observed_micro_batches: int = 1
    grad_norms: GradNormMonitorConfig = field(default_factory=GradNormMonitorConfig)
    activations: ActivationMonitorConfig = field(default_factory=ActivationMonitorConfig)
    attention_logits: AttentionLogitMonitorConfig = field(default_factory=AttentionLogitMonitorConfig)
    context_rms: ContextRMSMonitorConfig = field(default_factory=ContextRMSMonitorConfig)
    lambdas: LambdaMonitorConfig = field(default_factory=LambdaMonitorConfig)
    attention_sinks: AttentionSinkMonitorConfig = field(default_factory=AttentionSinkMonitorConfig)
    spikes: SpikeMonitorConfig = field(default_factory=SpikeMonitorConfig)
    moe: MoEMonitorConfig = field(default_factory=MoEMonitorConfig)
    perf: PerfMonitorConfig = field(default_factory=PerfMonitorConfig)


@dataclass
class Config:
    seed: int = 0  # seeds model init, data shuffling and every RNG
    run_name: str = "${model.name}-${model.attention.name}-s${seed}"  # run directory name under runs/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="attention", name="schema", node=AttentionConfig, package="model.attention")
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="parallel", name="schema", node=ParallelConfig)
    cs.store(group="logging", name="schema", node=LoggingConfig)
    cs.store(group="monitoring", name="schema", node=MonitoringConfig)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def run_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a run directory under runs/ (one line), or None."""
    if not RUN_NAME.fullmatch(str(name)) or ".." in str(name):
        return (f"run_name={name!r} must be 1-200 ASCII letters, digits and . _ + - (starting with a letter or digit, "
                f"no '..'): it names a directory under runs/")
    return None


def unknown_keys(container: dict, schema: type, prefix: str = "") -> list[str]:
    """Keys of a composed config (a plain dict) that the dataclass schema does not define, dotted, nested too."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key, value in container.items():
        if key not in names:
            found.append(f"{prefix}{key}")
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints.get(key)):
            found += unknown_keys(value, hints[key], f"{prefix}{key}.")
    return found


def _choice(key: str, value: str, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(options)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Reject every inconsistent setting we can see before loading data or building the model."""
    from diffv2.attention import validate_heads

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
        _positive(f"model.{key}", getattr(m, key))
    for key in ("micro_batch_size", "global_batch_size", "max_steps", "log_interval", "eval_batches", "max_bad_steps",
                "preempt_check_interval"):
        _positive(f"trainer.{key}", getattr(t, key))
    for key in ("eval_interval", "ckpt_interval"):
        if getattr(t, key) < -1:
            raise ValueError(f"trainer.{key}={getattr(t, key)} must be >= -1 (-1 = never, 0 = only at the end)")
    _positive("monitoring.observed_micro_batches", cfg.monitoring.observed_micro_batches, allow_zero=True)
    for key in ("keep_last", "profile_start"):
        _positive(f"trainer.{key}", getattr(t, key), allow_zero=True)
    _positive("trainer.profile_steps", t.profile_steps)
    if t.profile_start and t.profile_start + t.profile_steps - 1 > t.max_steps:
        raise ValueError(f"trainer.profile_start={t.profile_start} with trainer.profile_steps={t.profile_steps} ends "
                         f"after trainer.max_steps={t.max_steps}; start the profile earlier or profile fewer steps")
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("data.seq_len", cfg.data.seq_len)
    _positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    _positive("optim.eps", o.eps)
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
    dp = world_size // cfg.parallel.tp
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
            f"ranks = {t.micro_batch_size} x {dp} (world size {world_size} / tp {cfg.parallel.tp}); change one of them"
        )
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
                             f"`python -m diffv2.weights export` or an HF export directory")
        if cfg.parallel.meta_init:
            raise ValueError("trainer.init_from loads whole weights into the model before sharding; set "
                             "parallel.meta_init=false (or resume from a DCP checkpoint instead)")


def validate_parallel(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    _choice("parallel.engine", p.engine, ("fsdp", "deepspeed"))
    _choice("parallel.data_parallel", p.data_parallel, ("shard", "hybrid", "replicate"))
    _choice("parallel.activation_checkpoint", p.activation_checkpoint, ("none", "full", "selective"))
    _choice("parallel.meta_init_draw", p.meta_init_draw, ("cpu", "device"))
    _positive("parallel.tp", p.tp)
    _positive("parallel.ac_every", p.ac_every)
    _positive("parallel.timeout_s", p.timeout_s)
    _positive("parallel.shard_group_size", p.shard_group_size, allow_zero=True)
    if world_size % p.tp:
        raise ValueError(f"parallel.tp={p.tp} does not divide the world size {world_size}; launch a multiple of "
                         f"{p.tp} processes or change parallel.tp")
    if p.tp > 1:
        if p.engine != "fsdp":
            raise ValueError(f"parallel.tp={p.tp} needs parallel.engine=fsdp (DeepSpeed ZeRO here is data-parallel only)")
        from diffv2.parallel.tensor import validate_tp

        validate_tp(cfg.model, p.tp)
    _positive("parallel.ep", p.ep)
    if p.ep > 1:
        dp = world_size // p.tp
        if p.engine != "fsdp" or p.data_parallel != "shard" or p.tp > 1:
            raise ValueError(f"parallel.ep={p.ep} needs parallel.engine=fsdp with data_parallel=shard and tp=1")
        if cfg.model.moe.n_experts == 0:
            raise ValueError(f"parallel.ep={p.ep} needs an MoE model (model.moe.n_experts > 0); set parallel.ep=1")
        if dp % p.ep or cfg.model.moe.n_experts % p.ep:
            raise ValueError(f"parallel.ep={p.ep} must divide the {dp} data-parallel ranks and model.moe.n_experts="
                             f"{cfg.model.moe.n_experts}")
    if p.data_parallel == "hybrid" and p.shard_group_size and (world_size // p.tp) % p.shard_group_size:
        raise ValueError(f"parallel.shard_group_size={p.shard_group_size} does not divide the "
                         f"{world_size // p.tp} data-parallel ranks; use a divisor (usually the GPUs per node)")
    if p.engine == "deepspeed":
        if p.deepspeed.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.deepspeed.zero_stage={p.deepspeed.zero_stage} must be 1, 2 or 3")
        if p.deepspeed.config_file and not Path(p.deepspeed.config_file).is_file():
            raise ValueError(f"parallel.deepspeed.config_file={p.deepspeed.config_file!r} does not exist")
        if p.async_checkpoint:
            raise ValueError("parallel.async_checkpoint applies to engine=fsdp (DCP); DeepSpeed saves synchronously")
        if p.meta_init:
            raise ValueError("parallel.meta_init applies to engine=fsdp; DeepSpeed builds the model itself")


def validate_moe(m: ModelConfig) -> None:
    e = m.moe
    _positive("model.moe.n_experts", e.n_experts, allow_zero=True)
    if e.n_experts == 0:
        return
    _choice("model.moe.router", e.router, MOE_ROUTERS)
    _choice("model.moe.balance", e.balance, MOE_BALANCE)
    _choice("model.moe.experts_impl", e.experts_impl, MOE_EXPERT_IMPLS)
    if not 1 <= e.top_k <= e.n_experts:
        raise ValueError(f"model.moe.top_k={e.top_k} must be in [1, model.moe.n_experts={e.n_experts}]")
    _positive("model.moe.expert_hidden", e.expert_hidden)
    for key in ("n_shared_experts", "capacity_factor", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        _positive(f"model.moe.{key}", getattr(e, key), allow_zero=True)
    if e.balance == "aux_free" and e.bias_update_rate == 0:
        raise ValueError("model.moe.bias_update_rate=0 never moves the expert bias; set it > 0 (e.g. 1e-3) for "
                         "model.moe.balance=aux_free")
    if m.param_match:
        raise ValueError("model.param_match=true resizes the dense ffn_hidden, which MoE blocks do not use; "
                         "set model.param_match=false with model.moe.n_experts > 0")


def validate_monitoring(mon: MonitoringConfig) -> None:
    _positive("monitoring.probe_sequences", mon.probe_sequences)
    for name in ("grad_norms", "activations", "attention_logits", "context_rms", "lambdas", "attention_sinks",
                 "spikes", "moe"):
        _positive(f"monitoring.{name}.interval", getattr(mon, name).interval)
    _positive("monitoring.perf.interval", mon.perf.interval, allow_zero=True)
    _positive("monitoring.grad_norms.update_sample", mon.grad_norms.update_sample)
    for name in ("context_rms", "lambdas"):
        sub = getattr(mon, name)
        if sub.heatmap_interval <= 0 or sub.heatmap_interval % sub.interval:
            raise ValueError(
                f"monitoring.{name}.heatmap_interval={sub.heatmap_interval} must be a positive multiple of "
                f"monitoring.{name}.interval={sub.interval}"
            )
    _positive("monitoring.activations.top_k", mon.activations.top_k)
    s = mon.spikes
    _positive("monitoring.spikes.k", s.k)
    _positive("monitoring.spikes.score_window", s.score_window)
    if s.window < 2:
        raise ValueError(f"monitoring.spikes.window={s.window} must be >= 2 (the rolling std needs two values)")
    if s.warmup_steps < 2:
        raise ValueError(f"monitoring.spikes.warmup_steps={s.warmup_steps} must be >= 2 so the window has a std")
