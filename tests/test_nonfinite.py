"""Non-finite steps: caught on the device, skipped bit-exactly, counted, and too many in a row stop the run."""

from __future__ import annotations

import math
from pathlib import Path

import psutil
import pytest
import torch

from cli_runs import checkpoint_tensors, differing_tensors, error_line, metrics, side_by_side, train
from diffv2.train import checkpoint
from diffv2.train.callbacks import to_host
from diffv2.config import ModelConfig, OptimConfig
from diffv2.model.transformer import Transformer
from diffv2.train.nonfinite import NonFiniteGuard
from diffv2.optim import build_optimizer

CFG = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=64, vocab_size=64,
                  max_seq_len=32)
CPU = torch.device("cpu")


def build(max_bad_steps: int = 3, mode: str = "skip", fused: bool = False, device: torch.device = CPU):
    """`fused`: fused AdamW (CPU has the kernel too), whose found_inf flag the guard uses instead of the snapshot."""
    torch.manual_seed(0)
    model = Transformer(CFG).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, fused="on" if fused else "off"), device)
    guard = NonFiniteGuard(mode, max_bad_steps, model, optimizer, device)
    assert guard.fused == fused and (guard.undo is None) == fused
    return model, optimizer, guard


def step(model, optimizer, guard, poison: str = "") -> torch.Tensor:
    """One training step as the trainer takes it; `poison` makes the loss or a gradient non-finite."""
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(7))
    tokens = tokens.to(next(model.parameters()).device)
    loss, ce, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
    if poison in ("nan_loss", "inf_loss"):
        loss, ce = (x * float(poison[:3]) for x in (loss, ce))
    loss.backward()
    if poison in ("nan_grad", "inf_grad"):
        next(model.parameters()).grad[0, 0] = float(poison[:3])
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    bad = None
    if guard is not None:
        guard.before_step()
        if (gate := guard.gate(ce.detach())) is not None:  # as Engine.optimizer_step calls it
            gate(grad_norm)
    optimizer.step()
    if guard is not None:
        bad = guard.after_step(ce.detach(), grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return bad


def state(model, optimizer) -> dict[str, torch.Tensor]:
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, s in enumerate(optimizer.state.values()):
        out.update({f"optim/{i}/{k}": v.clone() for k, v in s.items()})
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["undo", "fused"])
@pytest.mark.parametrize("poison", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
def test_nonfinite_step_leaves_parameters_and_optimizer_state_bit_identical(poison, fused):
    model, optimizer, guard = build(fused=fused)
    step(model, optimizer, guard)
    step(model, optimizer, guard)
    before = state(model, optimizer)
    assert bool(step(model, optimizer, guard, poison))
    assert differing_tensors(before, state(model, optimizer)) == []  # AdamW's step counters included
    assert not hasattr(optimizer, "found_inf")  # disarmed: a plain step after the guard is a real step
    assert not bool(step(model, optimizer, guard))
    assert differing_tensors(before, state(model, optimizer))


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_the_fused_skip_continues_as_if_the_bad_step_never_happened(device):
    """Fused path: good, bad, good equals good, good; parameters, moments and bias-correction step counts. On a
    GPU this is the CUDA fused kernel's found_inf, the path every single-GPU run takes."""
    skipped, plain = build(fused=True, device=torch.device(device)), build(fused=True, device=torch.device(device))
    for poison in ("", "nan_grad", ""):
        step(*skipped, poison)
    for _ in range(2):
        step(*plain)
    a, b = state(*skipped[:2]), state(*plain[:2])
    if device == "cpu":
        assert differing_tensors(a, b) == []
    else:  # two runs of the same CUDA kernels need not be bit-equal (atomics); an applied NaN step would be NaN
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("fused", [False, True], ids=["undo", "fused"])
def test_finite_steps_are_exactly_plain_optimizer_steps(fused):
    guarded, plain = build(fused=fused), build(fused=fused)
    for _ in range(3):
        assert not bool(step(*guarded))
        step(*plain[:2], None)
    assert differing_tensors(state(*guarded[:2]), state(*plain[:2])) == []


@pytest.mark.parametrize("fused", [False, True], ids=["undo", "fused"])
def test_detection_reads_nothing_back_to_the_host(monkeypatch, fused):
    model, optimizer, guard = build(fused=fused)
    step(model, optimizer, guard)

    def host_read(*args, **kwargs):
        raise AssertionError("the non-finite check synchronised with the host")

    real_before, real_after = guard.before_step, guard.after_step

    def checked(fn):
        def run(*args):
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
                    m.setattr(torch.Tensor, name, host_read)
                return fn(*args)
        return run

    real_gate = guard.gate

    def gate(loss):
        arm = real_gate(loss)
        return None if arm is None else checked(arm)

    guard.before_step, guard.after_step, guard.gate = checked(real_before), checked(real_after), gate
    step(model, optimizer, guard, "nan_loss")
    guard.metrics()  # the counters stay on the device until the trainer's logging read


def test_bad_steps_are_counted_and_the_limit_applies_to_a_run_in_a_row():
    model, optimizer, guard = build(max_bad_steps=3)
    reads = []
    for poisons in (["", "nan_loss", "nan_loss"], ["", "inf_grad", "nan_loss"], ["nan_loss"]):
        for poison in poisons:
            step(model, optimizer, guard, poison)
        host = to_host(guard.metrics())
        reads.append((host["train/skipped_steps"], host["train/nonfinite_streak"], guard.stop_reason(host, 0)))
    assert [r[:2] for r in reads] == [(2, 2), (4, 2), (5, 3)]
    assert reads[0][2] is None and reads[1][2] is None
    assert reads[2][2].startswith("3 steps in a row up to step 0 had a non-finite loss or grad norm "
                                  "(trainer.max_bad_steps=3)")


def test_stop_mode_stops_at_the_first_bad_step():
    model, optimizer, guard = build(mode="stop")
    step(model, optimizer, guard, "nan_loss")
    assert "trainer.nonfinite=stop" in guard.stop_reason(to_host(guard.metrics()), 1)


def test_a_streak_in_progress_survives_a_checkpoint():
    model, optimizer, guard = build(max_bad_steps=3)
    for poison in ("nan_loss", "", "nan_loss", "nan_loss"):
        step(model, optimizer, guard, poison)
    resumed = build(max_bad_steps=3)[2]
    resumed.load_state_dict(guard.state_dict())
    step(*build()[:2], resumed, "nan_loss")
    host = to_host(resumed.metrics())
    assert (host["train/skipped_steps"], host["train/nonfinite_streak"]) == (4, 3)


RUN = ["trainer.max_steps=12", "trainer.log_interval=1", "trainer.ckpt_interval=2", "trainer.keep_last=0",
       "trainer.eval_interval=-1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    root, cache = tmp_path_factory.mktemp("nonfinite"), tmp_path_factory.mktemp("cache")
    train(root / "warm-cache", cache, *RUN, fault="step:1")  # prepares the data caches the runs below share
    jobs = {
        # two isolated bad steps: skipped, the run goes on
        "skip": ([], "nan_loss:3,4", None),
        "skip_fused": (["optim.fused=on"], "inf_loss:3,4", None),  # the optimizer's found_inf instead of the undo
        # six in a row, read every 2 steps, limit 3: stops at the read of step 6; data workers and W&B are live
        "limit": (["trainer.log_interval=2", "trainer.max_bad_steps=3", "data.num_workers=1",
                   "logging.wandb.mode=offline"], "nan_loss:3,4,5,6,7,8", {"WANDB_MODE": "offline"}),
        "stop": (["trainer.nonfinite=stop"], "inf_loss:3", None),
    }
    results = side_by_side(*[lambda n=n, j=j: train(root / n, cache, *RUN, *j[0], fault=j[1], env=j[2])
                             for n, j in jobs.items()])
    return {name: (root / name, proc) for name, proc in zip(jobs, results)}


def ckpt(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(run_dir / f"checkpoints/step_{step:08d}")


def test_isolated_bad_steps_are_skipped_logged_and_the_run_goes_on(runs):
    run_dir, proc = runs["skip"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m["step"]: m for m in metrics(run_dir) if "train/loss" in m}
    assert [rows[s]["train/skipped_steps"] for s in range(1, 13)] == [0, 0, 1, 2] + [2] * 8
    assert [rows[s]["train/loss"] for s in (3, 4)] == ["nan", "nan"]  # a window of skipped steps has no loss
    assert all(math.isfinite(rows[s]["train/loss"]) for s in (1, 2, *range(5, 13)))


@pytest.mark.parametrize("job", ["skip", "skip_fused"])
def test_skipped_steps_leave_the_checkpointed_state_bit_identical(runs, job):
    run_dir, proc = runs[job]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m["step"]: m for m in metrics(run_dir) if "train/loss" in m}
    assert rows[12]["train/skipped_steps"] == 2
    assert differing_tensors(ckpt(run_dir, 4), ckpt(run_dir, 2)) == []
    assert differing_tensors(ckpt(run_dir, 6), ckpt(run_dir, 4))  # good steps move it again


def test_bad_steps_in_a_row_stop_the_run_with_the_last_good_state_saved(runs):
    run_dir, proc = runs["limit"]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert error_line(proc).startswith("error: stopped at step 6: 4 steps in a row up to step 6 had a non-finite "
                                       "loss or grad norm (trainer.max_bad_steps=3)")
    assert error_line(proc).endswith(f"saved as {run_dir / 'checkpoints/step_00000006'}")
    assert checkpoint.verify(run_dir / "checkpoints/step_00000006") is None
    assert differing_tensors(ckpt(run_dir, 6), ckpt(run_dir, 2)) == []


def test_a_stopped_run_leaves_no_process_behind(runs):
    """The stop is raised with a data-loader worker and W&B live: both end with the run (no hang, no orphan)."""
    run_dir, proc = runs["limit"]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    stray = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert stray == []


def test_stop_mode_stops_at_the_first_bad_step_with_the_state_before_it(runs):
    run_dir, proc = runs["stop"]
    assert proc.returncode == 3
    assert error_line(proc).startswith("error: stopped at step 3: a step up to step 3 had a non-finite loss or grad "
                                       "norm (trainer.nonfinite=stop)")
    assert differing_tensors(ckpt(run_dir, 3), ckpt(run_dir, 2)) == []
