"""The evaluation command: validation perplexity and the multi-key needle-in-a-haystack test."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.dataset import build_datasets  # noqa: E402
from data.tokenizer import ByteTokenizer  # noqa: E402
from diffv2.config import DataConfig  # noqa: E402
from diffv2.infer.evaluate import main as evaluate_main, perplexity  # noqa: E402
from diffv2.infer.inference import load_model, run_config  # noqa: E402
from diffv2.infer.needle import NEEDLE, QUERY, answer_is_correct, build_case, haystack_pool  # noqa: E402
from cli_runs import train_tiny  # noqa: E402

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    return train_tiny(tmp / "run", tmp / "cache")


@pytest.fixture(scope="module")
def valid_ds(tiny_run):
    cfg = DataConfig(**OmegaConf.to_container(run_config(tiny_run).data, resolve=True))
    return build_datasets(cfg, 0, TOK, num_samples={"train": 0, "valid": 1})[1]


# ================================================================================================== perplexity
def test_perplexity_equals_exp_mean_cross_entropy(tiny_run, valid_ds):
    """exp(mean CE over every predicted token), uneven last batch included, = the same from full logits."""
    model = load_model(tiny_run, torch.device("cpu"))
    got = perplexity(model, valid_ds, batch_size=4, max_samples=10, autocast_dtype=None, eod=None)
    tokens = torch.stack([valid_ds[i] for i in range(10)])
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten())
    assert got["tokens"] == 10 * 64 and got["samples"] == 10
    assert got["loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert got["perplexity"] == pytest.approx(torch.exp(ce).item(), rel=1e-6)


def test_evaluate_command_reproduces_val_loss_and_compares_checkpoints(tiny_run, tmp_path, capsys):
    """On the trainer's 32 validation samples the command reproduces train/val_loss; given two checkpoints it
    writes RUN/eval/step_N.json for each, one combined JSON, and the tables side by side with identical cases."""
    out = tmp_path / "compare.json"
    evaluate_main(["--checkpoint", str(tiny_run), str(tiny_run.parent.parent), "--max-samples", "32",
                   "--batch-size", "8", "--needle-lengths", "600", "--needle-depths", "0", "1", "--needle-keys", "2",
                   "--needle-trials", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    val_loss = [json.loads(line) for line in (tiny_run.parent.parent / "metrics.jsonl").read_text().splitlines()
                if "train/val_loss" in line][-1]["train/val_loss"]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2
    assert results[0]["validation"]["loss"] == pytest.approx(val_loss, rel=1e-5)
    assert set(results[0]["needle"]["accuracy"]["600"]) == {"0", "1"}
    assert results[0]["needle"]["examples"] == results[1]["needle"]["examples"]
    assert json.loads((tiny_run.parent.parent / "eval" / f"{tiny_run.name}.json").read_text())["validation"]
    assert "needle retrieval accuracy" in printed and "blocks: " in printed


def test_evaluate_command_rejects_too_short_needle_context_before_work(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(tiny_run), "--needle-lengths", "100", "--needle-keys", "4"])
    assert exit_info.value.code == 2
    assert "--needle-lengths 100" in capsys.readouterr().err


def test_haystack_is_validation_text_without_eod(valid_ds):
    pool = haystack_pool(valid_ds, TOK, max_tokens=10_000)
    assert len(pool) >= 10_000 and TOK.eod not in pool
    assert "Python" in TOK.decode(pool)
    first_doc = valid_ds.dataset.dataset[int(min(valid_ds.dataset.indices))].tolist()
    assert pool[:len(first_doc) - 1] == first_doc[:-1]  # whole documents from the start of the split


# ====================================================================================================== needles
POOL = TOK.encode("The quick brown fox jumps over the lazy dog while the river keeps flowing. " * 40)


def hay_positions(case) -> list:
    """Indices of `case.tokens` that are haystack (not needle, not query)."""
    inside = {i for s, e in case.needle_spans for i in range(s, e)}
    return [i for i in range(case.haystack_len + sum(e - s for s, e in case.needle_spans)) if i not in inside]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("context,n_keys", [(400, 1), (700, 4), (1000, 6)])
def test_needle_sits_at_the_requested_depth(context, depth, n_keys):
    """The target needle is the stated text, preceded by exactly round(depth * haystack) haystack tokens; the
    prompt is `context` tokens and ends with the query about the target's key."""
    case = build_case(POOL, TOK, context, depth, n_keys, random.Random(7))
    start, end = case.needle_spans[0]
    assert start == case.target_start
    assert TOK.decode(case.tokens[start:end]) == NEEDLE.format(key=case.key, value=case.value)
    before = [i for i in hay_positions(case) if i < start]
    assert len(before) == round(depth * case.haystack_len)
    assert len(case.tokens) == context
    assert TOK.decode(case.tokens).endswith(QUERY.format(key=case.key))


def test_distractor_needles_have_other_keys_and_values():
    case = build_case(POOL, TOK, 1000, 0.5, 6, random.Random(3))
    texts = [TOK.decode(case.tokens[s:e]) for s, e in case.needle_spans]
    keys = [t.split(" for ")[1].split(" is ")[0] for t in texts]
    values = [t.split(" is ")[1].rstrip(". ") for t in texts]
    assert len(set(keys)) == len(set(values)) == 6
    assert keys[0] == case.key and values[0] == case.value
    assert TOK.decode(case.tokens).count(f"code for {case.key} is") == 2  # the needle and the query


def test_needle_cases_repeat_under_a_seed():
    a = [build_case(POOL, TOK, 700, d, 3, rng) for rng in [random.Random(5)] for d in (0.2, 0.8)]
    b = [build_case(POOL, TOK, 700, d, 3, rng) for rng in [random.Random(5)] for d in (0.2, 0.8)]
    assert a == b


@pytest.mark.parametrize("generated,correct", [
    (" 4821937.", True), ("4821937", True), (" 4821937. The", True), ("\n4821937 and more", True),
    (" 48219370", False), (" 482193", False), (" 4821937abc", False), (" 4821937..", False), ("", False),
    (" the code is 4821937", False),
])
def test_answer_check_is_exact(generated, correct):
    assert answer_is_correct(generated, "4821937") is correct
