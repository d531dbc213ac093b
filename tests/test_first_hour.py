"""What a new user meets first: run names that tell configs apart, one-line errors for unknown keys, odd run names
and a missing HOME, a warning for a warm-up longer than the run, one coherent console stream and train.log with
the run's lines. Config checks run in-process through train.py's own `compose_error` (what the CLI does first)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runs import ROOT, error_line, run_env, train, train_cmd

sys.path.insert(0, str(ROOT))
import train as entry  # noqa: E402  (train.py: compose_error, what the CLI checks before Hydra starts)


def composed_run_name(*overrides: str) -> str:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)["run_name"]


def test_default_run_names_carry_the_attention_preset():
    presets = sorted(p.stem for p in (ROOT / "configs" / "attention").glob("*.yaml"))
    names = {p: composed_run_name(f"attention={p}") for p in presets}
    assert len(set(names.values())) == len(presets), names  # no two presets share a run directory
    assert names["diffv2"] == "tiny-diffv2-s0" and names["baseline"] == "tiny-baseline-s0"
    assert names["diffv2_half_split"] == "tiny-diffv2_half_split-s0"


@pytest.mark.parametrize("overrides, expected", [
    (["+foo=1"], "unknown config key foo (from an override with '+'"),
    (["+trainer.foo=1"], "unknown config key trainer.foo"),
    (["run_name=../escape"], "run_name='../escape' must be 1-200 ASCII letters, digits and . _ + -"),
    (["run_name=a/b"], "run_name='a/b' must be"),
    (["run_name='ünï'"], "run_name='ünï' must be"),
    (["run_name=ünï"], "run_name=ünï: a value with non-ASCII characters must be quoted for Hydra"),
])
def test_config_mistakes_are_one_line(overrides, expected):
    problem = entry.compose_error(overrides)
    assert problem is not None and expected in problem and "\n" not in problem, problem


def test_good_overrides_pass_the_same_checks():
    for overrides in (["+experiment=gpu_1b"], ["run_name=my-run_2.b+c"], ["attention=diffv2_no_lambda"],
                      ["data.split='98,2,0'"], ["hydra/launcher=submitit_slurm"]):
        assert entry.compose_error(overrides) is None, overrides


def test_missing_home_names_the_fix(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    proc = train(run_dir, None, base=(), unset=("HOME", "DIFFV2_CACHE"))
    assert proc.returncode == 2
    assert error_line(proc) == ("error: data.cache_dir: the environment variable HOME is not set and data.cache_dir "
                                "defaults to a path under it; set HOME or DIFFV2_CACHE=DIR, or give data.cache_dir=DIR")
    assert not run_dir.exists()


def test_warm_up_longer_than_the_run_warns_and_trains(tmp_path, data_cache):
    proc = train(tmp_path / "warm", data_cache, "trainer.max_steps=2", "optim.warmup_steps=500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("optim.warmup_steps=500 is longer than trainer.max_steps=2: the learning rate never reaches optim.lr"
            in proc.stdout)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_console_is_one_stream_and_train_log_has_the_run(tmp_path, data_cache):
    """In a terminal, with the progress bar on: every log line and step line starts on a line of its own (the bar
    is cleared first, never glued to a line), and train.log holds the step and validation lines too."""
    run_dir = tmp_path / "tty"
    cmd = train_cmd(run_dir, data_cache, "trainer.max_steps=6", "trainer.log_interval=2", "trainer.eval_interval=3",
                    "logging.progress=true")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(extra={"COLUMNS": "120"}), stdin=follower,
                            stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait() == 0
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    wanted = [line for line in text.split("\n") if "| loss" in line or "][INFO]" in line or "validation loss" in line]
    assert len(wanted) >= 5
    for line in wanted:  # what stays visible after the last carriage return is the line itself
        visible = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.rstrip("\r").split("\r")[-1]).strip()  # "\r\n" ends
        assert visible.startswith(("step ", "[")), repr(line)
    log = (run_dir / "train.log").read_text()
    for needle in ("step      2 | loss", "step      3 | validation loss", "step      6 | loss", "done: train loss"):
        assert needle in log, needle
    # what start-up logged before the run directory could be written is in train.log too, first and in order
    assert log.index("attention backend:") < log.index("params total") < log.index("step      2 | loss")


def test_a_refused_trainer_keeps_no_start_up_log(tmp_path):
    """The start-up log waits for the run record; a trainer refused at start-up, or closed before its record, drops
    it (no handler left on the root logger of a process that goes on, e.g. a benchmark or a notebook)."""
    import logging

    from cli_runs import compose_cfg
    from diffv2.train.record import StartupLog
    from diffv2.train.trainer import Trainer

    before = list(logging.getLogger().handlers)
    trainer = Trainer(compose_cfg(), tmp_path / "ok", record_yaml="seed: 0\n")
    assert [h for h in logging.getLogger().handlers if isinstance(h, StartupLog)] == [trainer.startup_log]
    trainer.close()
    assert logging.getLogger().handlers == before
    with pytest.raises(ValueError, match="trainer.bf16_weights=true needs bf16 autocast"):
        Trainer(compose_cfg("trainer.bf16_weights=true", "trainer.precision=fp32"), tmp_path / "refused",
                record_yaml="seed: 0\n")
    assert logging.getLogger().handlers == before
    assert not (tmp_path / "refused").exists()


def test_help_lists_the_training_choices_only():
    proc = train(None, None, base=(), flags=["--help"])
    assert proc.returncode == 0
    groups = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in proc.stdout.splitlines()
              if line.startswith("  ") and ":" in line}
    assert set(groups) == {"attention", "data", "+experiment", "logging", "model", "monitoring", "optim", "parallel",
                           "trainer"}
    assert "schema" not in proc.stdout and "suite:" not in proc.stdout
    assert groups["attention"].split(",")[0].strip() == "diffv2" and "diffv2_half_split" in groups["attention"]
