"""EleutherAI's lm-evaluation-harness on an exported model, offline, agrees with the project's own numbers.

Skipped unless `lm_eval` is importable: `bash .ci/lm-eval` installs lm-eval[hf] 0.4.13 into a temporary venv
and runs this file (docs/lm_eval.md has the recipe). Nothing is downloaded here: the tasks are local JSON Lines
files built from the shipped sample corpus (`dataset_path: json`), with HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set.

Three tasks (written by `write_tasks`; `python tests/test_lm_eval.py tasks DIR` writes them for the recipe):
- diffv2_ppl, `loglikelihood_rolling`: paragraphs of the sample's validation documents. lm-eval's byte perplexity
  equals the project's perplexity of the same documents, each a sample [EOD] + its tokens: with the byte tokenizer
  a token is a byte, and lm-eval predicts a document's first token from the tokenizer's eos (there is no bos), as
  the training data does. Over the tokenizer's ids, as the export computes; diffv2.infer.evaluate.perplexity (softmax over
  the model's padded vocabulary) is higher by exactly the padding ids' mass, -log(1 - m) per token;
- diffv2_mc, `multiple_choice`: the true continuation of a paragraph among 4; every choice's log-likelihood equals
  the sum of the project model's token log-probabilities;
- diffv2_nextword, `generate_until`, greedy: the next word; lm-eval's generations equal `diffv2.infer.generate`'s greedy
  tokens, cut where lm-eval stops (a space or a newline).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "data" / "sample" / "python_docs.jsonl.gz"
# The validation documents of the sample's default split (98,2,0 gives the last 2 of its 77 documents to validation;
# data/sample/README.md): text the trained models never saw.
VALID_SOURCES = ("using/unix.rst.txt", "using/windows.rst.txt")
N_PPL, N_MC, N_GEN = 24, 32, 32
UNTIL = [" ", "\n"]
MAX_GEN_TOKS = 16


def paragraphs() -> List[str]:
    docs = {d["source"]: d["text"] for d in map(json.loads, gzip.open(SAMPLE, "rt", encoding="utf-8"))}
    out = []
    for source in VALID_SOURCES:
        for para in re.split(r"\n\s*\n", docs[source]):
            para = para.strip()
            words = para.split()
            # prose paragraphs: at least 24 words, mostly letters (not tables, directives or code)
            if 200 <= len(para.encode()) <= 1000 and len(words) >= 24 and \
                    sum(c.isalpha() or c.isspace() for c in para) > 0.9 * len(para):
                out.append(para)
    return out


def cut_at_word(text: str, at: int) -> int:
    """The index of the first word start at or after `at` (a non-space after a space)."""
    m = re.compile(r"(?<=\s)\S").search(text, at)
    return m.start() if m else len(text)


def task_docs() -> Dict[str, List[dict]]:
    paras = paragraphs()
    assert len(paras) >= max(N_PPL, N_MC + 3, N_GEN), len(paras)
    ppl = [{"text": p} for p in paras[:N_PPL]]
    mc = []
    for i in range(N_MC):
        # the context ends at a word's end, the choices start with the whitespace that follows it (lm-eval would
        # otherwise move a context's trailing whitespace into every continuation)
        ctx_end = len(paras[i][:cut_at_word(paras[i], 80)].rstrip())
        space = re.match(r"\s+", paras[i][ctx_end:]).group(0)
        conts = []
        for k in range(4):  # the true continuation first, then the same span of the next 3 paragraphs
            p = paras[(i + k) % len(paras)]
            start = ctx_end + len(space) if k == 0 else cut_at_word(p, 80)
            conts.append(space + p[start:cut_at_word(p, start + 40)].rstrip())
        label = i % 4  # the true one at a varying place
        choices = conts[1:label + 1] + [conts[0]] + conts[label + 1:]
        mc.append({"context": paras[i][:ctx_end], "choices": choices, "label": label})
    gen = []
    for i in range(N_GEN):
        p = paras[i]
        at = cut_at_word(p, 60 + 7 * i % 90)
        gen.append({"context": p[:at], "target": re.match(r"\S+", p[at:]).group(0)})
    return {"diffv2_ppl": ppl, "diffv2_mc": mc, "diffv2_nextword": gen}


def task_yaml(name: str, data: Path) -> str:
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    metric = "  - metric: {}\n    aggregation: {}\n    higher_is_better: {}\n".format
    if name == "diffv2_ppl":
        return head + ("output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\n"
                       "metric_list:\n" + metric("word_perplexity", "weighted_perplexity", "false")
                       + metric("byte_perplexity", "weighted_perplexity", "false")
                       + metric("bits_per_byte", "bits_per_byte", "false"))
    if name == "diffv2_mc":
        return head + ("output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
                       "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n"
                       + metric("acc", "mean", "true") + metric("acc_norm", "mean", "true"))
    return head + ("output_type: generate_until\ndoc_to_text: context\ndoc_to_target: target\n"
                   "target_delimiter: \"\"\ngeneration_kwargs:\n  until: [\" \", \"\\n\"]\n  do_sample: false\n"
                   f"  max_gen_toks: {MAX_GEN_TOKS}\nmetric_list:\n" + metric("exact_match", "mean", "true"))


def write_tasks(out: Path) -> Dict[str, List[dict]]:
    """DIR/NAME.jsonl and DIR/NAME.yaml per task (absolute data paths: lm-eval reads them from any directory)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs = task_docs()
    for name, rows in docs.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"{name}.yaml").write_text(task_yaml(name, out / f"{name}.jsonl"))
    return docs


