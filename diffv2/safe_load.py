"""Read checkpoints without running code from them: no step of a load unpickles arbitrary Python objects.

A checkpoint is RUN/checkpoints/step_N/{.metadata, *.distcp, trainer.pt, meta.json}. Stock torch (2.13) reads
them like this:

- `*.distcp` tensors: `torch.load(..., weights_only=True)` inside DCP's FileSystemReader: safe.
- `.metadata`: FileSystemReader.read_metadata calls plain `pickle.load`: a crafted file runs any code it names.
- non-tensor values of the state dict (the optimizer's param_groups: lr, betas, ...): DefaultLoadPlanner.load_bytes
  calls `torch.load(..., weights_only=False)`: the same.
- `trainer.pt` is ours: `torch.load(..., weights_only=True)`.

`dcp_load` replaces the two unsafe steps: `.metadata` goes through `_MetadataUnpickler`, a `pickle.Unpickler`
whose `find_class` admits only the classes DCP's metadata is made of (the restriction the `pickle` docs
describe), and the non-tensor values through `torch.load(..., weights_only=True)`. Anything else raises
UnsafeCheckpointError (a ValueError, so the command line tools print one `error:` line and exit 2).

The sha256 manifest (meta.json) catches damage, not an attacker: whoever can replace a file can rewrite the
manifest too. These loaders are the defence against a planted checkpoint.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP = "torch.distributed.checkpoint"
# Every global a DCP .metadata file names (read off torch 2.13's checkpoints of plain and FSDP2/DTensor state dicts).
ALLOWED_GLOBALS = frozenset({
    (f"{_DCP}.metadata", "Metadata"), (f"{_DCP}.metadata", "StorageMeta"), (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"), (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"), (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"), (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((module, cls) for module in ("pathlib", "pathlib._local")  # StorageMeta.checkpoint_id
      for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
})


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain data; nothing in it was run."""


def _refuse(path: Path, why: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: {why}; a checkpoint written by this code never holds that, so the file was "
        f"altered or does not come from this code (nothing in it was executed)")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _refuse(self.path, f"its pickle names {module}.{name}, which is not part of DCP metadata")

    def persistent_load(self, pid):
        raise _refuse(self.path, "its pickle holds a persistent id")


def read_dcp_metadata(path: Path) -> Metadata:
    """Unpickle a DCP `.metadata` file admitting only DCP's metadata classes."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path} is not a readable DCP metadata file ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata):
        raise _refuse(path, f"it holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by `read_dcp_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # DCP falls back to per-rank __RANK.metadata files
        metadata = read_dcp_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _UnsafeValue(Exception):
    """Raised inside DCP's read step (which wraps it in a CheckpointException); dcp_load names the checkpoint."""


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor values with weights_only=True (stock: weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _UnsafeValue(f"the value of {fqn} is not plain data ({_first_line(e)})") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    named = [ln for ln in lines if "global" in ln.lower() or "unsupported" in ln.lower()]
    line = (named or lines or [type(err).__name__])[0]
    # torch goes on to suggest allowlisting the global: not advice to pass on about a file nobody vouches for
    return line.replace("WeightsUnpickler error: ", "").split(" was not an allowed global")[0][:200]


def _unwrap(err: CheckpointException) -> BaseException | None:
    """The first failure inside DCP's CheckpointException ({rank: (error, traceback)})."""
    for failure in (getattr(err, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return None


def dcp_load(state: dict, path: Path) -> None:
    """`dcp.load(state, checkpoint_id=path)` in place, with `.metadata` and non-tensor values read safely."""
    path = Path(path)
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()  # refuse a planted .metadata before DCP starts (it would only log it and retry)
    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group on one device
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path), storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as err:
        inner = _unwrap(err)
        if isinstance(inner, _UnsafeValue):
            raise _refuse(path, str(inner)) from err
        if isinstance(inner, pickle.UnpicklingError):  # a tensor in a .distcp shard that is not a tensor
            raise _refuse(path, f"a shard holds a non-tensor object ({_first_line(inner)})") from err
        raise


def torch_load(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`, refusing a file with objects other than tensors and plain data."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(Path(path), f"it holds objects other than tensors and plain data ({_first_line(e)})") from e
