"""Where metrics go: `metrics.jsonl` in the run directory (always) and W&B (online, offline or disabled).

Values are floats, nested lists (layer x head matrices) or `Table`s (rows to append). In metrics.jsonl a
matrix stays a nested list and a Table becomes a list of {column: value} dicts; in W&B a matrix becomes a
heatmap image and a Table an incrementally logged `wandb.Table`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from diffv2.config import WandbConfig
from monitoring.callback import Table

log = logging.getLogger(__name__)

# Summaries W&B shows in the runs table; the key prefixes (train/ grad/ act/ attn/ moe/ spike/ perf/) give the
# workspace one panel section per group.
SUMMARIES = {"train/loss": "min", "train/val_loss": "min", "grad/norm": "max", "act/max_abs/*": "max",
             "attn/logit_max_abs/*": "max", "spike/count": "last", "spike/score": "max", "perf/tokens_per_s": "mean"}


def resolve_wandb_mode(mode: str) -> str:
    """`auto` means online when an API key is configured, otherwise offline (announced once)."""
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # wandb itself rejects an empty mode
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
    def __init__(self, run_dir: Path, cfg: WandbConfig, config_dict: dict, run_id: Optional[str], tags: list[str],
                 enabled: bool = True):
        """`enabled=False` (every rank but 0 of a distributed run) writes nothing anywhere."""
        self.path = run_dir / "metrics.jsonl"
        self.run = None
        self.enabled = enabled
        mode = resolve_wandb_mode(cfg.mode)
        if mode != "disabled" and enabled:
            import wandb

            os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, dir=str(run_dir),
                id=run_id, resume="allow", mode=mode, config=config_dict, tags=sorted(set(tags + list(cfg.tags))),
                settings=wandb.Settings(quiet=True),  # our console line already summarises the run
            )
            for key, summary in SUMMARIES.items():
                self.run.define_metric(key, summary=summary)
        self._tables: dict = {}

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.run is not None:
            self.run.log({k: self._wandb_value(k, v) for k, v in metrics.items()}, step=step)

    def _wandb_value(self, key: str, value):
        import wandb

        if isinstance(value, Table):
            if key not in self._tables:
                self._tables[key] = wandb.Table(columns=value.columns, log_mode="INCREMENTAL")
            for row in value.rows:
                self._tables[key].add_data(*[json.dumps(v) if isinstance(v, list) else v for v in row])
            return self._tables[key]
        if isinstance(value, list) and value and isinstance(value[0], list):
            from monitoring.plots import heatmap_image

            return wandb.Image(heatmap_image(value, key))
        return value

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so metrics.jsonl has one line per step."""
        if self.enabled:
            rewind_jsonl(self.path, step)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)


def rewind_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a {"step": ...} JSONL log up to `step`, and drop a last line cut short by a killed write."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            log.warning("%s: dropped an unreadable line (a write cut short by a crash?): %.80s", path, line)
    path.write_text("".join(ln + "\n" for ln in keep))


def _jsonable(value):
    if isinstance(value, Table):
        return [dict(zip(value.columns, [_jsonable(v) for v in row])) for row in value.rows]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
