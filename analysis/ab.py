"""A/B of one config setting across seeds: do runs that differ only in KEY train alike, arm by arm?

    python -m analysis.ab runs/fp8ab-* --key trainer.fp8 --out docs/results/fp8_ab

Every run directory needs its metrics.jsonl and the resolved config.yaml the trainer writes. Runs are grouped by
attention arm (model.attention.name) and by the value of KEY; within an arm every value of KEY is compared with
the first one found in `--reference` order (default: the value `off`, else the first value in sorted order).

Per run: final validation loss, final train loss (mean of the last 10% of logged values), late grad norm, max |h|
and max attention logit at the end, context RMS (mean over layers at the last read, and the smallest head relative
to the softmax floor, spec §6), and sigma(lambda) (mean, 5th and 95th percentile over heads, averaged over layers
at the last read). A table gives mean ± std over seeds; a verdict per arm says whether the difference in the losses,
the context RMS, sigma(lambda) and max |h| is within the seed noise (Welch's t-test, p >= 0.05, with >= 2 seeds on both sides). Writes OUT/report.md and
OUT/ab.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf

from analysis.claims import Run, _ms, _table, run_stats, welch
from analysis.run_data import RunData, load_runs

ALPHA = 0.05
LOSSES = ("val_loss", "train_loss")  # a difference in these is "worse" / "better"; in the others "higher" / "lower"
COMPARED = (("val_loss", "final val loss"), ("train_loss", "final train loss"), ("ctx_rms_mean", "context RMS (mean)"),
            ("lambda_mean", "σ(λ) mean"), ("lambda_p05", "σ(λ) p05"), ("lambda_p95", "σ(λ) p95"),
            ("act_max_final", "max |h| (end)"))
COLUMNS = (("val_loss", "final val loss", ".4f"), ("train_loss", "final train loss", ".4f"),
           ("grad_norm_late_mean", "late grad norm", ".3g"), ("act_max_final", "max |h| (end)", ".4g"),
           ("logit_max_final", "max logit (end)", ".4g"), ("ctx_rms_mean", "context RMS (mean)", ".4g"),
           ("ctx_rms_rel_min", "ctx RMS / floor (min)", ".3g"), ("lambda_mean", "σ(λ) mean", ".4f"),
           ("lambda_p05", "σ(λ) p05", ".4f"), ("lambda_p95", "σ(λ) p95", ".4f"),
           ("tokens_per_s", "tokens/s", ",.0f"))


def config_value(config_text: str, dotted: str) -> Optional[str]:
    """The value at `dotted` (e.g. trainer.fp8) in a resolved config.yaml, as text; None when absent."""
    value = OmegaConf.select(OmegaConf.create(config_text), dotted)
    return None if value is None else str(value)


def _layer_mean(d: RunData, family: str) -> float:
    _, values = d.last_per_layer(family)
    return float(np.nanmean(values)) if len(values) and np.isfinite(values).any() else float("nan")


def ab_stats(run: Run) -> Dict[str, float]:
    stats = run_stats(run)
    d = run.data
    stats["ctx_rms_mean"] = _layer_mean(d, "attn/context_rms_mean")
    for name, family in (("lambda_mean", "attn/lambda_sigmoid_mean"), ("lambda_p05", "attn/lambda_sigmoid_p05"),
                         ("lambda_p95", "attn/lambda_sigmoid_p95")):
        stats[name] = _layer_mean(d, family)
    return stats


def load(run_dirs: Sequence[Path], key: str) -> List[Run]:
    runs = []
    for run_dir in run_dirs:
        config = run_dir / "config.yaml"
        if not (run_dir / "metrics.jsonl").is_file() or not config.is_file():
            raise ValueError(f"{run_dir} has no metrics.jsonl or config.yaml: pass run directories written by "
                             f"train.py")
        text = config.read_text()
        value = config_value(text, key)
        if value is None:
            raise ValueError(f"{config} has no {key}: pass --key as a dotted config key (e.g. trainer.fp8)")
        status = {"attention": config_value(text, "model.attention.name") or "?", "value": value,
                  "seed": config_value(text, "seed")}
        run = Run(status, load_runs([run_dir])[0])
        run.stats = ab_stats(run)
        runs.append(run)
    if not runs:
        raise ValueError("no run directories given")
    return runs


def compare(runs: List[Run], reference: Sequence[str] = ("off",)) -> tuple[list, list]:
    """(rows of the mean ± std table, rows of the verdict table)."""
    arms = sorted({r.attention for r in runs})
    values = sorted({r.status["value"] for r in runs})
    ref = next((v for v in reference if v in values), values[0])
    ordered = [ref] + [v for v in values if v != ref]
    table, verdicts = [], []
    for arm in arms:
        groups = {v: [r for r in runs if r.attention == arm and r.status["value"] == v] for v in ordered}
        for v in ordered:
            if groups[v]:
                table.append([arm, v, str(len(groups[v]))] + [_ms([r.stats[k] for r in groups[v]], f)
                                                             for k, _, f in COLUMNS])
        for v in ordered[1:]:
            for key, name in COMPARED:
                a = [r.stats[key] for r in groups[ref] if math.isfinite(r.stats[key])]
                b = [r.stats[key] for r in groups[v] if math.isfinite(r.stats[key])]
                if not a or not b:
                    continue
                diff = float(np.mean(b) - np.mean(a))
                noise = _pooled_std([a, b])
                if len(a) >= 2 and len(b) >= 2:
                    t, p = welch(b, a)
                    stat = f"Welch t={t:.2f}, p={p:.3g}"
                    up, down = ("worse", "better") if key in LOSSES else ("higher", "lower")
                    verdict = "within seed noise" if p >= ALPHA else (up if diff > 0 else down)
                else:
                    stat, verdict = "one seed", "inconclusive"
                verdicts.append([arm, f"{v} − {ref}", name, f"{diff:+.4g}",
                                 "-" if noise is None else f"{noise:.4g}", stat, verdict])
    return table, verdicts


def _pooled_std(groups: Sequence[Sequence[float]]) -> Optional[float]:
    groups = [g for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    return math.sqrt(sum(np.var(g, ddof=1) * (len(g) - 1) for g in groups) / dof) if dof else None


def write_report(run_dirs: Sequence[Path], key: str, out: Path, reference: Sequence[str] = ("off",)) -> Path:
    runs = load(run_dirs, key)
    table, verdicts = compare(runs, reference)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# A/B of `{key}`", "",
          f"{len(runs)} runs, generated by `python -m analysis.ab ... --key {key}`. Mean ± std over seeds.", "",
          *_table(["arm", key, "seeds"] + [name for _, name, _ in COLUMNS], table), "",
          "## Against the reference", "",
          f"Difference of the means; noise = pooled seed standard deviation; verdict: Welch's t-test, "
          f"p >= {ALPHA} is within seed noise.", "",
          *_table(["arm", "compared", "metric", "difference", "seed noise", "statistic", "verdict"], verdicts), ""]
    (out / "ab.json").write_text(json.dumps({
        "key": key, "table": table, "verdicts": verdicts,
        "runs": [{"name": r.data.path.name, **r.status, **r.stats} for r in runs]}, indent=1))
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+", help="run directories (runs/NAME)")
    p.add_argument("--key", required=True, help="the dotted config key the runs differ in, e.g. trainer.fp8")
    p.add_argument("--reference", nargs="+", default=["off"], help="the value(s) compared against, first found wins")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    args = p.parse_args(argv)
    try:
        path = write_report(args.run_dirs, args.key, args.out, args.reference)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
