"""Distributed engines behind one small interface: the training loop calls only what `Engine` defines.

    engine = build_engine(cfg, model, device)        # diffv2.parallel.build: parallelizes the model (parallelize.py),
                                                      # builds the optimizer, picks the engine
    loss = engine.model.loss(x, y, doc_ids)[0]        # the wrapped model keeps Transformer's methods
    engine.backward(loss / accum, last_micro)         # gradient accumulation: sync on the last micro-batch
    grad_norm = engine.optimizer_step(max_norm)       # clip + step; the global pre-clip norm, a device scalar
    engine.zero_grad()
    engine.save(directory) / engine.load(directory)   # collective; model + optimizer shards (checkpoint.py adds
                                                      # the manifest, the atomic rename and the trainer state)

`fsdp` (this module): the step and checkpoints of a model that diffv2/parallel/parallelize.py has sharded with
FSDP2 (`fully_shard` per block and at the root, over the data-parallel layout `parallel.data_parallel` picks:
`shard`, `hybrid` = HSDP, `replicate` = DDP semantics), after tensor and expert parallelism. Checkpoints are DCP:
every rank writes its own shards, and a checkpoint loads onto any number of ranks (DCP reshards model and
optimizer). `deepspeed`: diffv2/parallel/deepspeed_engine.py.

One process with tp=1 wraps nothing: the engine is then the plain single-device loop, bit for bit.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from diffv2 import safe_load
from diffv2.parallel.norms import DisjointMeshes, clip_grad_norm

log = logging.getLogger(__name__)


def tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


class TrainEngine(Protocol):
    """What the training loop (diffv2/train/trainer.py) needs of an engine: the step, the checkpoint I/O, and the
    capabilities it declares, so the loop asks what an engine can do and never which engine it is."""

    name: str  # for messages
    model: nn.Module  # the wrapped model: it keeps Transformer's methods (loss, update_expert_bias)
    optimizer: torch.optim.Optimizer
    supports_undo: bool  # NonFiniteGuard can snapshot and restore parameters and optimizer state in place
    skips_nonfinite_steps: bool  # the engine itself skips a step whose global grad norm is not finite
    params_readable: bool  # parameters hold their values between steps (False: ZeRO-3 empties them outside forward)
    named_grads: Optional[Callable[[], Iterable[tuple[str, torch.Tensor]]]]  # local gradient pieces; None: .grad
    disjoint: DisjointMeshes  # meshes whose outside ranks hold other values (sharded grad norms)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None: ...
    def optimizer_step(self, max_norm: float, gate: Optional[Callable[[torch.Tensor], None]] = None
                       ) -> torch.Tensor: ...
    def zero_grad(self) -> None: ...
    def state_bytes(self) -> int: ...
    def save(self, directory: Path, async_ok: bool = False) -> None: ...
    def wait(self) -> None: ...
    def load(self, directory: Path) -> None: ...
    def describe(self) -> str: ...


class Engine:
    """The loop's view of a (possibly distributed) model + optimizer (implements `TrainEngine`)."""

    name = "single"
    supports_undo = True  # NonFiniteGuard can snapshot and restore parameters and optimizer state in place
    skips_nonfinite_steps = False  # a non-finite step is the guard's business (undo, or detect and stop)
    params_readable = True  # parameters hold their values between steps, so monitors and probes may read them

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dp_rank: int = 0, dp_size: int = 1,
                 disjoint: Optional[DisjointMeshes] = None):
        self.model, self.optimizer = model, optimizer
        self.dp_rank, self.dp_size = dp_rank, dp_size  # this rank's data shard, and how many shards there are
        self.named_grads: Optional[Callable[[], Iterable[tuple[str, torch.Tensor]]]] = None  # None = param.grad
        self._plans: dict = {}  # index tensors of the sharded grad-norm reduction, built once (no per-step copies)
        # meshes whose outside ranks hold other values (expert parallelism), for the sharded grad norms
        self.disjoint = disjoint if disjoint is not None else DisjointMeshes()

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        loss.backward()

    def optimizer_step(self, max_norm: float, gate: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """`gate(norm)`, if given, runs between clipping and the step (the non-finite guard's fused skip)."""
        # The optimizer's own parameters: FSDP2 swaps a module's registered parameters for unsharded copies while
        # it is gathered (e.g. after a no-grad probe forward), so model.parameters() can miss the sharded grads.
        norm = clip_grad_norm((p for g in self.optimizer.param_groups for p in g["params"]), max_norm, self._plans,
                              self.disjoint)
        if gate is not None:
            gate(norm)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Bytes this rank will write for model + optimizer (a lower bound; formats add metadata)."""
        return tensor_bytes(self._state())

    def _state(self) -> dict:
        """{"model": ..., "optim": ...} as DCP saves and loads them (fully qualified names as keys)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _set_state(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def save(self, directory: Path, async_ok: bool = False) -> None:
        """Write this rank's model and optimizer shards into `directory` (collective)."""
        with warnings.catch_warnings():  # DCP warns that it runs without a process group on one device
            warnings.simplefilter("ignore")
            dcp.save(self._state(), checkpoint_id=str(directory))

    def wait(self) -> None:
        """Block until an asynchronous save has finished writing (no-op for synchronous engines)."""

    def load(self, directory: Path) -> None:
        state = self._state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            safe_load.dcp_load(state, directory)  # stock dcp.load unpickles .metadata unrestricted
        self._set_state(state)

    def describe(self) -> str:
        return "single device"


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, layout):
        """`model` as `parallelize` left it (TP / EP applied, FSDP2-sharded); `layout`: what it returned."""
        super().__init__(model, optimizer, layout.dp_rank, layout.dp_size, disjoint=layout.disjoint)
        self.mesh = layout.mesh
        # Under expert parallelism each ep rank's experts are different tensors under the same names: checkpoints
        # keep them apart by name (".ep<rank>of<ep>"), so an EP checkpoint resumes with the same parallel.ep.
        self.ep_suffix = layout.ep_suffix
        self.layout = layout.text
        self._pending = None
        params = dict(model.named_parameters())  # the sharded parameters (FSDP2 has replaced the originals)
        self._head_shared = [params[name] for name in layout.head_shared]

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        loss.backward()
        if last_micro and self._head_shared:  # TP: each rank's heads gave part of these gradients
            from diffv2.parallel.tensor import sum_head_shared_grads

            sum_head_shared_grads(self._head_shared, self.mesh["tp"].get_group())

    def _state(self) -> dict:
        state = super()._state()
        return _rename_experts(state, self.ep_suffix, to_file=True) if self.ep_suffix else state

    def _set_state(self, state: dict) -> None:
        super()._set_state(_rename_experts(state, self.ep_suffix, to_file=False) if self.ep_suffix else state)

    def save(self, directory: Path, async_ok: bool = False) -> None:
        state = self._state()
        if async_ok:
            self._pending = dcp.async_save(state, checkpoint_id=str(directory))
        else:
            dcp.save(state, checkpoint_id=str(directory))

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def describe(self) -> str:
        return self.layout


def _rename_experts(state: dict, suffix: str, to_file: bool) -> dict:
    """Expert parameter names (".experts." in the name) gain `suffix` on the way to a file and lose it on the way
    back, in the model state dict and in the optimizer's (its per-parameter state and its param_groups)."""
    def name(fqn: str) -> str:
        if ".experts." not in fqn:
            return fqn
        return fqn + suffix if to_file else fqn.removesuffix(suffix)

    optim = dict(state["optim"])
    optim["state"] = {name(k): v for k, v in optim["state"].items()}
    optim["param_groups"] = [{**g, "params": [name(k) for k in g["params"]]} for g in optim["param_groups"]]
    return {"model": {name(k): v for k, v in state["model"].items()}, "optim": optim}
