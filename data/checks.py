"""Cheap validation of prepared data before megatron-core builds its indices.

Every check raises a one-line ValueError naming the file, the problem and the fix, because megatron itself would
fail later with an assertion, an infinite loop (a split with no tokens) or silently wrong embeddings (ids past
the vocabulary).
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np

from data.tokenizer import Tokenizer

FULL_SCAN_TOKENS = 1 << 27  # up to this many tokens the max-id check reads the whole .bin (<= 512 MB)
SCAN_WINDOWS = 64  # larger files: this many evenly spaced windows (a wrong tokenizer shows up everywhere)
SCAN_WINDOW_TOKENS = 1 << 20
SPLIT_NAMES = ("train", "valid", "test")
INDEX_HEADER = b"MMIDIDX\x00\x00"  # first bytes of every Megatron .idx file
INDEX_FIXED = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequence count, document count


def _prepare_hint(prefix: str, tokenizer: Tokenizer) -> str:
    return f"run python -m data.prepare INPUT --out {prefix} --tokenizer {tokenizer.spec}"


def read_manifest(prefix: str) -> Optional[dict]:
    path = prefix + ".manifest.json"
    if not os.path.isfile(path):
        return None  # data prepared by other tools (e.g. Megatron-LM) has no manifest; fall back to scanning
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: unreadable manifest ({err.msg}) (delete it or re-run python -m data.prepare)"
        ) from None


def _max_token_id(bin_path: str, dtype: np.dtype, n_tokens: int) -> int:
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    if n_tokens <= FULL_SCAN_TOKENS:
        return int(tokens.max())
    starts = np.linspace(0, n_tokens - SCAN_WINDOW_TOKENS, SCAN_WINDOWS).astype(np.int64)
    return max(int(tokens[s : s + SCAN_WINDOW_TOKENS].max()) for s in starts)


def check_prefix(prefix: str, tokenizer: Tokenizer) -> np.ndarray:
    """Validate one .bin/.idx pair against `tokenizer`; return its token count per sequence (int64).

    Megatron splits train/valid/test by sequence; data.prepare writes one sequence per document.
    """
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"missing {path} (give data.prefixes without .bin/.idx, or {_prepare_hint(prefix, tokenizer)})"
            )
    _check_index_layout(idx_path, prefix, tokenizer)
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # after the cheap checks: importing takes seconds

    try:
        with warnings.catch_warnings():
            # megatron-core 0.19 warns that it "could not determine rank" when it logs outside a process group.
            warnings.filterwarnings("ignore", message="Could not determine rank")
            index = IndexedDataset(prefix, mmap=False)
        lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
        dtype = np.dtype(index.index.dtype)
    except (AssertionError, IndexError, ValueError, struct.error) as err:  # megatron asserts on a bad header
        raise ValueError(
            f"{idx_path}: not a readable Megatron index ({err}) ({_prepare_hint(prefix, tokenizer)})"
        ) from None
    n_tokens = int(lengths.sum())
    expected, actual = n_tokens * dtype.itemsize, os.path.getsize(bin_path)
    if actual != expected:
        raise ValueError(
            f"{bin_path} has {actual} bytes but its index describes {expected} (truncated or from another run; "
            f"{_prepare_hint(prefix, tokenizer)})"
        )
    manifest = read_manifest(prefix)
    if manifest is None:
        max_id = _max_token_id(bin_path, dtype, n_tokens) if n_tokens else -1
    else:
        _check_manifest(prefix, manifest, dtype, n_tokens, tokenizer)
        max_id = int(manifest["max_token_id"])
    if max_id >= tokenizer.vocab_size:
        raise ValueError(
            f"{bin_path} contains token id {max_id} >= vocab size {tokenizer.vocab_size} of tokenizer "
            f"{tokenizer.name} (set data.tokenizer to the tokenizer the data was prepared with, "
            f"or {_prepare_hint(prefix, tokenizer)})"
        )
    return lengths


def _check_index_layout(idx_path: str, prefix: str, tokenizer: Tokenizer) -> None:
    """Header and size of a .idx, checked here because megatron's IndexedDataset, failing on a damaged index, also
    raises from its __del__ (a second traceback after our one-line error)."""
    with open(idx_path, "rb") as f:
        fixed = f.read(INDEX_FIXED.size)
    if len(fixed) < INDEX_FIXED.size or not fixed.startswith(INDEX_HEADER):
        raise ValueError(f"{idx_path}: not a Megatron index (bad header) ({_prepare_hint(prefix, tokenizer)})")
    _, _, _, sequences, documents = INDEX_FIXED.unpack(fixed)
    expected = INDEX_FIXED.size + sequences * (4 + 8) + documents * 8  # lengths int32, pointers and doc ids int64
    actual = os.path.getsize(idx_path)
    if actual not in (expected, expected + sequences):  # + one int8 mode per sequence in multimodal indexes
        raise ValueError(
            f"{idx_path} has {actual} bytes but its header describes {expected} (truncated or from another run; "
            f"{_prepare_hint(prefix, tokenizer)})"
        )


def _check_manifest(prefix: str, manifest: dict, dtype: np.dtype, n_tokens: int, tokenizer: Tokenizer) -> None:
    path = prefix + ".manifest.json"
    if manifest.get("dtype") != dtype.name:
        raise ValueError(
            f"dtype mismatch: {prefix}.idx stores {dtype.name} but {path} says {manifest.get('dtype')} "
            f"(the files come from different runs; {_prepare_hint(prefix, tokenizer)})"
        )
    if manifest.get("tokens") != n_tokens:
        raise ValueError(
            f"{path} lists {manifest.get('tokens')} tokens but {prefix}.idx holds {n_tokens} "
            f"(the files come from different runs; {_prepare_hint(prefix, tokenizer)})"
        )
    prepared = manifest.get("tokenizer", {})
    if prepared.get("name") != tokenizer.name:
        raise ValueError(
            f"tokenizer mismatch: {prefix} was prepared with {prepared.get('name')} ({prepared.get('spec')}) "
            f"but data.tokenizer gives {tokenizer.name} "
            f"(set data.tokenizer={prepared.get('spec')} or {_prepare_hint(prefix, tokenizer)})"
        )


def parse_split(split: str) -> List[float]:
    """Megatron's "train,valid,test" weights, normalised; rejects what megatron would assert on."""
    parts = split.split(",")
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\s*\d+(\.\d*)?\s*", p) for p in parts):
        raise ValueError(
            f"bad data.split {split!r} (give up to three non-negative weights train,valid,test such as 98,2,0)"
        )
    weights = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if weights[0] <= 0:
        raise ValueError(f"bad data.split {split!r}: the train weight must be > 0 (e.g. 98,2,0)")
    return [w / sum(weights) for w in weights]


