"""Offline comparison of runs from their metrics.jsonl alone: PNG plots + report.md + a self-contained report.html.

    python -m analysis.compare runs/tiny-diffv2-s0 runs/tiny-baseline-s0 --out reports/diffv2_vs_baseline

Figures are drawn only for what the runs logged (no empty panels): loss and validation loss (raw and smoothed,
spike events marked), grad norm with spike markers, spike counts and score, max |h| and max attention logit per
layer over time, context-RMS layer x head heatmaps and per-layer values against the spec §6 references,
lambda distributions, attention sinks and entropy, MoE balance, throughput, and a summary table. Step axes have
integer ticks; series with few readings are drawn with markers (a single reading is a dot, not an invisible line).

The summary's final train loss is the mean ± standard deviation of the last 10% of the logged training-loss values,
at least MIN_WINDOW (3). A run that logged fewer than FEW_POINTS (30) values is averaged over more than its last 10%
(over all of it when it logged 3 or fewer): the mean then lags the final loss and the ± is trend rather than noise.
Its table cell says `⚠ n=<values averaged>`, a warning under the table gives the count and the last logged value,
and the command prints one warning line on stderr for all such runs.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from analysis import compare_figures as figures
from analysis.run_data import RunData, load_runs


TAIL_FRACTION = 10  # the final train loss averages the last 1/10 of the logged values...
MIN_WINDOW = 3  # ...and at least this many
FEW_POINTS = TAIL_FRACTION * MIN_WINDOW  # runs logging fewer training-loss values get a warning: 1/10 < MIN_WINDOW


@dataclass
class FinalLoss:
    """The final train loss summary of one run: mean ± std over its last logged values."""

    logged: int  # training-loss values the run logged
    used: int  # of which the last `used` are averaged
    mean: float
    std: Optional[float]  # None for one value
    first_step: int  # the averaged window's steps
    last_step: int
    last: float  # the last logged value

    @property
    def too_few(self) -> bool:
        """The last 1/10 of the logged values is fewer than MIN_WINDOW: the window was widened, to the whole run
        when it logged MIN_WINDOW values or fewer."""
        return self.logged < FEW_POINTS

    def value(self) -> str:
        return f"{self.mean:.4f}" + (f" ± {self.std:.4f}" if self.std is not None else "")

    def cell(self) -> str:
        return self.value() + (f" ⚠ n={self.used}" if self.too_few else "")

    def warning(self, run: str) -> str:
        span = f"steps {self.first_step}-{self.last_step}" if self.used > 1 else f"step {self.last_step}"
        return (f"`{run}`: final train loss {self.value()} is the mean of only {self.used} logged "
                f"value{'s' if self.used != 1 else ''} ({span}), not of the last 10% of the run: it logged "
                f"{self.logged} training-loss value{'s' if self.logged != 1 else ''}, fewer than {FEW_POINTS}. Over "
                f"such a window the ± is mostly the loss's trend, not noise, and the mean lags the last logged value, "
                f"{self.last:.4f} at step {self.last_step}.")


def final_loss(run: RunData) -> Optional[FinalLoss]:
    """Mean ± std (ddof 1) of the last max(MIN_WINDOW, n // TAIL_FRACTION) of the n logged training-loss values."""
    steps, loss = run.series("train/loss")
    if not len(loss):
        return None
    window = max(MIN_WINDOW, len(loss) // TAIL_FRACTION)
    tail, tail_steps = loss[-window:], steps[-window:]
    return FinalLoss(logged=len(loss), used=len(tail), mean=float(tail.mean()),
                     std=float(tail.std(ddof=1)) if len(tail) > 1 else None, first_step=int(tail_steps[0]),
                     last_step=int(tail_steps[-1]), last=float(loss[-1]))


def _too_few(runs: list[RunData]) -> list[tuple[RunData, FinalLoss]]:
    return [(run, s) for run in runs if (s := final_loss(run)) is not None and s.too_few]


def few_point_warnings(runs: list[RunData]) -> list[str]:
    """One sentence per run whose final train loss rests on too few logged values (see the module docstring)."""
    return [s.warning(run.name) for run, s in _too_few(runs)]


def stderr_warning(runs: list[RunData]) -> Optional[str]:
    """The same warning as one line for the terminal, or None."""
    few = _too_few(runs)
    if not few:
        return None
    each = ", ".join(f"{run.name} averages {s.used} (last value {s.last:.4f} at step {s.last_step})"
                     for run, s in few)
    return (f"warning: final train loss rests on few points (a run logging fewer than {FEW_POINTS} training-loss "
            f"values is averaged over more than its last 10%, so its ± is mostly trend): {each}")


def summary_rows(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """One row per run: final loss +- noise, validation loss, spikes, max activation, max logit, throughput."""
    header = ["run", "variant", "steps", "final train loss", "final val loss", "spikes (loss / grad norm)",
              "spike score", "max abs h", "max attn logit", "tokens/s"]
    rows = []
    for run in runs:
        final = final_loss(run)
        _, val = run.series("train/val_loss")
        counts = [run.last_scalar(k) for k in ("spike/count", "spike/loss_count", "spike/grad_norm_count")]
        spikes = "-" if counts[0] is None else f"{counts[0]:.0f} ({counts[1]:.0f} / {counts[2]:.0f})"
        rows.append([run.name, run.variant, str(run.last_step), final.cell() if final else "-",
                     _fmt(val[-1] if len(val) else None), spikes,
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
    md += [""]
    warnings = few_point_warnings(runs)
    for w in warnings:
        md += [f"> **Warning, few points:** {w}", ""]
    md += [_NOTE, ""]
    for s in sections:
        md += [f"## {s.title}", "", s.caption, "", f"![{s.title}]({s.path.name})", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(runs, header, rows, sections, warnings))
    return out / "report.md"


_NOTE = (f"Final train loss: mean ± standard deviation of the last 10% of logged training-loss values (at least "
         f"{MIN_WINDOW}), i.e. the step-to-step noise around the end of the run; ⚠ n=K: the run logged fewer than "
         f"{FEW_POINTS} values and the K last were averaged (see the warning). Spikes: steps flagged by the spike "
         "detector (loss or grad norm above mean + k·std of the rolling window).")


def _html(runs, header, rows, sections, warnings) -> str:
    cells = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Run comparison</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}</style></head><body>",
             "<h1>Run comparison</h1><p>" + ", ".join(f"<code>{r.name}</code> ({r.variant})" for r in runs) + "</p>",
             f"<h2>Summary</h2><table><tr>{cells}</tr>{body}</table>"]
    parts += [f"<p><b>Warning, few points:</b> {html.escape(w).replace('`', '')}</p>" for w in warnings]
    parts.append(f"<p>{html.escape(_NOTE)}</p>")
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
    warning = stderr_warning(runs)
    if warning:
        print(warning, file=sys.stderr)
    print(f"wrote {report} and {report.with_suffix('.html')} ({len(list(args.out.glob('*.png')))} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
