"""DeepSpeed ZeRO engine (diffv2/parallel/deepspeed_engine.py): the generated JSON, and 2-rank gloo runs driven
through the `Engine` interface exactly as the training loop drives it, against a one-process plain-PyTorch
reference (the base `Engine` with `build_optimizer`, in float64) on the same global batch.

One spawn of two processes runs every configuration in turn (each spawn pays the torch + DeepSpeed import and the
first-initialize cost); the parent computes the references and asserts. Workers skip DeepSpeed's CPU shared-memory
comm op (used only by tensor-parallel inference all-reduce, not by training): building it costs ~30 s on a fresh
CI box and loading it ~8 s per process. So nothing is JIT-compiled here except DeepSpeedCPUAdam in the opt-in
offload test (cached in TORCH_EXTENSIONS_DIR, default ~/.cache/diffv2/torch_extensions).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffv2.config import Config, ModelConfig, MoEConfig  # noqa: E402
from diffv2.model.transformer import Transformer  # noqa: E402
from diffv2.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from diffv2.parallel.engine import Engine  # noqa: E402

pytest.importorskip("deepspeed")

WORLD, MICRO, GLOBAL, SEQ, STEPS, SAVE_AFTER = 2, 1, 4, 16, 4, 2
ACCUM_DS, ACCUM_REF = GLOBAL // (MICRO * WORLD), GLOBAL // MICRO
# (name, zero stage, precision, offload_optimizer, model overrides): fp32 runs are compared with the (float64)
# reference at rtol 1e-4; bf16 runs (BF16_Optimizer at stage 1, ZeRO-3 at stage 3) loosely, to show bf16 works on the
# CPU.
RUNS = [("zero1", 1, "fp32", False, {}), ("zero2", 2, "fp32", False, {}),
        ("zero3", 3, "fp32", False, {"tie_embeddings": True}),
        # MoE blocks are ZeRO-3 leaves; balance=none because the aux loss balances over all ranks' tokens by design,
        # which a one-process reference accumulating micro-batches does not reproduce.
        ("zero3_moe", 3, "fp32", False, {"moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=32, n_shared_experts=1,
                                                          balance="none")}),
        ("zero1_bf16", 1, "bf16", False, {}), ("zero3_bf16", 3, "bf16", False, {}),
        # Compiled blocks (trainer.compile=true: parallelize compiles every block before deepspeed.initialize, as for
        # FSDP2) against the same float64 eager reference; ZeRO-3 gathers parameters in hooks around them.
        ("zero2_compiled", 2, "fp32", False, {"compile": True}), ("zero3_compiled", 3, "fp32", False, {"compile": True})]
# ZeRO-Offload steps with DeepSpeedCPUAdam, whose C++ op takes ~4.5 minutes to build on the 2-core CI box: opt-in.
OFFLOAD_RUNS = [("zero2_offload", 2, "fp32", True, {}), ("zero3_offload", 3, "fp32", True, {})]
RUN_OFFLOAD = os.environ.get("DIFFV2_TEST_OFFLOAD") == "1"
SPAWN_TIMEOUT_S = 1800  # a hang guard for the whole spawn (~1-2 minutes on two idle cores), not a time limit


def make_cfg(stage: int = 2, precision: str = "fp32", offload: bool = False, compile: bool = False,
             **model) -> Config:
    """`compile`: trainer.compile; `model`: ModelConfig fields."""
    cfg = Config()
    cfg.trainer.compile = compile
    cfg.model = ModelConfig(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=128,
                            vocab_size=101, max_seq_len=64, **model)
    cfg.data.seq_len = SEQ
    cfg.trainer.device, cfg.trainer.precision = "cpu", precision
    cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size, cfg.trainer.max_steps = MICRO, GLOBAL, STEPS
    cfg.optim.warmup_steps, cfg.optim.grad_clip = 3, 0.5  # lr changes every step; clipping is active
    # AdamW's first step moves an element by lr * g / (|g| + eps): near g = 0 an error in g moves the weight lr / eps
    # times as far. fp32 gradient elements carry absolute rounding errors of ~1e-10 (ZeRO adds the same terms in
    # other orders than one process: micro-batch gradients grouped by rank or by micro-step, and at stage 3 identity
    # autograd nodes at every module boundary regroup the residual stream's gradient sums), so with the default
    # eps = 1e-8 (x1e5) a weight whose gradient happened to be ~1e-9 moved by up to 1e-5, several times the
    # 1e-6 + 1e-4 |p| tolerance: even the fp32 one-process loop missed the exact (float64) result by 3.8x it. At 1e-5
    # (x100) every fp32 run lands within 0.15 of the tolerance of the exact result.
    cfg.optim.eps = 1e-5
    cfg.parallel.engine, cfg.parallel.deepspeed.zero_stage = "deepspeed", stage
    cfg.parallel.deepspeed.offload_optimizer = offload
    return cfg


def batch() -> torch.Tensor:
    return torch.randint(0, 101, (STEPS + 1, GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(1))


# =============================================================================================== deepspeed_config
def test_config_batch_arithmetic_clipping_and_silence():
    from diffv2.parallel.deepspeed_engine import deepspeed_config

    cfg = make_cfg()
    cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 2, 16
    ds = deepspeed_config(cfg, 4, "cpu")
    assert [ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")] \
        == [2, 2, 16]
    assert ds["gradient_clipping"] == 0.5 and ds["wall_clock_breakdown"] is False and ds["steps_per_print"] > 1e15
    json.dumps(ds)  # the run record stores it as JSON
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size x ranks = 2 x 3"):
        deepspeed_config(cfg, 3, "cpu")


def test_config_stage_bf16_and_offload():
    from diffv2.parallel.deepspeed_engine import deepspeed_config

    z2 = deepspeed_config(make_cfg(2), 2, "cpu")
    assert z2["zero_optimization"]["stage"] == 2 and "stage3_prefetch_bucket_size" not in z2["zero_optimization"]
    assert "offload_optimizer" not in z2["zero_optimization"] and not z2["bf16"]["enabled"]
    z3 = deepspeed_config(make_cfg(3), 2, "cpu")["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is False
    bf16 = deepspeed_config(make_cfg(1, "bf16"), 2, "cpu")
    assert bf16["bf16"]["enabled"] and bf16["data_types"]["grad_accum_dtype"] == "fp32"
    auto = make_cfg(2, "auto")
    assert deepspeed_config(auto, 2, "cuda")["bf16"]["enabled"]
    assert not deepspeed_config(auto, 2, "cpu")["bf16"]["enabled"]
    assert deepspeed_config(auto, 2, "cuda")["zero_optimization"]["overlap_comm"]
    off = make_cfg(2)
    off.parallel.deepspeed.offload_optimizer = True
    assert deepspeed_config(off, 2, "cuda")["zero_optimization"]["offload_optimizer"] == {"device": "cpu",
                                                                                          "pin_memory": True}


def test_config_file_is_used_and_checked(tmp_path, caplog):
    from diffv2.parallel.deepspeed_engine import deepspeed_config

    cfg = make_cfg()
    path = tmp_path / "ds.json"
    cfg.parallel.deepspeed.config_file = str(path)
    path.write_text(json.dumps({"train_batch_size": 4, "zero_optimization": {"stage": 1}}))
    with caplog.at_level("INFO"):
        ds = deepspeed_config(cfg, 2, "cpu")
    assert ds["zero_optimization"] == {"stage": 1} and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and str(path) in caplog.text
    for bad, match in [({"train_batch_size": 8}, "sets train_batch_size=8 but the trainer config gives 4"),
                       ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu=2"),
                       ({"gradient_clipping": 1.0}, "gradient_clipping=1.0 but optim.grad_clip=0.5"),
                       ({"optimizer": {"type": "Adam"}}, "has a 'optimizer' section; remove it")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            deepspeed_config(cfg, 2, "cpu")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable JSON file"):
        deepspeed_config(cfg, 2, "cpu")


def test_load_refuses_other_world_size_or_stage(tmp_path):
    """ZeRO partitions do not reshard: the check runs before DeepSpeed reads anything (no process group needed)."""
    from diffv2.parallel.deepspeed_engine import META, DeepSpeedEngine

    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)
    engine.world, engine.stage = 4, 2
    with pytest.raises(ValueError, match="not a checkpoint of parallel.engine=deepspeed"):
        engine.load(tmp_path)
    (tmp_path / META).write_text(json.dumps({"world_size": 2, "zero_stage": 2}))
    with pytest.raises(ValueError, match="for 2 ranks but this run has 4; resume on 2 ranks.*ds_to_universal"):
        engine.load(tmp_path)
    engine.world, engine.stage = 2, 3
    with pytest.raises(ValueError, match="resume with parallel.deepspeed.zero_stage=2"):
        engine.load(tmp_path)


# =============================================================================================== 2-rank runs
def _full_params(model, stage: int) -> dict:
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _inner_state(engine) -> list[torch.Tensor]:
    """This rank's optimizer partition: flat fp32 master weights and every AdamW state tensor."""
    inner = engine.optimizer.optimizer
    out = []
    for group in inner.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            out += [v.clone() for _, v in sorted(inner.state[p].items()) if torch.is_tensor(v)]
    return out