def split_ranges(n_documents: int, split: str) -> List[Optional[Tuple[int, int]]]:
    """Document index range of each split, computed exactly as megatron's builder does (None = split unused)."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    matrix = convert_split_vector_to_split_matrix(parse_split(split))
    return [None if m is None else (int(round(m[0] * n_documents)), int(round(m[1] * n_documents))) for m in matrix]


def check_splits(prefix: str, lengths: np.ndarray, split: str, seq_len: int) -> None:
    """Each used split must hold at least one sample (seq_len + 1 tokens); megatron loops forever on zero."""
    for name, rng in zip(SPLIT_NAMES, split_ranges(len(lengths), split)):
        if rng is None:
            continue
        tokens = int(lengths[rng[0] : rng[1]].sum())
        if tokens < seq_len + 1:
            raise ValueError(
                f"{prefix}: the {name} split of data.split={split} gets {rng[1] - rng[0]} of {len(lengths)} documents "
                f"= {tokens} tokens, fewer than data.seq_len+1 = {seq_len + 1} (use more data, a smaller data.seq_len "
                f"or another data.split)"
            )


def check_weights(prefixes: Sequence[str], weights: Optional[Sequence[float]]) -> None:
    if weights is None:
        return
    if len(weights) != len(prefixes):
        raise ValueError(
            f"data.weights has {len(weights)} entries but data.prefixes has {len(prefixes)} "
            "(give one weight per prefix, or none)"
        )
    if any(not w > 0 for w in weights):
        raise ValueError(f"data.weights {list(weights)} must all be > 0 (drop a prefix instead of weighting it 0)")


NPY_MAGIC = b"\x93NUMPY"


def check_index_cache(cache: str) -> None:
    """megatron-core reads its cached indices (`data.cache_dir/index/*.npy`) with numpy.load(allow_pickle=True,
    mmap_mode="r"). That refuses object arrays inside a .npy, but numpy unpickles a file that does not start with the
    .npy magic (and opens a zip as .npz): a pickle planted there would run code. Refuse such files unread."""
    if not os.path.isdir(cache):
        return
    for name in sorted(os.listdir(cache)):
        path = os.path.join(cache, name)
        if not name.endswith(".npy") or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        if not NPY_MAGIC.startswith(head):  # empty or a prefix of the magic: another rank writing it now
            raise ValueError(
                f"{path} is not a .npy array (it starts {head!r}); megatron-core would load it with "
                f"allow_pickle=True, which runs code from a pickle. Delete it (the index is rebuilt) and check who "
                f"can write to data.cache_dir")
