r"""Weights in and out: a training checkpoint as one plain safetensors file, and such a file (or a Hugging Face export
directory) loaded into a freshly built model as its initial weights.

    python -m diffv2.infer.weights export --checkpoint RUN_OR_CKPT --out weights.safetensors [--dtype fp32|bf16|fp16]

The file holds the model's state dict under this project's own parameter names (those of `diffv2.model.transformer.Transformer`,
the names `python -m diffv2.infer.export_hf` writes into model.safetensors too): parameters in --dtype, buffers (the MoE
expert bias) as they are; tied embeddings are stored once (`embed.weight`, no `lm_head.weight`). Its metadata records
the model config it was exported from (`diffv2.model_config`, JSON) and the checkpoint and step. The export reads
only the model from the DCP checkpoint, through the safe loader (diffv2/safe_load.py: nothing in the checkpoint is
unpickled beyond DCP metadata and plain data); any layout the checkpoint was saved from (one process, FSDP2 shards
on any number of ranks, HSDP, expert parallelism) gives the same file. It needs the base install only: torch writes
the file (diffv2.infer.export_hf.save_safetensors); the `safetensors` package is not needed to write or to read it.

`load_initial_weights(model, path)` (diffv2/model/weight_files.py, with the file format) is the inverse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from diffv2.model.transformer import Transformer
from diffv2.model.weight_files import CONFIG_KEY, read_header, save_safetensors

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}


# ================================================================================================= export
def load_checkpoint_model(ckpt: Path) -> Transformer:
    """The checkpoint's model in fp32 on the CPU (eval mode), read through the safe DCP loader. Checkpoints of every
    FSDP2/HSDP layout load as they are (DCP reshards); expert-parallel ones are put together from their per-rank
    expert slices. DeepSpeed checkpoints are refused (not DCP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from diffv2.train import checkpoint

    from diffv2 import safe_load
    from diffv2.infer.inference import load_model, model_config

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
    tied embeddings once (the model has no lm_head). What diffv2.infer.export_hf writes into model.safetensors."""
    params = {name for name, _ in model.named_parameters()}
    return {k: v.detach().to("cpu", dtype if k in params else v.dtype) for k, v in model.state_dict().items()}


def write_weights(model: Transformer, out: Path, dtype: torch.dtype = torch.float32,
                  metadata: Optional[Dict[str, str]] = None) -> Path:
    """`model`'s weights as a plain safetensors file (torch alone), with its config in the metadata."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out={out} is a directory; give a file path such as {out / 'weights.safetensors'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg), sort_keys=True), **(metadata or {})}
    save_safetensors(weights_state(model, dtype), out, metadata=meta)
    return out


def export(ckpt: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Checkpoint (a verified checkpoint directory) -> safetensors file of its model's weights."""
    from diffv2.train import checkpoint

    step = checkpoint.read_meta(ckpt).get("step")
    return write_weights(load_checkpoint_model(ckpt), out, dtype,
                         {"diffv2.checkpoint": str(Path(ckpt).resolve()), "diffv2.step": str(step)})


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffv2.infer.weights", description=__doc__,
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
        from diffv2.infer.inference import checkpoint_dir

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