def _train_steps(engine, cfg, data, steps, record_grads: bool) -> dict:
    """The loop's calls, verbatim; rank r takes rows r, r + W, ... of each global batch."""
    import torch.distributed as dist

    rank, out = dist.get_rank(), {"loss": [], "norm": [], "lr": [], "grad_sq": []}
    for step in steps:
        lr = lr_at(step, cfg.optim, cfg.trainer.max_steps)
        set_lr(engine.optimizer, lr)
        out["lr"].append([g["lr"] for g in engine.optimizer.optimizer.param_groups])  # reached the inner optimizer
        loss_sum = torch.zeros(())
        for micro in range(ACCUM_DS):
            row = data[step, rank + WORLD * micro :][:MICRO]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16"):
                loss = engine.model.loss(row[:, :-1], row[:, 1:])[0]
            engine.backward(loss / ACCUM_DS, micro == ACCUM_DS - 1)
            loss_sum += loss.detach().float()
        dist.all_reduce(loss_sum)
        out["loss"].append(loss_sum.item() / (WORLD * ACCUM_DS))
        if record_grads:  # what the grad-norm monitor reads, per parameter, summed over ranks
            names = [n for n, _ in engine.model.named_parameters()]
            sq = torch.zeros(len(names))
            for name, piece in engine.named_grads():
                sq[names.index(name)] += piece.tensor.float().square().sum()
            dist.all_reduce(sq)
            out["grad_sq"].append(dict(zip(names, sq.tolist())))
        out["norm"].append(engine.optimizer_step(cfg.optim.grad_clip).item())
        engine.zero_grad()
    return out


