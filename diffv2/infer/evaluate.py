r"""Evaluate checkpoints: validation perplexity and multi-key needle-in-a-haystack retrieval (diffv2/infer/needle.py).

    python -m diffv2.infer.evaluate --checkpoint runs/tiny-diffv2-s0
    python -m diffv2.infer.evaluate --checkpoint runs/a/checkpoints/step_00020000 runs/b/checkpoints/step_00020000 \
        --needle-lengths 1024 2048 4096 --needle-keys 4 --out compare.json

Data defaults to the run's own data config (RUN/config.yaml): its validation split, its seq_len. Each
checkpoint's result goes to RUN/eval/step_XXXXXXXX.json; with several checkpoints the tables are printed side by
side (the needle cases are identical when the checkpoints share tokenizer and data).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from diffv2.config import DataConfig
from diffv2.infer.inference import (add_common_args, cast_weights, checkpoint_dir, load_model, resolve_device,
                              resolve_dtype, run_config, tokenizer_spec)
from diffv2.model.kernels import doc_ids_from_tokens

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def perplexity(model, ds, batch_size: int, max_samples: int, autocast_dtype: Optional[torch.dtype],
               eod: Optional[int]) -> dict:
    """exp(mean next-token cross-entropy) over the first max_samples samples, every predicted token weighted equally.

    Runs as the trainer's validation pass does (fp32 weights, bf16 autocast on GPU), so on the samples the trainer
    used it reproduces train/val_loss.
    """
    device = next(model.parameters()).device
    n = min(len(ds), max_samples)
    nll, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        batch_BN1 = torch.stack([ds[i] for i in range(start, min(n, start + batch_size))]).to(device)
        x_BN, y_BN = batch_BN1[:, :-1], batch_BN1[:, 1:]
        doc_ids_BN = doc_ids_from_tokens(x_BN, eod) if eod is not None else None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            ce = model.loss(x_BN, y_BN, doc_ids_BN)[1]
        nll += ce.double().item() * y_BN.numel()
        tokens += y_BN.numel()
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "samples": n, "tokens": tokens}


def data_config(ckpt: Path, args) -> DataConfig:
    """The run's data config with the command line's overrides."""
    cfg = DataConfig(**OmegaConf.to_container(run_config(ckpt).data, resolve=True))
    if args.data_prefix:
        cfg = replace(cfg, prefixes=list(args.data_prefix), weights=None)
    if args.split:
        cfg = replace(cfg, split=args.split)
    if args.seq_len:
        cfg = replace(cfg, seq_len=args.seq_len)
    if args.tokenizer:
        cfg = replace(cfg, tokenizer=args.tokenizer)
    return cfg


def evaluate_checkpoint(ckpt: Path, args) -> dict:
    from data.dataset import build_datasets
    from data.tokenizer import check_vocab, load_tokenizer
    from diffv2.infer.needle import build_case, haystack_pool, run_needles

    dcfg = data_config(ckpt, args)
    tokenizer = load_tokenizer(tokenizer_spec(ckpt, args.tokenizer))
    device = resolve_device(args.device)
    model = load_model(ckpt, device, args.backend)
    check_vocab(tokenizer, model.cfg.vocab_size)
    if dcfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len={dcfg.seq_len} exceeds model.max_seq_len={model.cfg.max_seq_len}; lower it")
    contexts = args.needle_lengths or sorted({max(256, dcfg.seq_len // 4), max(256, dcfg.seq_len // 2),
                                              max(256, dcfg.seq_len)})
    if max(contexts) + 16 > model.cfg.max_seq_len:
        raise ValueError(f"--needle-lengths {max(contexts)} + the answer exceeds model.max_seq_len="
                         f"{model.cfg.max_seq_len}; give shorter --needle-lengths")
    # A blend holds exactly the samples asked for; a single prefix at least one epoch of its validation split.
    _, valid = build_datasets(dcfg, run_config(ckpt).seed, tokenizer,
                              num_samples={"train": 0, "valid": max(1, args.max_samples)})
    if valid is None:
        raise ValueError(f"data.split={dcfg.split} has no validation part; pass --data-prefix of data with one")
    pool = haystack_pool(valid, tokenizer, max_tokens=16 * max(contexts))  # varied haystacks, bounded work
    for context in contexts if args.needle_trials > 0 else ():  # a too-short length fails now, not after perplexity
        build_case(pool, tokenizer, context, 0.0, args.needle_keys, random.Random(0))
    result = {"checkpoint": str(ckpt), "variant": model.cfg.attention.variant, "data": {
        "prefixes": dcfg.prefixes or ["<sample corpus>"], "split": dcfg.split, "seq_len": dcfg.seq_len}}
    if args.max_samples > 0:
        autocast = torch.bfloat16 if device.type == "cuda" else None
        eod = tokenizer.eod if model.cfg.attention.doc_mask else None
        result["validation"] = perplexity(model, valid, args.batch_size, args.max_samples, autocast, eod)
    if args.needle_trials > 0:
        model = cast_weights(model, resolve_dtype(args.dtype, device))
        result["needle"] = run_needles(model, tokenizer, pool, contexts, args.needle_depths,
                                       args.needle_keys, args.needle_trials, args.batch_size, args.seed)
    return result


def print_tables(results: List[dict]) -> None:
    names = [Path(r["checkpoint"]).parent.parent.name + "/" + Path(r["checkpoint"]).name for r in results]
    if all("validation" in r for r in results):
        print(f"\nvalidation ({results[0]['validation']['tokens']:,} tokens)")
        print(f"{'checkpoint':<48} {'variant':<9} {'loss':>8} {'ppl':>10}")
        for name, r in zip(names, results):
            v = r["validation"]
            print(f"{name:<48} {r['variant']:<9} {v['loss']:>8.4f} {v['perplexity']:>10.3f}")
    if not all("needle" in r for r in results):
        return
    n0 = results[0]["needle"]
    print(f"\nneedle retrieval accuracy ({n0['keys']} keys, {n0['trials']} trials per cell); rows: context tokens, "
          f"columns: target depth" + ("; one column block per checkpoint" if len(results) > 1 else ""))
    depths = list(next(iter(n0["accuracy"].values())))
    block = " ".join(f"{d:>5}" for d in depths)
    print(f"{'':>7} " + " | ".join(f"{block}" for _ in results))
    for ctx in n0["accuracy"]:
        cells = [" ".join(f"{r['needle']['accuracy'][ctx][d]:>5.2f}" for d in depths) for r in results]
        print(f"{ctx:>7} " + " | ".join(cells))
    if len(results) > 1:
        print("blocks: " + " | ".join(names))


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="one or more RUN/checkpoints/step_XXXXXXXX (or RUN dirs); several = a comparison")
    p.add_argument("--data-prefix", nargs="+", help="Megatron .bin/.idx prefixes (default: the run's data.prefixes)")
    p.add_argument("--split", help="train,valid,test weights (default: the run's data.split; 1,99,0 = mostly valid)")
    p.add_argument("--seq-len", type=int, help="tokens per perplexity sample (default: the run's data.seq_len)")
    p.add_argument("--max-samples", type=int, default=256, help="validation samples for perplexity (0 = skip)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--needle-lengths", type=int, nargs="+", help="prompt lengths in tokens (default: seq_len/4, /2, 1)")
    p.add_argument("--needle-depths", type=float, nargs="+", default=list(DEPTHS))
    p.add_argument("--needle-keys", type=int, default=4, help="needles per prompt: 1 target + k-1 distractors")
    p.add_argument("--needle-trials", type=int, default=20, help="prompts per (length, depth) cell (0 = skip)")
    p.add_argument("--seed", type=int, default=0, help="seeds needle keys, values, places and haystack offsets")
    p.add_argument("--out", help="also write all results to this JSON file")
    add_common_args(p)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")  # megatron-core's import noise
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
        if any(not 0 <= d <= 1 for d in args.needle_depths):
            raise ValueError(f"--needle-depths {args.needle_depths} must lie in [0, 1]")
        ckpts = [checkpoint_dir(c) for c in args.checkpoint]  # every path is checked before the first evaluation
        results = []
        for ckpt in ckpts:
            result = evaluate_checkpoint(ckpt, args)
            path = ckpt.parent.parent / "eval" / f"{ckpt.name}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
            print(f"{ckpt}: results in {path}")
            results.append(result)
    except ValueError as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_tables(results)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
        print(f"\nall results: {args.out}")


if __name__ == "__main__":
    main()
