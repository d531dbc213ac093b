"""Hugging Face export: AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) reproduces our logits."""

from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "diffv2-test-hf-modules"))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffv2.export_hf import REMOTE_FILES, main as export_main, verify, write_hf  # noqa: E402
from diffv2.generate import Sampling, generate  # noqa: E402
from diffv2.inference import load_model  # noqa: E402
from tests.test_inference import VARIANTS, tiny_model, train_tiny  # noqa: E402

EXPORT_VARIANTS = list(VARIANTS) + ["diffv2_tied"]


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory) -> Path:
    """A real training run with tied embeddings (no lm_head module at all)."""
    tmp = tmp_path_factory.mktemp("export")
    return train_tiny(tmp / "run", tmp / "cache", "model.tie_embeddings=true")


def load_hf(out: Path):
    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()


def max_logit_diff(ours, theirs, tokens) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


def test_export_command_round_trip_with_tied_embeddings(tied_run, tmp_path, capsys):
    out = tmp_path / "hf"
    export_main(["--checkpoint", str(tied_run), "--out", str(out)])
    assert "exported" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                               *REMOTE_FILES}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_diffv2.DiffV2ForCausalLM"
    assert config["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "embed.weight" in f.keys() and not any(k.startswith("lm_head") for k in f.keys())
    ours, theirs = load_model(tied_run, torch.device("cpu")), load_hf(out)
    assert theirs.lm_head is None  # the embedding matrix is the output matrix
    tokens = torch.randint(0, 264, (2, 48), generator=torch.Generator().manual_seed(0))
    assert max_logit_diff(ours, theirs, tokens) < 1e-5


@pytest.mark.parametrize("variant", EXPORT_VARIANTS)
def test_exported_model_reproduces_logits(variant, tmp_path):
    """fp32, max |logits - ours| < 1e-5 for every attention variant, ablation and tied/untied embeddings."""
    model = tiny_model(variant.removesuffix("_tied"), tie_embeddings=variant.endswith("_tied"), vocab_size=258)
    write_hf(model, "byte", tmp_path / variant)
    tokens = torch.randint(0, 258, (3, 37), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(model, load_hf(tmp_path / variant), tokens) < 1e-5


@pytest.mark.parametrize("variant", ["diffv2", "baseline", "diffv1"])
def test_transformers_generate_with_left_padding_matches_ours(variant, tmp_path):
    """HF generate (its DynamicCache, attention_mask, per-row positions) = our cached greedy decoding."""
    model = tiny_model(variant, vocab_size=258)
    write_hf(model, "byte", tmp_path)
    prompts = [list(b"Hello there, general"), list(b"import")]
    ours = generate(model, prompts, 6, Sampling(0.0), vocab=258, pad=257)
    width = max(map(len, prompts))
    ids = torch.tensor([[257] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    theirs = load_hf(tmp_path).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                        eos_token_id=None, pad_token_id=257)
    assert theirs[:, width:].tolist() == ours


def test_bf16_export_matches_rounded_weights(tmp_path):
    model = tiny_model("diffv2", vocab_size=258)
    write_hf(model, "byte", tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.attn.lambda_proj.weight").dtype == torch.bfloat16
    assert verify(model, tmp_path) < 1e-5


def test_tokenizer_json_runs_ship_their_tokenizer(tmp_path):
    """A run trained with a tokenizer.json exports it; AutoTokenizer then encodes as our tokenizer does."""
    from transformers import AutoTokenizer

    from data.tokenizer import train_bpe

    texts = ["def main():\n    return 0\n", "The secret code for amber is 1234567."] * 50
    ours = train_bpe(texts, 300, str(tmp_path / "tokenizer.json"))
    write_hf(tiny_model("diffv2", vocab_size=300), str(tmp_path / "tokenizer.json"), tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "The secret code for amber is 7654321.\ndef f(): return 1"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == ours.eod
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == ours.eod


def test_modeling_files_are_self_contained():
    """The remote-code files import only the standard library, torch and transformers (and each other)."""
    allowed = {"math", "typing", "torch", "transformers"}
    for name in REMOTE_FILES:
        tree = ast.parse((ROOT / "diffv2" / "hf" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (name, node.module)