def _run(name, stage, precision, offload, overrides, data, ckpt: Path) -> dict:
    from diffv2.parallel.build import build_engine

    cfg = make_cfg(stage, precision, offload, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    t0 = time.perf_counter()
    engine = build_engine(cfg, model, torch.device("cpu"))
    res = {"describe": engine.describe(), "init_s": time.perf_counter() - t0, "ds_config": engine.ds_config,
           "is_transformer": engine.model is model, "dp": (engine.dp_rank, engine.dp_size),
           "compiled_blocks": sum(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)}
    fp32 = precision == "fp32"
    first = _train_steps(engine, cfg, data, range(SAVE_AFTER), record_grads=True)
    if fp32:
        engine.save(ckpt / name)
        rank = engine.dp_rank
        mine = [f for f in (ckpt / name / "deepspeed").iterdir()
                if f.name.startswith(f"zero_pp_rank_{rank}_") or (rank == 0 and f.name.startswith("mp_rank_"))]
        res["state_bytes"], res["written_bytes"] = engine.state_bytes(), sum(f.stat().st_size for f in mine)
        at_save = _full_params(model, stage), _inner_state(engine)
    rest = _train_steps(engine, cfg, data, range(SAVE_AFTER, STEPS), record_grads=True)
    res.update({k: first[k] + rest[k] for k in first}, params=_full_params(model, stage))
    if not fp32:
        return res
    # Evaluation path: engine.model.loss under no_grad/eval (DeepSpeed's forward), and `hidden` called directly
    # (the attention probes do; under ZeRO-3 the submodules' hooks gather their parameters).
    model.eval()
    with torch.no_grad():
        res["eval_loss"] = engine.model.loss(data[STEPS, :1, :-1], data[STEPS, :1, 1:])[0].item()
        res["hidden"] = engine.model.hidden(data[STEPS, :1, :-1]).clone()
    model.train()
    # Non-finite gradients: DeepSpeed skips the step itself; parameters and optimizer state stay bit-identical.
    before = _full_params(model, stage), _inner_state(engine)
    row = data[STEPS, :MICRO]
    for micro in range(ACCUM_DS):
        loss = engine.model.loss(row[:, :-1], row[:, 1:])[0] * float("nan")
        engine.backward(loss, micro == ACCUM_DS - 1)
    res["nan_norm"] = engine.optimizer_step(cfg.optim.grad_clip).item()
    engine.zero_grad()
    after = _full_params(model, stage), _inner_state(engine)
    res["nan_unchanged"] = all(torch.equal(before[0][n], after[0][n]) for n in before[0]) and all(
        torch.equal(a, b) for a, b in zip(before[1], after[1]))
    # Resume: a fresh engine over a differently initialised model loads the step-SAVE_AFTER checkpoint.
    torch.manual_seed(123)
    fresh = Transformer(cfg.model)
    engine2 = build_engine(cfg, fresh, torch.device("cpu"))
    engine2.load(ckpt / name)
    loaded = _full_params(fresh, stage), _inner_state(engine2)
    res["resume_params_equal"] = all(torch.equal(at_save[0][n], loaded[0][n]) for n in at_save[0])
    res["resume_optim_equal"] = len(at_save[1]) == len(loaded[1]) and all(
        torch.equal(a, b) for a, b in zip(at_save[1], loaded[1]))
    resumed = _train_steps(engine2, cfg, data, range(SAVE_AFTER, STEPS), record_grads=False)
    res["resumed_loss"], res["resumed_params"] = resumed["loss"], _full_params(fresh, stage)
    res["ckpt_files"] = sorted(str(p.relative_to(ckpt / name)) for p in (ckpt / name).rglob("*") if p.is_file())
    return res


def _worker(rank: int, port: int, out_dir: str, runs: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see the module doc
    from diffv2.parallel import dist as pdist

    pdist.init(pdist.detect(), "cpu", timeout_s=120)  # a stuck collective fails instead of hanging
    data = batch()
    results = {}
    try:
        for name, *run in runs:
            results[name] = _run(name, *run, data, Path(out_dir) / "ckpt")
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        pdist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, nprocs: int, timeout_s: float) -> None:
    """torch.multiprocessing.spawn with a deadline: a hung rank fails the test instead of the CI job."""
    ctx = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"2-rank DeepSpeed run did not finish in {timeout_s}s")


