"""Offline comparison of runs from their metrics.jsonl alone: PNG plots + report.md + a self-contained report.html.

    python -m monitoring.compare runs/tiny-diffv2-s0 runs/tiny-baseline-s0 --out reports/diffv2_vs_baseline

Figures are drawn only for what the runs logged (no empty panels): loss and validation loss (raw and smoothed,
spike events marked), grad norm with spike markers, spike counts and score, max |h| and max attention logit per
layer over time, context-RMS layer x head heatmaps and per-layer values against the spec §6 references,
lambda distributions, attention sinks and entropy, MoE balance, throughput, and a summary table.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from monitoring import compare_figures as figures
from monitoring.run_data import RunData, load_runs


def summary_rows(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """One row per run: final loss +- noise, validation loss, spikes, max activation, max logit, throughput."""
    header = ["run", "variant", "steps", "final train loss", "final val loss", "spikes (loss / grad norm)",
              "spike score", "max abs h", "max attn logit", "tokens/s"]
    rows = []
    for run in runs:
        _, loss = run.series("train/loss")
        tail = loss[-max(3, len(loss) // 10):]
        noise = f" ± {tail.std(ddof=1):.4f}" if len(tail) > 1 else ""
        final = f"{tail.mean():.4f}{noise}" if len(tail) else "-"
        _, val = run.series("train/val_loss")
        counts = [run.last_scalar(k) for k in ("spike/count", "spike/loss_count", "spike/grad_norm_count")]
        spikes = "-" if counts[0] is None else f"{counts[0]:.0f} ({counts[1]:.0f} / {counts[2]:.0f})"
        rows.append([run.name, run.variant, str(run.last_step), final, _fmt(val[-1] if len(val) else None), spikes,
                     _fmt(run.last_scalar("spike/score")), _fmt(run.max_over_layers("act/max_abs")),
                     _fmt(run.max_over_layers("attn/logit_max_abs")),
                     _fmt(_median(run.series("perf/tokens_per_s")[1]))])
    return header, rows


def _median(values: np.ndarray) -> Optional[float]:
    return float(np.median(values)) if len(values) else None


def _fmt(value: Optional[float]) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def write_report(runs: list[RunData], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sections = [s for s in (draw(runs, out) for draw in figures.ALL) if s is not None]
    header, rows = summary_rows(runs)
    md = ["# Run comparison", "", "Runs: " + ", ".join(f"`{r.name}` ({r.variant}, `{r.path}`)" for r in runs), "",
          "## Summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", "Final train loss: mean ± standard deviation of the last 10% of logged training-loss values "
           "(at least 3), i.e. the step-to-step noise around the end of the run. Spikes: steps flagged by the "
           "spike detector (loss or grad norm above mean + k·std of the rolling window).", ""]
    for s in sections:
        md += [f"## {s.title}", "", s.caption, "", f"![{s.title}]({s.path.name})", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(runs, header, rows, sections))
    return out / "report.md"


def _html(runs, header, rows, sections) -> str:
    cells = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Run comparison</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}</style></head><body>",
             "<h1>Run comparison</h1><p>" + ", ".join(f"<code>{r.name}</code> ({r.variant})" for r in runs) + "</p>",
             f"<h2>Summary</h2><table><tr>{cells}</tr>{body}</table>"]
    for s in sections:
        data = base64.b64encode(s.path.read_bytes()).decode()
        parts.append(f"<h2>{s.title}</h2><p>{s.caption}</p><img src='data:image/png;base64,{data}'>")
    return "".join(parts) + "</body></html>"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("reports/compare"), help="output directory")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.run_dirs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = write_report(runs, args.out)
    print(f"wrote {report} and {report.with_suffix('.html')} ({len(list(args.out.glob('*.png')))} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
