"""Raw text -> Megatron indexed dataset (PREFIX.bin/.idx) + PREFIX.manifest.json.

    python -m data.prepare INPUT [INPUT ...] --out PREFIX [--tokenizer byte|PATH|bpe:VOCAB] [--workers N]
                           [--include GLOB ...]

Inputs: files or directories (walked recursively, sorted, hidden names skipped; `--include` keeps only the files
found in directories whose name matches one of the globs, e.g. `'*.rst.gz' '*.rst.txt'`). `*.jsonl` / `*.ndjson` hold one
document per line in a string field (`--text-key`); every other file is one document. `.gz` works for both.
Each document is followed by one EOD token. Output order is input order whatever the worker count.

`--tokenizer bpe:N` trains a byte-level BPE on the inputs first and writes it twice: PREFIX.tokenizer.json (pass it
as data.tokenizer) and PREFIX.tokenizer/, a Hugging Face tokenizer directory (the same tokenizer.json plus
tokenizer_config.json and special_tokens_map.json naming eos = EOD and pad) that transformers' AutoTokenizer and
Megatron-LM's `tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model PREFIX.tokenizer
--append-eod` load; that tool then writes the same .bin/.idx bytes as this one (tests/test_weights_and_megatron.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import sys
import warnings
from collections import deque
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from data.tokenizer import Tokenizer, load_tokenizer, train_bpe

TOOL_VERSION = "1"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BATCH_CHARS = 1 << 20  # documents are shipped to workers in batches of about this many characters
BATCH_DOCS = 512

_WORKER_TOKENIZER: Optional[Tokenizer] = None


class _HashingReader(io.RawIOBase):
    """Hashes the raw (possibly compressed) bytes as they are read, so inputs are read from disk once."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = self._raw.readinto(buf)
        self.sha256.update(memoryview(buf)[:n])
        self.nbytes += n
        return n


def _walk(root: str) -> Iterator[str]:
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .git, .cache and the like
        yield from (os.path.join(parent, name) for name in names if not name.startswith("."))


def list_files(inputs: Sequence[str], include: Sequence[str] = ()) -> List[str]:
    """Expand directories (recursively, sorted so the output order is reproducible) into files.

    `include`: file-name globs; files found in directories are kept only if their name matches one (files named
    directly are always kept)."""
    files: List[str] = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(_walk(path))
            if include:
                found = [f for f in found if any(fnmatch.fnmatch(os.path.basename(f), g) for g in include)]
            if not found:
                which = f" matching {' '.join(include)}" if include else ""
                raise ValueError(
                    f"no input files{which} under directory {path} (give files or a directory that holds some)"
                )
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"input not found: {path} (give existing files or directories)")
    return files


def _decode(data: bytes, path: str, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        where = "decompressed byte offset" if path.endswith(".gz") else "byte offset"
        raise ValueError(
            f"{path}: not valid UTF-8 at {where} {offset + err.start} (convert it to UTF-8 or pass --errors replace)"
        ) from None


def _jsonl_documents(stream: io.BufferedIOBase, path: str, text_key: str, errors: str) -> Iterator[str]:
    offset = 0
    for lineno, line in enumerate(stream, 1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            record = json.loads(_decode(line, path, start, errors))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg}) (give one JSON object per line)") from None
        text = record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: no string field {text_key!r} (pass --text-key with the right field)")
        yield text


def read_documents(path: str, text_key: str, errors: str, info: Dict[str, Any]) -> Iterator[str]:
    """Yield the documents of one file; fills `info` with its sha256, size and document count once exhausted."""
    count = 0
    gz = path.endswith(".gz")
    try:
        with open(path, "rb") as raw:
            hashed = _HashingReader(raw)
            stream = gzip.GzipFile(fileobj=hashed, mode="rb") if gz else io.BufferedReader(hashed)
            if path[: -3 if gz else None].endswith(JSONL_SUFFIXES):
                for doc in _jsonl_documents(stream, path, text_key, errors):
                    count += 1
                    yield doc
            else:
                count += 1
                yield _decode(stream.read(), path, 0, errors)
            while hashed.read(1 << 20):  # hash any bytes the decoder did not need
                pass
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        fix = "give a valid gzip file or drop the .gz suffix" if gz else "check the file's permissions"
        raise ValueError(f"{path}: cannot read ({err}) ({fix})") from None
    info.update(path=path, sha256=hashed.sha256.hexdigest(), bytes=hashed.nbytes, documents=count)


def _iter_corpus(files: Sequence[str], text_key: str, errors: str, infos: List[Dict[str, Any]]) -> Iterator[str]:
    for path in files:
        infos.append({})
        yield from read_documents(path, text_key, errors, infos[-1])