def reference(cfg: Config, data: torch.Tensor) -> dict:
    """One process, plain PyTorch: the base Engine, accumulating the whole global batch in micro-batches, in float64
    (the same fp32 initial weights, cast): the exact result to ~1e-16, whatever the thread count and kernels of the
    process running it, so a run's own fp32 rounding gets the whole tolerance instead of sharing it with the
    reference's (which sums in yet another order)."""
    torch.manual_seed(0)
    model = Transformer(cfg.model).double()
    engine = Engine(model, build_optimizer(model, cfg.optim, torch.device("cpu")))
    out = {"loss": [], "norm": [], "grad_sq": []}
    for step in range(STEPS):
        set_lr(engine.optimizer, lr_at(step, cfg.optim, cfg.trainer.max_steps))
        loss_sum = 0.0
        for micro in range(ACCUM_REF):
            row = data[step, micro * MICRO : (micro + 1) * MICRO]
            loss = engine.model.loss(row[:, :-1], row[:, 1:])[0]
            engine.backward(loss / ACCUM_REF, micro == ACCUM_REF - 1)
            loss_sum += loss.item()
        out["loss"].append(loss_sum / ACCUM_REF)
        out["grad_sq"].append({n: p.grad.square().sum().item() for n, p in model.named_parameters()})
        out["norm"].append(engine.optimizer_step(cfg.optim.grad_clip).item())
        engine.zero_grad()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.eval()
        out["eval_loss"] = model.loss(data[STEPS, :1, :-1], data[STEPS, :1, 1:])[0].item()
        out["hidden"] = model.hidden(data[STEPS, :1, :-1])
    return out


