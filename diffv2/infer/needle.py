"""Multi-key needle in a haystack built from the corpus: long-context retrieval under distracting context.

A case is `context` tokens: validation-split text with k needles "The secret code for <key> is <value>." inserted,
then a question about one of them, the target. The target sits after `depth` x (haystack tokens); the k - 1
distractor needles (other keys, other values) sit at random depths. The model answers by greedy decoding; the
answer is right when its first word, minus a final full stop, is exactly the value.

Every case of a grid comes from one seeded random stream, so two checkpoints with the same tokenizer and data see
identical prompts: their accuracy tables compare directly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from data.tokenizer import Tokenizer
from diffv2.infer.generate import Sampling, generate

KEYS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
        "lagoon", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
        "walnut", "xenon", "yarrow", "zephyr")
NEEDLE = " The secret code for {key} is {value}. "
QUERY = "\n\nQuestion: what is the secret code for {key}? Answer: The secret code for {key} is"


@dataclass(frozen=True)
class NeedleCase:
    tokens: List[int]  # the whole prompt: haystack with needles, then the query
    key: str  # the target's key and value
    value: str
    depth: float  # requested depth of the target needle, 0 = first, 1 = last in the haystack
    target_start: int  # index in `tokens` where the target needle begins
    needle_spans: List[tuple]  # (start, end) in `tokens` of every needle, the target's first
    haystack_len: int  # corpus tokens in the prompt


def haystack_pool(valid_ds, tokenizer: Tokenizer, max_tokens: int) -> List[int]:
    """Whole documents of the validation split (a megatron GPTDataset or a blend of them) in index order, EOD ->
    blank line, until `max_tokens`; haystacks are windows of this pool at seeded offsets, wrapping around."""
    parts = getattr(valid_ds.dataset, "datasets", [valid_ds.dataset])  # BlendedDataset or one GPTDataset
    sep = tokenizer.encode("\n\n")
    pool: List[int] = []
    for gpt in parts:
        for doc in sorted(int(i) for i in gpt.indices):
            pool += [t for t in gpt.dataset[doc].tolist() if t != tokenizer.eod] + sep
            if len(pool) >= max_tokens:
                return pool
    return pool


def build_case(pool: Sequence[int], tokenizer: Tokenizer, context: int, depth: float, n_keys: int,
               rng: random.Random) -> NeedleCase:
    if not 1 <= n_keys <= len(KEYS):
        raise ValueError(f"--needle-keys={n_keys} must be in [1, {len(KEYS)}]")
    keys = rng.sample(KEYS, n_keys)
    values = [str(v) for v in rng.sample(range(10**6, 10**7), n_keys)]  # 7 digits, all distinct
    needles = [tokenizer.encode(NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    query = tokenizer.encode(QUERY.format(key=keys[0]))
    hay_len = context - sum(map(len, needles)) - len(query)
    if hay_len < 2 * sum(map(len, needles)):
        raise ValueError(f"--needle-lengths {context} leaves {hay_len} haystack tokens for {n_keys} needles; "
                         f"use lengths >= {context + 2 * sum(map(len, needles)) - hay_len} or fewer --needle-keys")
    start = rng.randrange(len(pool))
    hay = [pool[(start + i) % len(pool)] for i in range(hay_len)]
    # (haystack offset, needle index); the target goes first among equal offsets so depth 0 means "first token".
    places = sorted([(round(depth * hay_len), 0)] + [(rng.randint(0, hay_len), i) for i in range(1, n_keys)])
    tokens: List[int] = []
    spans: Dict[int, tuple] = {}
    cut = 0
    for offset, i in places:
        tokens += hay[cut:offset]
        spans[i] = (len(tokens), len(tokens) + len(needles[i]))
        tokens += needles[i]
        cut = offset
    tokens += hay[cut:] + query
    assert len(tokens) == context
    return NeedleCase(tokens, keys[0], values[0], depth, spans[0][0], [spans[i] for i in range(n_keys)], hay_len)


def answer_is_correct(generated: str, value: str) -> bool:
    """Exact: the first whitespace-delimited word, without one trailing full stop, equals the value."""
    words = generated.split()
    return bool(words) and (words[0][:-1] if words[0].endswith(".") else words[0]) == value


@torch.no_grad()
def run_needles(model, tokenizer: Tokenizer, pool: Sequence[int], contexts: Sequence[int], depths: Sequence[float],
                n_keys: int, trials: int, batch_size: int, seed: int) -> dict:
    """Accuracy per (context, depth) over `trials` cases each, greedy decoding in batches of equal-length prompts."""
    rng = random.Random(seed)
    accuracy: Dict[str, Dict[str, float]] = {}
    examples = []
    pad = tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod
    for context in contexts:
        accuracy[str(context)] = {}
        for depth in depths:
            cases = [build_case(pool, tokenizer, context, depth, n_keys, rng) for _ in range(trials)]
            answers = []
            for i in range(0, trials, batch_size):
                batch = cases[i:i + batch_size]
                budget = max(len(tokenizer.encode(f" {c.value}.")) for c in batch) + 2
                new = generate(model, [c.tokens for c in batch], budget, Sampling(temperature=0.0),
                               vocab=tokenizer.vocab_size, pad=pad, stop=tokenizer.eod)
                answers += [tokenizer.decode(t for t in row if t != tokenizer.eod) for row in new]
            right = [answer_is_correct(a, c.value) for a, c in zip(answers, cases)]
            accuracy[str(context)][f"{depth:g}"] = sum(right) / trials
            examples.append({"context": context, "depth": depth, "key": cases[0].key, "value": cases[0].value,
                             "answer": answers[0], "correct": right[0]})
    return {"keys": n_keys, "trials": trials, "seed": seed, "accuracy": accuracy, "examples": examples}
