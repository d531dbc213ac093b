r"""Weights in and out: a training checkpoint as one plain safetensors file, and such a file (or a Hugging Face export
directory) loaded into a freshly built model as its initial weights.

    python -m diffv2.weights export --checkpoint RUN_OR_CKPT --out weights.safetensors [--dtype fp32|bf16|fp16]

The file holds the model's state dict under this project's own parameter names (those of `diffv2.model.Transformer`,
the names `python -m diffv2.export_hf` writes into model.safetensors too): parameters in --dtype, buffers (the MoE
expert bias) as they are; tied embeddings are stored once (`embed.weight`, no `lm_head.weight`). Its metadata records
the model config it was exported from (`diffv2.model_config`, JSON) and the checkpoint and step. The export reads
only the model from the DCP checkpoint, through the safe loader (diffv2/safe_load.py: nothing in the checkpoint is
unpickled beyond DCP metadata and plain data); any layout the checkpoint was saved from (one process, FSDP2 shards
on any number of ranks, HSDP, expert parallelism) gives the same file. It needs the base install only: torch writes
the file (diffv2.export_hf.save_safetensors); the `safetensors` package is not needed to write or to read it.

`load_initial_weights(model, path)` is the inverse: it copies such a file, or the model.safetensors (or sharded
model.safetensors.index.json) of an export_hf directory, into a freshly built model of the same config, strictly:
any missing or unexpected name, shape, non-float dtype, or (when the file records it) a different architecture is a
one-line ValueError naming the problem and the fix, raised before any parameter is changed. The trainer calls it for
`trainer.init_from` right after it builds the model of a fresh run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from diffv2.model import Transformer

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}
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
# export_hf's config.json keys for the same fields (diffv2/export_hf.py hf_config)
HF_CONFIG_FIELDS = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                    "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim", "intermediate_size": "ffn_hidden",
                    "vocab_size": "vocab_size", "tie_word_embeddings": "tie_embeddings",
                    "attention_variant": "attention.variant", "head_multiplier": "attention.head_multiplier",
                    "pairing": "attention.pairing", "lambda_mode": "attention.lambda_mode",
                    "qk_norm": "attention.qk_norm", "rope_style": "attention.rope_style",
                    "num_experts": "moe.n_experts", "num_experts_per_tok": "moe.top_k",
                    "moe_intermediate_size": "moe.expert_hidden", "num_shared_experts": "moe.n_shared_experts",
                    "moe_router": "moe.router"}


def _safetensors_dtypes() -> Dict[str, torch.dtype]:
    from diffv2.export_hf import SAFETENSORS_DTYPES

    return {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


# ================================================================================================= export
def load_checkpoint_model(ckpt: Path) -> Transformer:
    """The checkpoint's model in fp32 on the CPU (eval mode), read through the safe DCP loader. Checkpoints of every
    FSDP2/HSDP layout load as they are (DCP reshards); expert-parallel ones are put together from their per-rank
    expert slices. DeepSpeed checkpoints are refused (not DCP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from diffv2 import checkpoint, safe_load
    from diffv2.inference import load_model, model_config

    meta = checkpoint.read_meta(ckpt)
    if meta.get("engine", "fsdp") == "deepspeed":
        raise ValueError(f"{ckpt} was written by parallel.engine=deepspeed, whose ZeRO files this export does not read "
                         f"(export a checkpoint of parallel.engine=fsdp, or convert this one with DeepSpeed's "
                         f"zero_to_fp32.py, which unpickles the files: trusted checkpoints only)")
    ep = int(meta.get("ep", 1))
    if ep == 1:
        return load_model(ckpt, torch.device("cpu"), backend="math")
    # parallel.ep=N: every ep rank saved its E/N experts under NAME.ep{r}of{N} (diffv2/parallel/engine.py
    # _rename_experts); every other parameter under its own name, sharded as usual.
    model = Transformer(model_config(meta["model"]), "math")
    state = get_model_state_dict(model)
    wanted: Dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if ".experts." not in name:
            wanted[name] = value
            continue
        if value.shape[0] % ep:
            raise ValueError(f"{ckpt}: {name} has {value.shape[0]} experts, not a multiple of parallel.ep={ep} "
                             f"(the checkpoint's meta.json does not describe its files)")
        for r in range(ep):
            wanted[f"{name}.ep{r}of{ep}"] = torch.empty((value.shape[0] // ep, *value.shape[1:]), dtype=value.dtype)
    safe_load.dcp_load({"model": wanted}, ckpt)
    for name in [n for n in state if ".experts." in n]:
        state[name] = torch.cat([wanted[f"{name}.ep{r}of{ep}"] for r in range(ep)])
    set_model_state_dict(model, state)
    return model.eval()


def weights_state(model: Transformer, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """The model's state dict on the CPU: parameters in `dtype`, buffers (MoE routing state, fp32) as they are;
    tied embeddings once (the model has no lm_head). What diffv2.export_hf writes into model.safetensors."""
    params = {name for name, _ in model.named_parameters()}
    return {k: v.detach().to("cpu", dtype if k in params else v.dtype) for k, v in model.state_dict().items()}


def write_weights(model: Transformer, out: Path, dtype: torch.dtype = torch.float32,
                  metadata: Optional[Dict[str, str]] = None) -> Path:
    """`model`'s weights as a plain safetensors file (torch alone), with its config in the metadata."""
    from diffv2.export_hf import save_safetensors

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out={out} is a directory; give a file path such as {out / 'weights.safetensors'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg), sort_keys=True), **(metadata or {})}
    save_safetensors(weights_state(model, dtype), out, metadata=meta)
    return out


def export(ckpt: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Checkpoint (a verified checkpoint directory) -> safetensors file of its model's weights."""
    from diffv2 import checkpoint

    step = checkpoint.read_meta(ckpt).get("step")
    return write_weights(load_checkpoint_model(ckpt), out, dtype,
                         {"diffv2.checkpoint": str(Path(ckpt).resolve()), "diffv2.step": str(step)})


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
                      f"diffv2.weights export, or a directory written by python -m diffv2.export_hf")


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
    dtypes = _safetensors_dtypes()
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
        raise ValueError(f"init weights {path} not found (give a .safetensors file written by python -m diffv2.weights "
                         f"export or a directory written by python -m diffv2.export_hf)")
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
    raise ValueError(f"directory {path} holds no {HF_WEIGHTS} (give a directory written by python -m diffv2.export_hf "
                     f"or a .safetensors file written by python -m diffv2.weights export)")


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
    """Copy the weights in `path` (a safetensors file written by `python -m diffv2.weights export`, or a directory
    written by `python -m diffv2.export_hf`) into `model`, a freshly built `Transformer` (unwrapped) of the same
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
                             f"{target.dtype} (export the weights again with python -m diffv2.weights export)")
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
def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffv2.weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a checkpoint's model weights -> one safetensors file (project parameter names)")
    e.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step_XXXXXXXX, or RUN (its newest checkpoint)")
    e.add_argument("--out", required=True, help="output file, e.g. weights.safetensors (parent directories created)")
    e.add_argument("--dtype", default="fp32", help=f"parameter dtype: {', '.join(DTYPE_NAMES)} (default fp32)")
    args = p.parse_args(argv)
    try:
        if args.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype={args.dtype} is not one of {', '.join(DTYPE_NAMES)}")
        if Path(args.out).is_dir():
            raise ValueError(f"--out={args.out} is a directory; give a file path such as "
                             f"{Path(args.out) / 'weights.safetensors'}")
        from diffv2.inference import checkpoint_dir

        ckpt = checkpoint_dir(args.checkpoint)
        out = export(ckpt, Path(args.out), DTYPE_NAMES[args.dtype])
    except ValueError as err:  # user errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    entries, _ = read_header(out)
    n = sum(math.prod(t.shape) for t in entries.values())
    print(f"wrote {out}: {len(entries)} tensors, {n:,} values ({args.dtype}) from {ckpt}")


if __name__ == "__main__":
    main()
