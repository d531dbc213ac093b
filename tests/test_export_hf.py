"""Hugging Face export: AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) reproduces our logits, and
transformers' generate() and pipeline('text-generation') decode what `python -m diffv2.infer.generate` decodes.

Runs against the installed transformers; .ci/transformers-oldest runs this file against the oldest one the
`transformers>=4.56,<6` pin allows.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "diffv2-test-hf-modules"))

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.tokenizer import ByteTokenizer  # noqa: E402
from watched import run_watched  # noqa: E402
from diffv2.config import MoEConfig  # noqa: E402
from diffv2.infer.export_hf import REMOTE_FILES, main as export_main, verify, write_hf  # noqa: E402
from diffv2.infer.generate import Sampling, generate, main as generate_main  # noqa: E402
from diffv2.infer.inference import load_model  # noqa: E402
from cli_runs import train_tiny  # noqa: E402
from tests.builders import VARIANTS, tiny_model  # noqa: E402

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
BYTE = ByteTokenizer()  # 258 ids: bytes, 256 = end of document, 257 = pad
MOE = {  # the framework's MoE switches; weights drawn so that routing is far from uniform
    "moe": dict(n_experts=4, top_k=2, expert_hidden=32, n_shared_experts=1),
    "moe_sigmoid_aux_free_capacity": dict(n_experts=4, top_k=2, expert_hidden=32, router="sigmoid",
                                          balance="aux_free", capacity_factor=1.0),
}
EXPORT_VARIANTS = list(VARIANTS) + ["diffv2_tied"] + list(MOE)
GENERATE_VARIANTS = ["diffv2", "baseline", "diffv1", "moe"]
PROMPTS = [list(b"Hello there, general"), list(b"import"), list(b"The tutorial")]  # 20, 6 and 12 tokens


def export_model(variant: str, **kw):
    """tiny_model of a VARIANTS entry, `_tied`, or an MoE entry (attention DIFF V2, random expert biases)."""
    if variant in MOE:
        model = tiny_model("diffv2", moe=MoEConfig(**MOE[variant]), **kw)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for block in model.blocks:
                for name, p in block.mlp.named_parameters():
                    p.normal_(0.0, 1 / math.sqrt(p.shape[-2] if name.startswith("experts.") else p.shape[-1]),
                              generator=gen)
                block.mlp.expert_bias.normal_(0.0, 0.1, generator=gen)
        return model
    return tiny_model(variant.removesuffix("_tied"), tie_embeddings=variant.endswith("_tied"), **kw)


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory) -> Path:
    """A real training run with tied embeddings (no lm_head module at all); byte tokenizer, vocab padded to 264."""
    tmp = tmp_path_factory.mktemp("export")
    return train_tiny(tmp / "run", tmp / "cache", "model.tie_embeddings=true")


def load_hf(out: Path):
    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()


def max_logit_diff(ours, theirs, tokens, vocab: int) -> float:
    """Over the tokenizer's ids; the padded ids beyond them must be -inf in transformers' logits."""
    with torch.no_grad():
        theirs_BNV = theirs(tokens).logits
        assert bool((theirs_BNV[..., vocab:] == float("-inf")).all())
        return (ours(tokens)[..., :vocab] - theirs_BNV[..., :vocab]).abs().max().item()


def left_padded(prompts, pad: int = BYTE.pad):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ============================================================================================ export, logits
def test_export_command_round_trip_with_tied_embeddings(tied_run, tmp_path, capsys):
    out = tmp_path / "hf"
    export_main(["--checkpoint", str(tied_run), "--out", str(out)])
    assert "exported" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json", *REMOTE_FILES}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_diffv2.DiffV2ForCausalLM"
    assert config["tie_word_embeddings"] is True
    assert (config["vocab_size"], config["tokenizer_vocab_size"]) == (264, BYTE.vocab_size)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "embed.weight" in f.keys() and not any(k.startswith("lm_head") for k in f.keys())
    ours, theirs = load_model(tied_run, torch.device("cpu")), load_hf(out)
    assert theirs.lm_head is None  # the embedding matrix is the output matrix
    tokens = torch.randint(0, BYTE.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    assert max_logit_diff(ours, theirs, tokens, BYTE.vocab_size) < 1e-5


@pytest.mark.parametrize("variant", EXPORT_VARIANTS)
def test_exported_model_reproduces_logits(variant, tmp_path):
    """fp32, max |logits - ours| < 1e-5 for every attention variant, ablation, tied/untied embeddings and MoE
    (softmax router with a shared expert; sigmoid router with expert biases and a capacity limit that drops)."""
    model = export_model(variant, vocab_size=258)
    write_hf(model, "byte", tmp_path / variant)
    tokens = torch.randint(0, 258, (3, 37), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(model, load_hf(tmp_path / variant), tokens, 258) < 1e-5


def test_weights_file_is_standard_safetensors(tmp_path):
    """Written with torch alone: the safetensors library reads every tensor back bit for bit, parameters in the
    export dtype, the MoE expert bias (routing state, fp32 in the framework) unrounded."""
    model = export_model("moe_sigmoid_aux_free_capacity", vocab_size=258)
    write_hf(model, "byte", tmp_path, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict())
        for name, ours in model.state_dict().items():
            theirs = f.get_tensor(name)
            assert theirs.dtype == (torch.bfloat16 if name in params else torch.float32), name
            assert torch.equal(theirs, ours.to(theirs.dtype)), name


def test_bf16_export_matches_rounded_weights(tmp_path):
    model = tiny_model("diffv2", vocab_size=258)
    write_hf(model, "byte", tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.attn.lambda_proj.weight").dtype == torch.bfloat16
    assert verify(model, tmp_path) < 1e-5


def test_forward_takes_transformers_arguments(tmp_path):
    """The forward arguments of transformers' own decoders: the cache under either name (`cache` from transformers
    5, `past_key_values` in 4) and back in the output under the installed version's name, inputs_embeds,
    logits_to_keep, labels; a static cache is refused."""
    model = tiny_model("diffv2", vocab_size=258)
    write_hf(model, "byte", tmp_path)
    theirs = load_hf(tmp_path)
    ids = torch.randint(0, 258, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full_BNV = theirs(ids).logits
        assert torch.equal(theirs(inputs_embeds=theirs.embed(ids)).logits, full_BNV)
        assert (theirs(ids, logits_to_keep=1).logits - full_BNV[:, -1:]).abs().max() < 1e-5  # other matmul shape
        for name in ("cache", "past_key_values"):
            out = theirs(ids[:, :7], use_cache=True)
            cache = out.cache if "cache" in type(out).__dataclass_fields__ else out.past_key_values
            assert cache.get_seq_length() == 7
            step = theirs(ids[:, 7:], **{name: cache})
            assert (step.logits - full_BNV[:, 7:]).abs().max() < 1e-5, name
        with pytest.raises(ValueError, match="not both"):
            theirs(ids[:, 7:], cache=cache, past_key_values=cache)
        loss = theirs(ids, labels=ids).loss
        ours = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert torch.allclose(loss, ours)
    with pytest.raises(ValueError, match="DynamicCache"):
        theirs.generate(ids, max_new_tokens=2, cache_implementation="static")


# ============================================================================================ generate
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("variant", GENERATE_VARIANTS)
def test_transformers_generate_with_left_padding_matches_ours(variant, use_cache, tmp_path):
    """HF greedy generate (its cache passed under its version's name, attention_mask, per-row positions) = our
    cached greedy decoding, 12 tokens of 3 left-padded prompts; and with use_cache=False (full forward per step)."""
    model = export_model(variant, vocab_size=258)
    write_hf(model, "byte", tmp_path)
    ours = generate(model, PROMPTS, 12, Sampling(0.0), vocab=258, pad=BYTE.pad)
    ids, mask = left_padded(PROMPTS)
    theirs = load_hf(tmp_path).generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                        use_cache=use_cache, eos_token_id=None, pad_token_id=BYTE.pad)
    assert theirs[:, ids.shape[1]:].tolist() == ours


@pytest.mark.parametrize("variant", ["diffv2", "moe"])
def test_transformers_generate_one_prompt_matches_ours(variant, tmp_path):
    """No padding (generate then passes no attention_mask): every cached step must see the whole prefix."""
    model = export_model(variant, vocab_size=258)
    write_hf(model, "byte", tmp_path)
    ours = generate(model, PROMPTS[:1], 24, Sampling(0.0), vocab=258, pad=BYTE.pad)
    theirs = load_hf(tmp_path).generate(input_ids=torch.tensor(PROMPTS[:1]), max_new_tokens=24, do_sample=False,
                                        eos_token_id=None, pad_token_id=BYTE.pad)
    assert theirs[:, len(PROMPTS[0]):].tolist() == ours


@pytest.mark.parametrize("variant", ["diffv2", "diffv1"])
def test_transformers_sampling_matches_ours_seed_for_seed(variant, tmp_path):
    """Temperature sampling, seeded: transformers draws from the global generator what ours draws from its own
    generator with the same seed, so the tokens are the same; with and without the cache."""
    model = export_model(variant, vocab_size=258)
    write_hf(model, "byte", tmp_path)
    theirs_model = load_hf(tmp_path)
    ids, mask = left_padded(PROMPTS)
    for seed in (0, 1):
        ours = generate(model, PROMPTS, 10, Sampling(1.5), vocab=258, pad=BYTE.pad,
                        generator=torch.Generator().manual_seed(seed))
        for use_cache in (True, False):
            torch.manual_seed(seed)
            theirs = theirs_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                           temperature=1.5, top_k=0, top_p=1.0, use_cache=use_cache,
                                           eos_token_id=None, pad_token_id=BYTE.pad)
            assert theirs[:, ids.shape[1]:].tolist() == ours, (seed, use_cache)


def test_padded_vocabulary_is_never_generated(tmp_path):
    """The embedding is padded past the tokenizer (264 rows for 258 byte ids): config.json keeps the tokenizer's
    size and those ids get -inf logits, so even when their rows would win, generate() never emits them."""
    model = tiny_model("diffv2", vocab_size=264)
    with torch.no_grad():
        model.lm_head.weight[258:] = 10 * model.lm_head.weight[:6]  # the padded rows would win every step
    write_hf(model, "byte", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tokenizer_vocab_size"] == 258
    theirs = load_hf(tmp_path)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        logits_BNV = theirs(input_ids=ids, attention_mask=mask).logits
    assert bool((logits_BNV[..., 258:] == float("-inf")).all()) and bool(logits_BNV[..., :258].isfinite().all())
    for sample in (False, True):
        torch.manual_seed(0)
        new = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=sample,
                              eos_token_id=None, pad_token_id=BYTE.pad)[:, ids.shape[1]:]
        assert int(new.max()) < 258, new
    ours = generate(model, PROMPTS, 16, Sampling(0.0), vocab=258, pad=BYTE.pad)
    assert theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=BYTE.pad)[:, ids.shape[1]:].tolist() == ours


def test_pipeline_matches_generate_command(tied_run, tmp_path, capsys):
    """pipeline('text-generation') on the export of a real run (byte tokenizer, padded vocab, batched prompts of
    different lengths) prints what `python -m diffv2.infer.generate --greedy` prints."""
    from transformers import pipeline

    prompts = ["Hello", "import os\n\nThe tutorial"]
    out = tmp_path / "hf"
    export_main(["--checkpoint", str(tied_run), "--out", str(out)])
    capsys.readouterr()
    generate_main(["--checkpoint", str(tied_run), "--greedy", "--max-new-tokens", "16", "--device", "cpu",
                   *[a for p in prompts for a in ("--prompt", p)]])
    ours = capsys.readouterr().out
    pipe = pipeline("text-generation", model=str(out), trust_remote_code=True, dtype=torch.float32)
    theirs = pipe(prompts, max_new_tokens=16, do_sample=False, batch_size=2)
    assert "".join(f"=== {p}\n{row[0]['generated_text']}\n\n" for p, row in zip(prompts, theirs)) == ours


# ============================================================================================ tokenizer, files
def no_prompt(monkeypatch) -> list:
    """transformers asks 'Do you wish to run the custom code? [y/N]' through input(): record any such question."""
    asked: list = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "n")
    return asked


def test_tokenizer_json_runs_ship_their_tokenizer(tmp_path, monkeypatch):
    """A run trained with a tokenizer.json exports it with a standard tokenizer_config.json: AutoTokenizer needs
    no custom code, encodes as ours (text spelling a special token stays text), pads left; eos/pad named, no bos."""
    from data.tokenizer import train_bpe

    texts = ["def main():\n    return 0\n", "The secret code for amber is 1234567."] * 50
    ours = train_bpe(texts, 300, str(tmp_path / "tokenizer.json"))
    write_hf(tiny_model("diffv2", vocab_size=320), str(tmp_path / "tokenizer.json"), tmp_path / "hf")
    asked = no_prompt(monkeypatch)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    assert not asked
    assert isinstance(theirs, transformers.PreTrainedTokenizerFast)
    text = "The secret code for amber is 7654321.\ndef f(): return 1<|endoftext|>"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id) == (ours.eod, ours.pad, None)
    assert theirs.padding_side == "left"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (ours.eod, ours.pad)
    assert (config["vocab_size"], config["tokenizer_vocab_size"]) == (320, ours.vocab_size)


def test_byte_runs_ship_an_equivalent_tokenizer(tmp_path, monkeypatch):
    """The byte tokenizer as a standard tokenizers file: ids are the UTF-8 bytes, 256 = eos, 257 = pad."""
    write_hf(tiny_model("diffv2", vocab_size=264), "byte", tmp_path)
    asked = no_prompt(monkeypatch)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=False)
    assert not asked
    texts = ["Hello there, general", "  two  spaces\n\ttab", "ünïcödé ✓ 日本語 🙂", "<|endoftext|><|pad|>"]
    for text in texts:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids == BYTE.encode(text), text
        decoded = theirs.decode(ids + [BYTE.eod], skip_special_tokens=True)
        assert decoded == BYTE.decode(ids + [BYTE.eod]) == text
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id) == (BYTE.eod, BYTE.pad, None)
    assert theirs.padding_side == "left"
    batch = theirs(["import os", "x"], padding=True)
    assert set(batch) == {"input_ids", "attention_mask"}  # no token_type_ids: generate(**batch) takes the batch
    assert batch["input_ids"][1] == [BYTE.pad] * 8 + [ord("x")] and batch["attention_mask"][1] == [0] * 8 + [1]


@pytest.mark.xfail(TRANSFORMERS_MAJOR >= 5, strict=True,
                   reason="transformers 5's AutoTokenizer loads config.json through AutoConfig before the tokenizer "
                          "files, and config.json's auto_map (the model's remote code) makes AutoConfig ask; "
                          "pass trust_remote_code=False (or True) there")
def test_autotokenizer_without_trust_remote_code_does_not_ask(tmp_path, monkeypatch):
    write_hf(tiny_model("diffv2", vocab_size=264), "byte", tmp_path)
    asked = no_prompt(monkeypatch)
    assert AutoTokenizer.from_pretrained(str(tmp_path)).eos_token_id == BYTE.eod
    assert not asked


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_exported_files_get_the_modes_of_normal_files(umask, tmp_path):
    """Every file is created as open() creates files (0666 less the umask), also over an older export."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")
    os.chmod(out / "model.safetensors", 0o600 if umask == 0o022 else 0o644)
    saved = os.umask(umask)
    try:
        write_hf(tiny_model("diffv2", vocab_size=258), "byte", out)
    finally:
        os.umask(saved)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert modes == {name: oct(0o666 & ~umask) for name in modes} and len(modes) == 7, modes