def run_all(runs, out: Path) -> tuple[list, float]:
    """Results of every configuration on both ranks (one spawn), and the wall time it took."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "diffv2" / "torch_extensions"))
    t0 = time.perf_counter()
    spawn(_worker, (_free_port(), str(out), runs), WORLD, SPAWN_TIMEOUT_S)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name, *_ in runs:
        assert all(name in r for r in results), f"{name} did not finish on every rank (see the captured stderr)"
    return results, time.perf_counter() - t0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_all(RUNS, tmp_path_factory.mktemp("ds"))


def _close(got, want, rtol, what):
    assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-7), f"{what}: {got} vs reference {want}"


def check_reference(results, run) -> None:
    """Losses, pre-clip grad norms, per-parameter monitor grads (`named_grads`) and final parameters equal the
    one-process float64 reference within fp32 tolerance; the lr set each step reached the inner optimizer."""
    name, stage, precision, offload, overrides = run
    cfg = make_cfg(stage, precision, offload, **overrides)
    ref = reference(cfg, batch())
    for rank, res in enumerate(results):
        r = res[name]
        assert r["is_transformer"] and r["dp"] == (rank, WORLD) and f"ZeRO-{stage} (fp32" in r["describe"]
        assert r["compiled_blocks"] == (cfg.model.n_layers if cfg.trainer.compile else 0), r["compiled_blocks"]
        for step in range(STEPS):
            _close(r["loss"][step], ref["loss"][step], 1e-5, f"rank {rank} step {step} loss")
            _close(r["norm"][step], ref["norm"][step], 1e-4, f"rank {rank} step {step} grad norm")
            assert r["lr"][step] == [lr_at(step, cfg.optim, STEPS)] * len(r["lr"][step])
            for pname, sq in ref["grad_sq"][step].items():
                _close(r["grad_sq"][step][pname], sq, 1e-4, f"rank {rank} step {step} named grad {pname}")
        for pname, p in ref["params"].items():
            torch.testing.assert_close(r["params"][pname].double(), p, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{pname}: {m}")
        _close(r["eval_loss"], ref["eval_loss"], 1e-5, "eval loss through DeepSpeed's forward")
        torch.testing.assert_close(r["hidden"].double(), ref["hidden"], rtol=1e-4, atol=1e-5)


def check_round_trip_and_nonfinite_skip(results, name) -> None:
    """save -> load into a fresh engine restores parameters and this rank's optimizer partition bit for bit, and
    the following steps repeat exactly; a step with NaN gradients changes nothing and reports a non-finite norm."""
    for rank, res in enumerate(results):
        r = res[name]
        assert r["resume_params_equal"] and r["resume_optim_equal"], f"rank {rank}: load did not restore the state"
        assert r["resumed_loss"] == r["loss"][SAVE_AFTER:], "the steps after a resume differ"
        for pname, p in r["params"].items():
            assert torch.equal(r["resumed_params"][pname], p), pname
        assert not math.isfinite(r["nan_norm"]) and r["nan_unchanged"], "a non-finite step changed the state"
        assert 0.5 * r["written_bytes"] < r["state_bytes"] <= r["written_bytes"], "state_bytes is not a lower bound"
        assert "deepspeed_engine.json" in r["ckpt_files"] and "latest" not in r["ckpt_files"]
        assert any(f.startswith("deepspeed/zero_pp_rank_1_") for f in r["ckpt_files"])


FP32 = [r for r in RUNS if r[2] == "fp32"]


@pytest.mark.parametrize("run", FP32, ids=[r[0] for r in FP32])
def test_zero_equals_single_process_reference(ranks, run):
    check_reference(ranks[0], run)


@pytest.mark.parametrize("name", [r[0] for r in FP32])
def test_save_load_round_trip_and_nonfinite_skip(ranks, name):
    check_round_trip_and_nonfinite_skip(ranks[0], name)


@pytest.mark.parametrize("name", [r[0] for r in RUNS if r[2] == "bf16"])
def test_bf16_trains_on_cpu(ranks, name):
    """bf16 parameters with fp32 master weights and fp32 gradient accumulation: close to the fp32 reference, and
    the monitor's grad partitions add up to the norm DeepSpeed returns."""
    results, _ = ranks
    _, stage, _, offload, overrides = next(r for r in RUNS if r[0] == name)
    ref = reference(make_cfg(stage, "fp32", offload, **overrides), batch())
    for res in results:
        r = res[name]
        assert "(bf16" in r["describe"] and r["ds_config"]["bf16"]["enabled"]
        for step in range(STEPS):
            _close(r["loss"][step], ref["loss"][step], 2e-2, f"step {step} bf16 loss")
            _close(r["norm"][step], ref["norm"][step], 5e-2, f"step {step} bf16 grad norm")
            _close(math.sqrt(sum(r["grad_sq"][step].values())), r["norm"][step], 1e-3, f"step {step} named grads")


