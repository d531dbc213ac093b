"""Where metrics go: `metrics.jsonl` in the run directory (always) and W&B (online, offline or disabled).

Values are floats, nested lists (layer x head matrices) or `Table`s (rows to append). In metrics.jsonl a
matrix stays a nested list and a Table becomes a list of {column: value} dicts; in W&B a matrix becomes an
image drawn by the injected `render_matrix` (train.py plugs in monitoring/plots.py's heatmap) and a Table an
incrementally logged `wandb.Table`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from diffv2.train.callbacks import Table
from diffv2.config import WandbConfig

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
    has_key = has_wandb_key()
    if not has_key:
        log.info("W&B: no API key configured, logging offline")
    return "online" if has_key else "offline"


WANDB_ID_FILE = "wandb_run_id"  # in the run directory: one W&B run per run directory, across every restart
# W&B refuses these in project and entity names (and they would break its URLs)
WANDB_NAME_FORBIDDEN = set("/\\#?%:")


def wandb_problem(cfg: WandbConfig) -> Optional[str]:
    """Why W&B would fail to start with this config and environment (one line with the fix), else None. Checked
    before the run directory is written."""
    for key in ("project", "entity"):
        value = getattr(cfg, key)
        if value is None:
            continue
        bad = sorted(set(value) & WANDB_NAME_FORBIDDEN)
        if bad or not value.strip() or len(value) > 128:
            why = f"contains {' '.join(repr(c) for c in bad)}" if bad else "must be 1-128 characters"
            return (f"logging.wandb.{key}={value!r} {why}, which W&B does not allow in a {key} name; use letters, "
                    f"digits, '-', '_' and '.'")
    mode = os.environ.get("WANDB_MODE") or cfg.mode
    if mode == "online" and not has_wandb_key():
        return ("W&B mode is online but no API key is configured; run `wandb login`, set WANDB_API_KEY, or log "
                "offline with logging.wandb.mode=offline (WANDB_MODE=offline)")
    return None


def has_wandb_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


class MetricSink:
    def __init__(self, run_dir: Path, cfg: WandbConfig, config_dict: dict, run_id: Optional[str], tags: list[str],
                 enabled: bool = True, render_matrix: Optional[Callable[[list, str], Any]] = None):
        """`enabled=False` (every rank but 0 of a distributed run) writes nothing anywhere. `run_id`: the W&B run to
        continue (from the checkpoint); else the one this run directory started, else a new one. `render_matrix`
        (value, key) -> image: how W&B shows a nested-list metric (monitoring/plots.py's heatmap, plugged in by
        train.py); without it the nested list goes to W&B as it is. metrics.jsonl is the same either way."""
        self.path = run_dir / "metrics.jsonl"
        self.render_matrix = render_matrix
        self.run = None
        self.enabled = enabled
        mode = resolve_wandb_mode(cfg.mode)
        if mode != "disabled" and enabled:
            import wandb

            id_file = run_dir / WANDB_ID_FILE
            run_id = run_id or (id_file.read_text().strip() if id_file.is_file() else None)
            os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, dir=str(run_dir),
                id=run_id, resume="allow", mode=mode, config=config_dict, tags=sorted(set(tags + list(cfg.tags))),
                settings=wandb.Settings(quiet=True),  # our console line already summarises the run
            )
            if not id_file.is_file():
                id_file.write_text(self.run.id + "\n")
            if mode == "offline":
                log.info("W&B offline run %s: upload it later with `wandb sync %s`", self.run.id, run_dir / "wandb")
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
            try:
                self.run.log({k: self._wandb_value(k, v) for k, v in metrics.items()}, step=step)
            except Exception as e:  # noqa: BLE001 - W&B failing must not stop training; metrics.jsonl has it all
                self._lost(e)

    def _wandb_value(self, key: str, value):
        import wandb

        if isinstance(value, Table):
            if key not in self._tables:
                self._tables[key] = wandb.Table(columns=value.columns, log_mode="INCREMENTAL")
            for row in value.rows:
                self._tables[key].add_data(*[json.dumps(v) if isinstance(v, list) else v for v in row])
            return self._tables[key]
        if isinstance(value, list) and value and isinstance(value[0], list) and self.render_matrix is not None:
            return wandb.Image(self.render_matrix(value, key))
        return value

    def truncate_after(self, step: int) -> None:
        """On resume, move lines logged after the checkpoint aside so metrics.jsonl has one line per step."""
        if self.enabled:
            rewind_jsonl(self.path, step)

    def _lost(self, err: Exception) -> None:
        """The W&B service is gone (SLURM signals it with the job step) or failing: warn once, log on without it."""
        log.warning("W&B stopped accepting metrics (%s: %s); metrics.jsonl keeps every step (the local W&B run "
                    "files may lack the last ones)", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        self.run = None
        import wandb

        try:  # drop W&B's own exit hook now: it would print a traceback talking to the dead service at exit
            wandb.teardown()
        except (Exception, SystemExit):  # noqa: BLE001 - the service is gone; nothing left to tear down cleanly
            pass

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001 - a dead W&B service must not turn a clean stop into a crash
                self._lost(e)


def rewind_jsonl(path: Path, step: int) -> Optional[Path]:
    """Keep the lines of a {"step": ...} JSONL log up to `step`; lines after it (steps a resumed run redoes) and a
    line cut short by a killed write are appended to NAME.rewound.jsonl beside it, never dropped. Returns that
    file if anything moved."""
    if not path.exists():
        return None
    keep, moved = [], []
    for line in path.read_text().splitlines():
        try:
            (keep if json.loads(line)["step"] <= step else moved).append(line)
        except (ValueError, KeyError, TypeError):
            log.warning("%s: an unreadable line (a write cut short by a crash?) moved aside: %.80s", path, line)
            moved.append(line)
    if not moved:
        return None
    aside = path.with_name(path.stem + ".rewound.jsonl")
    with open(aside, "a") as f:  # first, so a crash between the two writes duplicates lines instead of losing them
        f.write("".join(ln + "\n" for ln in moved))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
    log.warning("%s: %d line(s) logged after step %d, the step this run resumes from, moved to %s", path.name,
                len(moved), step, aside.name)
    return aside


def final_numbers(path: Path) -> dict:
    """The last train/loss and train/val_loss a metrics.jsonl holds (those present)."""
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            found.update({k: row[k] for k in ("train/loss", "train/val_loss") if k in row})
    return found


def _jsonable(value):
    if isinstance(value, Table):
        return [dict(zip(value.columns, [_jsonable(v) for v in row])) for row in value.rows]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
