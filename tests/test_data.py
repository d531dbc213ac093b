"""data/: prepare -> read round trips, manifest, BPE, dataset determinism, blends, loader resume, and errors."""

import collections
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import data.checks as checks
import data.prepare as prep
from data.dataset import build_datasets, ensure_sample, make_loader, resolve_prefixes
from data.prepare import prepare
from data.tokenizer import check_vocab, load_tokenizer
from diffv2.config import DataConfig

# megatron-core 0.19 warns on every index it opens outside a process group, as these tests do.
pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank")
BYTE = load_tokenizer("byte")
DOCS = {
    "a.txt": "Hello world.\nSecond line: caf\u00e9 \u2603\n",
    "b.md": "# Title\n\nSome *markdown* text.",
    "blank.txt": "   \n",
}
JSONL = ["first json doc", "", "third \u00fcber doc"]


def _read_docs(prefix: str) -> List[List[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _expected(texts: List[str], tok=BYTE) -> List[List[int]]:
    return [tok.encode(t) + [tok.eod] for t in texts if t.strip()]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for name, text in DOCS.items():
        (root / name).write_text(text, encoding="utf-8")
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(JSONL))
    (root / "sub" / "c.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with gzip.open(root / "e.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS["a.txt"] * 3)
    (root / ".hidden").write_text("never read")
    return root


@pytest.mark.parametrize(
    "inputs, texts",
    [
        (["a.txt", "b.md"], [DOCS["a.txt"], DOCS["b.md"]]),
        (["sub/c.jsonl"], JSONL),
        (["e.txt.gz", "sub/d.jsonl.gz"], [DOCS["a.txt"] * 3] + JSONL),
        # a directory: sorted walk, hidden files skipped
        (["."], [DOCS["a.txt"], DOCS["b.md"], DOCS["blank.txt"], DOCS["a.txt"] * 3] + JSONL + JSONL),
    ],
    ids=["txt", "jsonl", "gz", "dir"],
)
def test_prepare_round_trip(corpus: Path, tmp_path: Path, inputs: List[str], texts: List[str]) -> None:
    manifest = prepare(
        [str(corpus / i) for i in inputs], str(tmp_path / "out" / "ds"), "byte", workers=1, progress=False
    )
    assert _read_docs(str(tmp_path / "out" / "ds")) == _expected(texts)
    assert manifest["documents"] == len(_expected(texts))
    assert manifest["empty_documents_skipped"] == len(texts) - len(_expected(texts))


def test_pool_output_matches_in_process_and_manifest(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prep, "BATCH_DOCS", 2)  # many small batches in flight, so ordering is really exercised
    one = prepare([str(corpus)], str(tmp_path / "one"), "byte", workers=1, progress=False)
    two = prepare([str(corpus)], str(tmp_path / "two"), "byte", workers=2, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    assert one == two == json.loads((tmp_path / "two.manifest.json").read_text())
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert [i["path"] for i in two["inputs"]] == [str(p) for p in files]
    assert [i["sha256"] for i in two["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert [i["bytes"] for i in two["inputs"]] == [p.stat().st_size for p in files]
    docs = _read_docs(str(tmp_path / "two"))
    assert two["tokens"] == sum(map(len, docs)) and two["documents"] == len(docs) == 7
    assert two["empty_documents_skipped"] == 3  # blank.txt and the empty JSONL record twice
    assert (two["dtype"], two["max_token_id"]) == ("uint16", BYTE.eod)
    assert two["tokenizer"] == {"name": "byte", "spec": "byte", "vocab_size": 258, "eod": 256, "pad": 257}
    assert not list(tmp_path.glob("*.tmp*"))


def test_cli(corpus: Path, tmp_path: Path, capsys) -> None:
    assert prep.main([str(corpus / "a.txt"), "--out", str(tmp_path / "cli"), "--workers", "1"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert prep.main([str(corpus / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input not found") and "\n" not in err


def test_include_globs_filter_directory_walks(corpus: Path, tmp_path: Path, capsys) -> None:
    m = prepare([str(corpus)], str(tmp_path / "inc"), "byte", workers=1, progress=False, include=["*.txt", "*.gz"])
    assert [os.path.basename(i["path"]) for i in m["inputs"]] == ["a.txt", "blank.txt", "e.txt.gz", "d.jsonl.gz"]
    assert _read_docs(str(tmp_path / "inc")) == _expected([DOCS["a.txt"], DOCS["a.txt"] * 3] + JSONL)
    named = prepare([str(corpus / "b.md")], str(tmp_path / "n"), "byte", workers=1, progress=False, include=["*.x"])
    assert named["documents"] == 1  # files named directly are kept whatever the globs
    assert prep.main([str(corpus), "--out", str(tmp_path / "none"), "--include", "*.rst"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no input files matching *.rst under directory") and "\n" not in err


def test_bpe_train_and_round_trip(corpus: Path, tmp_path: Path) -> None:
    manifest = prepare([str(corpus)], str(tmp_path / "bpe"), "bpe:300", workers=2, progress=False)
    tok = load_tokenizer(str(tmp_path / "bpe.tokenizer.json"))
    assert manifest["tokenizer"]["name"] == tok.name and tok.name.startswith("hf-")
    assert (tok.vocab_size, tok.eod, tok.pad, manifest["dtype"]) == (300, 0, 1, "uint16")
    docs = _read_docs(str(tmp_path / "bpe"))
    assert docs[0] == tok.encode(DOCS["a.txt"]) + [tok.eod]
    assert tok.decode(docs[0][:-1]) == DOCS["a.txt"]
    assert len(docs[0]) < len(DOCS["a.txt"].encode())  # merges were learned
    assert (
        tok.eod not in tok.encode("a<|endoftext|>b") and tok.decode(tok.encode("a<|endoftext|>b")) == "a<|endoftext|>b"
    )


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer file not found: .*data.tokenizer=byte"):
        load_tokenizer(str(tmp_path / "nope.json"))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "noeod.json"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path / "noeod.json"))
    with pytest.raises(ValueError, match="model.vocab_size=100 is smaller"):
        check_vocab(BYTE, 100)
    check_vocab(BYTE, 384)


def test_prepare_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text \xff\xfe more")
    with pytest.raises(ValueError, match=r"bad.txt: not valid UTF-8 at byte offset 10 .*--errors replace"):
        prepare([str(bad)], str(tmp_path / "o"), workers=1, progress=False)
    m = prepare([str(bad)], str(tmp_path / "o"), errors="replace", workers=1, progress=False)
    assert m["documents"] == 1 and BYTE.decode(_read_docs(str(tmp_path / "o"))[0]).count("\ufffd") == 2
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare([str(tmp_path / "blank.txt")], str(tmp_path / "e"), workers=1, progress=False)
    assert not (tmp_path / "e.bin").exists()
    (tmp_path / "k.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"k.jsonl:1: no string field 'text' \(pass --text-key"):
        prepare([str(tmp_path / "k.jsonl")], str(tmp_path / "k"), workers=1, progress=False)
    assert (
        prepare([str(tmp_path / "k.jsonl")], str(tmp_path / "k"), text_key="body", workers=1, progress=False)["tokens"]
        == 2
    )


# ---- datasets -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Dict[str, str]:
    """The shipped sample prepared once, plus a small second corpus for blends and error cases."""
    root = tmp_path_factory.mktemp("data")
    cache = str(root / "cache")
    small = root / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"doc {i} " + "z" * 300}) + "\n" for i in range(50)))
    prepare([str(small)], str(root / "small"), workers=1, progress=False)
    return {"root": str(root), "cache": cache, "sample": ensure_sample(cache, BYTE), "small": str(root / "small")}


def _cfg(sample: Dict[str, str], cache: str = "", **kw) -> DataConfig:
    return DataConfig(cache_dir=cache or sample["cache"], **{"seq_len": 32, **kw})


def _build(cfg: DataConfig, seed: int = 0, train: int = 2000, **kw):
    return build_datasets(cfg, seed, BYTE, num_samples={"train": train, "valid": 50}, **kw)


def test_ensure_sample_is_cached_and_atomic(sample: Dict[str, str]) -> None:
    prefix = sample["sample"]
    mtime = os.path.getmtime(prefix + ".bin")
    assert ensure_sample(sample["cache"], BYTE) == prefix and os.path.getmtime(prefix + ".bin") == mtime
    assert not [p for p in os.listdir(os.path.dirname(os.path.dirname(prefix))) if p.startswith(".tmp")]
    manifest = json.loads(Path(prefix + ".manifest.json").read_text())
    assert 1_000_000 < manifest["tokens"] < 3_000_000 and manifest["tokenizer"]["name"] == "byte"
    assert resolve_prefixes(_cfg(sample), BYTE) == [prefix]


def test_dataset_determinism_by_seed(sample: Dict[str, str], tmp_path: Path) -> None:
    train, valid = _build(_cfg(sample))
    assert len(train) >= 2000 and len(valid) >= 50
    item = train[0]
    assert item.dtype == torch.int64 and item.shape == (33,) and int(item.max()) <= BYTE.eod
    again, _ = _build(_cfg(sample, cache=str(tmp_path / "fresh")))  # rebuilt from scratch, not from the cache
    other, _ = _build(_cfg(sample), seed=1)
    first = torch.stack([train[i] for i in range(64)])
    assert torch.equal(first, torch.stack([again[i] for i in range(64)]))
    assert not torch.equal(first, torch.stack([other[i] for i in range(64)]))


def test_blend_weights(sample: Dict[str, str]) -> None:
    train, _ = _build(_cfg(sample, prefixes=[sample["sample"], sample["small"]], weights=[0.2, 0.8]))
    counts = collections.Counter(int(train.dataset[i]["dataset_id"]) for i in range(2000))
    assert abs(counts[1] / 2000 - 0.8) < 0.01
    # default weights follow token counts: the small corpus is ~1% of the tokens
    train, _ = _build(_cfg(sample, prefixes=[sample["sample"], sample["small"]]))
    counts = collections.Counter(int(train.dataset[i]["dataset_id"]) for i in range(2000))
    assert 0 < counts[1] / 2000 < 0.03


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resume(sample: Dict[str, str], num_workers: int) -> None:
    train, _ = _build(_cfg(sample, prefixes=[sample["small"]]), train=64)  # ~470 samples: one epoch of small
    full = list(make_loader(train, 4, 0, num_workers=num_workers, seed=0))
    resumed = list(make_loader(train, 4, 12, num_workers=num_workers, seed=0))
    assert len(full) == len(train) // 4 and full[0].shape == (4, 33)
    assert torch.equal(torch.cat(full[3:]), torch.cat(resumed))
    assert torch.equal(full[0][1], train[1])


def test_data_parallel_views_interleave(sample: Dict[str, str]) -> None:
    full, _ = _build(_cfg(sample))
    rank0, _ = _build(_cfg(sample), data_parallel_rank=0, data_parallel_size=2)
    rank1, _ = _build(_cfg(sample), data_parallel_rank=1, data_parallel_size=2)
    assert all(torch.equal(rank0[i], full[2 * i]) and torch.equal(rank1[i], full[2 * i + 1]) for i in range(8))
    batch = next(iter(make_loader(rank1, 2, start_sample=8)))  # 8 global samples consumed = 4 per rank
    assert torch.equal(batch[0], full[9])
    with pytest.raises(ValueError, match="multiple of the data-parallel size 2"):
        make_loader(rank1, 2, start_sample=3)


def _copy(prefix: str, dst: str) -> str:
    for suffix in (".bin", ".idx", ".manifest.json"):
        shutil.copy(prefix + suffix, dst + suffix)
    return dst


def test_dataset_errors(sample: Dict[str, str], tmp_path: Path, monkeypatch) -> None:
    def fails(match: str, tok=BYTE, **kw) -> None:
        with pytest.raises(ValueError, match=match):
            build_datasets(_cfg(sample, **kw), 0, tok, num_samples={"train": 10, "valid": 1})

    small, root = sample["small"], str(tmp_path)
    fails(r"missing .*nope.idx .*python -m data.prepare", prefixes=[root + "/nope"])
    no_bin = _copy(small, root + "/nobin")
    os.remove(no_bin + ".bin")
    fails(r"missing .*nobin.bin", prefixes=[no_bin])
    short = _copy(small, root + "/short")
    with open(short + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(short + ".bin") - 2)
    fails(r"short.bin has \d+ bytes but its index describes \d+ \(truncated", prefixes=[short])
    dtype = _copy(small, root + "/dtype")
    manifest = json.loads(Path(dtype + ".manifest.json").read_text())
    Path(dtype + ".manifest.json").write_text(json.dumps({**manifest, "dtype": "int32"}))
    fails(r"dtype mismatch: .*stores uint16 but .* says int32", prefixes=[dtype])

    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 200)
    prepare([str(corpus)], root + "/bpe", "bpe:300", workers=1, progress=False)
    fails(r"tokenizer mismatch: .*prepared with hf-.* but data.tokenizer gives byte", prefixes=[root + "/bpe"])
    os.remove(root + "/bpe.manifest.json")  # foreign data: the max id comes from scanning the .bin
    fails(r"contains token id 2\d\d >= vocab size 258 of tokenizer byte", prefixes=[root + "/bpe"])
    monkeypatch.setattr(checks, "FULL_SCAN_TOKENS", 10)  # the bounded scan of large files finds it too
    monkeypatch.setattr(checks, "SCAN_WINDOW_TOKENS", 16)
    fails(r"contains token id 2\d\d >= vocab size 258", prefixes=[root + "/bpe"])
    garbage = _copy(small, root + "/garbage")
    Path(garbage + ".idx").write_bytes(b"not an index")
    fails(r"garbage.idx: not a Megatron index \(bad header\)", prefixes=[garbage])

    fails(r"data.weights has 1 entries but data.prefixes has 2", prefixes=[small, small], weights=[1.0])
    fails(
        r"the valid split of data.split=98,2,0 gets 1 of 50 documents = \d+ tokens, fewer than data.seq_len\+1",
        prefixes=[small],
        seq_len=4096,
    )
    fails(r"bad data.split 'a,b'", split="a,b")
    fails(r"data.seq_len=0 must be >= 1", seq_len=0)
    train, valid = build_datasets(_cfg(sample, prefixes=[small], split="1,0,0"), 0, BYTE, num_samples={"train": 5})
    assert valid is None and len(train) >= 5
