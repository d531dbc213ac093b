"""Spec T14: tensor parallelism (diffv2/parallel/tensor.py) leaves outputs and gradients equal to tp=1.

Two gloo processes on CPU, spawned once for every case: each case builds a tiny fp32 model from the same seed on
both ranks, shards a copy with tp=2 and compares logits, loss and every parameter's gradient (DTensors gathered
with full_tensor) to the unsharded model on the same batch. The same spawn also checks cached decoding and one
AdamW step (after gradient clipping) on the DTensor parameters. validate_tp's refusals are plain unit tests.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffv2.config import AttentionConfig, ModelConfig, MoEConfig  # noqa: E402
from diffv2.parallel.tensor import validate_tp  # noqa: E402

TP = 2
TIMEOUT_S = 1800  # the whole spawn (well under a minute on two idle cores): a hang guard, not a time limit


def tiny_cfg(variant="diffv2", n_heads=4, n_kv_heads=2, **attn) -> ModelConfig:
    return ModelConfig(d_model=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=16, ffn_hidden=96,
                       vocab_size=61, max_seq_len=32, attention=AttentionConfig(variant=variant, **attn))


# (name, config, extra forward kwargs). diffv2 at n_heads=4, n_kv_heads=2 has g=4 query heads per group: each rank
# holds one whole group of two pairs. DIFF V1 needs tp | n_kv_heads/2, hence 4 KV heads.
CASES = [
    ("diffv2", tiny_cfg(), {}),
    ("diffv2 lambda_mode=none", tiny_cfg(lambda_mode="none"), {}),
    ("diffv2 lambda_mode=raw", tiny_cfg(lambda_mode="raw"), {}),
    ("diffv2 qk_norm rope=half combine_fp32=False", tiny_cfg(qk_norm=True, rope_style="half", combine_fp32=False), {}),
    ("diffv2 doc mask", tiny_cfg(doc_mask=True), {"doc_ids": True}),
    ("diffv2 param_match tied", ModelConfig(**{**tiny_cfg().__dict__, "param_match": True, "tie_embeddings": True}),
     {}),
    ("baseline", tiny_cfg("baseline"), {}),
    ("baseline x1.5", tiny_cfg("baseline", head_multiplier=1.5), {}),
    ("baseline x2", tiny_cfg("baseline", head_multiplier=2.0), {}),
    ("diffv1", tiny_cfg("diffv1", n_heads=8, n_kv_heads=4), {}),
    ("diffv1 qk_norm", tiny_cfg("diffv1", n_heads=8, n_kv_heads=4, qk_norm=True), {}),
]
DECODE_CASES = ("diffv2", "baseline x1.5", "diffv1")
B, N = 2, 12
ATOL = 1e-5


def _batch():
    g = torch.Generator().manual_seed(123)
    tokens_BN = torch.randint(0, 61, (B, N + 1), generator=g)
    doc_ids_BN = torch.cat([torch.zeros(B, 5, dtype=torch.long), torch.ones(B, N - 5, dtype=torch.long)], 1)
    return tokens_BN[:, :-1], tokens_BN[:, 1:], doc_ids_BN


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(_full(got), want, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _check_case(name, cfg, kw, mesh) -> None:
    from diffv2.model.transformer import Transformer
    from diffv2.parallel.tensor import apply_tensor_parallel

    torch.manual_seed(0)  # same seed on every rank: identical unsharded models
    full = Transformer(cfg, backend="math")
    sharded = apply_tensor_parallel(copy.deepcopy(full), mesh)
    attn = sharded.blocks[0].attn
    assert attn.tp == TP and attn.n_kv == full.blocks[0].attn.n_kv // TP
    assert attn.q_proj.weight.to_local().shape[0] == full.blocks[0].attn.q_proj.weight.shape[0] // TP, name
    tokens_BN, labels_BN, doc_ids_BN = _batch()
    doc = doc_ids_BN if kw.get("doc_ids") else None
    results = []
    for model in (full, sharded):
        logits = model(tokens_BN, doc)
        loss, ce, _ = model.loss(tokens_BN, labels_BN, doc)
        loss.backward()
        results.append((logits.detach(), loss.detach()))
    _finish_grads(sharded, mesh)
    _close(f"{name} logits", results[1][0], results[0][0])
    _close(f"{name} loss", results[1][1], results[0][1])
    want = dict(full.named_parameters())
    for pname, p in sharded.named_parameters():
        assert p.grad is not None, f"{name}: {pname} has no gradient"
        _close(f"{name} grad {pname}", p.grad, want[pname].grad)
        _close(f"{name} param {pname}", p.detach(), want[pname].detach())
    if name in DECODE_CASES:
        _check_decode(name, full, sharded, tokens_BN)
    if name in ("diffv2", "diffv1"):
        _check_clip(full, sharded)
        _check_adamw_step(full, sharded, tokens_BN, labels_BN)


def _finish_grads(model, tp_mesh) -> None:
    """What the engine does after the last micro-batch's backward: the weights every head shares (QK-norm, DIFF V1's
    lambda vectors and sub-LN) got only this rank's heads' part of their gradient; sum them over the TP ranks."""
    from diffv2.parallel.tensor import head_shared, sum_head_shared_grads

    names = head_shared(model)
    params = dict(model.named_parameters())
    sum_head_shared_grads([params[n] for n in names], tp_mesh.get_group())


@torch.no_grad()
def _check_decode(name, full, sharded, tokens_BN) -> None:
    """Prefill 8 tokens into a KV cache of this rank's heads, then decode 4 one at a time: equal to tp=1."""
    from diffv2.model.kv_cache import KVCache

    caches = [KVCache.for_model(m, B, N) for m in (full, sharded)]
    assert caches[1].k_BLKD[0].shape[2] == caches[0].k_BLKD[0].shape[2] // TP
    steps = [tokens_BN[:, :8]] + [tokens_BN[:, i:i + 1] for i in range(8, N)]
    for chunk in steps:
        want, got = (m(chunk, cache=c) for m, c in zip((full, sharded), caches))
        _close(f"{name} cached logits", got, want)


