"""Single-machine training loop: config -> build (data, model, optimizer, sinks) -> loop.

No host synchronisation inside a step except at log, eval and checkpoint steps. Failure behaviour (non-finite
steps, a full disk, kills mid-save) is described in docs/reliability.md.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from diffv2 import checkpoint, faults
from diffv2.config import Config
from diffv2.flops import count
from diffv2.kernels import doc_ids_from_tokens, resolve_backend
from diffv2.model import Transformer
from diffv2.nonfinite import NonFiniteGuard
from diffv2.optim import build_optimizer, lr_at, set_lr
from diffv2.record import write_record
from monitoring.build import build_monitors
from monitoring.callback import StepResult, TrainContext, to_host
from monitoring.sink import MetricSink

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
    def __init__(self, cfg: Config, run_dir: Path, record_yaml: Optional[str] = None):
        """`record_yaml`: the resolved config, written with the run record once every start-up check has passed."""
        self.cfg, self.run_dir, self.record_yaml = cfg, run_dir, record_yaml
        t = cfg.trainer
        want_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu")
        self.device = torch.device("cuda" if want_cuda else "cpu")
        self.backend = resolve_backend(cfg.model.attention.backend, self.device, cfg.model.attention.doc_mask)
        bf16 = t.precision == "bf16" or (t.precision == "auto" and want_cuda)
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.accum = t.global_batch_size // t.micro_batch_size
        self.ckpt_root = run_dir / "checkpoints"
        self.resume_from = self._find_resume()  # before any expensive work: a bad path fails now

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

    def _check_compatible(self, meta: dict) -> None:
        from diffv2.config import MoEConfig

        # Checkpoints written before MoE support have no model.moe: they are dense.
        saved, now = {"moe": asdict(MoEConfig()), **meta["model"]}, asdict(self.cfg.model)
        diff = [k for k in now if k not in ("attention", "name") and saved.get(k) != now[k]]
        diff += [f"attention.{k}" for k in now["attention"] if k != "backend" and saved["attention"].get(k) !=
                 now["attention"][k]]
        data_now = {"seq_len": self.cfg.data.seq_len, "seed": self.cfg.seed,
                    "train_samples": self.cfg.trainer.max_steps * self.cfg.trainer.global_batch_size}
        for key, value in data_now.items():
            if meta.get(key, value) != value:  # megatron's sample order is a function of all three
                raise ValueError(
                    f"checkpoint {self.resume_from} was written with {key}={meta[key]}, this run has {value}; the data "
                    f"order depends on it (train_samples = max_steps x global_batch_size), so resume with the original "
                    f"settings or start a new run_name"
                )
        if diff:
            k = diff[0]
            raise ValueError(
                f"checkpoint {self.resume_from} was written with a different model ({', '.join(diff)} differ, e.g. "
                f"model.{k}); resume with the original model config or start a new run_name"
            )

    def run(self) -> dict:
        from data.dataset import build_datasets, make_loader
        from data.tokenizer import load_tokenizer, check_vocab

        cfg, t = self.cfg, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        meta = checkpoint.read_meta(self.resume_from) if self.resume_from else None
        if meta:
            self._check_compatible(meta)
        seed_everything(cfg.seed)
        if self.device.type == "cpu" and t.deterministic:
            torch.use_deterministic_algorithms(True)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(tokenizer, cfg.model.vocab_size)
        train_ds, valid_ds = build_datasets(
            cfg.data, cfg.seed, tokenizer,
            num_samples={"train": t.max_steps * t.global_batch_size, "valid": t.eval_batches * t.micro_batch_size},
        )
        backend = self.backend
        model = Transformer(cfg.model, backend).to(self.device)
        if t.compile:
            for block in model.blocks:
                block.compile()
        optimizer = build_optimizer(model, cfg.optim, self.device)
        # MoE aux-loss-free balancing moves the expert biases after every step, outside autograd (no-op if dense).
        optimizer.register_step_post_hook(lambda *_: model.update_expert_bias())
        counts = count(model.cfg, cfg.data.seq_len)
        log.info("model %s/%s: %s | attention backend %s", cfg.model.name, cfg.model.attention.variant,
                 counts.table(), backend)

        step, trainer_state = 0, {}
        if self.resume_from:
            trainer_state = checkpoint.load(self.resume_from, model, optimizer)
            step = meta["step"]
            log.info("resumed from %s at step %d", self.resume_from, step)
        guard = None if t.nonfinite == "ignore" else NonFiniteGuard(t.nonfinite, t.max_bad_steps, model, optimizer,
                                                                     self.device)
        if guard is not None and "nonfinite" in trainer_state:
            guard.load_state_dict(trainer_state["nonfinite"])
        if "rng" in trainer_state:
            _restore_rng(trainer_state["rng"])

        loader = make_loader(train_ds, t.micro_batch_size, start_sample=step * t.global_batch_size,
                             num_workers=cfg.data.num_workers, seed=cfg.seed)
        batches = iter(loader)
        eod = tokenizer.eod if cfg.model.attention.doc_mask else None
        tokens_per_step = t.global_batch_size * cfg.data.seq_len
        monitors = build_monitors(cfg.monitoring, t.log_interval)
        ctx = TrainContext(cfg=cfg, model=model, optimizer=optimizer, run_dir=self.run_dir, device=self.device,
                           flops_per_token=counts.flops_per_token, tokens_per_step=tokens_per_step, start_step=step,
                           autocast_dtype=self.autocast_dtype,
                           probe_tokens=self._probe_batch(valid_ds) if monitors else None)
        saved = trainer_state.get("monitors", {})
        for m in monitors:
            if m.name in saved:
                m.load_state_dict(saved[m.name])
            m.on_train_start(ctx)
        if self.record_yaml is not None:  # only now: a run refused at start-up leaves its directory as it was
            write_record(self.run_dir, self.record_yaml)
        sink = MetricSink(self.run_dir, cfg.logging.wandb, asdict(cfg), meta.get("wandb_id") if meta else None,
                          tags=[cfg.model.attention.variant, cfg.model.name, f"lr={cfg.optim.lr:g}"])
        sink.truncate_after(step)
        summary = {"run_dir": str(self.run_dir)}
        bar = tqdm(total=t.max_steps, initial=step, disable=not cfg.logging.progress, unit="step", dynamic_ncols=True)
        ce_sum, window_steps = torch.zeros((), device=self.device), 0

        try:
            while step < t.max_steps:
                lr = lr_at(step, cfg.optim, t.max_steps)
                set_lr(optimizer, lr)
                for m in monitors:
                    m.on_step_start(step + 1)
                faults.kill("step", step + 1)
                step_loss, data_time = torch.zeros((), device=self.device), 0.0
                for _ in range(self.accum):
                    t0 = time.perf_counter()
                    tokens = next(batches).to(self.device, non_blocking=True)
                    data_time += time.perf_counter() - t0
                    loss, ce, _ = self._forward(model, tokens, eod)
                    loss, ce = faults.poison_loss(step + 1, loss, ce)
                    (loss / self.accum).backward()
                    step_loss += ce.detach() / self.accum
                metrics = {k: v for m in monitors for k, v in m.on_before_optimizer_step(step + 1).items()}
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
                faults.kill("backward", step + 1)
                if guard is not None:
                    guard.before_step()
                optimizer.step()
                bad = guard.after_step(step_loss, grad_norm) if guard is not None else None
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                result = StepResult(step, step_loss, grad_norm, lr, sample_index=(step - 1) * t.global_batch_size,
                                    batch_size=t.global_batch_size, data_time_s=data_time)
                metrics.update({k: v for m in monitors for k, v in m.on_step_end(result).items()})
                if bad is None:
                    ce_sum, window_steps = ce_sum + step_loss, window_steps + 1
                else:  # a skipped step stays out of the logged loss average
                    ce_sum, window_steps = ce_sum + torch.where(bad, 0.0, step_loss), window_steps + ~bad

                last = step == t.max_steps
                if step % t.log_interval == 0 or last:
                    metrics.update({"train/loss": ce_sum / window_steps, "train/lr": lr, "grad/norm": grad_norm,
                                    "train/tokens": step * tokens_per_step})
                    if guard is not None:
                        metrics.update(guard.metrics())
                    ce_sum, window_steps = torch.zeros((), device=self.device), 0
                if metrics:  # device values become floats only on steps that log
                    metrics = to_host(metrics)
                    sink.log(step, metrics)
                    if "train/loss" in metrics:
                        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{lr:.2e}")
                        bar.write(_format(step, metrics))
                        summary["train/loss"] = metrics["train/loss"]
                faults.kill("logged", step)
                diverged = guard.stop_reason(metrics, step) if "train/nonfinite_streak" in metrics else None
                if _due(step, t.eval_interval, last):
                    faults.kill("eval", step)
                    val = self._evaluate(model, valid_ds, eod)
                    sink.log(step, {"train/val_loss": val})
                    bar.write(f"step {step:>6} | validation loss {val:.4f}")
                    summary["train/val_loss"] = val
                stop = diverged or next((reason for m in monitors if (reason := m.should_stop())), None)
                if _due(step, t.ckpt_interval, last) or stop:
                    state = {"rng": rng_state(), "monitors": {m.name: m.state_dict() for m in monitors}}
                    if guard is not None:
                        state["nonfinite"] = guard.state_dict()
                    try:
                        path = checkpoint.save(
                            self.ckpt_root, step, model, optimizer, trainer_state=state,
                            meta={"model": asdict(cfg.model), "wandb_id": sink.run_id,
                                  "samples_consumed": step * t.global_batch_size, "seq_len": cfg.data.seq_len,
                                  "seed": cfg.seed, "train_samples": t.max_steps * t.global_batch_size},
                            keep_last=t.keep_last,
                        )
                    except checkpoint.DiskFullError as err:
                        raise RunStopped(f"stopped at step {step}: {err}") from None
                    summary["checkpoint"] = str(path)
                if diverged:
                    raise RunStopped(f"stopped at step {step}: {diverged}; saved as {path}")
                if stop:
                    log.warning("stopping at step %d: %s", step, stop)
                    summary["stopped"] = stop
                    break
        except BaseException:
            sink.finish(exit_code=1)  # W&B marks the run failed now instead of in its interpreter-exit hook
            raise
        finally:
            for m in monitors:
                m.on_train_end()
            bar.close()
            batches = loader = None  # the only references: DataLoader workers shut down now, on errors too
        sink.finish()
        summary["metrics"] = str(sink.path)
        return summary

    def _probe_batch(self, valid_ds) -> Optional[torch.Tensor]:
        """The first monitoring.probe_sequences validation samples: one fixed batch for every probe, no RNG drawn."""
        if valid_ds is None:
            return None
        n = min(self.cfg.monitoring.probe_sequences, len(valid_ds))
        return torch.stack([valid_ds[i] for i in range(n)]).to(self.device)

    def _forward(self, model, tokens_BN1, eod):
        x, y = tokens_BN1[:, :-1], tokens_BN1[:, 1:]
        doc_ids = doc_ids_from_tokens(x, eod) if eod is not None else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return model.loss(x, y, doc_ids)

    @torch.no_grad()
    def _evaluate(self, model, valid_ds, eod) -> float:
        from data.dataset import make_loader

        model.eval()
        loader = make_loader(valid_ds, self.cfg.trainer.micro_batch_size, start_sample=0, num_workers=0,
                             seed=self.cfg.seed)
        total, n = torch.zeros((), device=self.device), 0
        for tokens, _ in zip(loader, range(self.cfg.trainer.eval_batches)):
            total += self._forward(model, tokens.to(self.device), eod)[1]
            n += 1
        model.train()
        return total.item() / max(n, 1)


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _due(step: int, interval: int, last: bool) -> bool:
    """Every `interval` steps and at the last one; 0 = only at the last step; -1 = never (benchmarks)."""
    return interval > 0 and step % interval == 0 or (last and interval >= 0)


def _format(step: int, metrics: dict) -> str:
    parts = [f"step {step:>6}", f"loss {metrics['train/loss']:.4f}", f"lr {metrics['train/lr']:.2e}",
             f"grad {metrics['grad/norm']:.3f}"]
    if "perf/tokens_per_s" in metrics:
        parts.append(f"{metrics['perf/tokens_per_s']:,.0f} tok/s")
    if "perf/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
    return " | ".join(parts)
