"""The comparison report's figures. Each returns a Section, or None when no run logged the data it needs.

Every step axis has integer ticks (a step is an integer; matplotlib would otherwise tick 2.25, 2.5, ... on a short
run). A series over steps with fewer than SHORT_SERIES readings is drawn with markers: a line through one reading
draws nothing, and with a few readings the reader should see where they are. Training loss with fewer readings is
drawn raw only: an EMA over so few points is no smoother, and would look like data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.ticker import MaxNLocator

from monitoring.plots import draw_heatmap, ema, plt
from analysis.run_data import RunData

COLORS = plt.get_cmap("tab10").colors
SHORT_SERIES = 20  # series over steps with fewer readings get markers (and training loss is not smoothed)


@dataclass
class Section:
    title: str
    caption: str
    path: Path


def _color(runs: list[RunData], run: RunData):
    return COLORS[runs.index(run) % len(COLORS)]


def _label(run: RunData) -> str:
    return f"{run.name} ({run.variant})"


def _dots(n: int, ms: float = 4) -> dict:
    """Line2D keywords for a series of n readings: markers when it is short."""
    return {"marker": "o", "ms": ms} if n < SHORT_SERIES else {}


def _step_axis(ax) -> None:
    """An x axis of training steps: labelled, integer ticks only (min_n_ticks=1: else a view around one reading,
    which holds a single integer, falls back to fractional ticks)."""
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _smooth_weight(n: int) -> float:
    return 1 - 1 / max(2.0, n / 20)


def _save(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _markers(ax, runs, run, key: str) -> None:
    """Spike events of `run` on a curve of `key` (loss or grad_norm)."""
    events = run.events()
    if events:
        steps = [e["step"] for e in events]
        values = [float(e[key]) for e in events]
        ax.scatter(steps, values, marker="x", s=50, color=_color(runs, run), zorder=5,
                   label=f"{run.name}: spike steps ({len(events)})")


def loss(runs: list[RunData], out: Path) -> Optional[Section]:
    have_val = [r for r in runs if r.has("train/val_loss")]
    fig, axes = plt.subplots(1, 2 if have_val else 1, figsize=(12 if have_val else 7, 4), squeeze=False)
    ax = axes[0, 0]
    short = False
    for run in runs:
        steps, values = run.series("train/loss")
        c = _color(runs, run)
        if not len(values):
            continue
        if len(values) < SHORT_SERIES:  # too few readings to smooth: the raw ones, marked
            short = True
            ax.plot(steps, values, color=c, lw=1.5, label=_label(run), **_dots(len(values)))
        else:
            ax.plot(steps, values, color=c, alpha=0.3, lw=1)
            ax.plot(steps, ema(values, _smooth_weight(len(values))), color=c, lw=2, label=_label(run))
        _markers(ax, runs, run, "loss")
    smoothed = any(len(r.series("train/loss")[1]) >= SHORT_SERIES for r in runs)
    legend = (["thin: raw, thick: smoothed"] * smoothed
              + [f"with markers: raw, < {SHORT_SERIES} readings, not smoothed"] * short)
    ax.set(title="training loss" + (f" ({'; '.join(legend)})" if legend else ""), ylabel="cross-entropy")
    _step_axis(ax)
    ax.legend()
    if have_val:
        ax = axes[0, 1]
        for run in have_val:
            steps, values = run.series("train/val_loss")
            ax.plot(steps, values, "o-", color=_color(runs, run), label=_label(run))
        ax.set(title="validation loss", ylabel="cross-entropy")
        _step_axis(ax)
        ax.legend()
    return Section("Loss", f"Training loss raw and smoothed (EMA; runs with fewer than {SHORT_SERIES} readings: raw, "
                   "each reading marked), spike events marked with x; validation loss.", _save(fig, out, "loss"))


def grad_norm(runs: list[RunData], out: Path) -> Optional[Section]:
    if not any(r.has("grad/norm") for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    for run in runs:
        steps, values = run.series("grad/norm")
        ax.plot(steps, values, color=_color(runs, run), lw=1.2, label=_label(run), **_dots(len(values)))
        _markers(ax, runs, run, "grad_norm")
    ax.set(title="global gradient norm (pre-clip)", ylabel="grad norm", yscale="log")
    _step_axis(ax)
    ax.legend()
    return Section("Gradient norm", "Global grad norm before clipping at logging steps; x marks the value of each "
                   "step the spike detector flagged (those may fall between logging steps).",
                   _save(fig, out, "grad_norm"))


def spikes(runs: list[RunData], out: Path) -> Optional[Section]:
    have = [r for r in runs if r.has("spike/count")]
    if not have:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for run in have:
        c = _color(runs, run)
        count, score = run.series("spike/count"), run.series("spike/score")
        axes[0].step(*count, where="post", color=c, label=_label(run), **_dots(len(count[0])))
        axes[1].plot(*score, color=c, label=_label(run), **_dots(len(score[0])))
    axes[0].set(title="spike steps so far", ylabel="count")
    axes[1].set(title="spike score (share of spike steps, rolling)", ylabel="score")
    for ax in axes:
        _step_axis(ax)
        ax.legend()
    return Section("Loss spikes", "Cumulative spike steps (loss or grad norm) and the rolling spike score.",
                   _save(fig, out, "spikes"))


def _per_layer_over_time(runs, out, family: str, name: str, title: str, ylabel: str, caption: str):
    have = [r for r in runs if r.layer_keys(family)]
    if not have:
        return None
    fig, axes = plt.subplots(1, len(have), figsize=(5.5 * len(have), 4), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], have):
        layers = run.layer_keys(family)
        cmap = plt.get_cmap("viridis")
        for i, (layer, key) in enumerate(layers.items()):
            ax.plot(*run.series(key), color=cmap(i / max(1, len(layers) - 1)), marker=".", label=f"layer {layer}")
        ax.set(title=f"{_label(run)}", ylabel=ylabel)
        _step_axis(ax)
        if len(layers) <= 12:
            ax.legend(ncol=2)
    fig.suptitle(title)
    return Section(title, caption, _save(fig, out, name))


def activations(runs, out):
    return _per_layer_over_time(runs, out, "act/max_abs", "act_max_abs", "max |h| per layer (residual stream)",
                                "max |h|", "Largest |hidden state| at each block output, per layer (spec §7.5).")


def attention_logits(runs, out):
    return _per_layer_over_time(runs, out, "attn/logit_max_abs", "attn_logit_max", "max |q·k/√d| per layer",
                                "max |logit|", "Largest attention logit over all query heads on the probe batch.")


def context_rms_heatmaps(runs, out):
    have = [(r, r.last_matrix("attn/context_rms_heads")) for r in runs]
    have = [(r, m) for r, m in have if m is not None]
    if not have:
        return None
    vmax = max(np.nanmax(m) for _, (_, m) in have)
    fig, axes = plt.subplots(1, len(have), figsize=(4.5 * len(have), 3.5), squeeze=False, constrained_layout=True)
    for ax, (run, (step, matrix)) in zip(axes[0], have):
        im = draw_heatmap(ax, matrix, f"{_label(run)}, step {step}", vmin=0, vmax=vmax)
    fig.colorbar(im, ax=axes[0].tolist(), label="context RMS")
    return Section("Context RMS per layer x head", "RMS of each output head's context before o_proj (spec §6), last "
                   "logged matrix; DIFF V2 after the subtraction. Shared colour scale.",
                   _save(fig, out, "context_rms_heads"))


def context_rms_layers(runs, out):
    have = [r for r in runs if r.layer_keys("attn/context_rms_mean")]
    if not have:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for run in have:
        c = _color(runs, run)
        layers, mean = run.last_per_layer("attn/context_rms_mean")
        lo, hi = run.last_per_layer("attn/context_rms_min")[1], run.last_per_layer("attn/context_rms_max")[1]
        axes[0].plot(layers, mean, "o-", color=c, label=_label(run))
        axes[0].fill_between(layers, lo, hi, color=c, alpha=0.2)
        scale = run.last_per_layer("attn/value_rms")[1]
        if len(scale) == len(mean):
            axes[1].plot(layers, mean / scale, "o-", color=c, label=f"{_label(run)}")
            floor = run.last_per_layer("attn/context_rms_floor")[1]
            if len(floor) == len(mean):
                axes[1].plot(layers, floor, ":", color=c, lw=2, label=f"{run.name}: floor mean |1-σ|/√(t+1)")
    ref = next((r.last_scalar("attn/context_rms_uniform_ref") for r in have), None)
    if ref is not None:
        axes[1].axhline(ref, color="k", ls="--", lw=1, label="softmax, uniform attention: mean 1/√(t+1)")
        axes[1].axhline(1.0, color="gray", ls="-.", lw=1, label="softmax, one-hot attention: 1")
    axes[0].set(title="context RMS per layer (mean, band: min-max over heads)", xlabel="layer", ylabel="context RMS")
    axes[1].set(title="context RMS / value RMS with spec §6 references", xlabel="layer", ylabel="normalised RMS")
    axes[0].legend()
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return Section("Context RMS per layer", "Last logged per-layer context RMS (DIFF V1: after its per-head "
                   "RMSNorm); right: divided by the values' RMS so the spec's bounds (orthonormal unit-RMS values) "
                   "can be read against it.",
                   _save(fig, out, "context_rms_layers"))


def lambdas(runs, out):
    families = {r: f for r in runs for f in ("attn/lambda_sigmoid", "attn/lambda_raw") if r.layer_keys(f + "_p50")}
    v1 = [r for r in runs if r.layer_keys("attn/lambda_v1")]
    if not families and not v1:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for run, fam in families.items():
        c = _color(runs, run)
        layers, p50 = run.last_per_layer(fam + "_p50")
        axes[0].fill_between(layers, run.last_per_layer(fam + "_p05")[1], run.last_per_layer(fam + "_p95")[1],
                             color=c, alpha=0.2, label=f"{run.name}: p5-p95")
        axes[0].plot(layers, p50, "o-", color=c, label=f"{run.name}: median")
        axes[0].plot(layers, run.last_per_layer(fam + "_mean")[1], "s--", color=c, ms=4, label=f"{run.name}: mean")
        means = [run.series(k) for k in run.layer_keys(fam + "_mean").values()]
        axes[1].plot(means[0][0], np.mean([m[1] for m in means], axis=0), color=c, label=f"{_label(run)}: σ(λ) mean",
                     **_dots(len(means[0][0])))
    for run in v1:
        for layer, key in run.layer_keys("attn/lambda_v1").items():
            steps, values = run.series(key)
            axes[1].plot(steps, values, ls="--", color=_color(runs, run), label=f"{run.name}: V1 λ layer {layer}",
                         **_dots(len(steps)))
    axes[0].set(title="σ(λ) over tokens and heads per layer (last reading)", xlabel="layer", ylabel="σ(λ)")
    axes[1].set(title="λ over training (DIFF V2: mean σ(λ) over layers)", ylabel="value")
    _step_axis(axes[1])
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.legend()
    return Section("λ distributions", "DIFF V2 σ(λ) per layer: median, mean and the 5th-95th percentile band; DIFF "
                   "V1's scalar λ per layer over training.", _save(fig, out, "lambda"))


def sinks(runs, out):
    have = [r for r in runs if r.layer_keys("attn/sink_mass")]
    if not have:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for run in have:
        c = _color(runs, run)
        axes[0].plot(*run.last_per_layer("attn/sink_mass"), "o-", color=c, label=f"{_label(run)}: effective weights")
        if run.layer_keys("attn/sink_mass_a1"):
            axes[0].plot(*run.last_per_layer("attn/sink_mass_a1"), "s--", color=c, ms=4, label=f"{run.name}: map a1")
        ent = "attn/entropy" if run.layer_keys("attn/entropy") else "attn/entropy_a1"
        axes[1].plot(*run.last_per_layer(ent), "o-", color=c, label=f"{_label(run)}: {ent.split('/')[1]}")
    axes[0].set(title="attention mass on the first token (probe batch)", xlabel="layer", ylabel="mass")
    axes[1].set(title="attention entropy (nats)", xlabel="layer", ylabel="entropy")
    for ax in axes:
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    return Section("Attention sinks and entropy", "Mean over heads and query positions of the first-token weight "
                   "(DIFF V2: a1 - σ·a2 and map a1) and of the attention entropy, last probe reading.",
                   _save(fig, out, "sinks"))


def moe(runs, out):
    have = [r for r in runs if r.layer_keys("moe/imbalance")]
    if not have:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for run in have:
        c = _color(runs, run)
        for family, ax in (("moe/imbalance", axes[0]), ("moe/dead_experts", axes[1])):
            series = [run.series(k) for k in run.layer_keys(family).values()]
            ax.plot(series[0][0], np.mean([s[1] for s in series], axis=0), color=c, label=_label(run),
                    **_dots(len(series[0][0])))
    axes[0].set(title="load imbalance max/mean (mean over layers)", ylabel="max / mean")
    axes[1].set(title="dead experts per layer (mean over layers)", ylabel="experts")
    for ax in axes:
        _step_axis(ax)
        ax.legend()
    return Section("MoE balance", "Tokens-per-expert imbalance and experts that received no token.",
                   _save(fig, out, "moe"))


def throughput(runs, out):
    have = [r for r in runs if r.has("perf/tokens_per_s")]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for run in have:
        ax.plot(*run.series("perf/tokens_per_s"), "o-", color=_color(runs, run), ms=3, label=_label(run))
    ax.set(title="throughput", ylabel="tokens / s")
    _step_axis(ax)
    ax.legend()
    return Section("Throughput", "Training tokens per second per logging window.", _save(fig, out, "throughput"))


ALL = (loss, grad_norm, spikes, activations, attention_logits, context_rms_heatmaps, context_rms_layers, lambdas,
       sinks, moe, throughput)
