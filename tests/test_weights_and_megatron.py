"""Weights in and out (diffv2/infer/weights.py), and this project's data next to Megatron-LM's tools.

Megatron: `python -m data.prepare --tokenizer bpe:N` writes PREFIX.tokenizer/, a directory transformers' AutoTokenizer
loads with eos = the end-of-document id (Megatron-LM's `tools/preprocess_data.py --append-eod` appends
`tokenizer.eod`, which is `eos_token_id`: None from tokenizer.json alone), and the documents tokenized by that
directory and written as preprocess_data.py writes them (megatron-core's IndexedDatasetBuilder, EOD appended) are the
same bytes as data.prepare's, read identically by megatron-core's IndexedDataset and by data/dataset.py.

Weights: `python -m diffv2.infer.weights export` writes a checkpoint's model (one process or sharded over ranks) as a plain
safetensors file with torch alone; `load_initial_weights` puts it, or an export_hf directory, into a fresh model bit
for bit, refuses any mismatch with one line, and `train.py trainer.init_from=FILE` starts from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "diffv2-test-hf-modules"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cli_runs import (DIST_STEPS, SMALL, checkpoint_tensors, compose_cfg, error_line, metrics,  # noqa: E402
                      prepare as prepare_cli, run_env, run_watched, train)
from diffv2.infer import weights  # noqa: E402
from diffv2.model import weight_files  # noqa: E402
from diffv2.config import AttentionConfig, ModelConfig, MoEConfig  # noqa: E402
from diffv2.infer.export_hf import export as export_hf, write_hf  # noqa: E402
from diffv2.model.weight_files import save_safetensors  # noqa: E402
from diffv2.infer.inference import load_model, model_config  # noqa: E402
from diffv2.model.transformer import Transformer  # noqa: E402
from diffv2.model.weight_files import load_initial_weights  # noqa: E402

# Documents with code, non-ASCII text and a spelled special token (text, not EOD), so the tokenizers must agree on
# byte-level pieces, merges and special-token handling; the repeats give the BPE something to merge.
DOCS = ["def main():\n    return 0\n", "The secret code for amber is 1234567.", "héllo wörld ✓ 日本語 " * 3,
        "text that spells <|endoftext|> stays text", "import os\nprint(os.getcwd())\n" * 2] * 12 + \
       [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(40)]
BLOCK_IMPORTS = "import sys; sys.modules['transformers'] = sys.modules['safetensors'] = None; "


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def assert_same_state(model: Transformer, expected: dict) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    bad = [k for k in state if not bits_equal(state[k], expected[k])]
    assert not bad, f"differ: {bad}"


# =============================================================================================== Megatron tools
@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    """`python -m data.prepare corpus.jsonl --out ours --tokenizer bpe:320` (the real command line)."""
    root = tmp_path_factory.mktemp("megatron")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    proc = prepare_cli(str(corpus), "--out", str(root / "ours"), "--tokenizer", "bpe:320", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_bpe_tokenizer_directory_loads_in_transformers_and_megatron_with_eod(bpe_data):
    """PREFIX.tokenizer/ = tokenizer.json + tokenizer_config.json + special_tokens_map.json: AutoTokenizer gives
    eos_token_id = EOD and pad_token_id = pad (Megatron-LM's legacy _HuggingFaceTokenizer.eod is eos_token_id), a length
    limit that never truncates or warns, the same ids as data.prepare's tokenizer (a spelled <|endoftext|> stays
    text); megatron-core's HuggingFaceTokenizer (preprocess_data.py's default path) gives the same eod and ids; and
    its tokenizer.json is PREFIX.tokenizer.json (the same tokenizer name for data.tokenizer)."""
    from transformers import AutoTokenizer

    from data.tokenizer import load_tokenizer

    manifest = json.loads((bpe_data / "ours.manifest.json").read_text())
    eod, pad, vocab = (manifest["tokenizer"][k] for k in ("eod", "pad", "vocab_size"))
    directory = bpe_data / "ours.tokenizer"
    assert sorted(p.name for p in directory.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                           "tokenizer_config.json"]
    assert (directory / "tokenizer.json").read_bytes() == (bpe_data / "ours.tokenizer.json").read_bytes()
    assert json.loads((directory / "special_tokens_map.json").read_text()) == {"eos_token": "<|endoftext|>",
                                                                               "pad_token": "<|pad|>"}
    hf = AutoTokenizer.from_pretrained(str(directory))
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id, len(hf)) == (eod, pad, None, vocab)
    assert hf.model_max_length >= 10**18
    ours = load_tokenizer(str(bpe_data / "ours.tokenizer.json"))
    assert load_tokenizer(str(directory / "tokenizer.json")).name == ours.name == manifest["tokenizer"]["name"]
    for doc in DOCS:
        assert hf(doc).input_ids == ours.encode(doc), doc
    assert eod not in hf(DOCS[3]).input_ids

    from megatron.core.tokenizers import MegatronTokenizer

    # what megatron.core.tokenizers.text.utils.build_tokenizer passes for --tokenizer-type HuggingFaceTokenizer with
    # preprocess_data.py's defaults (Megatron-LM core_v0.16.1)
    mt = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(directory), metadata_path={"library": "huggingface"}, vocab_file=None, merges_file=None,
        additional_special_tokens=[], use_fast=False, trust_remote_code=False, include_special_tokens=False)
    assert (mt.eod, mt.vocab_size) == (eod, vocab)
    for doc in DOCS:
        assert mt.tokenize(doc) == ours.encode(doc), doc


def megatron_preprocess(docs: list[str], tokenize, eod: int, vocab_size: int, prefix: Path) -> None:
    """Megatron-LM tools/preprocess_data.py (core_v0.16.1) for one JSON key, no sentence splitting, --append-eod:
    Encoder.encode (ids of the document, then eod; one 'sentence' per document) and Partition.process_json_file
    (IndexedDatasetBuilder of DType.optimal_dtype(vocab_size), add_document(ids, lengths), finalize)."""
    from megatron.core.datasets import indexed_dataset

    builder = indexed_dataset.IndexedDatasetBuilder(str(prefix) + ".bin",
                                                    dtype=indexed_dataset.DType.optimal_dtype(vocab_size))
    for doc in docs:
        doc_ids = tokenize(doc)
        sentence_lens = [len(doc_ids)] if doc_ids else []
        if doc_ids:
            doc_ids = doc_ids + [eod]
            sentence_lens[-1] += 1
        builder.add_document(doc_ids, sentence_lens)
    builder.finalize(str(prefix) + ".idx")


def test_prepared_data_is_megatron_preprocess_data_output_byte_for_byte(bpe_data, tmp_path):
    """The same documents through the tokenizer directory as preprocess_data.py takes them (AutoTokenizer, eod =
    eos_token_id) and megatron-core's own builder: the .bin and .idx are byte-identical to data.prepare's;
    megatron-core's IndexedDataset reads the same sequences and document boundaries (each document + EOD) from both;
    and data/dataset.py (megatron's GPTDataset through build_datasets) gives the same training and validation samples.
    (Megatron-LM core_v0.16.1's real tools/preprocess_data.py, run by hand on such a directory with --append-eod, wrote
    the same bytes through both its tokenizer paths; from tokenizer.json alone it fails: eod is None.)"""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from data.dataset import build_datasets
    from data.tokenizer import load_tokenizer
    from diffv2.config import DataConfig

    hf = AutoTokenizer.from_pretrained(str(bpe_data / "ours.tokenizer"))
    theirs = tmp_path / "megatron_text_document"
    megatron_preprocess(DOCS, lambda text: hf(text).input_ids, hf.eos_token_id, len(hf), theirs)
    ours = bpe_data / "ours"
    for suffix in (".bin", ".idx"):
        assert (Path(str(ours) + suffix)).read_bytes() == Path(str(theirs) + suffix).read_bytes(), suffix

    tok = load_tokenizer(str(bpe_data / "ours.tokenizer.json"))
    expected = [tok.encode(d) + [tok.eod] for d in DOCS]
    a, b = IndexedDataset(str(ours)), IndexedDataset(str(theirs))
    assert len(a) == len(b) == len(DOCS)
    assert np.array_equal(a.document_indices, b.document_indices)
    assert np.array_equal(a.document_indices, np.arange(len(DOCS) + 1))
    for i, ids in enumerate(expected):
        assert a[i].tolist() == b[i].tolist() == ids, i

    def samples(prefix: Path, cache: Path) -> tuple[list, list]:
        cfg = DataConfig(prefixes=[str(prefix)], tokenizer=tok.spec, seq_len=32, split="90,10,0",
                         cache_dir=str(cache))
        train_ds, valid_ds = build_datasets(cfg, 1234, tok, num_samples={"train": 64, "valid": 8})
        return [x.tolist() for x in train_ds], [x.tolist() for x in valid_ds]

    ours_train, ours_valid = samples(ours, tmp_path / "cache_ours")
    theirs_train, theirs_valid = samples(theirs, tmp_path / "cache_theirs")
    assert len(ours_train) >= 64 and len(ours_valid) >= 8
    assert ours_train == theirs_train and ours_valid == theirs_valid
    assert any(tok.eod in s for s in ours_train)  # samples cross document boundaries: EODs where Megatron puts them


# =============================================================================================== weights
@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real 3-step training run (byte tokenizer, untied embeddings): (its checkpoint, the data cache)."""
    tmp = tmp_path_factory.mktemp("weights")
    proc = train(tmp / "src", tmp / "cache", "trainer.max_steps=3", "trainer.log_interval=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "src" / "checkpoints" / "step_00000003", tmp / "cache"


def export_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m diffv2.infer.weights export ...` with the base install: transformers and safetensors made unimportable."""
    code = BLOCK_IMPORTS + f"from diffv2.infer.weights import main; main({['export', *args]!r})"
    return run_watched([sys.executable, "-c", code], env=run_env())


def fresh_model(ckpt: Path, seed: int = 123) -> Transformer:
    """A newly built model of the checkpoint's config, initialised from another seed than the source."""
    from diffv2.train import checkpoint

    torch.manual_seed(seed)
    return Transformer(model_config(checkpoint.read_meta(ckpt)["model"]))


def test_export_round_trip_is_bit_identical(source_run, tmp_path):
    """checkpoint -> `python -m diffv2.infer.weights export` (torch alone) -> safetensors (the safetensors library reads it,
    our names, the config in its metadata) -> load_initial_weights into a fresh model: every tensor bit-identical to
    the checkpoint's model and identical logits; --dtype bf16 gives the rounded weights; RUN picks its newest."""
    from safetensors import safe_open

    ckpt, _ = source_run
    source = load_model(ckpt, torch.device("cpu"))
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    out = tmp_path / "w" / "weights.safetensors"
    proc = export_cli("--checkpoint", str(ckpt.parent.parent), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}: {len(expected)} tensors" in proc.stdout and str(ckpt) in proc.stdout
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(expected) and "lm_head.weight" in f.keys()
        assert all(bits_equal(f.get_tensor(k), v) for k, v in expected.items())
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["diffv2.step"] == "3"
    assert json.loads(meta["diffv2.model_config"]) == dataclasses.asdict(source.cfg)

    model = fresh_model(ckpt)
    assert not bits_equal(model.embed.weight, source.embed.weight)
    assert load_initial_weights(model, str(out)) is None
    assert_same_state(model, expected)
    tokens = torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), source(tokens))

    half = tmp_path / "half.safetensors"
    proc = export_cli("--checkpoint", str(ckpt), "--out", str(half), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = fresh_model(ckpt)
    load_initial_weights(model, half)
    assert model.embed.weight.dtype == torch.float32  # the model keeps its dtype; the values are the rounded ones
    assert_same_state(model, {k: v.to(torch.bfloat16).float() for k, v in expected.items()})


def moe_tied_model(seed: int, **kw) -> Transformer:
    """Tied embeddings (no lm_head at all) and MoE with a shared expert and nonzero expert biases (a buffer)."""
    torch.manual_seed(seed)
    cfg = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96, vocab_size=264,
               max_seq_len=64, tie_embeddings=True,
               moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32, n_shared_experts=1, balance="aux_free"))
    cfg.update(kw)
    model = Transformer(ModelConfig(**cfg))
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.expert_bias.normal_(0.0, 0.1)
    return model.eval()


def test_hf_export_directory_loads(source_run, tmp_path):
    """A directory of `python -m diffv2.infer.export_hf` (model.safetensors under our names) loads bit for bit: a real run's
    export, a tied-embedding MoE model's (expert biases included), and the same split into two shards with a
    model.safetensors.index.json, as transformers' save_pretrained writes large models."""
    ckpt, _ = source_run
    out = export_hf(ckpt, tmp_path / "hf")
    model = fresh_model(ckpt)
    load_initial_weights(model, out)
    assert_same_state(model, load_model(ckpt, torch.device("cpu")).state_dict())

    source = moe_tied_model(seed=1)
    write_hf(source, "byte", tmp_path / "moe")
    model = moe_tied_model(seed=2)
    load_initial_weights(model, tmp_path / "moe")
    assert_same_state(model, source.state_dict())
    tokens = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), source(tokens))

    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "config.json").write_bytes((tmp_path / "moe" / "config.json").read_bytes())
    state = weights.weights_state(source)
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_safetensors({k: state[k] for k in part}, shards / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = moe_tied_model(seed=3)
    load_initial_weights(model, shards)
    assert_same_state(model, source.state_dict())


def small_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    attention = kw.pop("attention", {})
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96, vocab_size=264,
                max_seq_len=64)
    return Transformer(ModelConfig(**{**base, **kw}, attention=AttentionConfig(**attention)))


def _file(tmp: Path, model: Transformer, edit=None, config: bool = True) -> Path:
    state = weights.weights_state(model)
    if edit:
        edit(state)
    meta = {"format": "pt", **({weight_files.CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg))} if config else {})}
    save_safetensors(state, tmp / "w.safetensors", metadata=meta)
    return tmp / "w.safetensors"


MISMATCHES = {  # case -> (make the weights for small_model(), words the one-line error must hold)
    "wrong shape": (lambda t: _file(t, small_model(), lambda s: s.update({"norm.weight": torch.ones(63)})),
                    ["norm.weight has shape [63] but this model's norm.weight has [64]", "config"]),
    "missing key": (lambda t: _file(t, small_model(), lambda s: s.pop("blocks.1.mlp.down_proj.weight")),
                    ["missing blocks.1.mlp.down_proj.weight", "build the model with"]),
    "unexpected key": (lambda t: _file(t, small_model(), lambda s: s.update({"blocks.2.norm1.weight": torch.ones(64)})),
                       ["unexpected blocks.2.norm1.weight", "build the model with"]),
    "other model config": (lambda t: _file(t, small_model(n_layers=3, d_model=96)),
                           ["of another model (d_model=96, n_layers=3; this model has d_model=64, n_layers=2)",
                            "build the model with model.d_model=96 model.n_layers=3"]),
    "same shapes, other pairing": (lambda t: _file(t, small_model(attention={"pairing": "half_split"})),
                                   ["attention.pairing=half_split", "model.attention.pairing=half_split"]),
    "tied weights, no config recorded": (lambda t: _file(t, small_model(tie_embeddings=True), config=False),
                                         ["missing lm_head.weight", "model.tie_embeddings=true"]),
    "export_hf directory of another model": (lambda t: write_hf(small_model(head_dim=32), "byte", t / "hf"),
                                             ["head_dim=32; this model has head_dim=16", "model.head_dim=32"]),
    "integer tensor": (lambda t: _file(t, small_model(), lambda s: s.update({"norm.weight": torch.ones(64).long()})),
                       ["norm.weight is torch.int64 but this model's norm.weight is torch.float32"]),
    "not a safetensors file": (lambda t: (t / "w.safetensors").write_bytes(b"\x10" * 64) and t / "w.safetensors",
                               ["is not a safetensors weights file", "python -m diffv2.infer.weights export"]),
    "truncated file": (lambda t: (t / "w.safetensors").write_bytes(_file(t, small_model()).read_bytes()[:-100])
                       and t / "w.safetensors", ["do not hold F32", "is not a safetensors weights file"]),
    "no such path": (lambda t: t / "nope.safetensors", ["not found", "python -m diffv2.infer.weights export"]),
    "directory without weights": (lambda t: t, ["holds no model.safetensors", "python -m diffv2.infer.export_hf"]),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatches_are_one_line_value_errors_and_change_nothing(case, tmp_path):
    make, words = MISMATCHES[case]
    path = make(tmp_path)
    model = small_model(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_initial_weights(model, path)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert_same_state(model, before)


def test_a_meta_device_model_is_refused_with_the_fix(tmp_path):
    path = weights.write_weights(small_model(), tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = small_model()
    with pytest.raises(ValueError, match=r"meta device .* set parallel.meta_init=false, or load them after the engine"):
        load_initial_weights(model, path)


def test_loads_into_fsdp2_sharded_parameters(tmp_path):
    """After the engine has sharded the model (DTensor parameters, FSDP2 on a one-rank gloo mesh), each rank gets its
    piece of the file's tensors: what a trainer that loads after materialising a meta-device model relies on."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    source = small_model(seed=1)
    path = weights.write_weights(source, tmp_path / "w.safetensors")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = small_model(seed=2)
        mesh = init_device_mesh("cpu", (1,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert hasattr(model.embed.weight, "full_tensor")
        load_initial_weights(model, path)
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    assert state.keys() == source.state_dict().keys()
    assert all(bits_equal(state[k], v) for k, v in source.state_dict().items())


def test_export_command_errors_are_one_line(source_run, tmp_path, capsys):
    """A bad --dtype, --out a directory, a missing checkpoint, a DeepSpeed checkpoint: exit 2, one `error:` line,
    nothing written."""
    from diffv2.train import checkpoint

    ckpt, _ = source_run
    deepspeed = tmp_path / "ds" / "checkpoints" / "step_00000003"
    deepspeed.mkdir(parents=True)
    for f in ckpt.iterdir():
        (deepspeed / f.name).write_bytes(f.read_bytes())
    meta = checkpoint.read_meta(deepspeed)
    (deepspeed / "meta.json").write_text(json.dumps({**meta, "engine": "deepspeed"}))
    out = ["--out", str(tmp_path / "out.safetensors")]
    cases = [(["--checkpoint", str(ckpt), "--dtype", "int8", *out], "--dtype=int8 is not one of fp32"),
             (["--checkpoint", str(ckpt), "--out", str(tmp_path)], "is a directory; give a file path"),
             (["--checkpoint", str(tmp_path / "nope"), *out], "is not a usable checkpoint"),
             (["--checkpoint", str(deepspeed), *out], "written by parallel.engine=deepspeed")]
    for args, words in cases:
        with pytest.raises(SystemExit) as exit_:
            weights.main(["export", *args])
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
        assert not (tmp_path / "out.safetensors").exists()


def test_sharded_expert_parallel_checkpoint_exports(source_run, tmp_path):
    """A checkpoint written by 2 ranks (torchrun, FSDP2-sharded parameters, MoE experts split by parallel.ep=2, each
    rank's under NAME.ep{r}of2) exports to the full model: every tensor equal to the checkpoint's own shards put
    together, and it loads into a fresh one-process model."""
    _, cache = source_run
    moe = ["model=moe_tiny", "model.vocab_size=264", "model.moe.balance=aux_free", "trainer.max_steps=2"]
    proc = train(tmp_path / "ep", cache, *DIST_STEPS, *moe, "parallel.ep=2", "parallel.meta_init=true", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ep" / "checkpoints" / "step_00000002"
    out = tmp_path / "ep.safetensors"
    proc = export_cli("--checkpoint", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    saved = {k.removeprefix("model/"): v for k, v in checkpoint_tensors(ckpt).items() if k.startswith("model/")}
    expected = {}
    for name, value in saved.items():
        if ".experts." in name:
            base = name.rsplit(".ep", 1)[0]
            expected[base] = torch.cat([saved[f"{base}.ep{r}of2"] for r in range(2)])
        else:
            expected[name] = value
    assert any(".experts." in k for k in expected) and any(k.endswith("expert_bias") for k in expected)
    model = fresh_model(ckpt)
    load_initial_weights(model, out)
    assert_same_state(model, expected)


def test_train_init_from_starts_from_the_exported_weights(source_run, tmp_path):
    """`train.py trainer.init_from=weights.safetensors`: a fresh run whose first-step loss is the source model's loss
    on that run's first batch (the same two micro-batches, computed here from the source checkpoint), bit for bit."""
    from data.dataset import build_datasets
    from data.tokenizer import load_tokenizer

    ckpt, cache = source_run
    out = tmp_path / "weights.safetensors"
    proc = export_cli("--checkpoint", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "from_weights"
    proc = train(run, cache, "trainer.max_steps=1", "trainer.log_interval=1", f"trainer.init_from={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = next(m["train/loss"] for m in metrics(run) if m.get("step") == 1 and "train/loss" in m)

    cfg = compose_cfg(*SMALL, f"data.cache_dir={cache}", "trainer.max_steps=1")
    t = cfg.trainer
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_ds, _ = build_datasets(cfg.data, cfg.seed, tokenizer, num_samples={
        "train": t.max_steps * t.global_batch_size, "valid": t.eval_batches * t.micro_batch_size})
    source = load_model(ckpt, torch.device("cpu")).train()
    accum = t.global_batch_size // t.micro_batch_size
    step_loss = torch.zeros(())
    with torch.no_grad():
        for micro in range(accum):  # the trainer's loop: micro-batches in order, ce / accum summed
            tokens = torch.stack([train_ds[micro * t.micro_batch_size + i] for i in range(t.micro_batch_size)])
            step_loss += source.loss(tokens[:, :-1], tokens[:, 1:])[1] / accum
    assert logged == step_loss.item()
    fresh = train(tmp_path / "fresh", cache, "trainer.max_steps=1", "trainer.log_interval=1")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert next(m["train/loss"] for m in metrics(tmp_path / "fresh") if "train/loss" in m) != logged


def test_train_init_from_a_mismatch_is_one_error_line(source_run, tmp_path):
    """Weights of another model: train.py refuses at start-up with the loader's one line (exit 2)."""
    ckpt, cache = source_run
    out = tmp_path / "weights.safetensors"
    weights.write_weights(small_model(), out)
    proc = train(tmp_path / "run", cache, "trainer.max_steps=1", f"trainer.init_from={out}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc).startswith("error: init weights") and "are of another model" in error_line(proc)
