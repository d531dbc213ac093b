"""DeepSpeed ZeRO (stage 1, 2 or 3) behind the `Engine` interface: pure data parallelism, dp rank = rank.

The DeepSpeed JSON is generated from the Hydra config (`deepspeed_config`), so batch sizes, clipping and precision
can never disagree with the loop; `parallel.deepspeed.config_file` swaps in a hand-written JSON, checked against
our batch sizes. The engine's JSON is `engine.ds_config` (the trainer writes it into the run record).

How the loop's calls map onto DeepSpeed:
  - `engine.model` is the Transformer itself (names, observers and methods as on one device) whose `loss` is
    patched per instance to go through DeepSpeed's forward: ZeRO-3 gathers parameters in forward hooks, so calling
    the unwrapped `loss` would see empty shards. Its class becomes `LossForward`, a Transformer whose forward also
    takes `labels_BN` and then returns `loss`'s triple (names, methods and isinstance unchanged; the model code
    knows nothing of it). The lm_head weight is used outside lm_head's forward and is registered as an external
    parameter of the Transformer.
  - `backward(loss, last_micro)`: the loop already divides by the accumulation steps, so DeepSpeed must not
    (`scale_wrt_gas=False`); the boundary is set explicitly, so gradients are reduced on the last micro-batch
    (and readable by monitors before `optimizer_step`) however many micro-batches the loop runs.
  - `optimizer_step`: DeepSpeed clips inside its step (`gradient_clipping`) and returns the global pre-clip norm.
    A step whose norm is inf/NaN is skipped by DeepSpeed itself (parameters and optimizer state untouched, the
    norm reads inf), for every stage in fp32 and bf16 (see `skips_nonfinite_steps`).
  - The optimizer is ours (`build_optimizer`: AdamW with decay groups), or DeepSpeedCPUAdam with the same groups
    when offloading; `engine.optimizer` is DeepSpeed's ZeRO wrapper whose `param_groups` are the inner
    optimizer's, so `set_lr` reaches the step. It is not a torch Optimizer (no `register_step_post_hook`, no
    per-parameter `state`), and DeepSpeed steps the inner one once per parameter group, so per-step work (MoE
    expert-bias updates) belongs after `optimizer_step`, not in optimizer hooks.
  - Checkpoints: DeepSpeed's own format under a fixed tag (`deepspeed/`), no 'latest' file; ZeRO partitions do not
    reshard, so `load` refuses another world size or stage with the way out.

Not supported: the step-undo snapshot (`supports_undo = False`): DeepSpeed's fp32 master partitions and optimizer
state are not `optimizer.state` of model parameters, so trainer.nonfinite=skip cannot restore a step; the trainer
falls back to detection / stop (DeepSpeed's own skip above still keeps a NaN gradient out of the weights).
Tensor parallelism (config validation refuses parallel.tp > 1).

ZeRO-3 keeps only partitions in `param.data` outside the forward of the module owning a parameter, so
`params_readable` is False there and the trainer turns off what reads weights directly (parameter norms, the
attention probes). Monitors read gradients through `named_grads`: this rank's reduced partition of every parameter
at every stage.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from diffv2.model.transformer import Transformer
from diffv2.optim import build_optimizer, param_groups
from diffv2.parallel import dist as pdist
from diffv2.parallel.engine import Engine, tensor_bytes
from diffv2.parallel.norms import ShardedLocal
from diffv2.parallel.parallelize import wants_bf16

log = logging.getLogger(__name__)

# Measured (bench/results/deepspeed-350m-H100.md): with the same compiled blocks, DeepSpeed's per-parameter gradient
# hooks, stream waits and per-tensor overflow checks leave the GPU idle for most of each step.
SLOW_NOTICE = ("notice: DeepSpeed ZeRO-2 trained 350m DIFF V2 at 0.64x the tokens/s of parallel=fsdp on one H100, with "
               "the same compiled blocks (its per-parameter gradient hooks keep the GPU idle ~60% of a step; README, "
               "'Many GPUs and many nodes'); parallel=fsdp is the fast path")
TAG = "deepspeed"  # fixed checkpoint tag: `load` names it, so DeepSpeed's 'latest' file is never written or read
META = "deepspeed_engine.json"  # world size and stage of a checkpoint, beside DeepSpeed's files


def deepspeed_config(cfg, world_size: int, device_type: Optional[str] = None) -> dict:
    """The DeepSpeed JSON for this run: generated from cfg, or cfg.parallel.deepspeed.config_file checked against
    our batch sizes (missing batch keys are filled in; an `optimizer` or `scheduler` section is refused because
    our AdamW and lr schedule drive training)."""
    t, ds = cfg.trainer, cfg.parallel.deepspeed
    batch = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
             "gradient_accumulation_steps": pdist.accumulation_steps(t.global_batch_size, t.micro_batch_size,
                                                                     world_size),
             "train_batch_size": t.global_batch_size}
    if ds.config_file:
        return _from_file(Path(ds.config_file), batch, cfg)
    device_type = device_type or ("cuda" if torch.cuda.is_available() and t.device != "cpu" else "cpu")
    bf16 = wants_bf16(cfg, device_type)
    # Buckets scale with the model width (the Hugging Face "auto" rule); a floor keeps tiny models in few buckets.
    d2 = max(cfg.model.d_model ** 2, 1 << 20)
    zero = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": device_type == "cuda",
            "reduce_bucket_size": d2, "allgather_bucket_size": d2}
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * d2),
                    stage3_param_persistence_threshold=10 * cfg.model.d_model,
                    stage3_gather_16bit_weights_on_model_save=False)
        zero.pop("allgather_bucket_size")
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    config = {**batch, "gradient_clipping": cfg.optim.grad_clip, "zero_optimization": zero,
              "bf16": {"enabled": bf16}, "steps_per_print": 1 << 62, "wall_clock_breakdown": False}
    if bf16:  # bf16 parameters and compute, fp32 master weights and AdamW; micro-batch gradients add up in fp32
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def _from_file(path: Path, batch: dict, cfg) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"parallel.deepspeed.config_file={str(path)!r} is not a readable JSON file ({err})") from None
    for key, ours in batch.items():
        theirs = config.setdefault(key, ours)
        if theirs != ours:
            raise ValueError(f"parallel.deepspeed.config_file {path} sets {key}={theirs} but the trainer config gives "
                             f"{ours}; remove it from the JSON or change trainer.micro_batch_size/global_batch_size")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"parallel.deepspeed.config_file {path} has a {key!r} section; remove it (optim.* "
                             f"configures the optimizer and lr schedule)")
    clip = config.setdefault("gradient_clipping", cfg.optim.grad_clip)
    if clip != cfg.optim.grad_clip:
        raise ValueError(f"parallel.deepspeed.config_file {path} sets gradient_clipping={clip} but optim.grad_clip="
                         f"{cfg.optim.grad_clip}; remove it from the JSON or make them equal")
    config.setdefault("steps_per_print", 1 << 62)
    config.setdefault("wall_clock_breakdown", False)
    log.info("DeepSpeed config from %s (parallel.deepspeed.config_file)", path)
    return config


def _ensure_env() -> None:
    """One process without a launcher: DeepSpeed would look for MPI; give it a one-rank env:// rendezvous."""
    if torch.distributed.is_initialized() or "RANK" in os.environ:
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