def project_perplexity(ckpt: Path, texts: List[str]) -> dict:
    """The project's perplexity of the documents, each a sample [eod] + its tokens (fp32, CPU), two ways:
    - `perplexity`: diffv2.infer.evaluate.perplexity, what `python -m diffv2.infer.evaluate` and train/val_loss compute: softmax
      over the model's whole (padded) vocabulary, `model.vocab_size` rows;
    - `perplexity_tokenizer_ids`: softmax over the tokenizer's ids only, as the export computes it (it gives the
      padding ids a logit of -inf). `pad_mass` is the mean probability the model puts on padding ids; per token,
      the two log-likelihoods differ by exactly -log(1 - that token's pad mass).
    Word perplexity: the same log-likelihood per whitespace-separated word, as lm-eval counts words."""
    import torch

    from data.tokenizer import load_tokenizer
    from diffv2.infer.evaluate import perplexity
    from diffv2.infer.inference import load_model, run_config

    tokenizer = load_tokenizer(run_config(ckpt).data.tokenizer)
    model = load_model(ckpt, torch.device("cpu"))
    samples = [torch.tensor([tokenizer.eod] + tokenizer.encode(t)) for t in texts]
    result = perplexity(model, samples, batch_size=1, max_samples=len(samples), autocast_dtype=None, eod=None)
    nll_full = nll_ids = pad_mass = correction = 0.0
    with torch.no_grad():
        for s in samples:
            logits = model(s[None, :-1])[0].double()
            target = s[1:, None]
            nll_full -= logits.log_softmax(-1).gather(-1, target).sum().item()
            nll_ids -= logits[:, :tokenizer.vocab_size].log_softmax(-1).gather(-1, target).sum().item()
            mass_N = logits.softmax(-1)[:, tokenizer.vocab_size:].sum(-1)
            pad_mass += mass_N.sum().item()
            correction -= torch.log1p(-mass_N).sum().item()
    tokens, words = result["tokens"], sum(len(re.split(r"\s+", t)) for t in texts)
    return {**result, "loss_recomputed": nll_full / tokens, "loss_tokenizer_ids": nll_ids / tokens,
            "perplexity_tokenizer_ids": math.exp(nll_ids / tokens), "words": words,
            "word_perplexity": math.exp(nll_full / words), "word_perplexity_tokenizer_ids": math.exp(nll_ids / words),
            "pad_mass": pad_mass / tokens, "pad_correction": correction / tokens, "model_vocab": model.cfg.vocab_size, "tokenizer_ids": tokenizer.vocab_size}


if __name__ != "__main__":
    import pytest

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "diffv2-test-hf-modules"))
    if os.environ.get("DIFFV2_REQUIRE_LM_EVAL") == "1":  # .ci/lm-eval: an import failure fails, never skips
        import lm_eval
    else:
        lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: `bash .ci/lm-eval` installs it into "
                                                       "a temporary venv and runs this file")


def test_task_docs_are_stable_and_distinct():
    docs = task_docs()
    assert [len(v) for v in docs.values()] == [N_PPL, N_MC, N_GEN]
    for row in docs["diffv2_mc"]:
        assert len(set(row["choices"])) == 4 and all(row["choices"])
    assert all(row["target"] and not re.search(r"\s", row["target"]) for row in docs["diffv2_nextword"])


