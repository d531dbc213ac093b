r"""Export a checkpoint as a Hugging Face model directory (safetensors + config.json + remote-code modeling files).

    python -m diffv2.infer.export_hf --checkpoint runs/tiny-diffv2-s0/checkpoints/step_00000200 --out hf/tiny-diffv2
    python -c "import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('hf/tiny-diffv2', \
        trust_remote_code=True)"

OUT holds model.safetensors (our parameter names, no renaming), config.json (with auto_map pointing at the two
files below), configuration_diffv2.py and modeling_diffv2.py (copied from diffv2/infer/hf/: pure torch + transformers,
no import of this project), generation_config.json, and the run's tokenizer as tokenizer.json +
tokenizer_config.json (a standard PreTrainedTokenizerFast; for the byte tokenizer an equivalent byte-level one).
The export itself needs torch and tokenizers only; --verify needs transformers (pip install -e '.[hf]').
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from diffv2.config import ModelConfig
from diffv2.infer.inference import DTYPES, cast_weights, checkpoint_dir, load_model, tokenizer_spec
from diffv2.model.transformer import Transformer
from diffv2.model.weight_files import save_safetensors, write_new

TEMPLATES = Path(__file__).resolve().parent / "hf"
REMOTE_FILES = ("configuration_diffv2.py", "modeling_diffv2.py")
HF_EXTRA = "pip install -e '.[hf]'"
# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
BYTE_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")  # ids 256 (end of document) and 257 (pad) of the byte tokenizer


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eod: int, pad: int, tokenizer_vocab: int) -> dict:
    """config.json for the model as built (param_match already resolved into ffn_hidden)."""
    a, moe = cfg.attention, cfg.moe
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
        "num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.expert_hidden,
        "num_shared_experts": moe.n_shared_experts, "moe_router": moe.router,
        "moe_router_bias": moe.balance == "aux_free", "moe_capacity_factor": moe.capacity_factor,
        # The embedding is padded past the tokenizer (e.g. 264 rows for 258 byte ids): those ids get -inf logits.
        "tokenizer_vocab_size": tokenizer_vocab,
        "eos_token_id": eod, "pad_token_id": pad, "bos_token_id": None,
    }


def export(ckpt: Path, out: Path, dtype: torch.dtype = torch.float32, tokenizer: Optional[str] = None) -> Path:
    """The checkpoint's model and its run's tokenizer (or `tokenizer`) as a transformers directory."""
    return write_hf(load_model(ckpt, torch.device("cpu")), tokenizer_spec(ckpt, tokenizer), out, dtype)


def write_text(path: Path, text: str) -> None:
    write_new(path, lambda f: f.write(text.encode("utf-8")))


def gpt2_byte_chars() -> Dict[int, str]:
    """The printable character ByteLevel pre-tokenizers stand each byte for (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_tokenizer_json() -> str:
    """data.tokenizer.ByteTokenizer as a tokenizers file: ids 0-255 are the UTF-8 bytes (a byte-level BPE without
    merges), 256 = <|endoftext|> (end of document), 257 = <|pad|>; decoding is lossy UTF-8, as ours."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in gpt2_byte_chars().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL_TOKENS])
    assert [tok.token_to_id(t) for t in BYTE_SPECIAL_TOKENS] == [256, 257]
    return tok.to_str()


def write_tokenizer(tokenizer: str, out: Path, eod: int, pad: int, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json for transformers' standard PreTrainedTokenizerFast (no custom code):
    eos = end of document, pad, no bos; left padding (batched generation); text that spells a special token stays
    text (split_special_tokens), as our tokenizers encode it; no token_type_ids (generate(**batch) takes the batch)."""
    from tokenizers import Tokenizer as TokenizerFile

    if tokenizer == "byte":
        text = byte_tokenizer_json()
    else:
        text = Path(tokenizer).read_text(encoding="utf-8")
    vocab = TokenizerFile.from_str(text)
    write_text(out / "tokenizer.json", text)
    write_text(out / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": vocab.id_to_token(eod),
         "pad_token": vocab.id_to_token(pad), "padding_side": "left", "split_special_tokens": True,
         "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False,
         "model_max_length": max_len}, indent=2))


def write_hf(model: Transformer, tokenizer: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    from data.tokenizer import check_vocab, load_tokenizer

    tok = load_tokenizer(tokenizer)
    check_vocab(tok, model.cfg.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    # Parameters in `dtype`; buffers (the MoE expert bias: routing runs in fp32) as they are, as cast_weights does.
    # Tied embeddings leave lm_head out of the state dict: the modeling file reads embed.weight for both.
    params = {name for name, _ in model.named_parameters()}
    state = {k: v.detach().to("cpu", dtype if k in params else v.dtype) for k, v in model.state_dict().items()}
    save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    pad = tok.pad if tok.pad >= 0 else tok.eod
    write_text(out / "config.json", json.dumps(hf_config(model.cfg, dtype, tok.eod, pad, tok.vocab_size), indent=2))
    write_text(out / "generation_config.json", json.dumps({"eos_token_id": tok.eod, "pad_token_id": pad}, indent=2))
    for name in REMOTE_FILES:
        write_new(out / name, lambda f, src=TEMPLATES / name: f.write(src.read_bytes()))
    write_tokenizer(tokenizer, out, tok.eod, pad, model.cfg.max_seq_len)
    return out


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
        import safetensors  # noqa: F401  (transformers reads model.safetensors with it)
    except ImportError as e:
        raise ValueError(f"--verify loads OUT with transformers: it needs the hf extra ({e.name} is not installed); "
                         f"{HF_EXTRA}") from None


@torch.no_grad()
def verify(ours: Transformer, out: Path, tokens: int = 32) -> float:
    """Max |logits(ours) - logits(transformers)| in fp32 on random tokens, both from the exported (rounded) weights,
    over the tokenizer's ids; inf if the padded ids beyond them do not all get -inf."""
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "config.json").read_text())
    vocab = config["tokenizer_vocab_size"]
    ours = cast_weights(cast_weights(ours, DTYPES[config["dtype"]]), torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab, (2, min(tokens, ours.cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    theirs_BNV = theirs(ids).logits
    if not bool((theirs_BNV[..., vocab:] == float("-inf")).all()):
        return float("inf")
    return (ours(ids)[..., :vocab] - theirs_BNV[..., :vocab]).abs().max().item()


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
        if args.verify:  # before any work: the export itself needs torch and tokenizers only
            require_transformers()
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