def _check_clip(full, sharded) -> None:
    """Gradient clipping over plain and DTensor parameters gives tp=1's norm and clipped gradients."""
    from diffv2.parallel.norms import clip_grad_norm as clip_grad_norm_

    want = torch.nn.utils.clip_grad_norm_(full.parameters(), 0.5)
    got = clip_grad_norm_(sharded.parameters(), 0.5)
    assert want > 0.5, want  # clipping really scales
    _close("grad norm", got, want)
    ref = dict(full.named_parameters())
    for pname, p in sharded.named_parameters():
        _close(f"clipped grad {pname}", p.grad, ref[pname].grad)


def _check_adamw_step(full, sharded, tokens_BN, labels_BN) -> None:
    """One AdamW step on the DTensor parameters (gradients from _check_case, already compared with tp=1's) moves them
    exactly as a plain AdamW step with the same gradients, gathered, moves the tp=1 parameters; the loss after it
    matches tp=1's.

    The reference steps with the gathered sharded gradients, not with its own: Adam's first update is
    lr * g / (|g| + eps), so for a gradient within rounding of zero (|g| ~ eps) the last-bit differences of the
    sharded sums, which depend on the CPU's matmul kernels, would move it by up to lr and say nothing about the
    optimizer on DTensors."""
    lr = 1e-2
    ref = copy.deepcopy(full)
    grads = {name: _full(p.grad).clone() for name, p in sharded.named_parameters()}
    for name, p in ref.named_parameters():
        p.grad = grads[name]
    for m in (ref, sharded):
        torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1).step()
    want = dict(ref.named_parameters())
    for pname, p in sharded.named_parameters():
        _close(f"after AdamW {pname}", p.detach(), want[pname].detach(), atol=1e-7)
    losses = [m.loss(tokens_BN, labels_BN)[0].detach() for m in (ref, sharded)]
    _close("loss after AdamW", losses[1], losses[0], atol=1e-4)


