"""A monitor is one file: monitoring/build.py finds every module that declares a `SPEC` (monitoring/spec.py), adds its
config class to the `monitoring` schema and builds it in hook order; the core's schema names no monitor.

The new-monitor test writes a made-up package (a monitor and a helper module) into a temporary directory and checks
that, with no other file touched, its keys compose through Hydra, are overridable and validated at start-up, and
that it is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffv2.config import Config, MonitoringConfig, register_configs
from diffv2.train.callbacks import Callback
from diffv2.train.validate import validate
from monitoring import build

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")

FOO = '''
from dataclasses import dataclass

from diffv2.train.callbacks import Callback
from diffv2.train.validate import positive
from monitoring.spec import MonitorConfig, MonitorSpec


@dataclass
class FooConfig(MonitorConfig):
    """monitoring.foo: a made-up monitor."""

    interval: int = 7
    depth: int = 3

    def validate(self, key: str) -> None:
        super().validate(key)
        positive(f"{key}.depth", self.depth)


class FooMonitor(Callback):
    name = "foo"

    def __init__(self, interval: int, depth: int, log_interval: int):
        self.interval, self.depth, self.log_interval = interval, depth, log_interval


SPEC = MonitorSpec("foo", FooConfig, order=50, build=lambda c, env: FooMonitor(c.interval, c.depth, env.log_interval))
'''
HELPER = 'raise RuntimeError("a helper module without SPEC must not be imported by discovery")\n'


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    pkg = tmp_path / "plugmon"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "foo.py").write_text(textwrap.dedent(FOO))
    (pkg / "helper.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("plugmon")
    for name in [m for m in sys.modules if m == "plugmon" or m.startswith("plugmon.")]:
        del sys.modules[name]
    register_configs(monitoring=build.schema())  # the real schema back for the tests after this one


def _compose(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def test_a_new_monitor_is_one_file(plugin_package):
    found = build.discover(plugin_package)
    assert [s.name for s in found] == ["foo"]  # helper.py was not imported (it raises on import)
    register_configs(monitoring=build.schema(found))

    cfg = _compose(["monitoring.foo.depth=5", "monitoring.foo.interval=2"])
    assert (cfg.monitoring.foo.depth, cfg.monitoring.foo.interval, cfg.monitoring.foo.enabled) == (5, 2, True)
    assert _compose([]).monitoring.foo.depth == 3  # the config class's defaults, no YAML written
    validate(cfg)
    with pytest.raises(ValueError, match=r"^monitoring\.foo\.depth=0 must be > 0$"):
        validate(_compose(["monitoring.foo.depth=0"]))
    with pytest.raises(ValueError, match=r"^monitoring\.foo\.interval=0 must be > 0$"):
        validate(_compose(["monitoring.foo.interval=0"]))
    with pytest.raises((HydraException, OmegaConfBaseException), match="depht"):
        _compose(["monitoring.foo.depht=1"])

    [monitor] = build.build_monitors(cfg.monitoring, log_interval=4, found=found)
    assert (type(monitor).__name__, monitor.interval, monitor.depth, monitor.log_interval) == ("FooMonitor", 2, 5, 4)
    assert build.build_monitors(_compose(["monitoring.foo.enabled=false"]).monitoring, found=found) == []
    assert build.build_monitors(_compose(["monitoring.enabled=false"]).monitoring, found=found) == []


def test_the_core_schema_names_no_monitor():
    """diffv2/config.py holds only what every monitor shares; each monitor's keys live in its own module."""
    assert {f.name for f in dataclasses.fields(MonitoringConfig)} == {"enabled", "probe_sequences",
                                                                       "observed_micro_batches"}
    specs = build.specs()
    assert [s.name for s in specs] == ["spikes", "grad_norms", "activations", "context_rms", "lambdas",
                                       "attention_logits", "attention_sinks", "moe", "perf"]  # hook order
    full = build.schema()()
    for spec in specs:
        module = sys.modules[spec.config.__module__]
        assert module.SPEC is spec, f"{spec.name}: its config class is not declared beside its SPEC"
        assert isinstance(spec.build(getattr(full, spec.name), build.BuildEnv()), Callback)


def test_parameter_norms_follow_the_engine():
    """ZeRO-3 empties parameters between steps: the trainer says so (params_readable) and the grad-norm monitor
    leaves parameter norms out; no monitor config is rewritten by the core."""
    cfg = build.schema()()
    grad = {m.name: m for m in build.build_monitors(cfg, params_readable=False)}["grad_norms"]
    assert grad.param_norms is False
    grad = {m.name: m for m in build.build_monitors(cfg, params_readable=True)}["grad_norms"]
    assert grad.param_norms is True


def test_a_composed_config_pickles():
    """Hydra's submitit launcher (hydra/launcher=slurm) pickles the composed config into each job: the generated
    schema classes must be found again by their qualified names, as a config of plain classes would be."""
    import pickle

    config = register_configs(monitoring=build.schema())
    assert register_configs(monitoring=build.schema()) is config  # one class per schema, however often registered
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        composed = compose("config", overrides=["monitoring.spikes.window=7"])
    back = OmegaConf.to_object(pickle.loads(pickle.dumps(composed)))
    assert type(back) is config and back.monitoring.spikes.window == 7
    assert pickle.loads(pickle.dumps(back)) == back
