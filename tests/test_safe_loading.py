"""Nothing the project loads can run code: a static scan of the source, and planted payloads in real checkpoints.

Every payload here is a pickle whose __reduce__ calls exec() to create a marker file. Each test shows the payload
is live where it matters (stock torch/numpy run it) and that the project's own load path refuses it with an error
while the marker never appears. The sha256 manifest is rewritten to match each planted file, as an attacker who can
write the files would do, so what is tested is the unpickling defence, not the checksum.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from cli_runs import ROOT, SMALL, compose_cfg, error_line, run_env, run_watched, train
from diffv2.train import checkpoint
from diffv2.parallel.engine import Engine, safe_load
from diffv2.config import ModelConfig
from diffv2.infer.inference import load_model
from diffv2.model.transformer import Transformer

SCANNED = ["diffv2", "data", "monitoring", "analysis", "bench", "train.py"]
# (file, class): the only pickle.Unpickler allowed, a subclass whose find_class admits DCP's metadata classes only.
AUDITED_UNPICKLERS = {("diffv2/safe_load.py", "_MetadataUnpickler")}
CFG = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=64, vocab_size=64,
                  max_seq_len=32)


# ---------------------------------------------------------------------------------------------- static scan


def _import_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from every import in the file (`import numpy as np` -> np: numpy)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def _kw(call: ast.Call, name: str):
    """The keyword's value node, 'dynamic' for **kwargs, None when absent."""
    for k in call.keywords:
        if k.arg == name:
            return k.value
        if k.arg is None:
            return "dynamic"
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")


def scan(source: str, filename: str) -> list[str]:
    """file:line: problem for every way the source could unpickle (or otherwise execute) untrusted data."""
    tree = ast.parse(source, filename)
    names = _import_names(tree)
    found = []

    def flag(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    audited_bases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and (filename, node.name) in AUDITED_UNPICKLERS:
            if any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                audited_bases |= {id(b) for b in node.bases}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in ("dill", "cloudpickle", "joblib", "shelve", "marshal"):
                    flag(node, f"imports {mod} (unpickles arbitrary objects)")
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in audited_bases:
            name = _dotted(node, names)
            if name.split(".")[0] in ("pickle", "_pickle", "cPickle") and name.split(".")[-1] in (
                    "Unpickler", "_Unpickler"):
                flag(node, f"{name} outside the audited restricted unpicklers")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, names)
        last = name.split(".")[-1]
        if name in ("torch.load", "torch.serialization.load"):
            if not _is_const(_kw(node, "weights_only"), True):
                flag(node, f"{name} without weights_only=True")
        elif name.split(".")[0] in PICKLE_MODULES and last in ("load", "loads", "open"):
            flag(node, f"{name} (arbitrary unpickling)")
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            allow = _kw(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                flag(node, f"{name} with allow_pickle not False")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "pandas.read_pickle"):
            flag(node, f"{name} (constructs arbitrary objects)")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not (isinstance(loader, (ast.Attribute, ast.Name)) and "Safe" in _dotted(loader, names)):
                flag(node, f"{name} without a SafeLoader")
    return found


def source_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_source_tree_has_no_unsafe_loading():
    files = source_files()
    assert len(files) > 30 and ROOT / "diffv2/train/checkpoint.py" in files
    problems = [p for f in files for p in scan(f.read_text(), str(f.relative_to(ROOT)))]
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet, expect", [
    ("import torch\ntorch.load(p)", "without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=False)", "without weights_only=True"),
    ("import torch\ntorch.load(p, **kw)", "without weights_only=True"),
    ("from torch import load\nload(p)", "without weights_only=True"),
    ("import torch as T\nT.serialization.load(p)", "without weights_only=True"),
    ("import pickle\npickle.load(f)", "arbitrary unpickling"),
    ("import pickle as pk\npk.loads(b)", "arbitrary unpickling"),
    ("from pickle import loads\nloads(b)", "arbitrary unpickling"),
    ("import pickle\nclass U(pickle.Unpickler):\n    pass", "outside the audited"),
    ("import pickle\nu = pickle.Unpickler(f)", "outside the audited"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "allow_pickle not False"),
    ("import numpy\nnumpy.load(p, mmap_mode='r', allow_pickle=flag)", "allow_pickle not False"),
    ("import dill", "imports dill"),
    ("import joblib\njoblib.load(p)", "joblib"),
    ("import yaml\nyaml.load(s, Loader=yaml.Loader)", "without a SafeLoader"),
    ("import yaml\nyaml.unsafe_load(s)", "constructs arbitrary objects"),
])
def test_scan_catches_each_unsafe_pattern(snippet, expect):
    found = scan(snippet, "x.py")
    assert found and expect in found[0] and found[0].startswith("x.py:"), found


