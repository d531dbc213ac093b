"""Load a trained run for inference: the model from a DCP checkpoint (weights only), its tokenizer and run config.

A checkpoint is RUN/checkpoints/step_XXXXXXXX: meta.json holds the model config; RUN/config.yaml (written by
train.py) holds the resolved run config, which names the tokenizer and the data the run trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from diffv2.train import checkpoint

from diffv2 import safe_load
from diffv2.config import AttentionConfig, ModelConfig, MoEConfig
from diffv2.infer.fused_combine import install_fused_combine
from diffv2.model.kernels import resolve_backend
from diffv2.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(saved: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's meta.json recorded (asdict form)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - fields) + sorted(f"attention.{k}" for k in set(saved.get("attention", {})) -
                                                   {f.name for f in dataclasses.fields(AttentionConfig)})
    unknown += sorted(f"moe.{k}" for k in set(saved.get("moe", {})) - {f.name for f in dataclasses.fields(MoEConfig)})
    if unknown:
        raise ValueError(f"checkpoint model config has keys this code does not know ({', '.join(unknown)}); "
                         f"use the code version that wrote it (RUN/git.json)")
    moe = MoEConfig(**saved.get("moe", {}))  # checkpoints from before MoE support are dense
    return ModelConfig(**{**saved, "attention": AttentionConfig(**saved["attention"]), "moe": moe})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bf16 on GPU (as training's autocast), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype={name} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def checkpoint_dir(path: str) -> Path:
    """A checkpoint directory, or a run directory (its newest valid checkpoint); verified before any loading."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        latest = checkpoint.latest_valid(p / "checkpoints")
        if latest is None:
            raise ValueError(f"--checkpoint={path}: run directory has no valid checkpoint under checkpoints/")
        return latest
    problem = checkpoint.verify(p) if p.is_dir() else "not a directory"
    if problem:
        raise ValueError(f"--checkpoint={path} is not a usable checkpoint ({problem}); give RUN/checkpoints/step_N")
    return p


def run_config(ckpt: Path) -> DictConfig:
    path = ckpt.parent.parent / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{path} not found (the run's resolved config); pass --tokenizer and --data-prefix explicitly")
    return OmegaConf.load(path)


def tokenizer_spec(ckpt: Path, override: Optional[str]) -> str:
    return override or run_config(ckpt).data.tokenizer


def load_model(ckpt: Path, device: torch.device, backend: str = "auto") -> Transformer:
    """The checkpoint's model in fp32 on `device`, in eval mode; only the model is read, not the optimizer."""
    cfg = model_config(checkpoint.read_meta(ckpt)["model"])
    model = Transformer(cfg, resolve_backend(backend, device, doc_mask=False)).to(device)
    state = get_model_state_dict(model)
    safe_load.dcp_load({"model": state}, ckpt)  # never unpickles objects other than DCP metadata and plain data
    set_model_state_dict(model, state)
    install_fused_combine(model)  # DIFF V2's pair combine in one kernel on a GPU without autograd
    return model.eval()


def cast_weights(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Parameters to `dtype`, buffers untouched: Module.to(dtype) would also round the fp32 RoPE tables, which
    training reads in fp32 under autocast (bf16 cos/sin quantise every angle to 3 significant digits)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="byte or a tokenizer.json (default: data.tokenizer of RUN/config.yaml)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--backend", default="auto", help="attention backend for prefill (model.attention.backend values)")
