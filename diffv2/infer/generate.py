r"""Batched sampling with a KV cache: greedy, temperature and nucleus (top-p) decoding.

    python -m diffv2.infer.generate --checkpoint runs/tiny-diffv2-s0/checkpoints/step_00000200 \
        --prompt "The Python tutorial" --prompt "import os" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
    python -m diffv2.infer.generate --checkpoint runs/tiny-diffv2-s0 --greedy --prompts-file prompts.txt

Prompts are left-padded to one length and decoded together (see diffv2/model/kv_cache.py for why positions stay right).

Legend: B batch, P padded prompt length, T new tokens, V vocab.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from diffv2.infer.inference import (add_common_args, cast_weights, checkpoint_dir, load_model, resolve_device,
                              resolve_dtype, tokenizer_spec)
from diffv2.model.kv_cache import KVCache
from diffv2.model.transformer import Transformer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p={self.top_p} must be in (0, 1]")


def sample(logits_BV: torch.Tensor, s: Sampling, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row: argmax when greedy, else a draw from the temperature-scaled, top-p truncated softmax."""
    if s.temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = F.softmax(logits_BV.float() / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # A token stays if the tokens ranked above it hold less than top_p: the top token always stays.
        drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= s.top_p
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, 0.0))
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def last_logits(model: Transformer, tokens_BN: torch.Tensor, cache: KVCache, vocab: int) -> torch.Tensor:
    """Logits of the last position only (a long prompt never materialises (B, N, V)); ids >= vocab get -inf:
    the embedding may be padded beyond the tokenizer's vocabulary."""
    h_BM = model.hidden(tokens_BN, cache=cache)[:, -1]
    logits_BV = F.linear(h_BM, model.lm_head_weight).float()
    logits_BV[:, vocab:] = float("-inf")
    return logits_BV


@torch.no_grad()
def generate(model: Transformer, prompts: List[List[int]], max_new_tokens: int, sampling: Sampling, *,
             vocab: int, pad: int, stop: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """New tokens for each prompt (up to and including `stop`, at most max_new_tokens).

    One prefill of the left-padded batch, then one token per step for every row; finished rows are fed `pad`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty; give every prompt at least one token (one character)")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    if width + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({width} tokens) + max_new_tokens={max_new_tokens} exceeds "
                         f"model.max_seq_len={model.cfg.max_seq_len}; shorten the prompt or lower --max-new-tokens")
    pads_B = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens_BP = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    cache = KVCache.for_model(model, len(prompts), width + max_new_tokens, pads_B if pads_B.any() else None)
    logits_BV = last_logits(model, tokens_BP, cache, vocab)
    done_B = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        next_B = sample(logits_BV, sampling, generator).masked_fill(done_B, pad)
        out.append(next_B)
        if stop is not None:
            done_B |= next_B == stop
        if step + 1 == max_new_tokens or bool(done_B.all()):
            break
        logits_BV = last_logits(model, next_B[:, None], cache, vocab)
    new_BT = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
    return [_until_stop(row, stop) for row in new_BT]


def _until_stop(row: List[int], stop: Optional[int]) -> List[int]:
    return row[: row.index(stop) + 1] if stop is not None and stop in row else row


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step_XXXXXXXX, or RUN (its newest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--prompts-file", "--batch", help="a file with one prompt per line, appended to --prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler: same seed, same text")
    add_common_args(p)
    args = p.parse_args(argv)
    try:
        sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_p)
        prompts = list(args.prompt)
        if args.prompts_file:
            prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
        from data.tokenizer import load_tokenizer

        ckpt = checkpoint_dir(args.checkpoint)
        tokenizer = load_tokenizer(tokenizer_spec(ckpt, args.tokenizer))
        device = resolve_device(args.device)
        model = cast_weights(load_model(ckpt, device, args.backend), resolve_dtype(args.dtype, device))
        ids = [tokenizer.encode(text) for text in prompts]
        new = generate(model, ids, args.max_new_tokens, sampling, vocab=tokenizer.vocab_size,
                       pad=tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod, stop=tokenizer.eod,
                       generator=torch.Generator(device).manual_seed(args.seed))
    except ValueError as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for text, row in zip(prompts, new):
        print(f"=== {text}\n{text}{tokenizer.decode(t for t in row if t != tokenizer.eod)}\n")


if __name__ == "__main__":
    main()
