"""What both launchers share: one-line CLI errors, positive integers, and checking overrides before launching."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Parser(argparse.ArgumentParser):
    """argparse prints its usage over several lines before the error; the project's CLIs print one line."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m {self.prog} --help)\n")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def non_negative_int(text: str) -> int:
    """A non-negative integer (0 allowed, e.g. --gpus-per-node 0 for a CPU job)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def check_overrides(overrides: list[str]) -> None:
    """A typo found now costs nothing; found on the cluster, it costs a wait in the queue."""
    for o in overrides:
        if o.startswith("-"):
            raise ValueError(f"{o!r} is a flag, not a key=value override; put launcher options before `--`")
    if not (REPO / "train.py").is_file():
        raise ValueError(f"train.py not found in {REPO}; run the launcher from a checkout of the repository")
    sys.path.insert(0, str(REPO))
    try:
        from train import compose_error
    finally:
        sys.path.remove(str(REPO))
    if problem := compose_error(overrides):
        raise ValueError(problem)


def check_config(overrides: list[str], world_size: int):
    """train.py's own start-up validation, now: the composed config checked by `diffv2.train.validate.validate` for
    `world_size` processes (global batch vs micro-batch x data-parallel ranks, tensor/expert parallel sizes, head
    layout, ...). Returns the typed config; raises ValueError with train.py's one-line message."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from diffv2.config import register_configs
    from diffv2.train.validate import validate
    from monitoring.build import schema

    register_configs(monitoring=schema())
    try:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as e:  # check_overrides has reported the usual ones already
        raise ValueError(str(e).strip().splitlines()[0]) from None
    validate(cfg, world_size=world_size)
    return cfg


def run_dir_of(overrides: list[str]) -> Path:
    """The run directory train.py will use for these overrides (hydra.run.dir, default runs/<run_name>), absolute."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    path = Path(str(cfg.hydra.run.dir)).expanduser()
    return path if path.is_absolute() else REPO / path
