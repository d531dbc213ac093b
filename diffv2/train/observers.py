"""Shared access to what the model exposes for monitoring: its observer slots and a fixed probe batch.

The model has two observer slots: `Attention.observer(layer_idx, stats)` (context before o_proj, the two maps'
outputs, sigmoid(lambda)) and `Transformer.block_observer(layer_idx, x_BNM)` (residual stream after each
block). Several monitors may want the same slot on the same step, so the hub owns the slots and fans out.
A slot holds a function only while some monitor watches it; otherwise it stays None and the forward pass is
exactly the unmonitored one.

Under torch.compile (compiled blocks), a monitored step runs compiled too. Whether a block observes is an argument
the model passes it (`observe`, read from the slot), so the compiled graph is picked by an argument guard. The
attention observer is called from `Attention._emit`, which the compiler never traces: a compiled block breaks its
graph there, hands the statistics tensors out, and the observer runs eagerly on them. Since `_emit` reads the layer
index itself, no graph depends on it: the observed variant of a block compiles once for all layers (tracing the
observer would specialise on each layer's integer `layer_idx`: one recompilation per layer, past dynamo's recompile
limit). The block observer is called between blocks, outside compiled code. Probe passes run eagerly (their own
explicit math path).

Legend: B batch, N sequence, M d_model.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from diffv2.model.attention import Attention


class ObserverHub:
    def __init__(self, model: torch.nn.Module):
        self.attention_modules = [m for m in model.modules() if isinstance(m, Attention)]
        self.block_owners = [m for m in model.modules() if hasattr(m, "block_observer")]
        self._attention: dict[str, Callable] = {}
        self._blocks: dict[str, Callable] = {}

    def watch_attention(self, key: str, fn: Callable[[int, dict], None]) -> None:
        self._attention[key] = fn
        self._install()

    def watch_blocks(self, key: str, fn: Callable[[int, torch.Tensor], None]) -> None:
        self._blocks[key] = fn
        self._install()

    def unwatch(self, key: str) -> None:
        self._attention.pop(key, None)
        self._blocks.pop(key, None)
        self._install()

    @property
    def watching(self) -> bool:
        """Some monitor watches a slot now (O(1): no walk over the modules)."""
        return bool(self._attention or self._blocks)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Empty slots for a forward that must not be observed (the probe pass)."""
        for m in self.attention_modules:
            m.observer = None
        for m in self.block_owners:
            m.block_observer = None
        try:
            yield
        finally:
            self._install()

    def _install(self) -> None:
        attention = self._on_attention if self._attention else None
        for m in self.attention_modules:
            m.observer = attention
        blocks = self._on_block if self._blocks else None
        for m in self.block_owners:
            m.block_observer = blocks

    def _on_attention(self, layer_idx: int, stats: dict) -> None:
        with torch.no_grad():
            for fn in self._attention.values():
                fn(layer_idx, stats)

    def _on_block(self, layer_idx: int, x_BNM: torch.Tensor) -> None:
        with torch.no_grad():
            for fn in self._blocks.values():
                fn(layer_idx, x_BNM)


class ProbeBatch:
    """A fixed batch of validation tokens, run through the model once per step for all probes that asked.

    Probes `request` a pass and call `run`; the first `run` after requests does one forward (no grad, the
    training autocast: fused attention kernels need it on GPU) with forward pre-hooks on the attention modules,
    handing each probe `(attention module, its input x_BNM in fp32)` layer by layer, so probes recompute q/k
    from exactly what the layer saw and only one layer's input is alive at a time.
    """

    def __init__(self, model: torch.nn.Module, tokens_BN1: torch.Tensor, hub: ObserverHub,
                 autocast_dtype: Optional[torch.dtype] = None):
        self.model, self.tokens_BN, self.hub, self.autocast_dtype = model, tokens_BN1[:, :-1], hub, autocast_dtype
        self.attention_modules = [m for m in model.modules() if isinstance(m, Attention)]
        self._requests: dict[str, Callable[[Attention, torch.Tensor], None]] = {}

    def request(self, key: str, fn: Callable[[Attention, torch.Tensor], None]) -> None:
        self._requests[key] = fn

    @torch.no_grad()
    def run(self) -> None:
        if not self._requests:
            return
        fns, self._requests = list(self._requests.values()), {}

        def probe(module, args):
            x_BNM = args[0].detach().float()
            for fn in fns:
                fn(module, x_BNM)

        hooks = [m.register_forward_pre_hook(probe) for m in self.attention_modules]
        try:
            eager = torch.compiler.set_stance("force_eager")
            autocast = torch.autocast(self.tokens_BN.device.type, dtype=self.autocast_dtype,
                                      enabled=self.autocast_dtype is not None)
            with autocast, eager, self.hub.paused():
                self.model.hidden(self.tokens_BN)
            if hasattr(self.model, "reshard"):  # FSDP2 leaves a forward's gathered root parameters registered
                self.model.reshard()  # until the next backward; put the sharded ones (holding the grads) back
        finally:
            for h in hooks:
                h.remove()
