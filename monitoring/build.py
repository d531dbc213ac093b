"""Config -> the list of monitors the trainer drives, in hook order; and the `monitoring` config schema.

Every module of monitoring/ that defines `SPEC` (a `MonitorSpec`, monitoring/spec.py) is a monitor: `specs()` finds
them, `schema()` adds one field per monitor (its config class, keyed by its name) to the core's MonitoringConfig
(the fields all monitors share), and `build_monitors` builds the enabled ones in their `order`: the spike monitor
first, so that a skipped step is undone before any other monitor reads parameters; the throughput monitor last, so
that its step time includes the work of the monitors before it. Adding a monitor is one new module here.
`instrumentation()` is what train.py (the composition root) hands the trainer: these monitors and the W&B heatmap
renderer (the core never imports monitoring/).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import re
from pathlib import Path
from typing import Optional

import monitoring
from diffv2.config import MonitoringConfig
from diffv2.train.callbacks import Callback, Instrumentation
from monitoring.spec import BuildEnv, MonitorSpec

DECLARES = re.compile(r"^SPEC\s*[:=]", re.M)  # a monitor module assigns SPEC at top level


@functools.lru_cache(maxsize=None)
def specs() -> tuple[MonitorSpec, ...]:
    """Every monitor of monitoring/, in hook order."""
    return discover(monitoring)


def discover(package) -> tuple[MonitorSpec, ...]:
    """The SPEC of every module of `package` that declares one, in hook order (`order`, then name). Sources are
    scanned for a top-level `SPEC =` first, so helper modules (plots.py imports matplotlib) are not imported."""
    found: dict[str, MonitorSpec] = {}
    for info in pkgutil.iter_modules(package.__path__):
        path = Path(package.__path__[0]) / f"{info.name}.py"
        if info.ispkg or not DECLARES.search(path.read_text(encoding="utf-8")):
            continue  # helpers (plots, ranks, ...) are not imported here: only modules that declare a monitor
        spec = importlib.import_module(f"{package.__name__}.{info.name}").SPEC
        if spec.name in found or any(spec.name == f.name for f in dataclasses.fields(MonitoringConfig)):
            raise ValueError(f"{path}: a monitor named {spec.name!r} exists already; give it "
                             f"another SPEC name")
        found[spec.name] = spec
    return tuple(sorted(found.values(), key=lambda s: (s.order, s.name)))


@functools.lru_cache(maxsize=None)
def schema(found: Optional[tuple[MonitorSpec, ...]] = None) -> type:
    """MonitoringConfig with one field per monitor (monitoring.<name>: its config class with its defaults), for
    diffv2.config.register_configs(monitoring=schema()); `found`: other specs than monitoring/'s (tests)."""
    fields = [(s.name, s.config, dataclasses.field(default_factory=s.config)) for s in found or specs()]
    # Named MonitoringConfig in messages; pickled (Hydra's submitit launcher ships composed configs) by the
    # qualified name below, which this module's __getattr__ resolves.
    return dataclasses.make_dataclass("MonitoringConfig", fields, bases=(MonitoringConfig,), namespace={
        "__module__": __name__, "__qualname__": "MonitoringSchema", "__doc__": MonitoringConfig.__doc__})


def __getattr__(name: str):
    """`monitoring.build.MonitoringSchema`: schema(), so that configs composed with it pickle and unpickle."""
    if name == "MonitoringSchema":
        return schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_monitors(cfg: MonitoringConfig, log_interval: int = 10, params_readable: bool = True,
                   found: Optional[tuple[MonitorSpec, ...]] = None) -> list[Callback]:
    """The enabled monitors of `cfg` (a `schema()` instance); `monitoring.enabled=false` leaves only those marked
    `always` (the throughput monitor, if enabled). `params_readable`: False when the engine empties parameters
    between steps (ZeRO-3), which turns parameter norms off. `found`: other specs than monitoring/'s (tests)."""
    env = BuildEnv(log_interval, params_readable)
    monitors = []
    for spec in found or specs():
        sub = getattr(cfg, spec.name, None)
        if sub is None:
            sub = spec.config()  # a MonitoringConfig without this field (built outside Hydra): the defaults
        if sub.enabled and (cfg.enabled or spec.always):
            monitors.append(spec.build(sub, env))
    return monitors


def instrumentation() -> Instrumentation:
    """The monitors of cfg.monitoring and the W&B heatmap renderer, for Trainer(instrumentation=...)."""
    return Instrumentation(build_monitors=build_monitors, render_matrix=_heatmap)


def _heatmap(rows, key):
    from monitoring.plots import heatmap_image  # matplotlib only once W&B receives a matrix (as today)

    return heatmap_image(rows, key)
