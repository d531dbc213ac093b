"""Shared test settings: never talk to W&B from tests; one intra-op thread in the test process.

The README's test command runs `pytest -n 2 --dist loadfile`: each test file runs on one xdist worker, so a module's
shared fixtures (training runs, references: minutes of CPU) are built once, and the SLURM tests (one file) run one
job at a time on the one-node cluster. (`--dist loadgroup` with `xdist_group` marks did neither: pytest-xdist 3.8
renames the node ids it groups by through an attribute pytest 9 no longer reads, so every test was scheduled on its
own and those fixtures were built on both workers.)"""

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


# The files that take longest (minutes of training runs each) start first, so that no single long file runs alone
# at the end while the other worker idles.
SLOW_FIRST = ("test_readme.py", "test_slurm_cluster.py", "test_signals.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: SLOW_FIRST.index(item.path.name) if item.path.name in SLOW_FIRST else len(SLOW_FIRST))
