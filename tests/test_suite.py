"""The experiment suite: launch.suite (grids -> train.py runs, one at a time on the CPU, resumable) and
analysis.claims (Student-t p-values, verdicts, the sweep's LR pick, the report).

Unit tests on hand-made grids and on synthetic suite directories (metrics.jsonl, config.yaml and the suite's own
suite_status.json written here), and one real suite on the CPU: a two-LR sweep of tiny train.py runs on the shipped
sample corpus, the same command again (nothing to do), a phase whose run fails, a main phase whose `normal` LR comes
from that sweep, and the claims report with its plots. About 60 s on 2 cores, nearly all of it the real suite's four train.py runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest

from launch import suite as S
from analysis import claims as C

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "python_docs.jsonl.gz"
# After `--`: a 2-layer model of model=tiny's family, 4 steps of 2 x 64 tokens, one validation batch, monitors on.
TINY = ["model.vocab_size=384", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.head_dim=32", "model.ffn_hidden=128", "data.seq_len=64", "data.num_workers=0",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "trainer.max_steps=4", "trainer.eval_batches=1",
        "monitoring.enabled=true"]


def names(runs) -> list[str]:
    return [r.name for r in runs]


def write_suite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def call(main, argv) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.strip().count("\n") == 0, repr(err)
    return err


# ------------------------------------------------------------------------------------------------ launch.suite
def test_expand_is_the_cartesian_product_in_order_with_run_names():
    runs = S.expand([{"attention": ["baseline", "diffv2"], "lr": [1e-3, 2e-3], "seed": [0, 1]}], {})
    assert names(runs) == ["baseline-lr0.001-s0", "baseline-lr0.001-s1", "baseline-lr0.002-s0", "baseline-lr0.002-s1",
                           "diffv2-lr0.001-s0", "diffv2-lr0.001-s1", "diffv2-lr0.002-s0", "diffv2-lr0.002-s1"]
    assert [(r.attention, r.lr, r.seed, r.lr_name, r.overrides) for r in runs[:2]] == [
        ("baseline", 1e-3, 0, None, ()), ("baseline", 1e-3, 1, None, ())]
    # scalars for lists; the seed defaults to 0; small and large LRs keep a readable %g name
    assert names(S.expand([{"attention": "diffv2", "lr": 1.6e-2}], {})) == ["diffv2-lr0.016-s0"]
    assert S.run_name("baseline", 1e-5, 3) == "baseline-lr1e-05-s3"


def test_expand_trains_identical_runs_once_at_their_first_place():
    runs = S.expand([{"attention": "baseline", "lr": [1e-3, 2e-3]},
                     {"attention": ["diffv2", "baseline"], "lr": 2e-3, "seed": 0},
                     {"attention": "baseline", "lr": 1e-3, "seed": [0, 1]}], {})
    assert names(runs) == ["baseline-lr0.001-s0", "baseline-lr0.002-s0", "diffv2-lr0.002-s0", "baseline-lr0.001-s1"]
    # a named LR that equals a number given elsewhere is the same run; the first grid's record is kept
    runs = S.expand([{"attention": "diffv2", "lr": ["normal", 2e-3]}], {"normal": 2e-3})
    assert names(runs) == ["diffv2-lr0.002-s0"] and runs[0].lr_name == "normal"


def test_expand_resolves_named_lrs_and_refuses_unknown_ones():
    lrs = {"normal": 2e-3, "large": 1.6e-2}
    runs = S.expand([{"attention": "diffv2", "lr": ["normal", "large"], "seed": [0, 1]},
                     {"attention": "baseline", "lr": 4e-3}], lrs)
    assert [(r.name, r.lr, r.lr_name) for r in runs] == [
        ("diffv2-lr0.002-s0", 2e-3, "normal"), ("diffv2-lr0.002-s1", 2e-3, "normal"),
        ("diffv2-lr0.016-s0", 1.6e-2, "large"), ("diffv2-lr0.016-s1", 1.6e-2, "large"),
        ("baseline-lr0.004-s0", 4e-3, None)]
    with pytest.raises(ValueError, match=r"`large` is not known yet.*--lr large=VALUE"):
        S.expand([{"attention": "diffv2", "lr": ["normal", "large"]}], {"normal": 2e-3})


@pytest.mark.parametrize("grid", [{"attention": "diffv2", "lr": 1e-3, "seeds": [0, 1]},  # typo
                                  {"attention": "diffv2", "seed": 0},  # no lr
                                  {"lr": 1e-3},  # no attention
                                  {"attention": "diffv2", "lr": 1e-3, "model": "tiny"}])
def test_expand_refuses_bad_grid_keys(grid):
    with pytest.raises(ValueError, match="bad grid"):
        S.expand([grid], {})


def test_expand_refuses_one_run_name_with_two_different_models():
    grids = [{"attention": "diffv1", "lr": 1e-3, "overrides": ["model.n_kv_heads=10"]},
             {"attention": "diffv1", "lr": 1e-3}]
    with pytest.raises(ValueError, match="diffv1-lr0.001-s0 is in two grids with different overrides"):
        S.expand(grids, {})
    # the same overrides twice are the same run
    assert len(S.expand([grids[0], dict(grids[0], seed=[0, 1])], {})) == 2


def test_command_line_of_a_run(tmp_path):
    suite = {"experiment": "repro_small", "overrides": ["model=tiny", "trainer.max_steps=9"]}
    run = S.expand([{"attention": "diffv1", "lr": "large", "seed": 2, "overrides": ["model.n_kv_heads=10"]}],
                   {"large": 1.6e-2})[0]
    out, data = tmp_path / "suite", str(tmp_path / "corpus")
    cmd = S.command(suite, run, out, data, ["trainer.max_steps=4"], slot=3)
    assert cmd[:2] == [sys.executable, str(ROOT / "train.py")]
    assert cmd[2:] == ["+experiment=repro_small", "attention=diffv1", "optim.lr=0.016", "seed=2",
                       "run_name=diffv1-lr0.016-s2", f"hydra.run.dir={out}/runs/diffv1-lr0.016-s2",
                       f"data.cache_dir={out}/cache/slot3", f"data.prefixes=[{data}]",
                       f"data.tokenizer={data}.tokenizer.json",
                       # suite overrides, then the grid's, then the command line's: the later one wins in Hydra
                       "model=tiny", "trainer.max_steps=9", "model.n_kv_heads=10", "trainer.max_steps=4"]
    no_data = S.command(suite, run, out, None, [])
    assert not any(a.startswith(("data.prefixes", "data.tokenizer")) for a in no_data)
    assert no_data[-1] == "model.n_kv_heads=10" and f"data.cache_dir={out}/cache/slot0" in no_data


def test_shipped_suite_expands_and_every_arm_composes(tmp_path):
    suite = S.load_suite(ROOT / "configs" / "suite" / "repro_small.yaml")
    lrs = {"normal": 1e-3, "large": 8e-3}
    sweep, main = S.expand(suite["phases"]["sweep"], lrs), S.expand(suite["phases"]["main"], lrs)
    assert len(sweep) == 7 and len(main) == 21
    assert len(set(names(sweep)) | set(names(main))) == 26  # the 26 runs of docs/results/repro_small
    assert {r.overrides for r in main if r.attention == "diffv1"} == {("model.n_kv_heads=10",)}
    rc, out, err = call(S.main, [ROOT / "configs/suite/repro_small.yaml", "--phase", "main", "--out", tmp_path / "o",
                                 "--lr", "normal=1e-3", "large=8e-3", "--dry-run", "--", "model=tiny"])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 21 and all("train.py +experiment=repro_small" in ln and ln.endswith("model=tiny")
                                    for ln in lines)
    assert "attention=diffv1 optim.lr=0.001 seed=0 run_name=diffv1-lr0.001-s0" in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_parse_lrs():
    assert S.parse_lrs(["normal=2e-3", "large=1.6e-2"]) == {"normal": 2e-3, "large": 1.6e-2}
    assert S.parse_lrs([]) == {}
    for bad in ("normal", "=2e-3", "large=", "large=fast", "large:1e-2"):
        with pytest.raises(ValueError, match=r"bad --lr .*NAME=VALUE"):
            S.parse_lrs([bad])


SUITE_YAML = """experiment: repro_small
overrides: [model=tiny]
phases:
  sweep:
    - {attention: baseline, lr: [1.0e-3, 4.0e-3], seed: [0]}
  main:
    - {attention: [baseline, diffv2], lr: normal, seed: 0}
