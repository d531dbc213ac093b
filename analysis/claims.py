"""The DIFF V2 claims (spec §7) measured on an experiment suite's runs (launch/suite.py), with verdicts.

    python -m analysis.claims results/repro_small --out docs/results/repro_small

Reads SUITE/runs/*/metrics.jsonl (+ suite_status.json) and writes OUT/report.md: the learning-rate sweep and the
rule that picked the normal and the large LR, one row per blog claim with our numbers and a verdict
(reproduced / not reproduced / inconclusive at this scale), a table per arm (mean ± std over seeds), comparison
plots (analysis.compare) and OUT/raw_runs.tar.gz with every run's metrics.jsonl, spikes.jsonl, config and status.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from analysis.run_data import RunData, load_runs

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
    log = d.path.parent.parent / "logs" / f"{d.path.name}.log"  # launch.suite's console log of the run
    m = re.search(r"params total ([\d,]+)", log.read_text(errors="replace")) if log.is_file() else None
    if m:
        stats["params"] = float(m.group(1).replace(",", ""))
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


def pick_lrs(suite_dir: Path, baseline: str = "baseline", runs: Optional[List[Run]] = None) -> dict:
    """The sweep's verdict: `normal` = the baseline LR with the lowest final validation loss; `large` = the smallest
    LR above it at which the baseline is unstable (>= 1% of steps flagged as loss or grad-norm spikes, or the run
    stopped on non-finite values). Without an unstable LR, `large` is the largest swept LR (and the report says so).
    `runs`: the suite's runs if already loaded (else read from `suite_dir`).
    """
    runs = load_suite_runs(suite_dir) if runs is None else runs
    sweep = sorted((r for r in runs if r.attention == baseline and r.status.get("seed") == 0
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


# ------------------------------------------------------------------------------------------------ significance
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t statistic of mean(a) - mean(b) and its two-sided p-value (needs >= 2 values on each side)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        diff = a.mean() - b.mean()  # no spread: the sign of the difference is all there is
        return (math.copysign(math.inf, diff) if diff else 0.0), (0.0 if diff else 1.0)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, t_two_sided_p(t, df)


REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def verdict(claimed: Sequence[float], other: Sequence[float], noise: Optional[float] = None,
            alpha: float = 0.05) -> tuple[str, str]:
    """Is mean(claimed) < mean(other) (the claim's direction), beyond seed noise?

    Both sides with >= 2 seeds: Welch's t-test at `alpha`. One side with one seed: z = difference / (noise *
    sqrt(1/n1 + 1/n2)) with `noise` the seed standard deviation of the same LR's 3-seed arms, decisive at |z| >= 2.78
    (the 5% two-sided t quantile at 4 degrees of freedom). Returns (verdict, the statistic as text)."""
    claimed, other = [v for v in claimed if math.isfinite(v)], [v for v in other if math.isfinite(v)]
    if not claimed or not other:
        return INCONCLUSIVE, "missing runs"
    diff = float(np.mean(claimed) - np.mean(other))
    if len(claimed) >= 2 and len(other) >= 2:
        t, p = welch(claimed, other)
        stat, decisive = f"Welch t={t:.2f}, p={p:.3g}", p < alpha
    elif noise and noise > 0:
        z = diff / (noise * math.sqrt(1 / len(claimed) + 1 / len(other)))
        stat, decisive = f"z={z:.2f} vs seed noise {noise:.3g}", abs(z) >= 2.78
    else:
        return INCONCLUSIVE, "one seed and no noise estimate"
    if not decisive:
        return INCONCLUSIVE, stat
    return (REPRODUCED if diff < 0 else NOT_REPRODUCED), stat


# ------------------------------------------------------------------------------------------------ the report
def _group(runs: List[Run], attention: str, lr: float) -> List[Run]:
    return [r for r in runs if r.attention == attention and math.isclose(r.lr, lr)]


def _vals(runs: List[Run], key: str) -> List[float]:
    return [r.stats[key] for r in runs]


def _ms(values: Sequence[float], fmt: str = ".4g") -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} ± {np.std(values, ddof=1):{fmt}}"


def _noise(runs: List[Run], lr: float, key: str, arms: Sequence[str] = ("baseline", "diffv2")) -> Optional[float]:
    """Pooled seed standard deviation of `key` over the arms that have several seeds at this LR."""
    groups = [_vals(_group(runs, a, lr), key) for a in arms]
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return None
    dof = sum(len(g) - 1 for g in groups)
    return math.sqrt(sum(np.var(g, ddof=1) * (len(g) - 1) for g in groups) / dof)


def uniform_sink_mass(seq_len: int) -> float:
    """First-token attention mass of uniform causal attention averaged over query positions: mean_t 1/(t+1)."""
    return float(np.mean(1.0 / np.arange(1, seq_len + 1)))


def claim_rows(runs: List[Run], normal: float, large: float, seq_len: int) -> List[List[str]]:
    """One row per claim: claim, setting, metric, DIFF V2, comparison arm(s), verdict, statistic."""
    rows: List[List[str]] = []
    g = lambda arm, lr: _group(runs, arm, lr)  # noqa: E731

    def row(claim, lr_name, lr, metric, key, claimed_arm, other_arm, direction="lower", note=""):
        a, b = _vals(g(claimed_arm, lr), key), _vals(g(other_arm, lr), key)
        sign = 1.0 if direction == "lower" else -1.0
        v, stat = verdict([sign * x for x in a], [sign * x for x in b], _noise(runs, lr, key))
        rows.append([claim, f"{lr_name} LR {lr:g}", metric, f"{claimed_arm}: {_ms(a)} (n={len(a)})",
                     f"{other_arm}: {_ms(b)} (n={len(b)})", v, stat + (f"; {note}" if note else "")])

    row("1. Lower LM loss than the Transformer", "normal", normal, "final validation loss", "val_loss",
        "diffv2", "baseline")
    row("1. (same, training loss)", "normal", normal, "final training loss (mean of last 10% of logs)",
        "train_loss", "diffv2", "baseline")
    row("2. Fewer loss and gradient spikes where the baseline is unstable", "large", large,
        "spike steps (loss + grad norm)", "spikes", "diffv2", "baseline")
    row("2. (same, loss spikes only)", "large", large, "loss spike steps", "loss_spikes", "diffv2", "baseline")
    for name, lr in (("normal", normal), ("large", large)):
        row("3. Smaller activation outliers", name, lr, "max |h| over layers at the end", "act_max_final",
            "diffv2", "baseline")
    row("§7.4 Smaller qk-logit outliers", "normal", normal, "max |q·k|/sqrt(d) over layers at the end",
        "logit_max_final", "diffv2", "baseline")
    # 4. gradient-norm scale comparable to the Transformer's: the ratio, not a one-sided test
    for name, lr in (("normal", normal), ("large", large)):
        a, b = _vals(g("diffv2", lr), "grad_norm_late_mean"), _vals(g("baseline", lr), "grad_norm_late_mean")
        if a and b:
            ratio = float(np.mean(a) / np.mean(b))
            v = REPRODUCED if 0.5 <= ratio <= 2.0 else NOT_REPRODUCED
            rows.append(["4. Gradient-norm scale comparable to the Transformer's", f"{name} LR {lr:g}",
                         "mean grad norm over the last 30% of steps", f"diffv2: {_ms(a)}", f"baseline: {_ms(b)}", v,
                         f"ratio {ratio:.2f} (comparable = within 0.5-2x)"])
    row("4. DIFF V1: larger late grad norm than the Transformer at a large LR", "large", large,
        "mean grad norm over the last 30% of steps", "grad_norm_late_mean", "baseline", "diffv1",
        note="claimed: baseline below diffv1")
    row("4. DIFF V1: higher late grad-norm variance than the Transformer at a large LR", "large", large,
        "std of grad norm over the last 30% of steps", "grad_norm_late_std", "baseline", "diffv1",
        note="claimed: baseline below diffv1")
    # 5. context RMS below the softmax floor
    for name, lr in (("normal", normal), ("large", large)):
        a, b = _vals(g("diffv2", lr), "ctx_rms_rel_min"), _vals(g("baseline", lr), "ctx_rms_rel_min")
        if a and b:
            below = [x < 1.0 for x in a]
            v0, stat = verdict(a, b, _noise(runs, lr, "ctx_rms_rel_min"))
            v = REPRODUCED if all(below) and v0 == REPRODUCED else (INCONCLUSIVE if v0 != NOT_REPRODUCED else v0)
            rows.append(["5. Context RMS lower bound relaxed toward zero", f"{name} LR {lr:g}",
                         "min over heads of context RMS / (value RMS · softmax floor); < 1 = below the floor",
                         f"diffv2: {_ms(a)}", f"baseline: {_ms(b)}", v,
                         f"{stat}; diffv2 heads below the floor in {sum(below)}/{len(a)} runs"])
    # 6. attention sinks
    uniform = uniform_sink_mass(seq_len)
    a, b = _vals(g("diffv2", normal), "sink_mass"), _vals(g("baseline", normal), "sink_mass")
    if a and b:
        v, stat = verdict(a, b, _noise(runs, normal, "sink_mass"))
        if np.mean(b) < 2 * uniform:  # no sink in the baseline: nothing to eliminate
            v, stat = INCONCLUSIVE, stat + f"; the baseline has no sink (uniform attention gives {uniform:.4f})"
        rows.append(["6. No attention sinks", f"normal LR {normal:g}", "first-token attention mass (mean over layers)",
                     f"diffv2: {_ms(a)}", f"baseline: {_ms(b)}", v, stat])
    # design ablations at the large LR (spec §7.3)
    row("A1. Pairing across GQA groups: more spikes than DIFF V2", "large", large, "spike steps", "spikes",
        "diffv2", "diffv2_half_split")
    row("A1. (same) higher loss than DIFF V2", "large", large, "final validation loss", "val_loss", "diffv2",
        "diffv2_half_split")
    row("A2. No lambda: excessively small context RMS at initialization", "large", large,
        "mean context RMS at the first read", "ctx_rms_first_mean", "diffv2_no_lambda", "diffv2")
    row("A2. (same) higher loss than DIFF V2", "large", large, "final validation loss", "val_loss", "diffv2",
        "diffv2_no_lambda")
    row("A3. Raw lambda (no sigmoid): higher loss than DIFF V2", "large", large, "final validation loss", "val_loss",
        "diffv2", "diffv2_raw_lambda")
    row("A3. (same) less stable than DIFF V2", "large", large, "spike steps", "spikes", "diffv2", "diffv2_raw_lambda")
    row("A3. (same) more stable than A1", "large", large, "spike steps", "spikes", "diffv2_raw_lambda",
        "diffv2_half_split")
    for name, lr in (("large", large), ("normal", normal)):
        row("A4. 1.5h-head Transformer (parameter-aligned): higher loss than DIFF V2", name, lr,
            "final validation loss", "val_loss", "diffv2", "baseline_1p5h")
    return rows


ARM_KEYS = [("val_loss", "val loss", ".4f"), ("train_loss", "train loss", ".4f"), ("spikes", "spike steps", ".3g"),
            ("grad_norm_late_mean", "late grad norm", ".3g"), ("grad_norm_late_std", "late grad-norm std", ".3g"),
            ("act_max_final", "max |h|", ".4g"), ("logit_max_final", "max logit", ".4g"),
            ("sink_mass", "sink mass", ".3g"), ("ctx_rms_rel_min", "ctx RMS / floor (min)", ".3g"),
            ("tokens_per_s", "tokens/s", ",.0f")]


def arm_rows(runs: List[Run]) -> List[List[str]]:
    keys = sorted({(r.attention, r.lr) for r in runs}, key=lambda k: (k[1], k[0]))
    rows = []
    for attention, lr in keys:
        group = _group(runs, attention, lr)
        params = group[0].stats.get("params")
        rows.append([attention, f"{lr:g}", str(len(group)), *[_ms(_vals(group, k), f) for k, _, f in ARM_KEYS]]
                    + ([f"{params / 1e6:.2f}M"] if params else []))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731  (|h| inside a Markdown table cell)
    return (["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def write_report(suite_dir: Path, out: Path, plots: bool = True) -> Path:
    suite_dir, out = Path(suite_dir), Path(out)
    runs = load_suite_runs(suite_dir)
    picked = pick_lrs(suite_dir, runs=runs)
    normal, large = picked["lrs"]["normal"], picked["lrs"]["large"]
    claims, arms = claim_rows(runs, normal, large, _seq_len(runs[0])), arm_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# DIFF V2 claims at small scale: measured", "",
          f"Suite directory: `{suite_dir}`, {len(runs)} finished runs. Generated by `python -m analysis.claims`.",
          "", "## Learning-rate sweep (baseline, seed 0)", "",
          *_table(["LR", "final val loss", "spike steps", "unstable", "max grad norm", "max |h| (end)",
                   "max logit (end)"],
                  [[f"{s['lr']:g}", f"{s['val_loss']:.4f}", f"{s['spikes']:.0f}", "yes" if s["unstable"] else "no",
                    f"{s['grad_norm_max']:.3g}", f"{s['act_max_final']:.4g}", f"{s['logit_max_final']:.4g}"]
                   for s in picked["sweep"]]),
          "", f"Normal LR = the baseline's best: **{normal:g}**. Large LR = the smallest LR above it at which the "
          f"baseline is unstable (>= {UNSTABLE_SPIKE_SHARE:.0%} of steps flagged as loss or grad-norm spikes, or "
          f"stopped on non-finite values): **{large:g}**"
          + ("" if picked["found_unstable"] else " (no swept LR was unstable: the largest one is used)") + ".", "",
          "## Claims", "",
          *_table(["claim (spec §7)", "setting", "metric", "DIFF V2 (or the claimed-lower arm)", "compared with",
                   "verdict", "statistic"], claims),
          "", "Verdicts: the claimed direction beyond seed noise. Both sides with >= 2 seeds: Welch's t-test, "
          "p < 0.05. One side with one seed: the difference over the pooled seed standard deviation of the "
          "3-seed arms at that LR, decisive at |z| >= 2.78. Otherwise inconclusive.", "",
          "## Every arm (mean ± std over seeds)", "",
          *_table(["arm", "LR", "seeds"] + [name for _, name, _ in ARM_KEYS] + ["params"], arms), ""]
    if plots:
        from analysis.compare import write_report as compare_report

        for name, lr in (("normal_lr", normal), ("large_lr", large)):
            chosen = [r.data for r in runs if math.isclose(r.lr, lr) and r.status.get("seed") == 0]
            if chosen:
                compare_report(chosen, out / name)
                md += [f"Plots, seed 0 of every arm at the {name.replace('_', ' ')} ({lr:g}): "
                       f"[{name}/report.md]({name}/report.md)", ""]
    with tarfile.open(out / "raw_runs.tar.gz", "w:gz") as tar:
        for r in runs:
            for fname in ("metrics.jsonl", "spikes.jsonl", "config.yaml", "suite_status.json"):
                path = r.data.path / fname
                if path.is_file():
                    tar.add(path, arcname=f"runs/{r.data.path.name}/{fname}")
    md += ["Raw data: [raw_runs.tar.gz](raw_runs.tar.gz) (every run's metrics.jsonl, spikes.jsonl, resolved "
           "config.yaml and suite_status.json with its exact command).", ""]
    (out / "claims.json").write_text(json.dumps({"lrs": picked["lrs"], "sweep": picked["sweep"],
                                                 "claims": claims, "arms": arms}, indent=1))
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


def _seq_len(run: Run) -> int:
    config = run.data.path / "config.yaml"
    m = re.search(r"^\s+seq_len:\s*(\d+)", config.read_text(), flags=re.M) if config.is_file() else None
    return int(m.group(1)) if m else 1024


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.claims", description=__doc__.split("\n\n")[0])
    p.add_argument("suite_dir", type=Path, help="the --out directory of launch.suite")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    args = p.parse_args(argv)
    try:
        path = write_report(args.suite_dir, args.out, plots=not args.no_plots)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
