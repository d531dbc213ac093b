"""Where metrics go: `metrics.jsonl` in the run directory (always) and W&B (online, offline or disabled)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from diffv2.config import WandbConfig

log = logging.getLogger(__name__)


def resolve_wandb_mode(mode: str) -> str:
    """`auto` means online when an API key is configured, otherwise offline (announced once)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        log.info("W&B: no API key configured, logging offline (sync later with `wandb sync RUN_DIR/wandb`)")
    return "online" if has_key else "offline"


class MetricSink:
    def __init__(self, run_dir: Path, cfg: WandbConfig, config_dict: dict, run_id: Optional[str], tags: list[str]):
        self.path = run_dir / "metrics.jsonl"
        self.run = None
        mode = resolve_wandb_mode(cfg.mode)
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, dir=str(run_dir),
                id=run_id, resume="allow", mode=mode, config=config_dict, tags=sorted(set(tags + list(cfg.tags))),
            )

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so metrics.jsonl has one line per step."""
        if not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in lines))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