"""


@pytest.mark.parametrize("case,expected", [
    ("missing suite", "suite file not found"),
    ("unknown phase", "no phase 'nope' in"),
    ("bad data", "--data"),
    ("bad lr", "bad --lr"),
    ("lr missing", "--lr large=VALUE"),
    ("no sweep yet", "no finished runs under"),
    ("bad override", "trainer.max_stepz"),
    ("flag after --", "is a flag, not a key=value override"),
    ("bad grid override", "model.n_headz"),
    ("phase not a list", "phase `main` must be a non-empty list of grids"),
    ("no experiment", "no `experiment` key"),
])
def test_main_refuses_bad_input_with_one_error_line(tmp_path, case, expected):
    suite = write_suite(tmp_path / "suite.yaml", SUITE_YAML)
    argv = [suite, "--phase", "sweep", "--out", tmp_path / "out", "--gpus", "0", "--dry-run"]
    if case == "missing suite":
        argv[0] = tmp_path / "nope.yaml"
    elif case == "unknown phase":
        argv[2] = "nope"
    elif case == "bad data":
        argv += ["--data", tmp_path / "missing"]
    elif case == "bad lr":
        argv += ["--lr", "normal"]
    elif case == "lr missing":
        write_suite(suite, SUITE_YAML + "  stability:\n    - {attention: diffv2, lr: [normal, large]}\n")
        argv[2] = "stability"
        argv += ["--lr", "normal=1e-3"]
    elif case == "no sweep yet":
        argv[2] = "main"
    elif case == "bad override":
        argv += ["--", "trainer.max_stepz=4"]
    elif case == "flag after --":
        argv += ["--", "--gpus", "2"]
    elif case == "bad grid override":  # in the last grid: checked before anything runs
        write_suite(suite, SUITE_YAML + "    - {attention: diffv2, lr: 2.0e-3, overrides: [model.n_headz=3]}\n")
        argv[2] = "main"
        argv += ["--lr", "normal=1e-3"]
    elif case == "phase not a list":
        write_suite(suite, SUITE_YAML.replace("  main:\n    - ", "  main: "))
    elif case == "no experiment":
        write_suite(suite, SUITE_YAML.replace("experiment: repro_small\n", ""))
    rc, out, err = call(S.main, argv)
    assert rc == 2 and expected in one_error_line(err), (rc, err)
    assert not (tmp_path / "out").exists()
    if case == "unknown phase":
        assert "(phases: sweep, main)" in err


# ------------------------------------------------------------------------------------------------ a real suite
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from data.prepare import prepare

    prefix = str(tmp_path_factory.mktemp("corpus") / "python_docs")
    prepare([str(SAMPLE)], prefix, "bpe:384", workers=1, progress=False)
    return prefix


@pytest.fixture(scope="module")
def real_suite(tmp_path_factory, corpus):
    """The sweep phase run once for the module: (suite file, out dir, stdout, exit code)."""
    root = tmp_path_factory.mktemp("real_suite")
    suite = write_suite(root / "suite.yaml", SUITE_YAML + "  broken:\n"
                        "    - {attention: diffv2, lr: 2.0e-3, overrides: ['data.prefixes=[/nonexistent/corpus]']}\n")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("OMP_NUM_THREADS", "1")
        rc, stdout, err = call(S.main, [suite, "--phase", "sweep", "--data", corpus, "--out", out, "--gpus", "0",
                                        "--", *TINY])
    return suite, out, stdout, rc, err


def run_suite(real_suite, corpus, *args):
    suite, out = real_suite[:2]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("OMP_NUM_THREADS", "1")
        return call(S.main, [suite, *args, "--data", corpus, "--out", out, "--gpus", "0", "--", *TINY])


def val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/val_loss"] for r in rows if "train/val_loss" in r][-1]


SWEEP = ["baseline-lr0.001-s0", "baseline-lr0.004-s0"]


def test_suite_runs_the_sweep_on_the_cpu(real_suite):
    _, out, stdout, rc, err = real_suite
    assert rc == 0, (stdout, err)
    assert "suite: 2 runs, 0 already finished, 2 to run on the CPU" in stdout
    assert stdout.count("  ok       baseline-lr") == 2 and "every run finished" in stdout
    for name, lr in zip(SWEEP, (1e-3, 4e-3)):
        status = json.loads((out / "runs" / name / "suite_status.json").read_text())
        assert (status["returncode"], status["diverged"], status["gpu"], status["lr"], status["lr_name"]) == (
            0, False, None, lr, None)
        assert status["command"][-len(TINY):] == TINY and f"optim.lr={lr:g}" in status["command"]
        assert math.isfinite(val_loss(out / "runs" / name))
        assert "model tiny/baseline: params total" in (out / "logs" / f"{name}.log").read_text()
    record = json.loads((out / "suite-sweep.json").read_text())
    assert [(r["name"], r["returncode"]) for r in record["runs"]] == [(n, 0) for n in SWEEP]
    assert record["extra_overrides"] == TINY


def test_suite_run_again_has_nothing_to_do(real_suite, corpus):
    out = real_suite[1]
    files = [out / "runs" / n / f for n in SWEEP for f in ("metrics.jsonl", "suite_status.json")]
    files += [out / "logs" / f"{n}.log" for n in SWEEP]
    before = {f: f.stat().st_mtime_ns for f in files}
    rc, stdout, err = run_suite(real_suite, corpus, "--phase", "sweep")
    assert rc == 0, err
    assert "suite: 2 runs, 2 already finished, 0 to run on the CPU" in stdout and "start" not in stdout
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_suite_records_a_failed_run_as_not_finished(real_suite, corpus):
    out = real_suite[1]
    rc, stdout, err = run_suite(real_suite, corpus, "--phase", "broken")
    assert rc == 1 and "1 run(s) FAILED: diffv2-lr0.002-s0" in stdout, (stdout, err)
    status = json.loads((out / "runs" / "diffv2-lr0.002-s0" / "suite_status.json").read_text())
    assert status["returncode"] not in (0, 3) and not status["diverged"]
    assert S.finished(out, "diffv2-lr0.002-s0") is None  # so the next call runs it again
    record = json.loads((out / "suite-broken.json").read_text())
    assert record["runs"][0]["returncode"] == status["returncode"]  # the outcome, not just "not finished"
    assert "nonexistent" in (out / "logs" / "diffv2-lr0.002-s0.log").read_text()


def test_main_phase_takes_the_sweeps_lrs_and_the_claims_report(real_suite, corpus, tmp_path):
    out = real_suite[1]
    losses = {lr: val_loss(out / "runs" / f"baseline-lr{lr:g}-s0") for lr in (1e-3, 4e-3)}
    normal = min(losses, key=losses.get)
    large = 4e-3  # no spikes in 4 steps (the detector's warm-up is 50): the largest swept LR above normal, or normal
    rc, stdout, err = run_suite(real_suite, corpus, "--phase", "main")
    assert rc == 0, (stdout, err)
    assert f"suite: learning rates from the sweep: normal={normal:g}, large={large:g}" in stdout
    # baseline at the normal LR is the sweep's run: only DIFF V2 trains
    assert "suite: 2 runs, 1 already finished, 1 to run on the CPU" in stdout
    assert f"start diffv2-lr{normal:g}-s0" in stdout and "start baseline" not in stdout
    status = json.loads((out / "runs" / f"diffv2-lr{normal:g}-s0" / "suite_status.json").read_text())
    assert (status["returncode"], status["lr"], status["lr_name"]) == (0, normal, "normal")

    report = tmp_path / "report"
    rc, stdout, err = call(C.main, [out, "--out", report])  # plots on
    assert rc == 0 and "wrote" in stdout, err
    for sub in ("normal_lr", "large_lr"):
        assert (report / sub / "report.md").is_file() and (report / sub / "loss.png").stat().st_size > 0
        assert f"[{sub}/report.md]({sub}/report.md)" in (report / "report.md").read_text()
    assert json.loads((report / "claims.json").read_text())["lrs"] == {"normal": normal, "large": large}
    with tarfile.open(report / "raw_runs.tar.gz") as tar:
        listed = set(tar.getnames())
    finished = SWEEP + [f"diffv2-lr{normal:g}-s0"]
    assert {f"runs/{n}/metrics.jsonl" for n in finished} <= listed
    assert not any("diffv2-lr0.002-s0" in n for n in listed)  # the failed run is not data
    text = (report / "report.md").read_text()
    assert "| 0.001 |" in text and "| 0.004 |" in text  # the sweep table
    assert "params" in text and "M |" in text  # parameter counts read from the suite's console logs


# ------------------------------------------------------------------------------------------------ significance
@pytest.mark.parametrize("t,df,p", [(2.776, 4, 0.05), (2.228, 10, 0.05), (12.706, 1, 0.05), (2.042, 30, 0.05),
                                    (4.604, 4, 0.01), (1.96, 1e6, 0.05), (2.576, 1e6, 0.01)])
def test_t_two_sided_p_matches_student_t_tables(t, df, p):
    assert C.t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    assert C.t_two_sided_p(-t, df) == C.t_two_sided_p(t, df)


def test_t_two_sided_p_closed_forms_and_limits():
    assert C.t_two_sided_p(0.0, 3) == 1.0 and C.t_two_sided_p(0.0, 1e6) == 1.0
    assert C.t_two_sided_p(math.inf, 5) == 0.0 and C.t_two_sided_p(-math.inf, 5) == 0.0
    for t in (0.1, 0.7, 1.0, 3.0, 25.0):
        assert C.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-9)  # Cauchy
        assert C.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
        assert C.t_two_sided_p(t, 1e7) == pytest.approx(math.erfc(t / math.sqrt(2)), abs=1e-6)  # the normal
    ps = [C.t_two_sided_p(2.0, df) for df in (1, 2, 5, 30, 1e4)]
    assert ps == sorted(ps, reverse=True)  # heavier tails at fewer degrees of freedom


def test_welch_on_hand_computed_examples():
    # equal sizes and variances: var 2 on both sides, t = -3 / sqrt(2/2 + 2/2), df = 2
    t, p = C.welch([1, 3], [4, 6])
    assert t == pytest.approx(-3 / math.sqrt(2)) and p == pytest.approx(1 - 3 / math.sqrt(2) / math.sqrt(6.5))
    # unequal: var 1/3 and 5/12 of the means, t = -3.5 / sqrt(3/4), df = (3/4)^2 / ((1/3)^2/2 + (5/12)^2/3) = 243/49
    t, p = C.welch([1, 2, 3], [4, 5, 6, 7])
    assert t == pytest.approx(-3.5 / math.sqrt(0.75))
    assert p == pytest.approx(C.t_two_sided_p(3.5 / math.sqrt(0.75), 243 / 49), rel=1e-12)
    assert 0.0095 < p < 0.0105  # t(0.995, 5) = 4.032
    assert C.welch([4, 5, 6, 7], [1, 2, 3]) == pytest.approx((-t, p))
    # no spread: the sign of the difference (claimed lower -> -inf), p 0 or 1
    assert C.welch([1, 1], [2, 2]) == (-math.inf, 0.0)
    assert C.welch([2, 2, 2], [1, 1]) == (math.inf, 0.0)
    assert C.welch([2, 2], [2, 2, 2]) == (0.0, 1.0)


def test_verdict_directions_and_the_one_seed_z_path():
    lower, higher = [3.00, 3.01, 2.99], [3.20, 3.21, 3.19]
    v, stat = C.verdict(lower, higher)
    assert v == C.REPRODUCED and stat.startswith("Welch t=-")
    assert C.verdict(higher, lower)[0] == C.NOT_REPRODUCED
    assert C.verdict([3.0, 3.2, 2.9], [3.05, 3.15, 2.95])[0] == C.INCONCLUSIVE  # within seed noise
    # one seed: z = -0.05 / (0.01 * sqrt(1 + 1/3)) = -4.33, decisive beyond 2.78
    v, stat = C.verdict([3.00], [3.05, 3.04, 3.06], noise=0.01)
    assert v == C.REPRODUCED and "z=-4.33" in stat
    assert C.verdict([3.10], [3.05, 3.04, 3.06], noise=0.01)[0] == C.NOT_REPRODUCED
    assert C.verdict([3.00], [3.05, 3.04, 3.06], noise=0.1) == (C.INCONCLUSIVE, "z=-0.43 vs seed noise 0.1")
    v, stat = C.verdict([3.00], [3.05], noise=0.02)  # one seed each: z = -0.05 / (0.02 * sqrt 2) = -1.77
    assert v == C.INCONCLUSIVE and "z=-1.77" in stat
    assert C.verdict([3.00], [3.05]) == (C.INCONCLUSIVE, "one seed and no noise estimate")
    assert C.verdict([math.nan], [1.0, 2.0]) == (C.INCONCLUSIVE, "missing runs")
    assert C.verdict([1.0, math.nan, 1.01], [2.0, 2.01])[0] == C.REPRODUCED  # non-finite values are dropped


def test_uniform_sink_mass():
    assert C.uniform_sink_mass(1) == 1.0 and C.uniform_sink_mass(2) == 0.75
    assert C.uniform_sink_mass(64) == pytest.approx(sum(1 / t for t in range(1, 65)) / 64)


# ------------------------------------------------------------------------------------------------ synthetic suites
def fake_run(suite: Path, attention: str, lr: float, seed: int, *, val: float, spikes: int = 0, steps: int = 100,
             lr_name=None, returncode: int = 0, act: float = 10.0, sink: float = 0.3, grad: float = 1.0) -> str:
    """A finished run as launch.suite leaves it: runs/NAME/{metrics.jsonl, config.yaml, suite_status.json}."""
    run = S.SuiteRun(S.run_name(attention, lr, seed), attention, lr, seed, lr_name)
    run_dir = suite / "runs" / run.name
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "train/loss": val + 0.05 + 0.5 * (1 - s / steps), "grad/norm": grad * (1 + 0.1 * (s % 20 == 0)),
             "spike/count": spikes * s // steps, "spike/loss_count": spikes * s // steps, "spike/grad_norm_count": 0,
             "act/max_abs/L00": act, "act/max_abs/L01": act / 2, "attn/logit_max_abs/L00": 5.0,
             "attn/sink_mass/L00": sink, "attn/sink_mass/L01": sink} for s in range(10, steps + 1, 10)]
    rows.append({"step": steps, "train/val_loss": val})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text(f"model:\n  name: tiny\n  max_seq_len: 4096\n  attention:\n"
                                         f"    variant: {attention}\ndata:\n  seq_len: 64\n")
    S._write_status(suite, run, ["train.py"], returncode, 1.0, None)
    return run.name


def fake_suite(root: Path) -> dict:
    """A sweep (normal = 4e-3 with the best val loss; 1.6e-2 is the first unstable LR above it), then 3 seeds of
    baseline and DIFF V2 at both: DIFF V2 clearly lower in val loss and spikes, clearly higher in activations."""
    sweep = {1e-3: dict(val=3.50, spikes=20),  # unstable, but below normal: not `large`
             2e-3: dict(val=3.30), 4e-3: dict(val=3.20), 8e-3: dict(val=3.25, spikes=0),
             1.6e-2: dict(val=3.60, spikes=5),  # 5 of 100 steps: unstable
             3.2e-2: dict(val=9.00, returncode=3)}  # stopped on non-finite losses: unstable, but larger
    made = [fake_run(root, "baseline", lr, 0, **kw) for lr, kw in sweep.items()]
    made.append(fake_run(root, "diffv2", 4e-3, 0, val=3.10, act=20.0, sink=0.05))
    failed = fake_run(root, "baseline", 3e-3, 0, val=1.0, returncode=1)  # best loss, but the run failed
    for seed, (b, d) in enumerate([(3.21, 3.11), (3.19, 3.09)], start=1):
        made.append(fake_run(root, "baseline", 4e-3, seed, val=b, lr_name="normal"))
        made.append(fake_run(root, "diffv2", 4e-3, seed, val=d, act=20.0 + seed, sink=0.05, lr_name="normal"))
    for seed, (b, d) in enumerate([(3.62, 3.31), (3.58, 3.29)], start=1):
        made.append(fake_run(root, "baseline", 1.6e-2, seed, val=b, spikes=5 + seed, lr_name="large"))
        made.append(fake_run(root, "diffv2", 1.6e-2, seed, val=d, spikes=0, lr_name="large"))
    made.append(fake_run(root, "diffv2", 1.6e-2, 0, val=3.30, spikes=0))
    made.append(fake_run(root, "baseline_1p5h", 1.6e-2, 0, val=3.60, lr_name="large"))
    (root / "logs").mkdir()
    (root / "logs" / "diffv2-lr0.004-s0.log").write_text("model x: params total 65,432,100 | active 65,432,100\n")
    return {"finished": made, "failed": failed}


def claim_row(md: str, claim: str, setting: str) -> list[str]:
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines() if line.startswith("| ")]
    found = [r for r in rows if r[0] == claim and r[1] == setting]
    assert len(found) == 1, (claim, setting)
    return found[0]


def test_pick_lrs_normal_is_the_best_loss_large_the_first_unstable_above(tmp_path):
    fake_suite(tmp_path)
    picked = C.pick_lrs(tmp_path)
    assert picked["lrs"] == {"normal": 4e-3, "large": 1.6e-2} and picked["found_unstable"]
    assert [(s["lr"], s["unstable"]) for s in picked["sweep"]] == [  # the failed 3e-3 run is not in the sweep
        (1e-3, 1.0), (2e-3, 0.0), (4e-3, 0.0), (8e-3, 0.0), (1.6e-2, 1.0), (3.2e-2, 1.0)]
    assert picked["sweep"][0]["spikes"] == 20


def test_pick_lrs_without_an_unstable_lr_and_without_a_sweep(tmp_path):
    for lr, val in ((1e-3, 3.3), (2e-3, 3.1), (4e-3, 3.2), (8e-3, 3.4)):
        fake_run(tmp_path / "a", "baseline", lr, 0, val=val)
    fake_run(tmp_path / "a", "baseline", 4e-3, 1, val=2.0, lr_name="normal")  # seed 1 is not the sweep
    picked = C.pick_lrs(tmp_path / "a")
    assert picked["lrs"] == {"normal": 2e-3, "large": 8e-3} and not picked["found_unstable"]
    fake_run(tmp_path / "b", "baseline", 1e-3, 0, val=3.3)
    fake_run(tmp_path / "b", "baseline", 2e-3, 0, val=3.1)
    assert C.pick_lrs(tmp_path / "b")["lrs"] == {"normal": 2e-3, "large": 2e-3}  # nothing above the best
    fake_run(tmp_path / "c", "diffv2", 1e-3, 0, val=3.3)
    with pytest.raises(ValueError, match="no baseline sweep runs"):
        C.pick_lrs(tmp_path / "c")


def test_run_stats_of_a_synthetic_run(tmp_path):
    fake_run(tmp_path, "baseline", 1e-3, 0, val=3.2, spikes=1, steps=200, act=7.0, sink=0.25)
    (run,) = C.load_suite_runs(tmp_path)
    s = run.stats
    assert (s["steps"], s["val_loss"], s["spikes"], s["loss_spikes"], s["grad_spikes"]) == (200, 3.2, 1, 1, 0)
    assert s["unstable"] == 0.0  # 1 spike in 200 steps is below 1%
    assert (s["act_max_final"], s["act_max_run"], s["sink_mass"], s["logit_max_final"]) == (7.0, 7.0, 0.25, 5.0)
    assert s["grad_norm_max"] == pytest.approx(1.1) and s["diverged"] == 0.0
    # mean of the last 10% of the logged losses, at least 3 (steps 180, 190, 200)
    assert s["train_loss"] == pytest.approx(3.2 + 0.05 + 0.5 * (1 - 190 / 200))
    assert math.isnan(s["ctx_rms_rel_min"]) and "params" not in s


def test_write_report_verdicts_on_a_clear_cut_suite(tmp_path):
    made = fake_suite(tmp_path / "suite")
    rc, stdout, err = call(C.main, [tmp_path / "suite", "--out", tmp_path / "report", "--no-plots"])
    assert rc == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    row = claim_row(md, "1. Lower LM loss than the Transformer", "normal LR 0.004")
    assert row[3:6] == ["diffv2: 3.1 ± 0.01 (n=3)", "baseline: 3.2 ± 0.01 (n=3)", "reproduced"]
    assert row[6].startswith("Welch t=-")
    row = claim_row(md, "2. Fewer loss and gradient spikes where the baseline is unstable", "large LR 0.016")
    assert row[3:6] == ["diffv2: 0 ± 0 (n=3)", "baseline: 6 ± 1 (n=3)", "reproduced"]
    assert claim_row(md, "3. Smaller activation outliers", "normal LR 0.004")[5] == "not reproduced"
    assert claim_row(md, "6. No attention sinks", "normal LR 0.004")[5] == "reproduced"
    # one seed of the 1.5h-head arm against 3 of DIFF V2: the z test with the pooled seed noise of the large LR
    row = claim_row(md, "A4. 1.5h-head Transformer (parameter-aligned): higher loss than DIFF V2", "large LR 0.016")
    assert row[5] == "reproduced" and row[6].startswith("z=-")
    assert claim_row(md, "A1. (same) higher loss than DIFF V2", "large LR 0.016")[5:] == [
        "inconclusive", "missing runs"]
    assert "Normal LR = the baseline's best: **0.004**" in md and "**0.016**." in md
    assert "| diffv2 | 0.004 | 3 |" in md and "65.43M" in md  # the arm table with params from the console log
    assert "normal_lr" not in md and not (tmp_path / "report" / "normal_lr").exists()  # --no-plots

    saved = json.loads((tmp_path / "report" / "claims.json").read_text())
    assert saved["lrs"] == {"normal": 4e-3, "large": 1.6e-2}
    assert ["1. Lower LM loss than the Transformer", "normal LR 0.004"] == saved["claims"][0][:2]
    assert saved["claims"][0][5] == "reproduced" and len(saved["sweep"]) == 6
    with tarfile.open(tmp_path / "report" / "raw_runs.tar.gz") as tar:
        listed = set(tar.getnames())
    expected = {f"runs/{n}/{f}" for n in made["finished"] for f in ("metrics.jsonl", "config.yaml",
                                                                     "suite_status.json")}
    assert listed == expected  # every finished run (the diverged one too), not the failed one
    assert not any(made["failed"] in n for n in listed)


def test_claims_main_without_runs_refuses_with_one_error_line(tmp_path):
    rc, _, err = call(C.main, [tmp_path, "--out", tmp_path / "report"])
    assert rc == 2 and "no finished runs under" in one_error_line(err)
    fake_run(tmp_path, "baseline", 1e-3, 0, val=3.0, returncode=1)  # only a failed run: still nothing
    rc, _, err = call(C.main, [tmp_path, "--out", tmp_path / "report"])
    assert rc == 2 and "no finished runs under" in one_error_line(err)
    assert not (tmp_path / "report").exists()
