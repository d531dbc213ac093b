"""What a monitor module declares so that monitoring/build.py finds it: adding a monitor is one new file.

    @dataclass
    class FooConfig(MonitorConfig):
        '''foo/: what it logs.'''
        interval: int = 100                    # monitoring.foo.interval (monitoring.foo.enabled comes with the base)
        depth: int = 3                         # monitoring.foo.depth

        def validate(self, key: str) -> None:  # one-line errors at start-up, before any work
            super().validate(key)
            ...

    SPEC = MonitorSpec("foo", FooConfig, lambda c, env: FooMonitor(c.interval, c.depth), order=50)

`SPEC.name` is the config key under `monitoring.`; `order` places the monitor among the others in hook order
(spikes 0 first: a skipped step is undone before another monitor reads parameters; perf 100 last: its step time
includes the others' work). build.py collects every module's SPEC, makes the Hydra schema of `monitoring` from their
config classes (the core's diffv2/config.py holds only the fields every monitor shares), and builds the enabled ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from diffv2.train.validate import positive

if TYPE_CHECKING:
    from diffv2.train.callbacks import Callback


@dataclass
class MonitorConfig:
    """The keys every monitor has: monitoring.<name>.enabled and .interval (steps between readings)."""

    enabled: bool = True
    interval: int = 10

    def validate(self, key: str) -> None:
        """Raise a one-line ValueError for a value the monitor cannot run with; `key` is "monitoring.<name>"."""
        positive(f"{key}.interval", self.interval)


@dataclass(frozen=True)
class BuildEnv:
    """What a monitor's builder may know besides its config."""

    log_interval: int = 10  # trainer.log_interval
    params_readable: bool = True  # the engine's parameters hold their values between steps (not under ZeRO-3)


@dataclass(frozen=True)
class MonitorSpec:
    name: str  # the config key: monitoring.<name>
    config: type  # its MonitorConfig subclass
    build: Callable[[Any, BuildEnv], Callback]  # (its config, BuildEnv) -> the monitor
    order: int  # hook order among the monitors, lowest first
    always: bool = False  # built with monitoring.enabled=false too (the throughput monitor)