def test_export_needs_only_torch_and_verify_names_the_extra(tied_run, tmp_path):
    """With the base install (no transformers, no safetensors): the export works, and --verify fails with one
    `error:` line naming the extra, before writing anything."""
    blocked = "import sys; sys.modules['transformers'] = sys.modules['safetensors'] = None; "

    def export(out: Path, *extra: str) -> subprocess.CompletedProcess:
        code = blocked + (f"from diffv2.infer.export_hf import main; main(['--checkpoint', {str(tied_run)!r}, "
                          f"'--out', {str(out)!r}{''.join(f', {a!r}' for a in extra)}])")
        return run_watched([sys.executable, "-c", code], env={**os.environ, "WANDB_MODE": "disabled"})

    proc = export(tmp_path / "verified", "--verify")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --verify loads OUT with transformers: it needs the hf extra "
                                                "(transformers is not installed); pip install -e '.[hf]'"]
    assert not (tmp_path / "verified").exists()
    proc = export(tmp_path / "plain")
    assert proc.returncode == 0, proc.stderr
    ours, theirs = load_model(tied_run, torch.device("cpu")), load_hf(tmp_path / "plain")
    tokens = torch.randint(0, BYTE.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    assert max_logit_diff(ours, theirs, tokens, BYTE.vocab_size) < 1e-5


def test_modeling_files_are_self_contained():
    """The remote-code files import only the standard library, torch and transformers (and each other)."""
    allowed = {"math", "typing", "torch", "transformers"}
    for name in REMOTE_FILES:
        tree = ast.parse((ROOT / "diffv2" / "infer" / "hf" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (name, node.module)
