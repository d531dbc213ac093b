"""Loss-spike detection: injected spikes found, smooth curves quiet, state survives resume, skip leaves no trace."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffv2.train.callbacks import StepResult, Table, TrainContext
from diffv2.config import Config
from diffv2.train.step_undo import StepUndo
from monitoring.spikes import RollingSpikeDetector, SpikeMonitor

STEPS = 2000
INJECTED = [300, 301, 777, 1200, 1650]  # includes two adjacent spikes


def smooth_loss(n: int = STEPS) -> torch.Tensor:
    """A decaying loss with step-to-step noise, like a healthy run."""
    t = torch.arange(n, dtype=torch.float64)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return 2.5 + 3.0 * torch.exp(-t / 300) + 0.02 * noise


def flat_loss(n: int) -> torch.Tensor:
    """The late, flat part of a run: a plateau with noise."""
    noise = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return 3.0 + 0.02 * noise


def smooth_grad_norm(n: int = STEPS) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return 0.6 + 0.4 * torch.exp(-t / 200) + 0.05 * torch.sin(t / 40) + 0.03 * noise


def flagged(values: torch.Tensor, detector: RollingSpikeDetector, start: int = 0) -> list[int]:
    return [start + i for i, v in enumerate(values) if detector.update(v)[0].item()]


def test_no_false_positives_on_smooth_curves():
    for curve in (smooth_loss(), smooth_grad_norm()):
        assert flagged(curve, RollingSpikeDetector(6.0, 128, 64, torch.device("cpu"))) == []


def test_every_injected_spike_is_found():
    loss = smooth_loss()
    loss[INJECTED] += 1.5  # a jump of 1.5 nats; early on the decaying trend itself widens the window's std
    loss[1800] = float("nan")  # a non-finite loss is always a spike
    assert flagged(loss, RollingSpikeDetector(6.0, 128, 64, torch.device("cpu"))) == INJECTED + [1800]
    grad_norm = smooth_grad_norm()
    grad_norm[INJECTED] *= 4
    assert flagged(grad_norm, RollingSpikeDetector(6.0, 128, 64, torch.device("cpu"))) == INJECTED


def test_warm_up_flags_nothing_and_a_level_shift_is_followed():
    curve = flat_loss(600)
    curve[10] += 5.0  # inside the warm-up
    curve[300:] += 0.5  # a genuine shift (25 noise std), not a spike train
    hits = flagged(curve, RollingSpikeDetector(6.0, 128, 64, torch.device("cpu")))
    assert 10 not in hits and hits[0] == 300
    assert max(hits) < 300 + 128  # winsorised values catch the window up with the new level


def test_detector_state_survives_a_round_trip():
    curve = smooth_loss()
    curve[INJECTED] += 1.5
    whole = flagged(curve, RollingSpikeDetector(6.0, 128, 64, torch.device("cpu")))
    first = RollingSpikeDetector(6.0, 128, 64, torch.device("cpu"))
    hits = flagged(curve[:1000], first)
    second = RollingSpikeDetector(6.0, 128, 64, torch.device("cpu"))
    second.load_state_dict(first.state_dict())
    assert hits + flagged(curve[1000:], second, start=1000) == whole


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.norm = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (self.lin(x) * self.norm).square().mean()


def _train_step(model, opt, scale: float = 1.0) -> torch.Tensor:
    opt.zero_grad()
    loss = model(torch.randn(8, 4)) * scale
    loss.backward()
    return loss.detach()


def _state(model, opt) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    return tensors + [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def test_skipped_step_leaves_params_and_optimizer_state_bit_identical():
    model = _Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        _train_step(model, opt)
        opt.step()
    before = _state(model, opt)
    undo = StepUndo(model, opt)
    _train_step(model, opt, scale=1e6)
    model.lin.weight.grad[0, 0] = float("inf")  # a multiply-by-zero skip would turn this into NaN
    undo.snapshot()
    opt.step()
    assert undo.restore_if(torch.tensor(True)).item()
    after = _state(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_unskipped_step_is_the_plain_optimizer_step():
    runs = []
    for use_undo in (False, True):
        model = _Model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        undo = StepUndo(model, opt)
        torch.manual_seed(5)
        for _ in range(4):
            _train_step(model, opt)
            if use_undo:
                undo.snapshot()
            opt.step()
            if use_undo:
                undo.restore_if(torch.tensor(False))
        runs.append(_state(model, opt))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _ctx(model, opt, tmp_path, start_step: int = 0) -> TrainContext:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return TrainContext(cfg=Config(), model=model, optimizer=opt, run_dir=tmp_path, device=torch.device("cpu"),
                        flops_per_token=1.0, tokens_per_step=1, start_step=start_step)


def _drive(monitor, model, opt, losses, first_step: int = 1) -> list[dict]:
    """Feed `losses` as steps through the monitor's hooks around real optimizer steps; returns logged metrics."""
    logged = []
    for i, loss in enumerate(losses):
        step = first_step + i
        monitor.on_step_start(step)
        _train_step(model, opt)
        monitor.on_before_optimizer_step(step)
        opt.step()
        res = StepResult(step, torch.tensor(loss), torch.tensor(1.0 + 0.01 * math.sin(step)), 1e-2,
                         sample_index=(step - 1) * 4, batch_size=4)
        logged.append(monitor.on_step_end(res))
    return logged


