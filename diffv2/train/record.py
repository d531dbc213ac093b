"""The run directory is the experiment record: resolved config, code version, package versions."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

# The trainer's console lines (`step N | loss ...`): the progress bar's writer prints them; this logger puts them in
# train.log too, and nowhere else (no propagation to the console handlers).
PROGRESS = logging.getLogger("diffv2.progress")
PROGRESS.propagate = False
PROGRESS.setLevel(logging.INFO)

PACKAGES = ("torch", "numpy", "hydra-core", "omegaconf", "megatron-core", "wandb", "tokenizers", "deepspeed",
            "flash-attn", "flash-attn-4", "nvidia-cutlass-dsl")


def _git(*args: str, cwd: Path) -> str:
    try:
        out = subprocess.run(("git", *args), cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": found}
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count())
    return env


class StartupLog(logging.Handler):
    """Holds what is logged at start-up, before the run directory may be written (a refused run leaves none), so
    that train.log gets it too: the model's size, the FP8 split, the expert placement, warnings. Installed on the
    root logger by the trainer; `write_record` replays it into train.log and removes it, `remove` drops it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    @classmethod
    def install(cls) -> "StartupLog":
        handler = cls()
        logging.getLogger().addHandler(handler)
        return handler

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def remove(self) -> None:
        logging.getLogger().removeHandler(self)
        self.records = []


def write_record(run_dir: Path, resolved_yaml: str, startup: Optional[StartupLog] = None) -> None:
    """config.yaml, git.json (+ git.diff when the tree is dirty) and versions.json in the run directory; from now
    on the log also goes to train.log (appended across resumes), starting with what `startup` held."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _log_to_file(run_dir / "train.log")
    if startup is not None:
        for record in startup.records:
            handler.handle(record)
        startup.remove()
    (run_dir / "config.yaml").write_text(resolved_yaml)
    src = Path(__file__).resolve().parents[2]  # the repository root (diffv2/train/record.py)
    commit = _git("rev-parse", "HEAD", cwd=src).strip()
    diff = _git("diff", "HEAD", cwd=src)
    (run_dir / "git.json").write_text(json.dumps({"commit": commit or None, "dirty": bool(diff)}, indent=1))
    if diff:
        (run_dir / "git.diff").write_text(diff)
    (run_dir / "versions.json").write_text(json.dumps(versions(), indent=1))


def _log_to_file(path: Path) -> logging.FileHandler:
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve():
            return h
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    PROGRESS.handlers = [h for h in PROGRESS.handlers if not isinstance(h, logging.FileHandler)] + [handler]
    return handler
