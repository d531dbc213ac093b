r"""Model weights in files: the safetensors format written and read with torch alone, and
`load_initial_weights(model, path)`, which copies such a file (or the model.safetensors, or sharded
model.safetensors.index.json, of a Hugging Face export directory) into a freshly built model of the same config,
strictly: any missing or unexpected name, shape, non-float dtype, or (when the file records it) a different
architecture is a one-line ValueError naming the problem and the fix, raised before any parameter is changed. The
trainer calls it for `trainer.init_from` right after it builds the model of a fresh run; `python -m
diffv2.infer.weights export` and `python -m diffv2.infer.export_hf` write the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple, Union

import torch

from diffv2.model.transformer import Transformer

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
CONFIG_KEY = "diffv2.model_config"  # metadata entry: json.dumps(dataclasses.asdict(model.cfg))
HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header
# What wrappers put into parameter names (torch.compile's module, activation-checkpoint wrappers; DDP's leading
# "module."): a file saved from a wrapped model still names the same parameters.
WRAPPER_INFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")
WRAPPER_PREFIX = "module."
# Model config fields that decide what the weights mean; with the file's config recorded, any difference is refused.
# Left out on purpose: max_seq_len and rope_theta (context extension), norm_eps, init_std, scale_residual_init, z_loss,
# ce_chunk, param_match (already resolved into ffn_hidden), attention backend/doc_mask/combine_fp32, MoE balancing.
ARCH_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size",
               "tie_embeddings", "attention.variant", "attention.qk_norm", "attention.rope_style")
ARCH_FIELDS_BY_VARIANT = {"diffv2": ("attention.pairing", "attention.lambda_mode"),
                          "baseline": ("attention.head_multiplier",)}
ARCH_FIELDS_MOE = ("moe.n_experts", "moe.top_k", "moe.expert_hidden", "moe.n_shared_experts", "moe.router")
# export_hf's config.json keys for the same fields (diffv2/infer/export_hf.py hf_config)
HF_CONFIG_FIELDS = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                    "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim", "intermediate_size": "ffn_hidden",
                    "vocab_size": "vocab_size", "tie_word_embeddings": "tie_embeddings",
                    "attention_variant": "attention.variant", "head_multiplier": "attention.head_multiplier",
                    "pairing": "attention.pairing", "lambda_mode": "attention.lambda_mode",
                    "qk_norm": "attention.qk_norm", "rope_style": "attention.rope_style",
                    "num_experts": "moe.n_experts", "num_experts_per_tok": "moe.top_k",
                    "moe_intermediate_size": "moe.expert_hidden", "num_shared_experts": "moe.n_shared_experts",
                    "moe_router": "moe.router"}



def write_new(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` as a new file renamed over any old one: created as open() creates files (0666 less the umask),
    whatever mode an earlier file there had, and never left half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    with open(partial, "wb") as f:
        write(f)
    os.replace(partial, path)


def save_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """`tensors` in the safetensors format with torch alone: an 8-byte little-endian header length, the JSON header
    (name -> dtype, shape, [begin, end) byte offsets into the data; padded with spaces to 8 bytes), then the raw
    little-endian data, largest elements first so that every tensor is aligned to its element size."""
    if sys.byteorder != "little":
        raise ValueError("safetensors stores little-endian data; export on a little-endian machine")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: cannot store dtype {t.dtype} in safetensors; export --dtype float32")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)

    def write(f: BinaryIO) -> None:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)

    write_new(path, write)


# ================================================================================================= reading
class _Entry:
    """One tensor of a safetensors file: where its bytes are and what they are."""

    def __init__(self, file: Path, name: str, dtype: torch.dtype, shape: Tuple[int, ...], start: int, end: int):
        self.file, self.name, self.dtype, self.shape, self.start, self.end = file, name, dtype, shape, start, end

    def read(self) -> torch.Tensor:
        if self.end == self.start:
            return torch.empty(self.shape, dtype=self.dtype)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            data = bytearray(f.read(self.end - self.start))
        if len(data) != self.end - self.start:
            raise ValueError(f"{self.file} is truncated: {self.name} ends past the end of the file (copy the file "
                             f"again or export it again)")
        return torch.frombuffer(data, dtype=self.dtype).reshape(self.shape)


def _not_safetensors(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a safetensors weights file ({why}); give a file written by python -m "
                      f"diffv2.infer.weights export, or a directory written by python -m diffv2.infer.export_hf")


def read_header(path: Path) -> Tuple[Dict[str, _Entry], Dict[str, str]]:
    """The tensors (name -> entry) and the metadata of a safetensors file, every field checked; no data is read."""
    if sys.byteorder != "little":
        raise ValueError("safetensors stores little-endian data; load it on a little-endian machine")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER, size - 8):
            raise _not_safetensors(path, f"header length {n} does not fit the file's {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_safetensors(path, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _not_safetensors(path, "__metadata__ is not a map of strings")
    dtypes = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
    data_start, data_len = 8 + n, size - 8 - n
    entries: Dict[str, _Entry] = {}
    for name, info in header.items():
        ok = isinstance(info, dict) and info.get("dtype") in dtypes and isinstance(info.get("shape"), list) and \
            all(isinstance(d, int) and d >= 0 for d in info["shape"]) and isinstance(info.get("data_offsets"), list) \
            and len(info["data_offsets"]) == 2 and all(isinstance(o, int) for o in info["data_offsets"])
        if not ok:
            raise _not_safetensors(path, f"bad header entry for {name!r}: {str(info)[:120]}")
        dtype, shape = dtypes[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise _not_safetensors(path, f"{name}: data_offsets {begin}..{end} do not hold {info['dtype']} "
                                         f"{list(shape)} within the {data_len} data bytes: truncated or damaged")
        entries[name] = _Entry(path, name, dtype, shape, data_start + begin, data_start + end)
    return entries, metadata


def _weight_files(path: Path) -> Tuple[List[Path], Optional[dict]]:
    """The safetensors file(s) behind `path` and the export's config.json (None for a plain file)."""
    if not path.exists():
        raise ValueError(f"init weights {path} not found (give a .safetensors file written by python -m diffv2.infer.weights "
                         f"export or a directory written by python -m diffv2.infer.export_hf)")
    if path.is_file():
        return [path], None
    config = None
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'config.json'} is not JSON ({e.msg}); export the directory again") from None
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS], config
    if (path / HF_INDEX).is_file():
        try:
            weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path / HF_INDEX} is not a safetensors index ({type(e).__name__}: {e}); export the "
                             f"directory again") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{path / HF_INDEX} names {', '.join(missing)}, which {path} does not hold (copy the "
                             f"whole export directory)")
        return files, config
    raise ValueError(f"directory {path} holds no {HF_WEIGHTS} (give a directory written by python -m diffv2.infer.export_hf "
                     f"or a .safetensors file written by python -m diffv2.infer.weights export)")


