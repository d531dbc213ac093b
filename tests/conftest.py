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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