def test_scan_passes_safe_patterns():
    safe = ("import torch, numpy as np, yaml, json, pickle\ntorch.load(p, weights_only=True)\nnp.load(p)\n"
            "np.load(p, allow_pickle=False)\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\njson.load(f)\n"
            "pickle.dump(x, f)\n")
    assert scan(safe, "x.py") == []
    restricted = "import pickle\nclass _MetadataUnpickler(pickle.Unpickler):\n    def find_class(self, m, n): ...\n"
    assert scan(restricted, "diffv2/safe_load.py") == []
    assert scan(restricted, "diffv2/other.py")  # the same class anywhere else is flagged
    no_find_class = "import pickle\nclass _MetadataUnpickler(pickle.Unpickler):\n    pass\n"
    assert scan(no_find_class, "diffv2/safe_load.py")


# ---------------------------------------------------------------------------------------------- payloads


class Payload:
    """Unpickling this runs exec(), which creates `marker`: what any planted pickle could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who can write the files does: make meta.json's sizes and sha256 match them again."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": checkpoint._sha256(p)}
                     for p in sorted(ckpt.iterdir()) if p.name != "meta.json"}
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=1))
    assert checkpoint.verify(ckpt) is None  # the manifest now vouches for the planted file


def plant_metadata(ckpt: Path, marker: Path) -> None:
    with open(ckpt / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own, just written
    md.storage_meta.modules = [Payload(marker)]
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    rewrite_manifest(ckpt)


def plant_trainer_state(ckpt: Path, marker: Path) -> None:
    torch.save({"rng": {"torch": torch.get_rng_state()}, "extra": Payload(marker)}, ckpt / "trainer.pt")
    rewrite_manifest(ckpt)


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(CFG)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def saved(root: Path, optimizer_tweak=None) -> Path:
    model, opt = model_and_optimizer()
    if optimizer_tweak:
        optimizer_tweak(opt)
    return checkpoint.save(root, 1, Engine(model, opt), {"rng": {"torch": torch.get_rng_state()}},
                           {"model": asdict(CFG), "step": 1}, keep_last=2)


def test_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "pwned"


def test_stock_dcp_load_unpickles_metadata_unrestricted(tmp_path):
    """Why diffv2/safe_load.py exists: torch's FileSystemReader.read_metadata is a plain pickle.load."""
    marker = tmp_path / "marker"
    ckpt = saved(tmp_path / "ckpts")
    plant_metadata(ckpt, marker)
    model, opt = model_and_optimizer(1)
    try:
        dcp.load({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    except BaseException:  # noqa: B036 (the payload has run by now, whatever DCP makes of the result)
        pass
    assert marker.exists()


@pytest.mark.parametrize("loader", ["checkpoint.load", "inference.load_model"])
def test_planted_dcp_metadata_is_refused(tmp_path, loader):
    marker = tmp_path / "marker"
    ckpt = saved(tmp_path / "ckpts")
    plant_metadata(ckpt, marker)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"refusing to load .*builtins\.exec"):
        if loader == "checkpoint.load":
            checkpoint.load(ckpt, Engine(*model_and_optimizer(1)))
        else:
            load_model(ckpt, torch.device("cpu"), "math")
    assert not marker.exists()


def test_planted_trainer_state_is_refused(tmp_path):
    marker = tmp_path / "marker"
    ckpt = saved(tmp_path / "ckpts")
    plant_trainer_state(ckpt, marker)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"refusing to load .*trainer\.pt.*exec"):
        checkpoint.load(ckpt, Engine(*model_and_optimizer(1)))
    assert not marker.exists()
    torch.load(ckpt / "trainer.pt", weights_only=False)  # the planted file is live
    assert marker.exists()


def test_planted_optimizer_value_is_refused(tmp_path):
    """Non-tensor state (param_groups' lr, betas, ...) is a torch.save blob that stock DCP loads weights_only=False."""
    marker = tmp_path / "marker"

    def poison(opt):
        opt.param_groups[0]["lr"] = Payload(marker)

    ckpt = saved(tmp_path / "ckpts", poison)  # written by checkpoint.save itself: the manifest is genuine
    assert checkpoint.verify(ckpt) is None and not marker.exists()
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"param_groups\.0\.lr is not plain data"):
        checkpoint.load(ckpt, Engine(*model_and_optimizer(1)))
    assert not marker.exists()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = model_and_optimizer(1)
    model_sd, optim_sd = get_state_dict(model, opt)
    try:
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))  # stock planner
    except BaseException:  # noqa: B036
        pass
    assert marker.exists()