def _check_fsdp_composition(cfg) -> None:
    """The engine's order on a ("dp", "tp") mesh: TP on mesh["tp"], then FSDP2 over mesh["dp"] (size 1 here: two
    processes). Gradients, clipping over the two meshes and an AdamW step still match tp=1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from diffv2.model.transformer import Transformer
    from diffv2.parallel.norms import clip_grad_norm as clip_grad_norm_
    from diffv2.parallel.tensor import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (1, TP), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    full = Transformer(cfg, backend="math")
    model = apply_tensor_parallel(copy.deepcopy(full), mesh["tp"])
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    register_fsdp_forward_method(model, "loss")  # FSDP2 unshards on forward; loss is a second entry point
    tokens_BN, labels_BN, _ = _batch()
    for m in (full, model):
        m.loss(tokens_BN, labels_BN)[0].backward()
    _finish_grads(model, mesh["tp"])
    _close("fsdp grad norm", clip_grad_norm_(model.parameters(), 0.5),
           torch.nn.utils.clip_grad_norm_(full.parameters(), 0.5))
    ref = dict(full.named_parameters())
    for pname, p in model.named_parameters():
        _close(f"fsdp+tp grad {pname}", p.grad, ref[pname].grad)
    _check_adamw_step(full, model, tokens_BN, labels_BN)


def _worker(rank: int, port: int, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))["tp"]
        for name, cfg, kw in CASES:
            if name in names:
                _check_case(name, cfg, kw, mesh)
        _check_fsdp_composition(tiny_cfg("diffv1", n_heads=8, n_kv_heads=4, qk_norm=True))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(names: list[str]) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), names), nprocs=TP, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises with the worker's traceback if one fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"tensor-parallel workers still running after {TIMEOUT_S}s (hung collective?)")


def test_tp2_matches_tp1_outputs_and_gradients_for_every_variant():
    """T14 for every attention variant and ablation switch, plus KV-cache decoding, gradient clipping, one AdamW
    step at tp=2 and the TP-then-FSDP2 composition."""
    _spawn([name for name, _, _ in CASES])


# --- validate_tp ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [c for _, c, _ in CASES], ids=[n for n, _, _ in CASES])
def test_validate_tp_accepts_the_spawned_cases(cfg):
    validate_tp(cfg, 1)
    validate_tp(cfg, 2)


@pytest.mark.parametrize("cfg, tp, message", [
    (tiny_cfg(), 4, "tp=4 must divide n_kv_heads=2"),  # whole GQA groups per rank (spec R5)
    (tiny_cfg(n_heads=6, n_kv_heads=3), 2, "tp=2 must divide n_kv_heads=3 "),  # R5: 2 ranks would split a group
    (tiny_cfg(), 3, "use tp in [1, 2]"),
    (tiny_cfg("baseline", n_heads=4, n_kv_heads=2, head_multiplier=1.5), 4, "query heads=6"),
    (tiny_cfg("diffv1", n_heads=8, n_kv_heads=2), 2, "n_kv_heads/2 (V1 kv heads of 2d)=1"),
    (ModelConfig(**{**tiny_cfg(n_heads=8, n_kv_heads=8).__dict__, "ffn_hidden": 100}), 8, "ffn_hidden=100"),
    (tiny_cfg(pairing="half_split"), 2, "pairing=half_split pairs head i with head i+n_heads"),
    (ModelConfig(**{**tiny_cfg().__dict__, "moe": MoEConfig(n_experts=4)}), 2, "shards dense SwiGLU blocks only"),
    (tiny_cfg(), 0, "must be a positive integer"),
    (tiny_cfg(n_heads=3, n_kv_heads=2), 1, "DIFF V2 pairs need n_heads % n_kv_heads == 0"),
])
def test_validate_tp_refuses_bad_degrees_with_one_line(cfg, tp, message):
    with pytest.raises(ValueError) as err:
        validate_tp(cfg, tp)
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_half_split_and_moe_are_fine_at_tp1():
    validate_tp(tiny_cfg(pairing="half_split"), 1)
    validate_tp(ModelConfig(**{**tiny_cfg().__dict__, "moe": MoEConfig(n_experts=4)}), 1)
