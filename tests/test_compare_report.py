"""`python -m analysis.compare` on runs with few logged points (synthetic metrics.jsonl: no training, fast).

A 4-step run logging every 2 steps is the case: the final train loss was averaged over 2 values without a word, the
λ-over-training panel drew its one reading as an invisible line, and step axes were ticked 2.25, 2.5, ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis import compare, compare_figures
from analysis.run_data import load_runs

STEP_FIGURES = {"loss", "grad_norm", "spikes", "act_max_abs", "attn_logit_max", "lambda", "moe", "throughput"}


def write_run(path: Path, variant: str, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"model:\n  variant: {variant}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def short_rows(losses=(4.54, 3.26), lambda_family: str = "attn/lambda_sigmoid") -> list[dict]:
    """What train.py logs in 4 steps with log_interval=2, eval_interval=2: the training scalars at steps 2 and 4,
    validation rows of their own, and every interval-4 monitor once, at step 4 (two layers, two experts)."""
    rows = []
    for step, loss in zip((2, 4), losses):
        rows.append({"step": step, "train/loss": loss, "grad/norm": 8.0 / step, "perf/tokens_per_s": 900.0 + step})
        rows.append({"step": step, "train/val_loss": loss - 0.3})
    once = {"spike/count": 0, "spike/loss_count": 0, "spike/grad_norm_count": 0, "spike/score": 0.0}
    for layer in ("L00", "L01"):
        once |= {f"act/max_abs/{layer}": 0.2, f"attn/logit_max_abs/{layer}": 0.6, f"moe/imbalance/{layer}": 1.3,
                 f"moe/dead_experts/{layer}": 0.0}
        if lambda_family == "attn/lambda_v1":
            once[f"attn/lambda_v1/{layer}"] = 0.8
        else:
            once |= {f"{lambda_family}_{q}/{layer}": v for q, v in (("p05", 0.4), ("p50", 0.5), ("p95", 0.6),
                                                                     ("mean", 0.51))}
    rows[-2] |= once
    return rows


def long_rows(n: int) -> list[dict]:
    return [{"step": 10 * (i + 1), "train/loss": 5.0 - 0.01 * i + 0.02 * (-1) ** i} for i in range(n)]


@pytest.fixture
def drawn(monkeypatch):
    """The report's matplotlib figures by name, kept for inspection when the report saves them."""
    figures = {}
    save = compare_figures._save

    def keep(fig, out, name):
        figures[name] = fig
        return save(fig, out, name)

    monkeypatch.setattr(compare_figures, "_save", keep)
    return figures


@pytest.fixture
def short_report(tmp_path, drawn):
    """Two 4-step runs (DIFF V2 and DIFF V1, so both λ curves are drawn) through the report; their figures."""
    runs = [write_run(tmp_path / "cmpA", "diffv2", short_rows()),
            write_run(tmp_path / "cmpV1", "diffv1", short_rows((4.6, 3.4), "attn/lambda_v1"))]
    compare.write_report(load_runs(runs), tmp_path / "report")
    assert STEP_FIGURES <= set(drawn), sorted(drawn)
    return drawn


def step_axes(figures: dict) -> list:
    return [(name, ax) for name, fig in figures.items() for ax in fig.axes if ax.get_xlabel() == "step"]


def test_final_loss_on_few_points_warns_in_the_report_and_on_stderr_with_the_count(tmp_path, capsys):
    short = write_run(tmp_path / "cmpA", "diffv2", short_rows())
    many = long_rows(40)
    tail = np.array([r["train/loss"] for r in many[-4:]])  # 40 logged values: their last 10%, no warning
    long = write_run(tmp_path / "longrun", "baseline", many)
    out = tmp_path / "report"
    assert compare.main([str(short), str(long), "--out", str(out)]) == 0

    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: final train loss"), err
    assert "cmpA averages 2 (last value 3.2600 at step 4)" in err[0] and "fewer than 30" in err[0]
    assert "longrun" not in err[0]

    md = (out / "report.md").read_text()
    assert "| cmpA | diffv2 | 4 | 3.9000 ± 0.9051 ⚠ n=2 |" in md  # mean ± std of 4.54 and 3.26: flagged
    assert f"| longrun | baseline | 400 | {tail.mean():.4f} ± {tail.std(ddof=1):.4f} |" in md
    warnings = [line for line in md.splitlines() if line.startswith("> **Warning, few points:**")]
    assert len(warnings) == 1 and "`cmpA`" in warnings[0]
    assert "mean of only 2 logged values (steps 2-4)" in warnings[0]
    assert "fewer than 30" in warnings[0] and "last logged value, 3.2600 at step 4" in warnings[0]
    html = (out / "report.html").read_text()
    assert "Warning, few points" in html and "mean of only 2 logged values" in html


@pytest.mark.parametrize("logged, cell_suffix", [(1, " ⚠ n=1"), (3, " ⚠ n=3"), (29, " ⚠ n=3"), (30, ""), (45, "")])
def test_the_few_points_threshold_is_a_last_10_percent_shorter_than_3_values(tmp_path, logged, cell_suffix):
    """The window is the last 10% of the logged values, at least 3: flagged exactly when 10% is fewer than 3."""
    rows = long_rows(logged)
    run = load_runs([write_run(tmp_path / "r", "diffv2", rows)])[0]
    cell = compare.summary_rows([run])[1][0][3]
    window = np.array([r["train/loss"] for r in rows[-max(3, logged // 10):]])
    noise = f" ± {window.std(ddof=1):.4f}" if len(window) > 1 else ""
    assert cell == f"{window.mean():.4f}{noise}{cell_suffix}"


def test_single_readings_and_short_series_are_drawn_with_markers(short_report):
    lam = next(ax for name, ax in step_axes(short_report) if name == "lambda")
    curves = {line.get_label(): line for line in lam.get_lines()}
    sigma = curves["cmpA (diffv2): σ(λ) mean"]  # the panel the issue found blank
    assert len(sigma.get_xdata()) == 1 and sigma.get_marker() not in (None, "", " ", "None", "none")
    unmarked = [(name, line.get_label(), len(line.get_xdata())) for name, ax in step_axes(short_report)
                for line in ax.get_lines()
                if line.get_marker() in (None, "", " ", "None", "none") or line.get_markersize() <= 0]
    assert not unmarked  # every series here has 1 or 2 readings: all of them marked


def test_every_step_axis_has_integer_ticks(short_report):
    axes = step_axes(short_report)
    assert {name for name, _ in axes} == STEP_FIGURES
    for name, ax in axes:
        ax.figure.canvas.draw()
        lo, hi = sorted(ax.get_xlim())
        ticks = [(t, label.get_text()) for t, label in zip(ax.get_xticks(), ax.get_xticklabels()) if lo <= t <= hi]
        assert ticks, (name, ax.get_title())
        assert all(t == round(t) and label.isdigit() for t, label in ticks), \
            (name, ax.get_title(), ticks)
    val = next(ax for name, ax in axes if ax.get_title() == "validation loss")
    lo, hi = sorted(val.get_xlim())
    assert [t for t in val.get_xticks() if lo <= t <= hi] == [2, 3, 4]  # readings at steps 2 and 4
