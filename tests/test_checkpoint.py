"""Checkpoints are atomic, verified by checksum, and restore model + optimizer exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffv2.train import checkpoint
from diffv2.parallel.engine import Engine
from diffv2.config import ModelConfig
from diffv2.model.transformer import Transformer

CFG = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=64, vocab_size=64,
                  max_seq_len=32)


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (2, 17))
    for _ in range(2):
        model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(root: Path, step: int, model, opt, keep_last: int = 5) -> Path:
    return checkpoint.save(root, step, Engine(model, opt), {"rng": {"torch": torch.get_rng_state()}}, {"note": "t"}, keep_last)


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path):
    model, opt = trained()
    rng_at_save = torch.get_rng_state()
    path = save(tmp_path, 2, model, opt)
    assert checkpoint.verify(path) is None
    torch.manual_seed(1)
    fresh = Transformer(CFG)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoint.load(path, Engine(fresh, fresh_opt))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(state["rng"]["torch"], rng_at_save)


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained()
    good = save(tmp_path, 1, model, opt)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_sha256", boom)  # fails after the shards are written, before the rename
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, opt)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # no partial step_2, no temp dir left
    monkeypatch.undo()
    assert checkpoint.latest_valid(tmp_path) == good


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_shard", "delete_meta"])
def test_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, caplog):
    model, opt = trained()
    good = save(tmp_path, 1, model, opt)
    bad = save(tmp_path, 2, model, opt)
    shard = next(bad.glob("*.distcp"))
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete_shard":
        shard.unlink()
    else:
        (bad / "meta.json").unlink()
    assert checkpoint.verify(bad) is not None
    assert checkpoint.latest_valid(tmp_path) == good
    assert "skipping checkpoint" in caplog.text


def test_keep_last_prunes_oldest(tmp_path):
    model, opt = trained()
    for step in range(1, 5):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