def test_spawn_time(ranks):
    """Everything above ran in one spawn; report its cost (the budget on the 2-core CI box is ~2 minutes)."""
    results, wall_s = ranks
    print(f"2-rank DeepSpeed spawn: {wall_s:.1f}s; engine init: "
          + ", ".join(f"{n} {results[0][n]['init_s']:.1f}s" for n, *_ in RUNS))
    assert wall_s < SPAWN_TIMEOUT_S


SINGLE = """
import importlib, json, torch
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
from diffv2.model.transformer import Transformer
from diffv2.parallel.build import build_engine
from tests.test_deepspeed_engine import batch, make_cfg
cfg = make_cfg(3)
torch.manual_seed(0)
engine = build_engine(cfg, Transformer(cfg.model), torch.device("cpu"))
data = batch()
for micro in range(4):
    loss = engine.model.loss(data[0, micro:micro + 1, :-1], data[0, micro:micro + 1, 1:])[0]
    engine.backward(loss / 4, micro == 3)
norm = engine.optimizer_step(cfg.optim.grad_clip).item()
print(json.dumps({"norm": norm, "dp": [engine.dp_rank, engine.dp_size], "describe": engine.describe()}))
"""


def test_one_process_without_launcher():
    """`python train.py parallel.engine=deepspeed` on one device: no RANK/MASTER_ADDR, DeepSpeed must not look
    for MPI. A subprocess, because DeepSpeed's process group would outlive the test in this one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "OMPI_COMM_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    from watched import run_watched  # here: SINGLE imports this module in a process without tests/ on its path

    proc = run_watched([sys.executable, "-c", SINGLE], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dp"] == [0, 1] and out["describe"] == "DeepSpeed ZeRO-3 (fp32), 1 ranks"
    _close(out["norm"], reference(make_cfg(3), batch())["norm"][0], 1e-4, "one-process ZeRO-3 grad norm")


@pytest.mark.skipif(not RUN_OFFLOAD, reason="builds DeepSpeed's cpu_adam op (~4.5 min); set DIFFV2_TEST_OFFLOAD=1")
def test_offload_optimizer_equals_reference(tmp_path):
    """ZeRO-Offload (DeepSpeedCPUAdam with our decay groups) at stages 2 and 3: same checks as above."""
    results, _ = run_all(OFFLOAD_RUNS, tmp_path)
    for run in OFFLOAD_RUNS:
        assert "optimizer offloaded to CPU" in results[0][run[0]]["describe"]
        check_reference(results, run)
        check_round_trip_and_nonfinite_skip(results, run[0])