def _strip_wrappers(name: str) -> str:
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name.removeprefix(WRAPPER_PREFIX)


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _file_config(metadata: Dict[str, str], hf_config: Optional[dict], where: Path) -> Optional[dict]:
    """The architecture fields the file (or export directory) records, flat ('attention.variant': ...), or None."""
    if CONFIG_KEY in metadata:
        try:
            return _flat(json.loads(metadata[CONFIG_KEY]))
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{where}: its {CONFIG_KEY} metadata is not a JSON object (export the file again)") \
                from None
    if hf_config is not None:
        return {ours: hf_config[theirs] for theirs, ours in HF_CONFIG_FIELDS.items() if theirs in hf_config}
    return None


def _arch_fields(a: dict, b: dict) -> Tuple[str, ...]:
    fields = ARCH_FIELDS + ARCH_FIELDS_BY_VARIANT.get(b.get("attention.variant"), ())
    if a.get("moe.n_experts", 0) or b.get("moe.n_experts", 0):
        fields += ARCH_FIELDS_MOE
    return fields


def _check_config(theirs: Optional[dict], model: Transformer, path: Path) -> None:
    if theirs is None:
        return
    ours = _flat(dataclasses.asdict(model.cfg))
    diff = [k for k in _arch_fields(theirs, ours) if k in theirs and theirs[k] != ours[k]]
    if diff:
        file_side = ", ".join(f"{k}={theirs[k]}" for k in diff)
        model_side = ", ".join(f"{k}={ours[k]}" for k in diff)
        fix = " ".join(f"model.{k}={theirs[k]}" for k in diff)
        raise ValueError(f"init weights {path} are of another model ({file_side}; this model has {model_side}); "
                         f"build the model with {fix}, or give weights of a model of this config")


