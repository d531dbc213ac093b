"""The training loop: config -> build (data, model, engine, components) -> loop, on one process or many.

`Trainer._loop` is the whole loop on one screen; each step calls the components of diffv2/train/components.py in a fixed
order (callbacks' step start -> TrainStep -> callbacks' step end -> loss window -> output -> validation -> stop
agreement -> checkpoint). The loop talks to the model and optimizer only through an engine and asks it what it can
do (`TrainEngine` in diffv2/parallel/engine.py: plain single device, FSDP2 with tensor/expert parallelism, DeepSpeed
ZeRO); it never names one. Monitors come from outside (`instrumentation`, wired by train.py), so the core never
imports monitoring/. Every rank runs the same loop; rank 0 alone writes the run record, metrics, progress and the
checkpoint manifest. Host values that decide control flow (resume path, stop reasons) are agreed across ranks, so no
rank waits on a collective another rank skipped. No host synchronisation inside a step except at log, eval and
checkpoint steps. Failure behaviour (non-finite steps, a full disk, kills mid-save, a dead rank) is described in
docs/reliability.md.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffv2.train import checkpoint
from diffv2.train.callbacks import Instrumentation, StepResult, TrainContext
from diffv2.train.components import (CallbackList, LossWindow, RunOutput, TrainStep, Validation, lm_forward,
                               unwrapped)
from diffv2.train.compute_weights import ComputeWeights
from diffv2.config import Config
from diffv2.train.faults import FaultPlan
from diffv2.model.flops import count
from diffv2.model.kernels import resolve_backend
from diffv2.train.memory_check import check_fits
from diffv2.model.transformer import Transformer
from diffv2.train.nonfinite import NonFiniteGuard
from diffv2.optim import lr_at
from diffv2.parallel import dist as pdist
from diffv2.parallel.build import build_engine
from diffv2.parallel.float8 import check_fp8
from diffv2.parallel.parallelize import wants_bf16
from diffv2.train.preempt import PreemptionCallback, SignalLatch, ignore_stop_signals, signals_blocked
from diffv2.train.profiling import ProfilerCallback
from diffv2.train.record import StartupLog, write_record
from diffv2.train.run_lock import RunLock
from diffv2.train.sink import MetricSink, final_numbers

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}  # the only generator the loop draws from
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class RunStopped(RuntimeError):
    """The run cannot go on safely (non-finite steps, a full disk); the message says what was kept."""


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, record_yaml: Optional[str] = None,
                 env: Optional[pdist.DistEnv] = None, signals: Optional[SignalLatch] = None,
                 instrumentation: Optional[Instrumentation] = None):
        """`record_yaml`: the resolved config, written with the run record once every start-up check has passed.
        `env`: the launcher's view of this process (default: read from the environment); with more than one
        process the process group starts here (cheap), so ranks can agree on start-up decisions. `signals`: the
        process's stop-signal latch when the caller installed one early (train.py); else the trainer installs it.
        `instrumentation`: the monitors and W&B renderer to run with (train.py passes monitoring.build's; default:
        none). Rank 0 locks the run directory here (one writer per run directory, diffv2/train/run_lock.py)."""
        self.startup_log = StartupLog.install() if record_yaml is not None else None  # for train.log, once written
        self.lock: Optional[RunLock] = None
        try:
            self._start(cfg, run_dir, record_yaml, env, signals, instrumentation)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: Config, run_dir: Path, record_yaml: Optional[str], env: Optional[pdist.DistEnv],
               signals: Optional[SignalLatch], instrumentation: Optional[Instrumentation]) -> None:
        self.cfg, self.run_dir, self.record_yaml = cfg, run_dir, record_yaml
        self.instrumentation = instrumentation or Instrumentation()  # monitors + W&B renderer (none by default)
        t = cfg.trainer
        self.preemption = PreemptionCallback(t.preempt_check_interval, t.requeue, latch=signals)
        self.replanned_from: Optional[int] = None  # the checkpoint's planned train samples, when max_steps changed
        want_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu")
        self.env = env or pdist.detect()
        self.faults = FaultPlan.from_env(self.env.rank)  # test hooks, armed only by DIFFV2_FAULT (faults.py)
        self.device = pdist.init(self.env, "cuda" if want_cuda else "cpu", cfg.parallel.timeout_s)
        self.rank0 = self.env.rank == 0
        if not self.rank0:  # one console for the job: other ranks report warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
            self.close_startup_log()  # only rank 0 writes train.log
        self.dp_size = self.env.world_size // cfg.parallel.tp
        self.dp_rank = self.env.rank // cfg.parallel.tp  # mesh order (dp_replicate, dp_shard, tp): tp innermost
        self.autocast_dtype = torch.bfloat16 if wants_bf16(cfg, "cuda" if want_cuda else "cpu") else None
        self.backend = resolve_backend(cfg.model.attention.backend, self.device, cfg.model.attention.doc_mask,
                                       self.autocast_dtype or torch.float32)
        if t.bf16_weights and self.autocast_dtype is None:
            raise ValueError("trainer.bf16_weights=true needs bf16 autocast: set trainer.precision=bf16 (auto is fp32 "
                             "on CPU) or drop trainer.bf16_weights")
        if t.bf16_weights and (self.env.world_size > 1 or cfg.parallel.engine == "deepspeed"):
            raise ValueError("trainer.bf16_weights=true works in one process with the plain engine (FSDP2's "
                             "MixedPrecisionPolicy does this job on several GPUs); drop trainer.bf16_weights")
        check_fp8(t.fp8, self.device)  # torchao installed, an SM89+ GPU: before data and model are built
        self.accum = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        if cfg.model.moe.n_experts and cfg.model.moe.force_balance:
            log.warning("model.moe.force_balance=true: tokens go to experts round-robin, not where the router sends "
                        "them; for throughput benchmarks only, never for a model you mean to use")
        if cfg.optim.warmup_steps > t.max_steps:
            log.warning("optim.warmup_steps=%d is longer than trainer.max_steps=%d: the learning rate never reaches "
                        "optim.lr=%g; shorten the warm-up or train longer", cfg.optim.warmup_steps, t.max_steps,
                        cfg.optim.lr)
        self.ckpt_root = run_dir / "checkpoints"
        # Before any allocation: a model or batch that cannot fit. Every rank checks its own device and host.
        fits = _outcome(lambda: check_fits(cfg, self.device, self.env.world_size, self.env.local_world_size,
                                           self.autocast_dtype))
        if problem := pdist.agree_on(fits[1] if fits[0] == "error" else None):
            raise ValueError(problem)
        # Before any expensive work: a run directory in use, a bad path. Rank 0 reads the disk; every rank gets its
        # answer.
        found = _outcome(self._lock_and_find_resume) if self.rank0 else None
        self.resume_from = _unwrap(pdist.broadcast(found))

    def _lock_and_find_resume(self) -> Optional[Path]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock.acquire(self.run_dir)
        try:
            return self._find_resume()
        except BaseException:
            self.close()
            raise

    def close_startup_log(self) -> None:
        if self.startup_log is not None:
            self.startup_log.remove()
            self.startup_log = None

    def close(self) -> None:
        """Release the run directory (the end of run() does; process exit does too)."""
        self.close_startup_log()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _find_resume(self) -> Optional[Path]:
        mode = self.cfg.trainer.resume
        if mode == "none":
            if checkpoint.list_checkpoints(self.ckpt_root):
                raise ValueError(
                    f"{self.run_dir} already holds checkpoints and trainer.resume=none would overwrite them; "
                    f"use trainer.resume=auto or another run_name"
                )
            return None
        if mode == "auto":
            found = checkpoint.latest_valid(self.ckpt_root)
            if found is None and checkpoint.list_checkpoints(self.ckpt_root):  # never restart over damaged history
                raise ValueError(
                    f"no checkpoint in {self.ckpt_root} verifies (reasons logged above); move them aside to start "
                    f"over, or pick one with trainer.resume=PATH"
                )
            return found
        path = Path(mode)
        problem = checkpoint.verify(path) if path.is_dir() else "not a directory"
        if problem:
            raise ValueError(f"trainer.resume={mode}: checkpoint is not usable ({problem})")
        return path

    def _announce_continuation(self, meta: dict, train_ds, tokenizer) -> None:
        """trainer.max_steps changed since the checkpoint (a finished run continued, or a plan shortened): the data
        is megatron's order for the new total. It keeps the samples already read where the corpus's epoch count did
        not change (always below one epoch); the last global batch read tells."""
        from data.dataset import build_datasets

        t, step = self.cfg.trainer, meta["step"]
        old = build_datasets(self.cfg.data, self.cfg.seed, tokenizer, 0, 1,
                             num_samples={"train": self.replanned_from, "valid": 0})[0]
        new, last = train_ds.global_view(), range((step - 1) * t.global_batch_size, step * t.global_batch_size)
        same = step == 0 or all(torch.equal(old[i], new[i]) for i in last)
        log.warning("trainer.max_steps is now %d (the checkpoint at step %d planned %d samples, this run %d): the "
                    "learning-rate schedule is re-planned for %d steps and %s", t.max_steps, step, self.replanned_from,
                    t.max_steps * t.global_batch_size, t.max_steps,
                    "the data continues in the same order" if same else
                    "megatron's sample order for the new total differs from the old one (the corpus is read a "
                    "different number of epochs), so the continued run reads the new order from sample "
                    f"{step * t.global_batch_size} on and may revisit samples already trained on")

    def _check_compatible(self, meta: dict) -> None:
        from diffv2.config import MoEConfig

        # Checkpoints written before MoE support have no model.moe: they are dense.
        saved, now = {"moe": asdict(MoEConfig()), **meta["model"]}, asdict(self.cfg.model)
        diff = [k for k in now if k not in ("attention", "name") and saved.get(k) != now[k]]
        diff += [f"attention.{k}" for k in now["attention"] if k not in ("backend", "name") and
                 saved["attention"].get(k) != now["attention"][k]]
        t, step = self.cfg.trainer, meta.get("step", 0)
        data_now = {"data.seq_len": ("seq_len", self.cfg.data.seq_len), "seed": ("seed", self.cfg.seed),
                    "trainer.global_batch_size": ("samples_consumed", step * t.global_batch_size)}
        for name, (key, value) in data_now.items():
            if meta.get(key, value) != value:  # megatron's sample order and the data position depend on these
                saved = meta[key] if key != "samples_consumed" else meta[key] // max(step, 1)
                raise ValueError(
                    f"checkpoint {self.resume_from} was written with {name}={saved}, this run has "
                    f"{value if key != 'samples_consumed' else t.global_batch_size}; the data order depends on it, so "
                    f"resume with the original settings or start a new run_name"
                )
        if step > t.max_steps:
            raise ValueError(f"checkpoint {self.resume_from} is at step {step}, past trainer.max_steps="
                             f"{t.max_steps}; raise trainer.max_steps to continue it or start a new run_name")
        planned = meta.get("train_samples", t.max_steps * t.global_batch_size)
        self.replanned_from = planned if planned != t.max_steps * t.global_batch_size else None
        if meta.get("ep", 1) != self.cfg.parallel.ep or meta.get("engine", "fsdp") != self.cfg.parallel.engine:
            raise ValueError(
                f"checkpoint {self.resume_from} was written with parallel.engine={meta.get('engine', 'fsdp')} "
                f"parallel.ep={meta.get('ep', 1)}; this run has parallel.engine={self.cfg.parallel.engine} "
                f"parallel.ep={self.cfg.parallel.ep}. Resume with the same engine and expert parallelism (the number "
                f"of GPUs may change for fsdp)"
            )
        if diff:
            k = diff[0]
            raise ValueError(
                f"checkpoint {self.resume_from} was written with a different model ({', '.join(diff)} differ, e.g. "
                f"model.{k}); resume with the original model config or start a new run_name"
            )

    def run(self) -> dict:
        """Train to trainer.max_steps or a stop; the summary dict has the final numbers and what happened
        (`stopped`: a signal's stop reason; `exit_code`: the process's exit status after it; `already_finished`)."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        meta = checkpoint.read_meta(self.resume_from) if self.resume_from else None
        if meta:
            self._check_compatible(meta)
        parts = self._build(meta)
        if isinstance(parts, dict):  # a finished run: every input checked, nothing to train, nothing written
            return parts
        summary = {"run_dir": str(self.run_dir)}
        try:
            if stop := parts.callbacks.start(parts.ctx, parts.saved_state, self._stop_before_start):
                log.warning("stopping before the first step: %s", stop)
                return {**summary, "stopped": stop, "exit_code": self.preemption.exit_code, "started": False}
            if self.record_yaml is not None and self.rank0:  # only now: a run refused at start-up is left as it was
                write_record(self.run_dir, self.record_yaml, self.startup_log)
                self.startup_log = None
            parts.output = self._output(parts, meta)
            summary.update(self._loop(parts))
        except KeyboardInterrupt:  # SIGINT under handlers other than the latch's: out now, W&B left to its exit hook
            raise
        except BaseException:
            if parts.output is not None:
                parts.output.sink.finish(exit_code=1)  # W&B marks the run failed now, not in its exit hook
            raise
        else:
            # before the callbacks' end (the requeue): `scontrol requeue` makes SLURM SIGTERM the whole job step
            parts.output.sink.finish()
        finally:
            if parts.output is not None:
                parts.output.close()
            # the train step holds the only reference to the DataLoader's iterator (a traceback may keep the step's
            # frame alive): let go of it, so the workers shut down now
            parts.train_step.batches = None
            parts.callbacks.end()
        return {**summary, **parts.output.summary, "metrics": str(parts.output.sink.path)}

    def _loop(self, p: "_Parts") -> dict:
        """The training loop (component order: diffv2/train/components.py)."""
        t, optim = self.cfg.trainer, self.cfg.optim
        step, window, out, summary = p.start_step, LossWindow(self.device, p.guard), p.output, {}
        while step < t.max_steps:
            lr = lr_at(step, optim, t.max_steps)
            result = p.train_step(step + 1, lr)
            step += 1
            last = step == t.max_steps
            metrics = {**result.metrics, **p.callbacks.step_end(StepResult(
                step, result.loss, result.grad_norm, lr, sample_index=(step - 1) * t.global_batch_size,
                batch_size=t.global_batch_size, data_time_s=result.data_time_s))}
            window.add(result)
            if step % t.log_interval == 0 or last:
                metrics.update(window.metrics(result, lr, step * p.tokens_per_step))
            metrics = out.log(step, metrics)
            diverged = p.guard.stop_reason(metrics, step) if "train/nonfinite_streak" in metrics else None
            if _due(step, t.eval_interval, last):
                out.validation(step, p.validation(step))
            stop = pdist.agree_on(diverged or p.callbacks.stop_request())
            if _due(step, t.ckpt_interval, last) or stop:
                summary["checkpoint"] = str(self._save(p, step, final=last or bool(stop)))
            if diverged:
                raise RunStopped(f"stopped at step {step}: {diverged}; saved as {summary['checkpoint']}")
            if stop:
                log.warning("stopping at step %d: %s", step, stop)
                return {**summary, "stopped": stop, "exit_code": self.preemption.exit_code}
        return summary

    def _save(self, p: "_Parts", step: int, final: bool) -> Path:
        cfg, t = self.cfg, self.cfg.trainer
        if p.guard is not None and p.guard.poisoned():
            raise RunStopped(
                f"stopped at step {step}: a step had a non-finite loss or grad norm and the {p.engine.name} engine "
                f"cannot undo it, so nothing was saved; the newest checkpoint in {self.ckpt_root} holds the last "
                f"good state (lower optim.lr or check the data, then trainer.resume=auto)")
        state = {"rng": rng_state(), "monitors": p.callbacks.state_dict()}
        if p.guard is not None:
            state["nonfinite"] = p.guard.state_dict()
        meta = {"model": asdict(cfg.model), "wandb_id": p.output.sink.run_id,
                "samples_consumed": step * t.global_batch_size, "seq_len": cfg.data.seq_len, "seed": cfg.seed,
                "train_samples": t.max_steps * t.global_batch_size, "engine": cfg.parallel.engine,
                "ep": cfg.parallel.ep}
        try:
            return p.checkpointer.save(step, p.engine, trainer_state=state, meta=meta, keep_last=t.keep_last,
                                       async_save=cfg.parallel.async_checkpoint and not final)
        except checkpoint.DiskFullError as err:
            raise RunStopped(f"stopped at step {step}: {err}") from None

    def _build(self, meta: Optional[dict]):
        """Data, model, engine and the loop's components; a finished run's summary dict instead when there is
        nothing left to train."""
        from data.dataset import build_datasets, make_loader
        from data.tokenizer import check_vocab, load_tokenizer

        cfg, t = self.cfg, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        if self.device.type == "cpu" and t.deterministic:
            torch.use_deterministic_algorithms(True)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(tokenizer, cfg.model.vocab_size)
        train_ds, valid_ds = build_datasets(
            cfg.data, cfg.seed, tokenizer, self.dp_rank, self.dp_size,
            num_samples={"train": t.max_steps * t.global_batch_size,
                         "valid": t.eval_batches * t.micro_batch_size},
        )
        if meta and self.replanned_from is not None and meta["step"] < t.max_steps:
            self._announce_continuation(meta, train_ds, tokenizer)
        if meta and meta["step"] >= t.max_steps:
            self.preemption.on_train_end()
            return {"run_dir": str(self.run_dir), "already_finished": meta["step"], "checkpoint":
                    str(self.resume_from), "metrics": str(self.run_dir / "metrics.jsonl"),
                    **final_numbers(self.run_dir / "metrics.jsonl")}
        engine, flops_per_token = self._engine()
        model = engine.model
        step, trainer_state = 0, {}
        if self.resume_from:
            trainer_state = checkpoint.load(self.resume_from, engine)
            step = meta["step"]
            log.info("resumed from %s at step %d", self.resume_from, step)
        guard = self._guard(engine, trainer_state)
        if "rng" in trainer_state:
            _restore_rng(trainer_state["rng"])

        loader = make_loader(train_ds, t.micro_batch_size, start_sample=step * t.global_batch_size,
                             num_workers=cfg.data.num_workers, seed=cfg.seed, worker_init_fn=ignore_stop_signals)
        with signals_blocked():  # workers start here and must not die of a signal meant for this process
            batches = iter(loader)
        eod = tokenizer.eod if cfg.model.attention.doc_mask else None
        forward = functools.partial(lm_forward(self.device, self.autocast_dtype, eod), model)
        callbacks, ctx = self._callbacks(engine, valid_ds, step, flops_per_token)
        weights = (ComputeWeights(unwrapped(model), self.autocast_dtype, t.fused_wgrad) if t.bf16_weights
                   else None)
        train_step = TrainStep(engine, forward, batches, self.accum, self.device, callbacks, ctx.observers,
                               cfg.monitoring.observed_micro_batches, guard, weights, cfg.optim.grad_clip,
                               self.faults)
        validation = Validation(model, forward, valid_ds, t.eval_batches * t.micro_batch_size // self.dp_size,
                                t.micro_batch_size, cfg.seed, self.device, self.faults)
        return _Parts(engine, callbacks, ctx, trainer_state.get("monitors", {}), step, train_step, validation,
                      guard, checkpoint.Checkpointer(self.ckpt_root, self.faults),
                      t.global_batch_size * cfg.data.seq_len)

    def _engine(self) -> tuple[Any, float]:
        """The single-device model, built on this device (or on meta, materialised once sharded), parallelized and
        wrapped by its engine; and its training FLOPs per token."""
        cfg, t = self.cfg, self.cfg.trainer
        if cfg.parallel.meta_init:  # no memory until parallelize has sharded it (then materialise)
            with torch.device("meta"):
                model = Transformer(cfg.model, self.backend)
        else:
            model = Transformer(cfg.model, self.backend).to(self.device)  # same seed on every rank: identical init
        if t.init_from and not self.resume_from:  # a checkpoint, when there is one, holds newer weights
            from diffv2.model.weight_files import load_initial_weights

            load_initial_weights(model, t.init_from)
            log.info("initial weights from %s", t.init_from)
        # Parallelism, activation checkpointing and compile are applied to it from outside, in one place
        # (diffv2/parallel/parallelize.py, called by build_engine).
        engine = build_engine(cfg, model, self.device, self.autocast_dtype, materialize=cfg.parallel.meta_init)
        counts = count(unwrapped(engine.model).cfg, cfg.data.seq_len)
        log.info("model %s/%s: %s | attention backend %s | %s", cfg.model.name, cfg.model.attention.variant,
                 counts.table(), self.backend, engine.describe())
        return engine, counts.flops_per_token

    def _guard(self, engine, trainer_state: dict) -> Optional[NonFiniteGuard]:
        """Non-finite steps: our device-side undo, or the engine's own skip (DeepSpeed skips a step whose grad norm
        is not finite), or, with neither, detection and a stop without saving."""
        t = self.cfg.trainer
        nonfinite = t.nonfinite
        if nonfinite == "skip" and not (engine.supports_undo or engine.skips_nonfinite_steps):
            nonfinite = "stop"
            log.warning("trainer.nonfinite=skip needs a step undo, which %s cannot do; a non-finite step stops the "
                        "run instead, keeping the last checkpoint as the good state", engine.name)
        if nonfinite == "ignore":
            return None
        guard = NonFiniteGuard(nonfinite, t.max_bad_steps, engine.model, engine.optimizer, self.device,
                               undo=engine.supports_undo, engine_skips=engine.skips_nonfinite_steps)
        if "nonfinite" in trainer_state:
            guard.load_state_dict(trainer_state["nonfinite"])
        return guard

    def _callbacks(self, engine, valid_ds, step: int, flops_per_token: float) -> tuple[CallbackList, TrainContext]:
        """The preemption callback first, the monitors (what the engine lets them read), the profiler last."""
        cfg, t = self.cfg, self.cfg.trainer
        monitors = self.instrumentation.build_monitors(cfg.monitoring, t.log_interval, engine.params_readable)
        probes = cfg.parallel.tp == 1 and engine.params_readable
        if not probes and monitors:
            log.warning("%s: probe monitors (attention logits, sinks, value RMS)%s are off%s",
                        f"parallel.tp={cfg.parallel.tp}" if cfg.parallel.tp > 1 else
                        f"{engine.describe()} (parameters empty outside forward)",
                        "" if engine.params_readable else " and parameter norms",
                        ", and λ statistics cover this rank's heads only" if cfg.parallel.tp > 1 else "")
        callbacks = [self.preemption, *monitors]
        if t.profile_start:
            callbacks.append(ProfilerCallback(t.profile_start, t.profile_steps, pdist.rank()))
        ctx = TrainContext(cfg=cfg, model=engine.model, optimizer=engine.optimizer, run_dir=self.run_dir,
                           device=self.device, flops_per_token=flops_per_token,
                           tokens_per_step=t.global_batch_size * cfg.data.seq_len, start_step=step,
                           autocast_dtype=self.autocast_dtype,
                           probe_tokens=self._probe_batch(valid_ds) if monitors and probes else None,
                           named_grads=engine.named_grads, disjoint=engine.disjoint)
        return CallbackList(callbacks), ctx

    def _stop_before_start(self, callback) -> Optional[str]:
        """A signal during start-up: stop right after the preemption callback starts, before anything (a monitor's
        log, the run record) is written."""
        return self.preemption.stop_before_start() if callback is self.preemption else None

    def _output(self, p: "_Parts", meta: Optional[dict]) -> RunOutput:
        cfg = self.cfg
        sink = MetricSink(self.run_dir, cfg.logging.wandb, asdict(cfg), meta.get("wandb_id") if meta else None,
                          tags=[cfg.model.attention.variant, cfg.model.name, f"lr={cfg.optim.lr:g}"],
                          enabled=self.rank0, render_matrix=self.instrumentation.render_matrix)
        sink.truncate_after(p.start_step)
        return RunOutput(sink, cfg.trainer.max_steps, p.start_step, cfg.logging.progress, self.rank0, self.faults)

    def _probe_batch(self, valid_ds) -> Optional[torch.Tensor]:
        """The first monitoring.probe_sequences validation samples: one fixed batch for every probe, no RNG drawn."""
        if valid_ds is None:
            return None
        everyone = valid_ds.global_view()  # the same probe on every rank, as in a one-process run
        n = min(self.cfg.monitoring.probe_sequences, len(everyone))
        return torch.stack([everyone[i] for i in range(n)]).to(self.device)


@dataclass
class _Parts:
    """What the loop runs with, built by `Trainer._build`."""

    engine: Any  # a TrainEngine (diffv2/parallel/engine.py)
    callbacks: CallbackList
    ctx: TrainContext
    saved_state: dict  # the callbacks' checkpointed state
    start_step: int
    train_step: TrainStep
    validation: Validation
    guard: Optional[NonFiniteGuard]
    checkpointer: checkpoint.Checkpointer
    tokens_per_step: int
    output: Optional[RunOutput] = None  # metrics file, W&B, console: made once the start-up has passed


def _outcome(fn):
    """fn() as a picklable ("ok", value) or ("error", message) pair, so a ValueError can travel to every rank."""
    try:
        return "ok", fn()
    except ValueError as e:
        return "error", str(e)


def _unwrap(outcome):
    kind, value = outcome
    if kind == "error":
        raise ValueError(value)
    return value


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _due(step: int, interval: int, last: bool) -> bool:
    """Every `interval` steps and at the last one; 0 = only at the last step; -1 = never (benchmarks)."""
    return interval > 0 and step % interval == 0 or (last and interval >= 0)
