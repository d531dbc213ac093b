"""Whether the running forward is activation checkpointing's recomputation (inside backward).

A checkpointed block's forward runs twice: once in the forward pass and again in backward to rebuild what it did
not keep. Anything a module does besides computing its output must happen once: module state written during the
recomputation (MoE's router loss, token counts) would hold a second, never-backpropagated graph of that block alive
until the next forward, and counters would count every token twice. `recomputing()` is True only inside the
recomputation; the activation-checkpoint runner (diffv2/parallel/activation_checkpoint.py) enters it through
`checkpoint(..., context_fn=checkpoint_contexts)`. The flag is
per thread because backward (and so the recomputation) runs on autograd's device threads.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_state = threading.local()


def recomputing() -> bool:
    return getattr(_state, "active", False)


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    previous, _state.active = recomputing(), True
    try:
        yield
    finally:
        _state.active = previous


def checkpoint_contexts() -> tuple:
    """torch.utils.checkpoint's context_fn (non-reentrant): nothing around the forward, the flag around the
    recomputation."""
    return contextlib.nullcontext(), _recomputation()
