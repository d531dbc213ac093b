"""Bad inputs: each is refused with one `error:` line naming the problem, before any work, and leaves existing run
directories, checkpoints and datasets exactly as they were.

Every case that touches files or checkpoints runs the real CLI (`python train.py` against a copy of an existing
run, `python -m data.prepare` onto an existing dataset) and compares a hash of every file before and after.
Config-level cases run the entry point's own checks in process (`train.compose_error` for what Hydra rejects,
then `diffv2.train.validate.validate`), which is what train.py runs before anything else; a few also run through the CLI.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from cli_runs import ROOT, compose_cfg, error_line, prepare, side_by_side, train, tree_digest
from diffv2.train.validate import validate

_spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_entry)

# (overrides, world size, what the one-line error must say)
CONFIG_CASES = {
    # wrong type
    "integer given a word": (["trainer.max_steps=abc"], 1, "Value 'abc' of type 'str' could not be converted"),
    "integer given a float": (["seed=1.5"], 1, "seed=1.5; Value '1.5' of type 'float' could not be converted"),
    "float given a word": (["optim.lr=fast"], 1, "Value 'fast' of type 'str' could not be converted to Float"),
    "bool given a word": (["trainer.compile=maybe"], 1, "Value 'maybe' is not a valid bool"),
    "list given a number": (["data.prefixes=3"], 1, "data.prefixes=3; Invalid value assigned: int is not a ListConfig"),
    "misspelt key": (["model.n_layer=4"], 1, "Key 'n_layer' not in 'ModelConfig'"),
    "unknown config option": (["attention=diffv3"], 1, "Could not find 'attention/diffv3' (options: baseline,"),
    "dangling interpolation": (["run_name=${nope}"], 1, "run_name: Interpolation key 'nope' not found"),
    "sweep without --multirun": (["seed=1,2"], 1, "Ambiguous value for argument 'seed=1,2'"),
    # out of range
    "zero width": (["model.d_model=0"], 1, "model.d_model=0 must be > 0"),
    "negative depth": (["model.n_layers=-2"], 1, "model.n_layers=-2 must be > 0"),
    "zero micro-batch": (["trainer.micro_batch_size=0"], 1, "trainer.micro_batch_size=0 must be > 0"),
    "zero steps": (["trainer.max_steps=0"], 1, "trainer.max_steps=0 must be > 0"),
    "zero learning rate": (["optim.lr=0"], 1, "optim.lr=0.0 must be > 0"),
    "min lr ratio above 1": (["optim.min_lr_ratio=1.5"], 1, "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    "beta2 of 1": (["optim.beta2=1.0"], 1, "optim.beta2=1.0 must be in [0, 1)"),
    "zero AdamW epsilon": (["optim.eps=0"], 1, "optim.eps=0.0 must be > 0"),
    "eval interval below -1": (["trainer.eval_interval=-5"], 1, "trainer.eval_interval=-5 must be >= -1"),
    "negative keep_last": (["trainer.keep_last=-1"], 1, "trainer.keep_last=-1 must be >= 0"),
    "negative data workers": (["data.num_workers=-1"], 1, "data.num_workers=-1 must be >= 0"),
    "zero bad-step limit": (["trainer.max_bad_steps=0"], 1, "trainer.max_bad_steps=0 must be > 0"),
    "unknown non-finite policy": (["trainer.nonfinite=retry"], 1, "trainer.nonfinite='retry' is not one of skip"),
    "unknown device": (["trainer.device=tpu"], 1, "trainer.device='tpu' is not one of auto, cpu, cuda"),
    "unknown precision": (["trainer.precision=fp8"], 1, "trainer.precision='fp8' is not one of"),
    "unknown fp8 recipe": (["trainer.fp8=e5m2"], 1, "trainer.fp8='e5m2' is not one of off, tensorwise, rowwise"),
    "fp8 on the CPU": (["trainer.fp8=tensorwise", "trainer.device=cpu"], 1,
                       "trainer.fp8=tensorwise needs an H100-class GPU (SM89+), not trainer.device=cpu"),
    "unknown activation checkpointing": (["parallel.activation_checkpoint=some"], 1,
                                         "parallel.activation_checkpoint='some' is not one of none, full, selective, "
                                         "selective_moe"),
    "unknown expert layout": (["parallel.expert_fsdp=rows"], 1, "parallel.expert_fsdp='rows' is not one of"),
    "unknown attention backend": (["model.attention.backend=triton"], 1, "model.attention.backend='triton' is not"),
    "spike window of one": (["monitoring.spikes.window=1"], 1, "monitoring.spikes.window=1 must be >= 2"),
    # inconsistent combinations
    "sequence beyond RoPE table": (["data.seq_len=8192"], 1, "data.seq_len=8192 exceeds model.max_seq_len=4096"),
    "batch not a multiple of micro-batch": (["trainer.global_batch_size=12", "trainer.micro_batch_size=8"], 1,
                                            "trainer.global_batch_size=12 is not a multiple"),
    "world size not dividing the batch": ([], 3, "micro_batch_size x data-parallel ranks = 8 x 3"),
    "TP degree not dividing the world size": (["parallel.tp=2"], 3, "parallel.tp=2 does not divide the world size 3"),
    "TP degree not dividing KV heads": (["parallel.tp=2", "model.n_kv_heads=1"], 2,
                                        "tensor parallel degree tp=2 must divide n_kv_heads=1"),
    "TP with DeepSpeed": (["parallel.tp=2", "parallel=zero2"], 2, "parallel.tp=2 needs parallel.engine=fsdp"),
    "expert parallelism on a dense model": (["parallel.ep=2"], 2, "parallel.ep=2 needs an MoE model"),
    "expert parallelism not dividing the experts": (["model=moe_tiny", "parallel.ep=3", "trainer.micro_batch_size=1",
                                                     "trainer.global_batch_size=3", "trainer.eval_batches=3"], 3,
                                                    "parallel.ep=3 must divide the 3 data-parallel ranks and "
                                                    "model.moe.n_experts=8"),
    "meta init with DeepSpeed": (["parallel=zero2", "parallel.meta_init=true"], 1,
                                 "parallel.meta_init applies to engine=fsdp"),
    "unknown engine": (["parallel.engine=megatron"], 1, "parallel.engine='megatron' is not one of fsdp, deepspeed"),
    "unknown data-parallel layout": (["parallel.data_parallel=zero"], 1, "parallel.data_parallel='zero' is not one of"),
    "HSDP group not dividing the ranks": (["parallel=hsdp", "parallel.shard_group_size=3", "trainer.micro_batch_size=2"],
                                          4, "parallel.shard_group_size=3 does not divide the 4 data-parallel ranks"),
    "validation not splittable over ranks": (["trainer.eval_batches=1", "trainer.micro_batch_size=1",
                                              "trainer.global_batch_size=2"], 2, "cannot share evenly"),
    "missing DeepSpeed JSON": (["parallel=zero2", "parallel.deepspeed.config_file=/nonexistent/ds.json"], 1,
                               "parallel.deepspeed.config_file='/nonexistent/ds.json' does not exist"),
    # spec R1: a DIFF V2 head pair must share one KV head; TP over KV heads is the distributed engine's (pending)
    "KV heads not dividing heads": (["model.n_heads=6", "model.n_kv_heads=4"], 1,
                                    "DIFF V2 pairs need n_heads % n_kv_heads == 0 (spec R1)"),
    "more KV heads than heads": (["model.n_heads=2", "model.n_kv_heads=4"], 1, "n_heads=2, n_kv_heads=4"),
    "1.5h baseline on 4 KV heads": (["attention=baseline_1p5h", "model.n_heads=4", "model.n_kv_heads=4"], 1,
                                    "must be an integer multiple of n_kv_heads=4"),
    "DIFF V1 with odd heads": (["attention=diffv1", "model.n_heads=6", "model.n_kv_heads=3"], 1,
                               "DIFF V1 uses n_heads/2 and n_kv_heads/2 heads"),
    "DIFF V2 ablation on the baseline": (["attention=baseline", "model.attention.pairing=half_split"], 1,
                                         "need attention.variant=diffv2"),
    "blend weights not matching prefixes": (["data.prefixes=[a,b]", "data.weights=[1.0]"], 1,
                                            "data.weights has 1 entries but data.prefixes has 2"),
    "heatmap not a multiple of interval": (["monitoring.context_rms.heatmap_interval=150"], 1,
                                           "monitoring.context_rms.heatmap_interval=150 must be a positive multiple"),
}


def refusal(overrides: list[str], world_size: int) -> str:
    problem = train_entry.compose_error(overrides)
    if problem is None:
        with pytest.raises(ValueError) as err:
            validate(compose_cfg(*overrides), world_size=world_size)
        problem = str(err.value)
    return problem


@pytest.mark.parametrize("overrides, world_size, message", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_bad_config_is_one_line_naming_the_problem(overrides, world_size, message):
    problem = refusal(overrides, world_size)
    assert message in problem and "\n" not in problem


# The run every train.py case is pointed at (a copy each); its settings, so only the case's override differs.
RUN = ["trainer.max_steps=4", "trainer.ckpt_interval=2", "trainer.eval_interval=-1", "trainer.log_interval=2"]


def flip_newest_checkpoint(run_dir: Path) -> None:
    shard = next((run_dir / "checkpoints/step_00000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def damage_every_checkpoint(run_dir: Path) -> None:
    for meta in (run_dir / "checkpoints").glob("step_*/meta.json"):
        meta.unlink()


@dataclass
class Case:
    args: list[str]  # train.py overrides or data.prepare arguments; {name} is filled from the `inputs` fixture
    message: str  # what the one-line error must say
    tool: str = "train"  # train | prepare
    env: dict = field(default_factory=dict)
    fresh: bool = False  # a new run directory instead of a copy of the existing run
    damage: Optional[Callable[[Path], None]] = None  # done to the run copy before the attempt
    needs_no_gpu: bool = False


CLI_CASES = {
    # the entry point itself: Hydra's and validate's refusals reach the console as one line
    "CLI: integer given a word": Case(["trainer.max_steps=abc"], "could not be converted to Integer"),
    "CLI: negative learning rate": Case(["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    "CLI: WORLD_SIZE not dividing the batch": Case([], "not a multiple of micro_batch_size x data-parallel ranks = 4 x 3",
                                                   env={"WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
    "CLI: WORLD_SIZE without RANK": Case([], "WORLD_SIZE=3 but RANK is not set", env={"WORLD_SIZE": "3"}),
    "CLI: WORLD_SIZE not a number": Case([], "WORLD_SIZE='two' is not a positive integer", env={"WORLD_SIZE": "two"}),
    # hardware
    "attention backend needing a GPU": Case(["model.attention.backend=cudnn"], "backend=cudnn needs a CUDA GPU",
                                            needs_no_gpu=True),
    "device cuda without a GPU": Case(["trainer.device=cuda"], "trainer.device=cuda but no CUDA GPU is visible",
                                      needs_no_gpu=True),
    # data files
    "nonexistent data prefix": Case(["data.prefixes=[{data}/nope]"], "nope.idx"),
    "nonexistent tokenizer file": Case(["data.tokenizer={data}/nope/tokenizer.json"], "tokenizer file not found"),
    "tokenizer not matching the dataset": Case(["data.prefixes=[{sample}]", "data.tokenizer={bpe}"],
                                               "tokenizer mismatch: {sample} was prepared with byte"),
    "truncated .bin": Case(["data.prefixes=[{truncated_bin}]"], "truncated_bin/python_docs.bin has"),
    "truncated .idx": Case(["data.prefixes=[{truncated_idx}]"], "truncated_idx/python_docs.idx has 40 bytes but its "
                           "header describes"),
    "corpus too short for one sample": Case(["data.prefixes=[{short}]"], "fewer than data.seq_len+1 = 65"),
    "no training split": Case(["data.split='0,50,50'"], "bad data.split '0,50,50': the train weight must be > 0"),
    "unwritable cache directory": Case(["data.cache_dir=/proc/diffv2-cache"], "/proc/diffv2-cache"),
    "model vocabulary below the tokenizer's": Case(["model.vocab_size=200"], "model.vocab_size=200 is smaller than "
                                                   "the vocabulary of tokenizer byte (258)", fresh=True),
    # checkpoints
    "vocabulary differing from the checkpoint": Case(["model.vocab_size=300"], "different model (vocab_size differ"),
    "resume with a changed model shape": Case(["model.n_layers=3"], "different model (n_layers differ"),
    "resume with a changed data position": Case(["trainer.global_batch_size=16"],
                                                "written with trainer.global_batch_size=8, this run has 16"),
    "resume with a changed data order": Case(["seed=5"], "written with seed=0, this run has 5"),
    "resume from a nonexistent path": Case(["trainer.resume={data}/nope"], "nope: checkpoint is not usable (not a "),
    "resume from a damaged checkpoint": Case(["trainer.resume={run}/checkpoints/step_00000004"],
                                             "checkpoint is not usable (__0_0.distcp checksum mismatch)",
                                             damage=flip_newest_checkpoint),
    "resume=none over checkpoints": Case(["trainer.resume=none"], "trainer.resume=none would overwrite them"),
    "every checkpoint damaged": Case([], "verifies (reasons logged above); move them aside",
                                     damage=damage_every_checkpoint),
    # data.prepare, writing onto an existing dataset
    "prepare: non-UTF-8 text": Case(["{bad_utf8}", "--out", "{dataset}"], "not valid UTF-8 at byte offset 3",
                                    tool="prepare"),
    "prepare: empty corpus": Case(["{empty_file}", "--out", "{dataset}"], "empty corpus: 1 file(s) gave 0 tokens",
                                  tool="prepare"),
    "prepare: only empty documents": Case(["{empty_docs}", "--out", "{dataset}"], "(3 empty documents)",
                                          tool="prepare"),
    "prepare: invalid JSONL line": Case(["{bad_json}", "--out", "{dataset}"], "bad.jsonl:2: invalid JSON",
                                        tool="prepare"),
    "prepare: nonexistent input": Case(["{data}/nope.txt", "--out", "{dataset}"], "input not found", tool="prepare"),
    "prepare: bad tokenizer spec": Case(["{bad_utf8}", "--out", "{dataset}", "--tokenizer", "bpe:many"],
                                        "bad tokenizer spec 'bpe:many'", tool="prepare"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """An existing run (checkpoints at steps 2 and 4), the prepared sample, and broken variants of both."""
    from data.dataset import ensure_sample
    from data.prepare import prepare as prepare_in_process
    from data.tokenizer import ByteTokenizer, train_bpe

    root, cache = tmp_path_factory.mktemp("bad-inputs"), tmp_path_factory.mktemp("cache")
    existing = train(root / "existing", cache, *RUN)
    assert existing.returncode == 0, existing.stderr[-3000:]
    data = root / "data"
    sample = Path(ensure_sample(str(cache), ByteTokenizer()))
    paths = {"existing": root / "existing", "cache": cache, "data": data, "sample": sample}
    for name, suffix, keep in (("truncated_bin", ".bin", -7), ("truncated_idx", ".idx", 40), ("dataset", "", 0)):
        (data / name).mkdir(parents=True)
        for f in sample.parent.glob(sample.name + ".*"):
            shutil.copy(f, data / name / f.name)
        if suffix:
            target = data / name / (sample.name + suffix)
            target.write_bytes(target.read_bytes()[:keep])
        paths[name] = data / name / sample.name
    texts = [gzip.open(ROOT / "data/sample/python_docs.jsonl.gz", "rt").readline()] * 4
    train_bpe(texts, 260, str(data / "bpe.json"))
    (data / "short.txt").write_text("A corpus of a few words.")
    prepare_in_process([str(data / "short.txt")], str(data / "short"), workers=1, progress=False)
    (data / "bad.txt").write_bytes(b"ok\n\xff\xfe not UTF-8\n")
    (data / "empty.txt").write_text("")
    (data / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n{"text": "\\n"}\n')
    (data / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    paths.update(bpe=data / "bpe.json", short=data / "short", bad_utf8=data / "bad.txt", empty_file=data / "empty.txt",
                 empty_docs=data / "empty.jsonl", bad_json=data / "bad.jsonl")
    return paths


@pytest.fixture(scope="module")
def cli_results(inputs, tmp_path_factory) -> dict[str, tuple]:
    """Every CLI case, two at a time: (process, watched directory, its digest before, its digest after)."""
    root = tmp_path_factory.mktemp("cases")

    def attempt(index: int, case: Case):
        run_dir = root / f"case{index}"
        if not case.fresh:
            shutil.copytree(inputs["existing"], run_dir)
            if case.damage:
                case.damage(run_dir)
        fill = {**{k: str(v) for k, v in inputs.items()}, "run": str(run_dir)}
        args = [a.format(**fill) for a in case.args]
        watched = inputs["dataset"].parent if case.tool == "prepare" else run_dir
        before = tree_digest(watched)
        if case.tool == "prepare":
            proc = prepare(*args, "--workers", "1")
        else:
            proc = train(run_dir, inputs["cache"], *RUN, *args, env=case.env)
        return proc, watched, before, tree_digest(watched), case.message.format(**fill)

    jobs = [lambda i=i, c=c: attempt(i, c) for i, c in enumerate(CLI_CASES.values())]
    return dict(zip(CLI_CASES, side_by_side(*jobs)))


def test_there_are_at_least_thirty_bad_inputs():
    assert len(CONFIG_CASES) + len(CLI_CASES) >= 30 and len(CLI_CASES) >= 20


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_bad_input_is_refused_with_one_line_and_changes_nothing(cli_results, name):
    if CLI_CASES[name].needs_no_gpu and torch.cuda.is_available():
        pytest.skip("this machine has the GPU the case is about")
    proc, watched, before, after, message = cli_results[name]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = error_line(proc)
    assert line.startswith("error: ") and message in line, line
    assert after == before  # every file of the run (checkpoints, metrics, logs) or dataset, bit for bit
