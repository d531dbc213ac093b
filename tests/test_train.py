"""The single-machine trainer through the real Hydra entry point: composition, validation, runs, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cli_runs import ROOT, compose_cfg, metrics, train
from diffv2.train import checkpoint
from diffv2.train.validate import validate


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_default_config_composes_to_tiny_diffv2():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.model.attention.variant, cfg.data.name) == ("tiny", "diffv2", "sample")
    validate(cfg)


@pytest.mark.parametrize(
    "group, field, value",
    [("attention=baseline", "variant", "baseline"), ("attention=baseline_1p5h", "head_multiplier", 1.5),
     ("attention=baseline_2h", "head_multiplier", 2.0), ("attention=diffv1", "variant", "diffv1"),
     ("attention=diffv2_half_split", "pairing", "half_split"), ("attention=diffv2_no_lambda", "lambda_mode", "none"),
     ("attention=diffv2_raw_lambda", "lambda_mode", "raw")],
)
def test_attention_group_selects_variant(group, field, value):
    cfg = compose_cfg(group)
    assert getattr(cfg.model.attention, field) == value
    validate(cfg)


@pytest.mark.parametrize("preset", ["tiny", "125m", "350m", "1b", "7b"])
@pytest.mark.parametrize("attention", ["diffv2", "baseline", "baseline_1p5h", "baseline_2h", "diffv1"])
def test_every_preset_accepts_every_attention_arm(preset, attention):
    validate(compose_cfg(f"model={preset}", f"attention={attention}", "data.seq_len=1024"))


def test_command_line_overrides_reach_nested_keys():
    cfg = compose_cfg("model.attention.rope_theta=500000", "optim.lr=1e-4", "trainer.max_steps=7")
    assert (cfg.model.attention.rope_theta, cfg.optim.lr, cfg.trainer.max_steps) == (500000.0, 1e-4, 7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.attention.variant=diffv3"], "model.attention.variant='diffv3' is not one of"),
        (["model.n_heads=6", "model.n_kv_heads=4"], "n_heads=6, n_kv_heads=4"),
        (["model.n_heads=8", "model.n_kv_heads=16"], "n_heads=8, n_kv_heads=16"),
        (["data.seq_len=8192", "model.max_seq_len=4096"], "data.seq_len=8192 exceeds model.max_seq_len=4096"),
        (["trainer.global_batch_size=12", "trainer.micro_batch_size=8"], "global_batch_size=12 is not a multiple"),
        (["attention=baseline_1p5h", "model.n_heads=4", "model.n_kv_heads=4"], "must be an integer multiple"),
        (["optim.schedule=linear"], "optim.schedule='linear'"),
        (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
        (["model.attention.pairing=half_split", "attention=baseline"], "need attention.variant=diffv2"),
        (["data.prefixes=[a,b]", "data.weights=[1.0]"], "data.weights has 1 entries"),
        (["trainer.max_steps=10", "trainer.profile_start=9", "trainer.profile_steps=3"], "ends after trainer.max_steps=10"),
        (["trainer.profile_steps=0"], "trainer.profile_steps=0"),
        (["trainer.profile_start=-1"], "trainer.profile_start=-1"),
    ],
)
def test_invalid_config_is_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=None) as err:
        validate(compose_cfg(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="no_such_key"):
        compose_cfg("model.no_such_key=1")


def test_bad_config_exits_with_one_line_before_any_work(tmp_path, data_cache):
    proc = train(tmp_path / "run", data_cache, "model.n_heads=3", "model.n_kv_heads=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: DIFF V2 pairs need")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_path_is_one_clear_error(tmp_path, data_cache):
    proc = train(tmp_path / "run", data_cache, f"data.prefixes=[{tmp_path}/nope]")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nope" in last and "data.prepare" in last


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "a"
    train(run_dir, data_cache, "trainer.max_steps=12", "trainer.log_interval=1", "trainer.eval_interval=6",
          "trainer.ckpt_interval=6", "trainer.keep_last=3", check=True)
    return run_dir


def test_run_writes_the_experiment_record(finished_run):
    for name in ("config.yaml", "git.json", "versions.json", "metrics.jsonl"):
        assert (finished_run / name).is_file(), name
    saved = OmegaConf.load(finished_run / "config.yaml")
    assert saved.model.d_model == 64 and "${" not in OmegaConf.to_yaml(saved)  # resolved
    assert "torch" in json.loads((finished_run / "versions.json").read_text())["packages"]
    assert [p.name for p in checkpoint.list_checkpoints(finished_run / "checkpoints")] == [
        "step_00000006", "step_00000012"]


def test_loss_decreases_and_validation_is_logged(finished_run):
    losses = train_losses(finished_run)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 0.5
    val = [m["train/val_loss"] for m in metrics(finished_run) if "train/val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]


def test_resume_is_bit_exact(finished_run, tmp_path, data_cache):
    """Stop after step 6 (drop the later checkpoint), resume: steps 7-12 repeat the uninterrupted losses exactly."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    train(run_dir, data_cache, "trainer.max_steps=12", "trainer.log_interval=1", "trainer.eval_interval=6",
          "trainer.ckpt_interval=6", "trainer.keep_last=3", check=True)
    assert train_losses(run_dir) == train_losses(finished_run)  # float equality, every step
    a = torch.load(finished_run / "checkpoints/step_00000012/trainer.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints/step_00000012/trainer.pt", weights_only=True)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_changed_model_shape_refuses_to_resume(finished_run, tmp_path, data_cache):
    run_dir = tmp_path / "reshaped"
    shutil.copytree(finished_run, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = train(run_dir, data_cache, "trainer.max_steps=12", "model.ffn_hidden=256")
    assert proc.returncode == 2 and "ffn_hidden" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_raising_max_steps_continues_a_finished_run(finished_run, tmp_path, data_cache):
    """A finished run continues when trainer.max_steps is raised: steps 13-14 are trained from the step-12
    checkpoint, the earlier rows stay as they were, and the run says how the schedule and the data order go on."""
    run_dir = tmp_path / "longer"
    shutil.copytree(finished_run, run_dir)
    before = metrics(run_dir)
    proc = train(run_dir, data_cache, "trainer.max_steps=14", "trainer.log_interval=1", check=True)
    text = proc.stdout + proc.stderr
    assert "resumed from" in text and "at step 12" in text
    assert "trainer.max_steps is now 14 (the checkpoint at step 12 planned 96 samples, this run 112)" in text
    assert "learning-rate schedule is re-planned for 14 steps" in text
    assert ("the data continues in the same order" in text) != ("may revisit samples already trained on" in text)
    after = metrics(run_dir)
    assert after[:len(before)] == before
    assert [m["step"] for m in after[len(before):] if "train/loss" in m] == [13, 14]
    assert checkpoint.read_meta(checkpoint.latest_valid(run_dir / "checkpoints"))["train_samples"] == 112


def test_lowering_max_steps_below_the_checkpoint_is_refused(finished_run, tmp_path, data_cache):
    run_dir = tmp_path / "shorter"
    shutil.copytree(finished_run, run_dir)
    proc = train(run_dir, data_cache, "trainer.max_steps=10")
    assert proc.returncode == 2
    assert "is at step 12, past trainer.max_steps=10; raise trainer.max_steps" in proc.stderr.strip().splitlines()[-1]


def test_baseline_runs_from_the_same_entry_point(tmp_path, data_cache):
    run_dir = tmp_path / "base"
    train(run_dir, data_cache, "attention=baseline", "trainer.max_steps=4", "trainer.log_interval=2", check=True)
    assert OmegaConf.load(run_dir / "config.yaml").model.attention.variant == "baseline"
    assert len(train_losses(run_dir)) == 2


def test_profiled_steps_write_a_trace_and_an_operator_table(tmp_path, data_cache):
    import gzip
    import json

    run_dir = tmp_path / "prof"
    train(run_dir, data_cache, "trainer.max_steps=5", "trainer.log_interval=5", "trainer.profile_start=2",
          "trainer.profile_steps=2", "trainer.eval_interval=-1", "trainer.ckpt_interval=-1", check=True)
    trace = json.loads(gzip.decompress((run_dir / "profile" / "trace_rank0.json.gz").read_bytes()))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::mm" in n or "aten::addmm" in n or "aten::bmm" in n for n in names)  # the model's matmuls
    assert any(n.startswith("Optimizer.step") for n in names)  # the optimizer step is inside the window
    table = (run_dir / "profile" / "ops_rank0.txt").read_text()
    assert table.startswith("optimizer steps 2-3\n") and "operators sorted by self_cpu_time_total" in table
    assert "Self CPU" in table and "no device (CPU run)" in table
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["ops_rank0.txt", "trace_rank0.json.gz"]
    assert len(train_losses(run_dir)) == 1  # the run itself is unchanged: it trains to the end


def test_kernel_summary_sorts_device_time_into_kinds():
    from diffv2.train.profiling import kernel_kind, kernel_summary

    kinds = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg_knob_7": "attention",
        "triton_poi_fused__unsafe_view_mul_silu_2": "compiled (triton)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "Memcpy DtoD (Device -> Device)": "copy / cast",
        "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>": "copy / cast",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, float>": "reduction",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "elementwise",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "collective (other)",
        "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)": "all-to-all",
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "all-gather/r-scatter",
        "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "all-gather/r-scatter",
        "some_custom_kernel": "other",
    }
    assert {name: kernel_kind(name) for name in kinds} == kinds
    text = kernel_summary([("nvjet_sm90_tst_a", 600.0, 3), ("triton_poi_x", 300.0, 2), ("Memcpy HtoD", 100.0, 1)],
                          wall_us=2000.0, top=2)
    lines = text.splitlines()
    assert lines[0] == "device busy 1.0 ms of 2.0 ms wall (50.0%)"
    assert lines[2].split() == ["matmul", "0.6", "60.0%", "3"] and lines[3].split()[-3:] == ["0.3", "30.0%", "2"]
    assert [line.split()[-1] for line in lines[-2:]] == ["nvjet_sm90_tst_a", "triton_poi_x"]  # top 2 only
    assert kernel_summary([], 1.0) == "no device kernels recorded\n"


