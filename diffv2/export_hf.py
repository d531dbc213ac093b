r"""Export a checkpoint as a Hugging Face model directory (safetensors + config.json + remote-code modeling files).

    python -m diffv2.export_hf --checkpoint runs/tiny-diffv2-s0/checkpoints/step_00000200 --out hf/tiny-diffv2
    python -c "import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('hf/tiny-diffv2', \
        trust_remote_code=True)"

OUT holds model.safetensors (our parameter names, no renaming), config.json (with auto_map pointing at the two
files below), configuration_diffv2.py and modeling_diffv2.py (copied from diffv2/hf/: pure torch + transformers,
no import of this project), generation_config.json, and for a tokenizer.json run its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import torch

from diffv2.config import ModelConfig
from diffv2.inference import DTYPES, cast_weights, checkpoint_dir, load_model, tokenizer_spec
from diffv2.model import Transformer

TEMPLATES = Path(__file__).resolve().parent / "hf"
REMOTE_FILES = ("configuration_diffv2.py", "modeling_diffv2.py")


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eod: int, pad: int) -> dict:
    """config.json for the model as built (param_match already resolved into ffn_hidden)."""
    a = cfg.attention
    return {
        "architectures": ["DiffV2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_diffv2.DiffV2Config",
                     "AutoModelForCausalLM": "modeling_diffv2.DiffV2ForCausalLM"},
        "model_type": "diffv2",
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_variant": a.variant, "head_multiplier": a.head_multiplier, "pairing": a.pairing,
        "lambda_mode": a.lambda_mode, "combine_fp32": a.combine_fp32, "qk_norm": a.qk_norm,
        "rope_style": a.rope_style, "rope_theta": a.rope_theta,
        "eos_token_id": eod, "pad_token_id": pad, "bos_token_id": None,
    }


def export(ckpt: Path, out: Path, dtype: torch.dtype = torch.float32, tokenizer: Optional[str] = None) -> Path:
    """The checkpoint's model and its run's tokenizer (or `tokenizer`) as a transformers directory."""
    return write_hf(load_model(ckpt, torch.device("cpu")), tokenizer_spec(ckpt, tokenizer), out, dtype)


def write_hf(model: Transformer, tokenizer: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    from data.tokenizer import load_tokenizer

    if model.cfg.moe.n_experts:  # the shipped modeling file has dense SwiGLU blocks only
        raise ValueError(f"HF export of MoE models (model.moe.n_experts={model.cfg.moe.n_experts}) is not implemented; "
                         f"export a dense model")
    tok = load_tokenizer(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    # Tied embeddings leave lm_head out of the state dict: the modeling file reads embed.weight for both.
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    pad = tok.pad if tok.pad >= 0 else tok.eod
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, dtype, tok.eod, pad), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eod, "pad_token_id": pad},
                                                           indent=2))
    for name in REMOTE_FILES:
        shutil.copyfile(TEMPLATES / name, out / name)
    if tokenizer != "byte":  # a tokenizer.json run: ship it so AutoTokenizer works
        from tokenizers import Tokenizer as TokenizerFile

        shutil.copyfile(tokenizer, out / "tokenizer.json")
        vocab = TokenizerFile.from_file(tokenizer)
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": vocab.id_to_token(tok.eod),
             "pad_token": vocab.id_to_token(pad)}, indent=2))
    return out


@torch.no_grad()
def verify(ours: Transformer, out: Path, tokens: int = 32) -> float:
    """Max |logits(ours) - logits(transformers)| in fp32 on random tokens, both from the exported (rounded) weights."""
    from transformers import AutoModelForCausalLM

    exported = DTYPES[json.loads((out / "config.json").read_text())["dtype"]]
    ours = cast_weights(cast_weights(ours, exported), torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, min(tokens, ours.cfg.max_seq_len)),
                        generator=torch.Generator().manual_seed(0))
    return (ours(ids) - theirs(ids).logits).abs().max().item()


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step_XXXXXXXX, or RUN (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--dtype", default="float32", help=f"weights dtype: {', '.join(DTYPES)}")
    p.add_argument("--tokenizer", help="byte or a tokenizer.json (default: data.tokenizer of RUN/config.yaml)")
    p.add_argument("--verify", action="store_true", help="load OUT with transformers and compare logits (fp32)")
    args = p.parse_args(argv)
    try:
        if args.dtype not in DTYPES:
            raise ValueError(f"--dtype={args.dtype} is not one of {', '.join(DTYPES)}")
        ckpt = checkpoint_dir(args.checkpoint)
        out = export(ckpt, Path(args.out), DTYPES[args.dtype], args.tokenizer)
    except ValueError as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {ckpt} -> {out}")
    if args.verify:
        diff = verify(load_model(ckpt, torch.device("cpu")), out)
        print(f"max |logits - transformers logits| = {diff:.3e} (fp32 forward of the exported weights)")


if __name__ == "__main__":
    main()
