"""analysis.ab: runs that differ in one config key, compared per attention arm across seeds (synthetic runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import ab

CONFIG = """seed: {seed}
run_name: {name}
model:
  name: 65m
  attention:
    name: {attention}
    variant: {attention}
trainer:
  max_steps: 100
  fp8: '{fp8}'  # quoted, as the trainer's config.yaml writes it (a bare off is YAML's false)
data:
  seq_len: 64
"""


def fake_run(root: Path, attention: str, fp8: str, seed: int, *, val: float, lam: float = 0.7) -> Path:
    run_dir = root / f"{attention}-{fp8}-s{seed}"
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "train/loss": val + 0.5 * (1 - s / 100), "grad/norm": 1.0,
             "attn/context_rms_mean/L00": 0.3, "attn/context_rms_mean/L01": 0.5,
             **({"attn/lambda_sigmoid_mean/L00": lam, "attn/lambda_sigmoid_mean/L01": lam + 0.1,
                 "attn/lambda_sigmoid_p05/L00": lam - 0.2, "attn/lambda_sigmoid_p95/L00": lam + 0.2}
                if attention == "diffv2" else {})} for s in range(10, 101, 10)]
    rows.append({"step": 100, "train/val_loss": val})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text(CONFIG.format(seed=seed, name=run_dir.name, attention=attention, fp8=fp8))
    return run_dir


def test_config_value_follows_the_nesting():
    text = CONFIG.format(seed=3, name="x", attention="diffv2", fp8="tensorwise")
    assert ab.config_value(text, "trainer.fp8") == "tensorwise"
    assert ab.config_value(text, "model.attention.name") == "diffv2"
    assert ab.config_value(text, "model.name") == "65m"  # not model.attention.name, which comes later
    assert ab.config_value(text, "seed") == "3"
    assert ab.config_value(text, "trainer.name") is None  # a key of another section is not found
    assert ab.config_value(text, "optim.lr") is None


def test_report_tells_noise_from_a_real_difference(tmp_path, capsys):
    runs = []
    for seed, noise in enumerate((-0.01, 0.0, 0.012)):
        runs.append(fake_run(tmp_path, "baseline", "off", seed, val=3.00 + noise))
        runs.append(fake_run(tmp_path, "baseline", "tensorwise", seed, val=3.40 - noise))  # clearly worse
        runs.append(fake_run(tmp_path, "diffv2", "off", seed, val=2.90 + noise))
        runs.append(fake_run(tmp_path, "diffv2", "tensorwise", seed, val=2.90 - noise / 2, lam=0.6))
    rc = ab.main([*map(str, runs), "--key", "trainer.fp8", "--out", str(tmp_path / "report")])
    assert rc == 0
    saved = json.loads((tmp_path / "report" / "ab.json").read_text())
    verdicts = {(row[0], row[2]): row[6] for row in saved["verdicts"]}
    assert verdicts[("baseline", "final val loss")] == "worse"
    assert verdicts[("diffv2", "final val loss")] == "within seed noise"
    assert verdicts[("diffv2", "σ(λ) mean")] == "lower"  # 0.65 against 0.75 in every seed
    assert ("baseline", "σ(λ) mean") not in verdicts  # no lambda to compare
    assert all(row[1] == "tensorwise − off" for row in saved["verdicts"])  # `off` is the reference
    by_name = {r["name"]: r for r in saved["runs"]}
    assert by_name["diffv2-tensorwise-s0"]["lambda_mean"] == pytest.approx(0.65)  # mean over the layers
    assert by_name["diffv2-off-s1"]["ctx_rms_mean"] == pytest.approx(0.4)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| diffv2 | tensorwise | 3 | 2.8997 ± 0.0055 |" in md and "| baseline | off | 3 | 3.0007 ± 0.0110 |" in md
    assert "within seed noise" in capsys.readouterr().out


def test_bad_input_gets_one_error_line(tmp_path, capsys):
    run = fake_run(tmp_path, "diffv2", "off", 0, val=3.0)
    assert ab.main([str(run), "--key", "trainer.fp9", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "trainer.fp9" in err[0]
    assert ab.main([str(tmp_path / "nothing"), "--key", "trainer.fp8", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics.jsonl" in err[0]
    assert not (tmp_path / "r").exists()  # nothing written for refused input