def test_monitor_logs_events_with_the_batch_sample_indices(tmp_path):
    model, losses = _Model(), flat_loss(200).tolist()
    losses[149] += 1.0  # step 150
    opt = torch.optim.AdamW(model.parameters())
    monitor = SpikeMonitor(interval=10, warmup_steps=32)
    monitor.on_train_start(_ctx(model, opt, tmp_path))
    logged = _drive(monitor, model, opt, losses)
    events = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [150] and events[0]["signal"] == "loss"
    assert events[0]["sample_indices"] == [596, 597, 598, 599] and events[0]["loss_z"] > 6
    table = logged[149]["spike/events"]
    assert isinstance(table, Table) and table.rows[0][0] == 150
    assert logged[-1]["spike/count"] == 1 and logged[-1]["spike/score"].item() == pytest.approx(1 / 200)


def test_monitor_state_survives_resume(tmp_path):
    losses = flat_loss(300).tolist()
    for step in (120, 250):
        losses[step - 1] += 1.0
    model = _Model()
    opt = torch.optim.AdamW(model.parameters())
    whole = SpikeMonitor(interval=10, warmup_steps=32)
    whole.on_train_start(_ctx(model, opt, tmp_path / "whole"))
    expected = _drive(whole, model, opt, losses)

    first = SpikeMonitor(interval=10, warmup_steps=32)
    first.on_train_start(_ctx(model, opt, tmp_path / "split"))
    _drive(first, model, opt, losses[:155])  # the checkpoint is taken after step 155, mid-interval
    state = first.state_dict()
    second = SpikeMonitor(interval=10, warmup_steps=32)
    second.load_state_dict(state)
    second.on_train_start(_ctx(model, opt, tmp_path / "split", start_step=155))
    resumed = _drive(second, model, opt, losses[155:], first_step=156)
    for want, got in zip(expected[155:], resumed):
        assert {k: v for k, v in want.items() if k != "spike/events"}.keys() == got.keys() - {"spike/events"}
        assert all(float(want[k]) == float(got[k]) for k in want if k != "spike/events")
    events = [json.loads(line)["step"] for line in (tmp_path / "split" / "spikes.jsonl").read_text().splitlines()]
    assert events == [120, 250]


def test_skip_action_undoes_exactly_the_spike_step(tmp_path):
    losses = flat_loss(80).tolist()
    losses[59] += 1.0  # step 60
    model = _Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = SpikeMonitor(interval=5, warmup_steps=32, skip_step=True)
    monitor.on_train_start(_ctx(model, opt, tmp_path))
    _drive(monitor, model, opt, losses[:59])
    before = _state(model, opt)
    logged = _drive(monitor, model, opt, losses[59:60], first_step=60)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, opt)))
    assert logged[0]["spike/skipped"] == 1
    _drive(monitor, model, opt, losses[60:61], first_step=61)
    assert not all(torch.equal(a, b) for a, b in zip(before, _state(model, opt)))  # the next step trains again


def test_stop_action_asks_for_a_checkpoint_and_stop(tmp_path):
    losses = flat_loss(80).tolist()
    losses[69] += 1.0
    model = _Model()
    opt = torch.optim.AdamW(model.parameters())
    monitor = SpikeMonitor(interval=5, warmup_steps=32, stop=True)
    monitor.on_train_start(_ctx(model, opt, tmp_path))
    _drive(monitor, model, opt, losses[:68])
    assert monitor.should_stop() is None
    _drive(monitor, model, opt, losses[68:70], first_step=69)
    assert monitor.should_stop() == "loss spike at step 70 (monitoring.spikes.stop=true)"