def test_idle_gaps_name_the_host_cause_of_each_device_gap():
    """A synthetic trace: a gap after the host waited in a synchronising call, and a gap where the next kernel was
    launched late inside the optimizer step; each is timed and named, the largest first."""
    from diffv2.train.profiling import idle_gaps

    def ev(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid, "args": args}

    events = [
        ev("kernel", "k1", 0, 100, tid=20, correlation=1), ev("kernel", "k2", 150, 110, tid=20, correlation=2),
        ev("kernel", "k3", 400, 100, tid=20, correlation=3), ev("kernel", "k4", 505, 10, tid=20, correlation=4),
        ev("cuda_runtime", "cudaLaunchKernel", 5, 3, correlation=1),
        ev("cuda_runtime", "cudaStreamSynchronize", 20, 85),
        ev("cuda_runtime", "cudaLaunchKernel", 120, 3, correlation=2),
        ev("cuda_driver", "cuLaunchKernel", 380, 3, correlation=3),
        ev("cuda_runtime", "cudaLaunchKernel", 386, 3, correlation=4),
        ev("user_annotation", "ProfilerStep#1", 0, 1000), ev("cpu_op", "aten::item", 10, 100),
        ev("cpu_op", "aten::_local_scalar_dense", 12, 96), ev("user_annotation", "Optimizer.step", 300, 90),
        ev("cpu_op", "aten::add_", 370, 15),
    ]
    lines = idle_gaps(events).splitlines()
    assert lines[0] == ("device idle gaps of >= 10 us: 0.2 ms in 2 gaps (36.9% of the 0.5 ms from the first to the "
                        "last kernel), by cause:")
    assert lines[2].split(None, 3) == ["0.14", "73.7%", "1", "launch: ProfilerStep#1 > aten::add_"]
    assert lines[3].split(None, 3) == ["0.05", "26.3%", "1",
                                       "sync: cudaStreamSynchronize in ProfilerStep#1 > aten::_local_scalar_dense"]
    assert lines[-2].split(None, 2)[:2] == ["0.14", "0.3"] and lines[-1].split(None, 2)[:2] == ["0.05", "0.1"]
    assert "fewer than two" in idle_gaps(events[:1])


