"""The config schema: every key, its type, default and one-line doc. YAML under configs/ only picks values.

Registered with Hydra's ConfigStore by `register_configs(monitoring=...)`; `diffv2.train.validate.validate(cfg)` turns
every user mistake we can see before start-up into one ValueError line that names the key, the value and the fix.
Each monitor's own keys (monitoring.grad_norms.*, monitoring.spikes.*, ...) are declared beside the monitor in
monitoring/<name>.py (monitoring/spec.py); train.py registers them with `monitoring.build.schema()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

ATTENTION_VARIANTS = ("diffv2", "baseline", "diffv1")
PAIRINGS = ("interleave", "half_split")
LAMBDA_MODES = ("sigmoid", "none", "raw")
BACKENDS = ("auto", "fa4", "flash_attn", "cudnn", "sdpa_flash", "flex", "math")
ROPE_STYLES = ("interleaved", "half")
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_BALANCE = ("aux_loss", "aux_free", "none")
MOE_EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
FP8_RECIPES = ("off", "tensorwise", "rowwise")
AC_MODES = ("none", "full", "selective", "selective_moe")  # parallel.activation_checkpoint


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
    force_balance: bool = False  # BENCHMARKS ONLY, never for training: slot a of the T*K goes to expert a mod E
    # (each expert gets T*K/E slots whatever the router says; Megatron's --moe-router-force-load-balancing)


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
    # diffv2.infer.weights export) or an HF export directory; ignored when resuming from a checkpoint
    compile: bool = False  # torch.compile each block
    fp8: str = "off"  # off | tensorwise | rowwise: large dense Linear layers in FP8 via torchao (SM89+ GPU, the fp8
    # extra); lm_head, router, lambda projection and MoE experts stay bf16 (diffv2/parallel/float8.py)
    bf16_weights: bool = False  # bf16 Linear weights cast once per optimizer step, not per micro-batch (one process,
    # bf16 autocast; see diffv2/train/compute_weights.py)
    # bf16_weights: each Linear's weight gradient is added into the fp32 .grad by its GEMM (CUDA: summed in fp32, not
    # rounded to bf16 first); false = a bf16 gradient, then the add (autocast's arithmetic exactly, on GPU too)
    fused_wgrad: bool = True
    deterministic: bool = True  # deterministic algorithms on CPU (exact resume); off on GPU for speed
    nonfinite: str = "skip"  # NaN/Inf loss or grad norm: skip (undo the step) | stop (at the first) | ignore (no check)
    max_bad_steps: int = 10  # nonfinite=skip: this many non-finite steps in a row save a checkpoint and stop the run
    preempt_check_interval: int = 1  # steps between the ranks' agreement on a received SIGUSR1/SIGTERM (save + stop)
    requeue: bool = True  # after a SIGUSR1 stop under SLURM, `scontrol requeue` the job (it resumes automatically)
    profile_start: int = 0  # > 0: profile optimizer steps profile_start .. + profile_steps - 1 (torch.profiler; trace
    # and operator table per rank under <run_dir>/profile/, see diffv2/train/profiling.py); 0 = off
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
    expert_fsdp: str = "block"  # fsdp, MoE, ep=1: block (experts sharded inside their block's FSDP2 unit, gathered
    # with it) | own (each MoE layer's experts are their own unit over the same ranks, gathered and prefetched apart
    # from the block; torchtitan's 30A3 layout). ep>1 always gives experts their own unit, over dp_mod_ep (docs/moe.md)
    meta_init: bool = False  # build the model on the meta device, shard it, then allocate and draw only this rank's
    # shards (identical weights; needed when the fp32 model does not fit one GPU, e.g. moe_30a3); engine fsdp only
    meta_init_draw: str = "cpu"  # meta_init: cpu (every full tensor drawn on the CPU from the global generator: bit-
    # identical to a normal build, ~125M samples/s, ~4 min per rank for moe_30a3) | device (drawn on this rank's
    # device from a generator seeded with `seed`: seconds; identical across layouts that use it, not to a CPU build)
    reshard_after_forward: bool = True  # fsdp: free gathered block parameters after forward (ZeRO-3) or keep them
    activation_checkpoint: str = "none"  # none | full (every block) | selective (every `ac_every`-th block) |
    # selective_moe (every block, keeping communication, GEMM and attention outputs: docs/moe.md)
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
class MonitoringConfig:
    enabled: bool = True  # health monitors (all but perf): false builds none and installs no observer (zero cost)
    # Every monitor also reads at the run's last step (trainer.max_steps), so each run ends with a full record.
    probe_sequences: int = 4  # validation sequences in the fixed probe batch of the attention probes
    # micro-batches per rank whose training forward an observed step observes (activations, context RMS, lambda):
    # the first k; 0 = all. The others run the unobserved graph (statistics from 1/accum of the step's tokens)
    observed_micro_batches: int = 1
    # One sub-config per monitor (monitoring.grad_norms, .spikes, ...): each monitor module in monitoring/ declares
    # its own (monitoring/spec.py); monitoring/build.py adds them to this schema (register_configs(monitoring=...)).


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


def register_configs(monitoring: type = MonitoringConfig) -> type:
    """Register the schema with Hydra's ConfigStore and return the Config class it composes into. `monitoring`: the
    MonitoringConfig subclass with one field per monitor (monitoring.build.schema(); the core knows no monitor)."""
    from dataclasses import make_dataclass

    from hydra.core.config_store import ConfigStore

    config = Config if monitoring is MonitoringConfig else vars(monitoring).get("Config")  # made once per schema
    if config is None:  # reachable for pickle as <monitoring's qualified name>.Config
        namespace = {"__module__": monitoring.__module__, "__qualname__": f"{monitoring.__qualname__}.Config",
                     "__doc__": Config.__doc__}
        config = make_dataclass("Config", [("monitoring", monitoring, field(default_factory=monitoring))],
                                bases=(Config,), namespace=namespace)
        monitoring.Config = config
    cs = ConfigStore.instance()
    cs.store(name="schema", node=config)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="attention", name="schema", node=AttentionConfig, package="model.attention")
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="parallel", name="schema", node=ParallelConfig)
    cs.store(group="logging", name="schema", node=LoggingConfig)
    cs.store(group="monitoring", name="schema", node=monitoring)
    return config


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
