"""Monitors through the real entry point: grouped keys in metrics.jsonl, spikes.jsonl, resume, the offline report."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from analysis import compare
from cli_runs import metrics, run_watched, train  # the same SMALL model and entry point as the trainer tests

# Intervals small enough that every monitor fires within 12 steps; spike warm-up shorter than the run.
MON = ["trainer.max_steps=12", "trainer.log_interval=2", "trainer.eval_interval=6", "trainer.ckpt_interval=6",
       "trainer.keep_last=3", "monitoring.grad_norms.interval=2", "monitoring.activations.interval=3",
       "monitoring.context_rms.interval=3", "monitoring.context_rms.heatmap_interval=6", "monitoring.lambdas.interval=3",
       "monitoring.lambdas.heatmap_interval=6", "monitoring.attention_logits.interval=4",
       "monitoring.attention_sinks.interval=4", "monitoring.spikes.interval=4", "monitoring.spikes.warmup_steps=4",
       "monitoring.perf.interval=4"]
GROUPS = ("train/", "grad/", "act/", "attn/", "spike/", "perf/")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("monitored")
    for variant in ("diffv2", "baseline"):
        train(root / variant, data_cache, f"attention={variant}", *MON, check=True)
    return root


def keys(run_dir) -> set[str]:
    return {k for row in metrics(run_dir) for k in row}


def test_monitored_run_logs_every_group_and_the_event_log(runs):
    found = keys(runs / "diffv2")
    assert all(any(k.startswith(g) for k in found) for g in GROUPS), sorted(found)
    for key in ("grad/norm_kind/lambda", "grad/update_ratio_layer/L01", "act/kurtosis/L00", "attn/logit_max_abs/L01",
                "attn/context_rms_a2_mean/L00", "attn/context_rms_floor/L01", "attn/lambda_sigmoid_p95/L01",
                "attn/sink_mass_a1/L00", "spike/score", "perf/tokens_per_s"):
        assert key in found, key
    heatmap = next(r["attn/context_rms_heads"] for r in metrics(runs / "diffv2") if "attn/context_rms_heads" in r)
    assert len(heatmap) == 2 and all(len(row) == 2 for row in heatmap)  # layers x output heads
    assert (runs / "diffv2" / "spikes.jsonl").is_file()
    assert not any(k.startswith("attn/lambda") for k in keys(runs / "baseline"))


def test_monitor_state_is_checkpointed_and_resumed(runs, tmp_path, data_cache):
    state = torch.load(runs / "diffv2/checkpoints/step_00000012/trainer.pt", weights_only=True)
    assert {"spikes", "grad_norms", "perf"} <= set(state["monitors"])
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs / "diffv2", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    train(run_dir, data_cache, "attention=diffv2", *MON, check=True)
    spike_keys = ("spike/loss_z", "spike/grad_norm_z", "spike/score", "spike/count")
    want = {r["step"]: [r[k] for k in spike_keys] for r in metrics(runs / "diffv2") if "spike/score" in r}
    got = {r["step"]: [r[k] for k in spike_keys] for r in metrics(run_dir) if "spike/score" in r}
    assert got == want  # the detector continued from its checkpointed window, bit for bit


def test_monitoring_off_logs_only_the_loop_and_throughput_metrics(tmp_path, data_cache):
    run_dir = tmp_path / "off"
    train(run_dir, data_cache, "monitoring.enabled=false", "trainer.max_steps=4", "trainer.log_interval=2", check=True)
    assert {k for k in keys(run_dir) if k.startswith("grad/")} == {"grad/norm"}
    assert {k.split("/")[0] for k in keys(run_dir) if "/" in k} == {"train", "grad", "perf"}
    assert not (run_dir / "spikes.jsonl").exists()


def test_an_observed_step_observes_its_first_micro_batches_only(tmp_path, data_cache):
    """monitoring.observed_micro_batches=1 (the default): the statistics of step 1 are those of its first micro-batch,
    i.e. of a run whose whole step is that micro-batch (same weights, same samples); 0 observes all of them."""
    once = ["trainer.max_steps=1", "monitoring.activations.interval=1", "monitoring.context_rms.interval=1",
            "monitoring.lambdas.interval=1"]
    runs = {"first_of_two": ["trainer.global_batch_size=8"], "all_of_two": ["trainer.global_batch_size=8",
            "monitoring.observed_micro_batches=0"], "one": ["trainer.global_batch_size=4"]}
    got = {}
    for name, overrides in runs.items():
        train(tmp_path / name, data_cache, "trainer.micro_batch_size=4", *once, *overrides, check=True)
        got[name] = {k: v for r in metrics(tmp_path / name) for k, v in r.items()
                     if k.startswith(("act/", "attn/context_rms_", "attn/lambda_sigmoid_"))}
    assert "act/max_abs/L01" in got["one"] and "attn/context_rms_a1_mean/L00" in got["one"]
    assert got["first_of_two"] == got["one"]
    differ = [k for k in got["one"] if got["all_of_two"][k] != got["one"][k]]
    assert "act/kurtosis/L00" in differ and "attn/context_rms_mean/L01" in differ


def test_compare_writes_a_report_for_two_runs(runs, tmp_path):
    assert compare.main([str(runs / "diffv2"), str(runs / "baseline"), "--out", str(tmp_path / "report")]) == 0
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.md", "report.html", "loss.png", "grad_norm.png", "spikes.png", "act_max_abs.png",
            "attn_logit_max.png", "context_rms_heads.png", "context_rms_layers.png", "lambda.png", "sinks.png",
            "throughput.png"} <= written
    assert "moe.png" not in written  # no MoE layers: no empty panel
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| diffv2 | diffv2 | 12 |" in report and "| baseline | baseline | 12 |" in report


def test_compare_rejects_a_directory_without_metrics(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_wandb_report_fails_with_one_clear_line_when_it_cannot_work():
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = run_watched([sys.executable, "-m", "analysis.wandb_report", "--project", "p"], env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error:")
    assert "wandb-workspaces" in last or "WANDB_MODE=offline" in last
