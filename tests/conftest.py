"""Shared test settings: never talk to W&B from tests."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
