"""Tokenizers with the small interface megatron-core's GPTDataset reads (`eod`, `pad`, `vocab_size`,
`unique_identifiers`) plus `encode`/`decode` and a content-derived `name`.

`name` identifies the vocabulary, not the file location: it is written into every data manifest and compared
at training time, so a tokenizer.json that was moved still matches and one that was edited does not.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, List, Optional, Tuple

# Tried in order when a tokenizer.json does not name its end-of-document token explicitly.
EOD_CANDIDATES: Tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
PAD_CANDIDATES: Tuple[str, ...] = ("<|pad|>", "<pad>", "[PAD]")
NO_PAD = -1  # megatron-core's own "no pad token" id; never occurs in the data


class Tokenizer:
    """Base: subclasses set `name`, `vocab_size`, `eod`, `pad` and implement encode/decode."""

    name: str
    spec: str  # what load_tokenizer() takes to rebuild this tokenizer (worker processes do exactly that)
    vocab_size: int
    eod: int
    pad: int

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        # Part of megatron's dataset cache key: a different vocabulary must never hit the same index cache.
        return OrderedDict(
            [("class", type(self).__name__), ("name", self.name), ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, EOD = 256, PAD = 257 (vocab_size 258). Needs no files.

    PAD never appears in prepared data; it exists so batch padding has an id distinct from EOD.
    """

    name = "byte"
    spec = "byte"
    vocab_size = 258
    eod = 256
    pad = 257

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # Special ids are dropped; a sequence cut mid-character decodes with U+FFFD instead of raising.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json. EOD is `eod_token` or the first of EOD_CANDIDATES present."""

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as _HF

        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file not found: {path} (give data.tokenizer=byte or a path to tokenizer.json)")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        try:
            self._tok = _HF.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(
                f"cannot load tokenizer {path}: {err} (give a tokenizer.json saved by HF tokenizers)"
            ) from None
        self.spec = os.path.abspath(path)
        self.name = f"hf-{digest[:16]}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eod_token,) if eod_token else EOD_CANDIDATES
        eod = next((i for i in map(self._tok.token_to_id, candidates) if i is not None), None)
        if eod is None:
            raise ValueError(
                f"tokenizer {path} has no end-of-document token (looked for {', '.join(candidates)}); "
                "add one as a special token or retrain with python -m data.prepare --tokenizer bpe:VOCAB"
            )
        self.eod = eod
        self.pad = next((i for i in map(self._tok.token_to_id, PAD_CANDIDATES) if i is not None), NO_PAD)
        # Text that spells a special token ("<|endoftext|>" in a document) stays text: only data.prepare puts EOD.
        self._tok.encode_special_tokens = True

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The embedding must have a row for every id the tokenizer can emit (larger is fine: padding for speed)."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the vocabulary of tokenizer {tokenizer.name} "
            f"({tokenizer.vocab_size}) (set model.vocab_size >= {tokenizer.vocab_size})"
        )


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` -> ByteTokenizer; anything else is a path to a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if not spec:
        raise ValueError("empty tokenizer spec (give data.tokenizer=byte or a path to tokenizer.json)")
    return HFTokenizer(spec)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on an iterable of documents; save tokenizer.json to `out_path`.

    Special tokens <|endoftext|> (EOD, id 0) and <|pad|> (id 1) come first so every vocabulary size keeps them.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_vocab = 256 + 2  # the byte alphabet plus the two specials
    if vocab_size < min_vocab:
        raise ValueError(f"bpe vocab size {vocab_size} is too small (give bpe:N with N >= {min_vocab})")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(out_path)
    return HFTokenizer(out_path)