def _fmt(names: List[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ================================================================================================= loading
@torch.no_grad()
def load_initial_weights(model: Transformer, path: Union[str, Path]) -> None:
    """Copy the weights in `path` (a safetensors file written by `python -m diffv2.infer.weights export`, or a directory
    written by `python -m diffv2.infer.export_hf`) into `model`, a freshly built `Transformer` (unwrapped) of the same
    config, keeping the model's dtypes and devices. Strict: a missing or unexpected name, a shape that differs, a
    non-float tensor for a float one, or (where the file records its config) another architecture raises a one-line
    ValueError before anything is copied. Parameters may be plain tensors or DTensor shards (each rank keeps its
    piece), and expert-parallel models take their slice of the experts; a model on the meta device is refused."""
    path = Path(path).expanduser()
    files, hf_config = _weight_files(path)
    entries: Dict[str, _Entry] = {}
    metadata: Dict[str, str] = {}
    for file in files:
        found, meta = read_header(file)
        metadata.update(meta)
        for name, entry in found.items():
            key = _strip_wrappers(name)
            if key in entries:
                raise ValueError(f"{file}: {name} names the same parameter as {entries[key].name} (one of them comes "
                                 f"from a wrapper); keep one of them")
            entries[key] = entry
    _check_config(_file_config(metadata, hf_config, path), model, path)

    state = model.state_dict(keep_vars=True)  # parameters and persistent buffers themselves, by name
    targets = {_strip_wrappers(k): v for k, v in state.items()}
    slices = {f"blocks.{i}.mlp.experts.": b.mlp.expert_slice for i, b in enumerate(model.blocks)
              if getattr(b.mlp, "expert_slice", None) is not None}
    missing = sorted(set(targets) - set(entries))
    unexpected = sorted(set(entries) - set(targets))
    if missing or unexpected:
        parts = ([f"missing {_fmt(missing)}"] if missing else []) + ([f"unexpected {_fmt(unexpected)}"] if unexpected
                                                                     else [])
        tied = "lm_head.weight" in missing + unexpected
        hint = (f"model.tie_embeddings={str('lm_head.weight' in missing).lower()} if the weights came from a model "
                f"with that setting" if tied else "the model config the weights were exported from")
        raise ValueError(f"init weights {path} do not fit this model: {'; '.join(parts)} (build the model with "
                         f"{hint}, or give weights of a model of this config)")
    for key, target in targets.items():
        entry, full_shape = entries[key], _full_shape(target, key, slices, model)
        if tuple(entry.shape) != tuple(full_shape):
            raise ValueError(f"init weights {path}: {entry.name} has shape {list(entry.shape)} but this model's {key} "
                             f"has {list(full_shape)} (build the model with the config the weights were exported from, "
                             f"or give weights of a model of this config)")
        if entry.dtype.is_floating_point != target.dtype.is_floating_point:
            raise ValueError(f"init weights {path}: {entry.name} is {entry.dtype} but this model's {key} is "
                             f"{target.dtype} (export the weights again with python -m diffv2.infer.weights export)")
        if target.is_meta:
            raise ValueError(f"cannot load init weights into a model on the meta device ({key}, as "
                             f"parallel.meta_init=true builds it); set parallel.meta_init=false, or load them after "
                             f"the engine has materialised the model")
    for key, target in targets.items():
        _copy_into(target, entries[key].read(), key, slices)


def _full_shape(target: torch.Tensor, key: str, slices: dict, model: Transformer) -> Tuple[int, ...]:
    """The unsharded shape of a model tensor: a DTensor's global shape; an expert-parallel slice's full expert count."""
    shape = tuple(target.shape)  # a DTensor's shape is its global shape
    if next((s for prefix, s in slices.items() if key.startswith(prefix)), None) is not None:
        shape = (model.cfg.moe.n_experts, *shape[1:])
    return shape


def _copy_into(target: torch.Tensor, full: torch.Tensor, key: str, slices: dict) -> None:
    sliced = next((s for prefix, s in slices.items() if key.startswith(prefix)), None)
    if sliced is not None:
        full = full[sliced[0]:sliced[1]]
    if hasattr(target, "to_local"):  # a DTensor shard: this rank's piece of the full tensor (no communication)
        from torch.distributed.tensor import distribute_tensor

        piece = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(piece.to_local())
        return
    target.copy_(full)


# ================================================================================================= command line
