"""The DIFF V2 claims (spec §7) measured on an experiment suite's runs (launch/suite.py), with verdicts.

    python -m monitoring.claims results/repro_small --out docs/results/repro_small

Reads SUITE/runs/*/metrics.jsonl (+ suite_status.json) and writes OUT/report.md: the learning-rate sweep and the
rule that picked the normal and the large LR, one row per blog claim with our numbers and a verdict
(reproduced / not reproduced / inconclusive at this scale), a table per arm (mean ± std over seeds), comparison
plots (monitoring.compare) and OUT/raw_runs.tar.gz with every run's metrics.jsonl, spikes.jsonl, config and status.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from monitoring.run_data import RunData, load_runs

UNSTABLE_SPIKE_SHARE = 0.01  # a run is unstable when >= 1% of its steps are flagged spikes (or it was stopped)


@dataclass
class Run:
    status: dict
    data: RunData
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def attention(self) -> str:
        return self.status["attention"]

    @property
    def lr(self) -> float:
        return float(self.status["lr"])


def load_suite_runs(suite_dir: Path) -> List[Run]:
    """Every finished run under SUITE/runs (status written by launch.suite), with its statistics."""
    runs = []
    for status_path in sorted((Path(suite_dir) / "runs").glob("*/suite_status.json")):
        status = json.loads(status_path.read_text())
        if status.get("returncode") != 0 and not status.get("diverged"):
            continue
        if not (status_path.parent / "metrics.jsonl").is_file():
            continue
        run = Run(status, load_runs([status_path.parent])[0])
        run.stats = run_stats(run)
        runs.append(run)
    if not runs:
        raise ValueError(f"no finished runs under {suite_dir}/runs (run python -m launch.suite ... --out {suite_dir})")
    return runs


def _last(values: np.ndarray) -> float:
    return float(values[-1]) if len(values) else float("nan")


def run_stats(run: Run) -> Dict[str, float]:
    d = run.data
    _, loss = d.series("train/loss")
    _, val = d.series("train/val_loss")
    gsteps, gnorm = d.series("grad/norm")
    late = gnorm[gsteps > 0.7 * d.last_step] if len(gnorm) else gnorm
    steps = max(d.last_step, 1)
    spikes = d.last_scalar("spike/count") or 0.0
    stats = {
        "steps": float(d.last_step),
        "val_loss": _last(val),
        "train_loss": float(np.mean(loss[-max(3, len(loss) // 10):])) if len(loss) else float("nan"),
        "spikes": spikes,
        "loss_spikes": d.last_scalar("spike/loss_count") or 0.0,
        "grad_spikes": d.last_scalar("spike/grad_norm_count") or 0.0,
        "diverged": float(bool(run.status.get("diverged"))),
        "grad_norm_late_mean": float(np.mean(late)) if len(late) else float("nan"),
        "grad_norm_late_std": float(np.std(late)) if len(late) else float("nan"),
        "grad_norm_max": float(np.max(gnorm)) if len(gnorm) else float("nan"),
        # outliers at the last read (the end of training) and over the whole run
        "act_max_final": float(np.nanmax(d.last_per_layer("act/max_abs")[1])) if d.layer_keys("act/max_abs") else float("nan"),
        "act_max_run": d.max_over_layers("act/max_abs") or float("nan"),
        "logit_max_final": float(np.nanmax(d.last_per_layer("attn/logit_max_abs")[1]))
        if d.layer_keys("attn/logit_max_abs") else float("nan"),
        "sink_mass": float(np.nanmean(d.last_per_layer("attn/sink_mass")[1])) if d.layer_keys("attn/sink_mass") else float("nan"),
        "tokens_per_s": float(np.median(d.series("perf/tokens_per_s")[1])) if d.has("perf/tokens_per_s") else float("nan"),
    }
    stats["unstable"] = float(stats["diverged"] or spikes >= UNSTABLE_SPIKE_SHARE * steps)
    stats.update(_context_rms_stats(d))
    return stats


def _context_rms_stats(d: RunData) -> Dict[str, float]:
    """Context RMS against the softmax floor (spec §6): per (layer, head) the RMS divided by the layer's value RMS
    (the spec's unit-RMS values) and by the uniform-attention reference mean_t 1/sqrt(t+1). A softmax head with
    uncorrelated values cannot go below 1; DIFF V2 can (towards 0)."""
    out = {"ctx_rms_rel_min": float("nan"), "ctx_rms_below_floor": float("nan"), "ctx_rms_first_mean": float("nan")}
    ref = d.last_scalar("attn/context_rms_uniform_ref")
    heads = d.last_matrix("attn/context_rms_heads")
    _, value_rms = d.last_per_layer("attn/value_rms")
    if ref and heads is not None and len(value_rms) == heads[1].shape[0]:
        rel = heads[1] / value_rms[:, None] / ref
        out["ctx_rms_rel_min"] = float(np.nanmin(rel))
        out["ctx_rms_below_floor"] = float(np.nanmean(rel < 1.0))
    firsts = [d.series(k)[1][0] for k in d.layer_keys("attn/context_rms_mean").values() if len(d.series(k)[1])]
    if firsts:
        out["ctx_rms_first_mean"] = float(np.mean(firsts))  # at the first read: how small the context starts
    return out


def pick_lrs(suite_dir: Path, baseline: str = "baseline") -> dict:
    """The sweep's verdict: `normal` = the baseline LR with the lowest final validation loss; `large` = the smallest
    LR above it at which the baseline is unstable (>= 1% of steps flagged as loss or grad-norm spikes, or the run
    stopped on non-finite values). Without an unstable LR, `large` is the largest swept LR (and the report says so).
    """
    sweep = sorted((r for r in load_suite_runs(suite_dir) if r.attention == baseline and r.status.get("seed") == 0
                    and r.status.get("lr_name") is None), key=lambda r: r.lr)
    if not sweep:
        raise ValueError(f"no {baseline} sweep runs under {suite_dir}/runs (run the suite's sweep phase first)")
    normal = min(sweep, key=lambda r: (r.stats["val_loss"] if math.isfinite(r.stats["val_loss"]) else math.inf))
    above = [r for r in sweep if r.lr > normal.lr]
    unstable = [r for r in above if r.stats["unstable"]]
    large = unstable[0] if unstable else (above[-1] if above else normal)
    return {"lrs": {"normal": normal.lr, "large": large.lr}, "found_unstable": bool(unstable),
            "sweep": [{"lr": r.lr, **{k: r.stats[k] for k in ("val_loss", "spikes", "unstable", "grad_norm_max",
                                                               "act_max_final", "logit_max_final")}} for r in sweep]}
