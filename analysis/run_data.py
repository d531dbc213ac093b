"""A run's metrics.jsonl as series, per-layer families and matrices (for the offline comparison report)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

_LAYER_KEY = re.compile(r"^(?P<family>.+)/L(?P<layer>\d+)$")


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan" / "inf" as written by the sink
        except ValueError:
            return None
    return None


@dataclass(eq=False)
class RunData:
    name: str
    path: Path
    variant: str
    rows: list[dict] = field(default_factory=list)

    @cached_property
    def keys(self) -> set[str]:
        return {k for row in self.rows for k in row}

    @property
    def last_step(self) -> int:
        return max((row["step"] for row in self.rows), default=0)

    def has(self, key: str) -> bool:
        return any(key in row for row in self.rows)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar key, in logging order."""
        points = [(row["step"], _number(row[key])) for row in self.rows if key in row]
        points = [(s, v) for s, v in points if v is not None]
        if not points:
            return np.array([]), np.array([])
        steps, values = zip(*points)
        return np.array(steps, dtype=float), np.array(values, dtype=float)

    def last_scalar(self, key: str) -> Optional[float]:
        _, values = self.series(key)
        return float(values[-1]) if len(values) else None

    def layer_keys(self, family: str) -> dict[int, str]:
        """{layer: key} for keys `family/L..`."""
        out = {}
        for key in self.keys:
            m = _LAYER_KEY.match(key)
            if m and m.group("family") == family:
                out[int(m.group("layer"))] = key
        return dict(sorted(out.items()))

    def last_per_layer(self, family: str) -> tuple[np.ndarray, np.ndarray]:
        """(layers, last logged value) of a per-layer family."""
        layers = self.layer_keys(family)
        values = [self.last_scalar(k) for k in layers.values()]
        return np.array(list(layers), dtype=float), np.array([np.nan if v is None else v for v in values])

    def max_over_layers(self, family: str) -> Optional[float]:
        values = [v for k in self.layer_keys(family).values() for v in self.series(k)[1]]
        return float(np.nanmax(values)) if values else None

    def last_matrix(self, key: str) -> Optional[tuple[int, np.ndarray]]:
        for row in reversed(self.rows):
            if isinstance(row.get(key), list) and row[key]:
                matrix = [[np.nan if _number(v) is None else _number(v) for v in r] for r in row[key]]
                return row["step"], np.array(matrix, dtype=float)
        return None

    def events(self) -> list[dict]:
        """Spike events logged as `spike/events` rows."""
        return [e for row in self.rows for e in row.get("spike/events", []) if isinstance(e, dict)]


def _variant(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.is_file():
        m = re.search(r"^\s+variant:\s*(\S+)", config.read_text(), flags=re.M)
        if m:
            return m.group(1)
    return "?"


def load_runs(run_dirs: list[Path]) -> list[RunData]:
    runs = []
    for run_dir in run_dirs:
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(f"{run_dir} has no metrics.jsonl; pass run directories written by train.py")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs.append(RunData(run_dir.name, run_dir, _variant(run_dir), rows))
    names = [r.name for r in runs]
    for run in runs:  # two runs with the same directory name get their parent as a prefix
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.name}"
    return runs