def _batches(docs: Iterator[str]) -> Iterator[List[str]]:
    batch: List[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_batch(docs: List[str]) -> List[np.ndarray]:
    """Token ids per document (no EOD); blank documents give an empty array so the caller can count them."""
    assert _WORKER_TOKENIZER is not None
    return [np.asarray(_WORKER_TOKENIZER.encode(d) if d.strip() else [], dtype=np.int32) for d in docs]


def _tokenize(batches: Iterator[List[str]], spec: str, workers: int) -> Iterator[List[np.ndarray]]:
    """Ordered results with at most 2*workers batches in flight, so a large corpus is never all in memory."""
    if workers <= 1:
        _init_worker(spec)
        yield from map(_encode_batch, batches)
        return
    # spawn, not fork: the caller may hold CUDA or tokenizer threads, which fork would copy in a broken state.
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (spec,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def resolve_tokenizer_spec(spec: str, files: Sequence[str], out_prefix: str, text_key: str, errors: str) -> str:
    """`bpe:N` trains a BPE on the inputs into PREFIX.tokenizer.json (and the Hugging Face directory
    PREFIX.tokenizer/) and returns that path; else `spec` as is."""
    if not spec.startswith("bpe:"):
        return spec
    try:
        vocab_size = int(spec[4:])
    except ValueError:
        raise ValueError(f"bad tokenizer spec {spec!r} (give bpe:N with an integer vocabulary size N)") from None
    path = out_prefix + ".tokenizer.json"
    train_bpe(_iter_corpus(files, text_key, errors, []), vocab_size, path).save_hf_dir(out_prefix + ".tokenizer")
    return path


def prepare(
    inputs: Sequence[str],
    out_prefix: str,
    tokenizer_spec: str = "byte",
    workers: int = 2,
    text_key: str = "text",
    errors: str = "strict",
    progress: bool = True,
    include: Sequence[str] = (),
) -> Dict[str, Any]:
    """Tokenize `inputs` into `out_prefix`.bin/.idx and write `out_prefix`.manifest.json; return the manifest.

    Outputs are written under temporary names and renamed at the end, so a crash never leaves a
    half-written dataset under the final name.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"bad errors mode {errors!r} (give strict or replace)")
    files = list_files(inputs, include)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    spec = resolve_tokenizer_spec(tokenizer_spec, files, out_prefix, text_key, errors)
    tokenizer = load_tokenizer(spec)
    spec = tokenizer.spec  # absolute, so workers and the manifest do not depend on the working directory
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # after the cheap checks

    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 below 65500 ids, else int32
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    infos: List[Dict[str, Any]] = []
    documents = empty = tokens = 0
    max_id = -1
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        with tqdm(desc=f"prepare {os.path.basename(out_prefix)}", unit="doc", disable=not progress) as bar:
            for encoded in _tokenize(_batches(_iter_corpus(files, text_key, errors, infos)), spec, workers):
                for ids in encoded:
                    if ids.size == 0:
                        empty += 1
                        continue
                    max_id = max(max_id, int(ids.max()))
                    builder.add_document(np.append(ids, tokenizer.eod), [ids.size + 1])
                    documents += 1
                    tokens += ids.size + 1
                bar.update(len(encoded))
                bar.set_postfix(tokens=tokens, refresh=False)
        builder.finalize(tmp + ".idx")
        if documents == 0:
            raise ValueError(
                f"empty corpus: {len(files)} file(s) gave 0 tokens ({empty} empty documents) "
                f"(give non-empty text files, or JSONL whose {text_key!r} field holds the text)"
            )
        manifest = {
            "tool": "data.prepare",
            "version": TOOL_VERSION,
            "documents": documents,
            "empty_documents_skipped": empty,
            "tokens": tokens,
            "max_token_id": max(max_id, tokenizer.eod),
            "dtype": np.dtype(dtype).name,
            "tokenizer": {
                "name": tokenizer.name,
                "spec": spec,
                "vocab_size": tokenizer.vocab_size,
                "eod": tokenizer.eod,
                "pad": tokenizer.pad,
            },
            "inputs": infos,
        }
        with open(tmp + ".manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
        for suffix in (".bin", ".idx", ".manifest.json"):
            os.replace(tmp + suffix, out_prefix + suffix)
        return manifest
    finally:
        for suffix in (".bin", ".idx", ".manifest.json"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="text/JSONL files (optionally .gz) or directories")
    parser.add_argument(
        "--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json"
    )
    parser.add_argument(
        "--tokenizer", default="byte",
        help="byte | path to tokenizer.json | bpe:VOCAB_SIZE (trains one: writes "
        "PREFIX.tokenizer.json and the transformers/Megatron-LM tokenizer directory PREFIX.tokenizer/)",
    )
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes (1 = in this process)")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the document text")
    parser.add_argument(
        "--errors", default="strict", choices=("strict", "replace"), help="invalid UTF-8: fail or use U+FFFD"
    )
    parser.add_argument(
        "--include", nargs="+", default=[], metavar="GLOB", help="keep only files under directories matching a glob"
    )
    args = parser.parse_args(argv)
    # megatron-core warns on import that optional GPU extensions are missing; irrelevant to writing files.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    try:
        m = prepare(
            args.inputs, args.out, args.tokenizer, args.workers, args.text_key, args.errors, include=args.include
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = m["tokenizer"]["name"]
    print(f"wrote {args.out}.bin/.idx: {m['documents']} documents, {m['tokens']} tokens ({m['dtype']}, {tokenizer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
