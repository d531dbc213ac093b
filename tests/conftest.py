"""Shared test settings: never talk to W&B from tests; one intra-op thread in the test process; under pytest-xdist
(`-n 2 --dist loadgroup`, the README's test command) the SLURM tests share one worker, so the one-node cluster runs
one of their jobs at a time."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")


@pytest.fixture(autouse=True, scope="module")
def _single_cpu_thread():
    """The tests' tensors are small: on the 2-core CI box OpenMP's spinning workers slow them ~8x as soon as another
    process takes a core. Subprocess training runs keep their own thread settings."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def shared_fixtures(item) -> list[str]:
    """The module-scoped fixtures `item` uses (what its module computes once for several tests: runs, references),
    other than the per-module thread setting above."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return [name for name, fixturedefs in defs.items()
            if name != "_single_cpu_thread" and any(d.scope == "module" for d in fixturedefs)]


def pytest_collection_modifyitems(config, items):
    """Under xdist's loadgroup, tests of one group run on one worker. The SLURM tests share one cluster; the tests
    that use a module's shared fixture go together, so that fixture runs once and not on both workers (it spawns
    training runs: minutes of CPU each, twice over before this grouping)."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif shared_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