class LossForward(Transformer):
    """The model under DeepSpeed: forward with `labels_BN` is `loss` (DeepSpeed's hooks and casts run around
    forward only); without, the logits as always."""

    def forward(self, tokens_BN, doc_ids_BN=None, cache=None, labels_BN=None):
        if labels_BN is None:
            return Transformer.forward(self, tokens_BN, doc_ids_BN, cache)
        return Transformer.loss(self, tokens_BN, labels_BN, doc_ids_BN)  # the class's: `loss` is patched below


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    supports_undo = False  # see the module doc: trainer.nonfinite=skip falls back to detection / stop
    skips_nonfinite_steps = True  # DeepSpeed itself skips a step whose global grad norm is inf/NaN

    def __init__(self, model: nn.Module, cfg, device: torch.device):
        import importlib

        import deepspeed

        if device.type == "cpu":
            # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op at initialize (tens of seconds, needs a C++
            # toolchain) that only its tensor-parallel inference uses; training all-reduces through gloo without it.
            comm = importlib.import_module("deepspeed.comm.torch")
            if hasattr(comm, "build_shm_op"):
                comm.build_shm_op = lambda: None
        _ensure_env()
        world = pdist.world_size() if torch.distributed.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
        self.ds_config = deepspeed_config(cfg, world, device.type)
        offload = self.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
        optimizer = _cpu_adam(model, cfg.optim) if offload else build_optimizer(model, cfg.optim, device)
        if model.moe_layers():
            # ZeRO-3 gathers a module's parameters when its forward runs; an MoE block uses its router weight
            # directly and runs a varying subset of experts, so it is gathered whole (a ZeRO-3 "leaf").
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [type(model.moe_layers()[0])])
        if type(model) is Transformer:
            model.__class__ = LossForward  # before initialize: DeepSpeed's hooks wrap the forward it calls
        ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                      dist_init_required=not torch.distributed.is_initialized())
        self.ds, self.stage, self.device = ds, ds.zero_optimization_stage(), device
        self.params_readable = self.stage != 3  # ZeRO-3 parameters are empty outside their module's forward
        if self.stage == 3:  # used outside lm_head's forward (Transformer.loss / forward): gather it with the root
            deepspeed.zero.register_external_parameter(model, model.lm_head_weight)

        def loss(tokens_BN, labels_BN, doc_ids_BN=None):
            return ds(tokens_BN, doc_ids_BN, labels_BN=labels_BN)

        model.loss = loss  # per instance: the loop's model.loss runs DeepSpeed's forward (hooks, casts)
        super().__init__(model, ds_optimizer, pdist.rank(), pdist.world_size())
        self.named_grads = self._named_local_grads if self.stage > 0 else None  # stage 0: full param.grad
        self.world = pdist.world_size()
        if pdist.rank() == 0:
            log.warning(SLOW_NOTICE)

    # -------------------------------------------------------------------------------------------- the step
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last_micro)
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop already divided by the accumulation steps

    def optimizer_step(self, max_norm: float, gate=None) -> torch.Tensor:
        """DeepSpeed clips with the configured `gradient_clipping`; the loop's max_norm must be the same value.
        No gate: DeepSpeed skips a non-finite step itself (the guard has no fused path here)."""
        if max_norm != self.ds.gradient_clipping():
            raise ValueError(f"optimizer_step(max_norm={max_norm}) but the DeepSpeed config clips at "
                             f"{self.ds.gradient_clipping()}; make gradient_clipping in the JSON equal optim.grad_clip")
        self.ds.step()
        norm = self.ds.get_global_grad_norm()  # a tensor, or float("inf") for a skipped non-finite step
        if norm is None:
            return torch.full((), float("nan"), device=self.device)
        return torch.as_tensor(norm, device=self.device).detach().float().reshape(())

    def zero_grad(self) -> None:
        """DeepSpeed already cleared its gradient partitions in step; this drops any stray `param.grad`."""
        self.ds.optimizer.zero_grad(set_to_none=True)

    def _named_local_grads(self) -> Iterable[tuple[str, object]]:
        """This rank's reduced gradient partition of each parameter, wrapped in ShardedLocal (disjoint pieces:
        sums of squares add over ranks). Valid between the last backward of a step and optimizer_step."""
        from deepspeed.utils import safe_get_local_grad

        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if self.stage == 3:
                grad = safe_get_local_grad(p)
            else:
                grad = _local_fragment(p)
            if grad is not None and grad.numel():
                yield name, ShardedLocal(grad)

    # -------------------------------------------------------------------------------------------- checkpoints
    def state_bytes(self) -> int:
        """This rank's optimizer partition (fp32 master weights + AdamW moments) plus, on rank 0 below ZeRO-3, the
        module weights DeepSpeed writes there (a lower bound)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        total = tensor_bytes([p for g in inner.param_groups for p in g["params"]])
        total += sum(tensor_bytes(s) for s in inner.state.values())
        if self.stage in (1, 2) and pdist.rank() == 0:
            total += tensor_bytes(list(self.model.parameters()))
        return total

    def save(self, directory: Path, async_ok: bool = False) -> None:
        """Model + optimizer partitions in DeepSpeed's format under `directory/deepspeed` (collective)."""
        directory = Path(directory)
        self.ds.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False)
        if pdist.rank() == 0:
            (directory / META).write_text(json.dumps({"world_size": self.world, "zero_stage": self.stage}) + "\n")
        pdist.barrier()

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise ValueError(f"{directory} has no {META}: not a checkpoint of parallel.engine=deepspeed; resume it "
                             f"with the engine that wrote it")
        meta = json.loads(meta_path.read_text())
        if meta["world_size"] != self.world:
            raise ValueError(f"{directory} holds ZeRO partitions for {meta['world_size']} ranks but this run has "
                             f"{self.world}; resume on {meta['world_size']} ranks, or convert it with DeepSpeed's "
                             f"universal checkpoint (python -m deepspeed.checkpoint.ds_to_universal; not wired here)")
        if meta["zero_stage"] != self.stage:
            raise ValueError(f"{directory} was written with ZeRO stage {meta['zero_stage']} but this run uses stage "
                             f"{self.stage}; resume with parallel.deepspeed.zero_stage={meta['zero_stage']}")
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint under {directory / TAG}; the directory is incomplete")

    def describe(self) -> str:
        offload = ", optimizer offloaded to CPU" if self.ds.zero_cpu_offload() else ""
        dtype = "bf16" if self.ds.bfloat16_enabled() else "fp32"
        return f"DeepSpeed ZeRO-{self.stage} ({dtype}{offload}), {self.world} ranks"


def _local_fragment(p: nn.Parameter) -> Optional[torch.Tensor]:
    """ZeRO-1/2: the slice of p's averaged gradient owned by this rank (None when this rank owns none of p).
    DeepSpeed's own `safe_get_full_grad` all-reduces the full gradient per parameter; this reads the same
    fragment it starts from, without communication."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
    address = mapping.lp_fragment_address
    if fragment.numel() == p.numel() and address.numel != p.numel():  # a full per-rank buffer (bf16 optimizer)
        fragment = fragment.narrow(0, address.start, address.numel)
    return fragment


def _cpu_adam(model: nn.Module, cfg):
    """ZeRO-Offload steps on the CPU: DeepSpeed's vectorised AdamW with our decay groups."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            adamw_mode=True)