def test_wandb_offline_run_keeps_its_id_across_resume(tmp_path, data_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "wb"
    wandb_run = ("trainer.max_steps=4", "trainer.ckpt_interval=2", "logging.wandb.mode=offline")
    train(run_dir, data_cache, *wandb_run, check=True)
    first_id = checkpoint.read_meta(run_dir / "checkpoints/step_00000004")["wandb_id"]
    assert first_id and list((run_dir / "wandb").glob(f"offline-run-*-{first_id}"))
    shutil.rmtree(run_dir / "checkpoints/step_00000004")
    train(run_dir, data_cache, *wandb_run, check=True)
    assert checkpoint.read_meta(run_dir / "checkpoints/step_00000004")["wandb_id"] == first_id


def test_multirun_sweeps_attention_and_seed(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    proc = train(None, data_cache, "attention=diffv2,baseline", "seed=0,1", f"hydra.sweep.dir={sweep}",
                 "trainer.max_steps=2", "trainer.log_interval=1", flags=["-m"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert names == ["tiny-baseline-s0", "tiny-baseline-s1", "tiny-diffv2-s0", "tiny-diffv2-s1"]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("attention", ["diffv2", "baseline"])
def test_experiment_presets_compose_and_validate(experiment, attention):
    cfg = compose_cfg(f"+experiment={experiment}", f"attention={attention}")
    validate(cfg)
    assert cfg.model.attention.variant == attention
