"""Tokenizers with the small interface megatron-core's GPTDataset reads (`eod`, `pad`, `vocab_size`,
`unique_identifiers`) plus `encode`/`decode` and a content-derived `name`.

`name` identifies the vocabulary, not the file location: it is written into every data manifest and compared
at training time, so a tokenizer.json that was moved still matches and one that was edited does not.

`save_hf_dir` writes a tokenizer.json as a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) that `transformers.AutoTokenizer.from_pretrained(DIR)` loads with eos = our end-of-document
token and pad = ours: what Megatron-LM's `tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer
--tokenizer-model DIR --append-eod` needs (its `eod` is the tokenizer's `eos_token_id`, None without a config).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from typing import Iterable, List, Optional, Tuple

# Tried in order when a tokenizer.json does not name its end-of-document token explicitly.
EOD_CANDIDATES: Tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
PAD_CANDIDATES: Tuple[str, ...] = ("<|pad|>", "<pad>", "[PAD]")
NO_PAD = -1  # megatron-core's own "no pad token" id; never occurs in the data
# transformers' "no limit" (tokenization_utils_base.VERY_LARGE_INTEGER): a data tokenizer encodes documents of any
# length whole; the model's context is set at training time. A smaller value makes transformers warn on every document
# longer than it (and Megatron-LM's preprocess_data.py tokenizes whole documents).
NO_LENGTH_LIMIT = int(1e30)


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

    def hf_config(self, model_max_length: int = NO_LENGTH_LIMIT) -> dict:
        """tokenizer_config.json for transformers' standard PreTrainedTokenizerFast (no custom code): eos = our
        end-of-document token, pad = ours (eos when there is none), no bos; text that spells a special token stays
        text (split_special_tokens), as `encode` does; left padding and no token_type_ids, as diffv2.infer.export_hf."""
        pad = self.pad if self.pad >= 0 else self.eod
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                "eos_token": self._tok.id_to_token(self.eod), "pad_token": self._tok.id_to_token(pad),
                "padding_side": "left", "split_special_tokens": True,
                "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False,
                "model_max_length": model_max_length}

    def save_hf_dir(self, out_dir: str, model_max_length: int = NO_LENGTH_LIMIT) -> str:
        """Write `out_dir`/ as a Hugging Face tokenizer directory: this tokenizer.json (byte for byte, so `name` is
        the same whichever of the two files a run names), tokenizer_config.json and special_tokens_map.json. Built
        under a temporary name and renamed into place (an older directory there is replaced). Returns `out_dir`."""
        config = self.hf_config(model_max_length)
        special = {k: config[k] for k in ("eos_token", "pad_token")}
        out_dir = os.path.abspath(out_dir)
        tmp = f"{out_dir}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of this process id
        os.mkdir(tmp)  # created as any new directory (0777 less the umask), the files in it likewise
        try:
            shutil.copyfile(self.spec, os.path.join(tmp, "tokenizer.json"))
            for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    json.dump(value, f, indent=2)
                    f.write("\n")
            if os.path.isdir(out_dir) and not os.path.islink(out_dir):
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir


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
    """Train a byte-level BPE (GPT-2 style) on an iterable of documents; save tokenizer.json to `out_path`
    (`HFTokenizer.save_hf_dir` makes a transformers / Megatron-LM tokenizer directory of it).

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
