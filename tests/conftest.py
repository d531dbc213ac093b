"""Shared test settings: never talk to W&B from tests; one intra-op thread in the test process."""

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