def test_lm_eval_matches_the_project(tmp_path_factory):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from data.tokenizer import load_tokenizer
    from diffv2.infer.export_hf import main as export_main
    from diffv2.infer.generate import Sampling, generate
    from diffv2.infer.inference import load_model
    from cli_runs import train_tiny

    tmp = tmp_path_factory.mktemp("lm_eval")
    ckpt = train_tiny(tmp / "run", tmp / "cache")  # a real 4-step train.py run
    export_main(["--checkpoint", str(ckpt), "--out", str(tmp / "export")])
    docs = write_tasks(tmp / "tasks")
    out = simple_evaluate(model="hf", model_args=f"pretrained={tmp / 'export'},trust_remote_code=True,dtype=float32",
                          tasks=list(docs), task_manager=TaskManager(include_path=str(tmp / "tasks")), device="cpu",
                          batch_size=4, log_samples=True)
    results, samples = out["results"], out["samples"]

    # perplexity: lm-eval's byte (= token) and word perplexity are the project's over the tokenizer's ids; the
    # project's evaluate/validation perplexity (softmax over the padded vocabulary) differs by the padding ids' mass
    ours = project_perplexity(ckpt, [d["text"] for d in docs["diffv2_ppl"]])
    ppl = results["diffv2_ppl"]
    assert ours["tokens"] == sum(len(d["text"].encode()) for d in docs["diffv2_ppl"])
    assert ours["loss_recomputed"] == pytest.approx(ours["loss"], rel=1e-6)
    assert ppl["byte_perplexity,none"] == pytest.approx(ours["perplexity_tokenizer_ids"], rel=1e-5)
    assert ppl["word_perplexity,none"] == pytest.approx(ours["word_perplexity_tokenizer_ids"], rel=1e-5)
    assert ppl["bits_per_byte,none"] == pytest.approx(ours["loss_tokenizer_ids"] / math.log(2), rel=1e-5)
    assert ours["loss_recomputed"] - ours["loss_tokenizer_ids"] == pytest.approx(ours["pad_correction"], rel=1e-6)
    assert ours["pad_mass"] > 0 and ours["perplexity"] > ppl["byte_perplexity,none"]
    print(f"\nlm-eval byte perplexity {ppl['byte_perplexity,none']:.6f} = ours over the tokenizer's ids "
          f"{ours['perplexity_tokenizer_ids']:.6f}; diffv2.infer.evaluate.perplexity {ours['perplexity']:.6f} (padding mass "
          f"{ours['pad_mass']:.2e}); word perplexity {ppl['word_perplexity,none']:.4f} = "
          f"{ours['word_perplexity_tokenizer_ids']:.4f}")

    # multiple choice: each choice's log-likelihood is the sum of our token log-probabilities given the context
    model = load_model(ckpt, torch.device("cpu"))
    tokenizer = load_tokenizer("byte")
    vocab = tokenizer.vocab_size
    with torch.no_grad():
        for s in samples["diffv2_mc"]:
            ctx = tokenizer.encode(s["doc"]["context"])
            for choice, resp in zip(s["doc"]["choices"], s["filtered_resps"]):
                cont = tokenizer.encode(choice)
                logits = model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1:, :vocab].double()
                ll = logits.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
                assert resp[0] == pytest.approx(ll, abs=1e-4)

    # greedy generation: lm-eval's text is diffv2.infer.generate's greedy tokens, cut at the first stop string
    rows = samples["diffv2_nextword"]
    new = generate(model, [tokenizer.encode(s["doc"]["context"]) for s in rows], MAX_GEN_TOKS, Sampling(0.0),
                   vocab=vocab, pad=tokenizer.pad, stop=tokenizer.eod)
    for s, ids in zip(rows, new):
        text = tokenizer.decode(t for t in ids if t != tokenizer.eod)
        cut = min([text.index(u) for u in UNTIL if u in text] + [len(text)])
        assert s["resps"][0][0] == text[:cut]
    exact = sum(s["resps"][0][0] == s["doc"]["target"] for s in rows) / len(rows)
    assert results["diffv2_nextword"]["exact_match,none"] == pytest.approx(exact)


if __name__ == "__main__":  # the recipe's helpers (docs/lm_eval.md)
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["tasks"] and len(sys.argv) == 3:
        for name, rows in write_tasks(Path(sys.argv[2])).items():
            print(f"{Path(sys.argv[2]) / name}.yaml: {len(rows)} documents")
    elif sys.argv[1:2] == ["perplexity"] and len(sys.argv) == 4:
        from diffv2.infer.inference import checkpoint_dir

        texts = [json.loads(line)["text"] for line in Path(sys.argv[3]).read_text().splitlines()]
        print(json.dumps(project_perplexity(checkpoint_dir(sys.argv[2]), texts), indent=1))
    else:
        sys.exit("usage: python tests/test_lm_eval.py tasks DIR | perplexity RUN_OR_CHECKPOINT DIR/diffv2_ppl.jsonl")