def test_genuine_checkpoint_still_loads_exactly(tmp_path):
    ckpt = saved(tmp_path / "ckpts")
    model, opt = model_and_optimizer(1)
    state = checkpoint.load(ckpt, Engine(model, opt))
    reference, _ = model_and_optimizer(0)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert set(state) == {"rng"}


def test_sharded_fsdp2_checkpoint_loads(tmp_path):
    """FSDP2 (DTensor) checkpoints name the same metadata classes: the allowlist does not break sharded resumes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, _ = model_and_optimizer()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))  # parameters become DTensors: optimizer after
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.ones_like(p)  # a DTensor, like p: gives the optimizer state to save
        opt.step()
        ckpt = checkpoint.save(tmp_path, 1, Engine(model, opt), {}, {"step": 1}, keep_last=1)
        want = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        fresh, _ = model_and_optimizer(1)
        fully_shard(fresh, mesh=init_device_mesh("cpu", (1,)))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        checkpoint.load(ckpt, Engine(fresh, fresh_opt))
        assert all(torch.equal(want[k], v.full_tensor()) for k, v in fresh.state_dict().items())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("module, name", [
    ("builtins", "exec"), ("builtins", "eval"), ("os", "system"), ("posix", "system"), ("subprocess", "Popen"),
    ("torch", "load"), ("torch.serialization", "load"), ("torch", "Tensor"), ("_pickle", "loads"),
    ("torch.distributed.checkpoint.filesystem", "pickle"),  # an allowed module, a name outside the list
    ("torch.distributed.checkpoint.metadata", "field"),
])
def test_metadata_unpickler_admits_only_dcp_classes(tmp_path, module, name):
    path = tmp_path / ".metadata"
    path.write_bytes(f"c{module}\n{name}\n.".encode())  # GLOBAL module.name, STOP
    with pytest.raises(safe_load.UnsafeCheckpointError, match=f"names {module}.{name}"):
        safe_load.read_dcp_metadata(path)


def test_metadata_unpickler_reads_real_metadata_whole(tmp_path):
    ckpt = saved(tmp_path / "ckpts")
    with open(ckpt / ".metadata", "rb") as f:
        stock = pickle.load(f)
    assert safe_load.read_dcp_metadata(ckpt / ".metadata") == stock


# ---------------------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 2-step train.py run: its checkpoint, config.yaml and megatron index cache."""
    root = tmp_path_factory.mktemp("safe")
    proc = train(root / "run", root / "cache", "trainer.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def copy_run(trained_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(trained_run / "run", tmp_path / "run")
    return tmp_path / "run", next((tmp_path / "run" / "checkpoints").iterdir())


def test_train_resume_refuses_planted_trainer_state(trained_run, tmp_path):
    run, ckpt = copy_run(trained_run, tmp_path)
    marker = tmp_path / "marker"
    plant_trainer_state(ckpt, marker)
    # continuing the finished 2-step run loads its checkpoint (rerunning it as it was reads only meta.json)
    proc = train(run, trained_run / "cache", "trainer.max_steps=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc).startswith("error: refusing to load") and "trainer.pt" in error_line(proc)
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["diffv2.infer.generate", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"],
    ["diffv2.infer.export_hf", "--out", "{tmp}/hf"],
    ["diffv2.infer.evaluate", "--max-samples", "2", "--needle-trials", "0", "--device", "cpu"],
])
def test_commands_refuse_planted_metadata(trained_run, tmp_path, command):
    run, ckpt = copy_run(trained_run, tmp_path)
    marker = tmp_path / "marker"
    plant_metadata(ckpt, marker)
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    proc = run_watched([sys.executable, "-m", *args, "--checkpoint", str(run)], env=run_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc).startswith("error: refusing to load") and "builtins.exec" in error_line(proc)
    assert not marker.exists()


def test_planted_megatron_index_cache_is_refused(trained_run, tmp_path):
    """megatron-core loads data.cache_dir/index/*.npy with numpy.load(allow_pickle=True, mmap_mode='r')."""
    from data.dataset import build_datasets
    from data.tokenizer import load_tokenizer

    cache = tmp_path / "cache"
    shutil.copytree(trained_run / "cache", cache)
    marker = tmp_path / "marker"
    target = next((cache / "index").glob("*-train-document_index.npy"))
    target.write_bytes(pickle.dumps(Payload(marker)))
    cfg = compose_cfg(*SMALL, "trainer.max_steps=2", f"data.cache_dir={cache}")
    with pytest.raises(ValueError, match="is not a .npy array"):
        build_datasets(cfg.data, cfg.seed, load_tokenizer(cfg.data.tokenizer), num_samples={"train": 16, "valid": 8})
    assert not marker.exists()
    np.load(target, allow_pickle=True, mmap_mode="r")  # megatron's own call: the planted file is live
    assert marker.exists()
