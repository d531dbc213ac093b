"""No hidden module-level state in the core (diffv2/) and in monitoring/ (read from the AST; nothing is imported).

State that changes behaviour lives on objects (the trainer, the engine, the model, ComputeWeights, ...). What may stay
at module level is listed in ALLOWED below with a one-line reason: memoized facts about the installation and compiled
callables of pure functions (`functools.lru_cache`), thread-local dynamic scopes, and constant tables that are of a
mutable type but never written. New module-level state needs a deliberate entry here.

Found as state: a `global` statement (and the names it rebinds); at module scope (also inside a module-level
if/try/with) or in a class body, a name assigned a dict/list/set literal or comprehension, a call of a mutable
container or synchronisation type (dict(), defaultdict(), threading.local(), ...) or of a class (a capitalised
name: a constructor call); any function or method decorated with `functools.lru_cache` / `functools.cache`.
Dataclass `field(...)` defaults are per instance and are not state.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffv2", "monitoring", "analysis")

MUTABLE_CALLS = {"dict", "list", "set", "bytearray", "defaultdict", "OrderedDict", "Counter", "deque", "ChainMap",
                 "WeakKeyDictionary", "WeakValueDictionary", "WeakSet", "local", "Lock", "RLock", "Event",
                 "Condition", "Semaphore"}
# MonitorSpec: a frozen dataclass (a monitor module's declaration, monitoring/spec.py)
IMMUTABLE_CALLS = {"frozenset", "tuple", "field", "MappingProxyType", "NamedTuple", "TypeVar", "Path", "MonitorSpec"}
CACHES = {"lru_cache", "cache"}

# name -> why it may stay at module level (plan section 11.2 / 11.3)
ALLOWED = {
    # memoized facts about the installation / compiled callables of pure functions (one per process)
    "diffv2.model.kernels.flash_attn_available": "lru_cache: whether flash-attn is installed, a fact of the process",
    "diffv2.model.kernels.fa4_unavailable": "lru_cache: why FlashAttention-4 cannot run here, a fact of the process",
    "diffv2.model.kernels._compiled_flex": "lru_cache: flex_attention compiled once per process (a pure function)",
    "diffv2.model.loss._compiled_chunk": "lru_cache: the cross-entropy chunk compiled once per process (a pure function)",
    "diffv2.infer.fused_combine._compiled_combine": "lru_cache: DIFF V2's combine compiled once per process; the "
                                                    "fall-back flag is per model (FusedCombine)",
    "diffv2.parallel.activation_checkpoint.saved_ops": "cache: the ops selective_moe saves, resolved once the optional "
                                                       "kernels have registered theirs (a fact of the process)",
    "monitoring.build.specs": "lru_cache: the monitor modules of the installed monitoring/ package, a fact of the "
                              "process",
    "monitoring.build.schema": "lru_cache: the monitoring config class made from those modules (a pure function)",
    # process-global by nature
    "diffv2.model.recompute._state": "threading.local: the recomputation flag is a dynamic scope per thread (autograd "
                               "runs backward on its own threads), like torch's grad mode",
    "diffv2.parallel.expert._copies_in_flight": "the events of split-size copies to the host still in flight, keyed by "
                                                "their host buffer: custom ops pass only tensors, so splits_to_host "
                                                "leaves its event here and splits_on_host of the same layer takes it",
    "diffv2.train.faults.NO_FAULTS": "a frozen FaultPlan (no faults): an immutable default, not state",
    # constant tables of a mutable type, never written
    "diffv2.model.weight_files.SAFETENSORS_DTYPES": "constant table: torch dtype -> safetensors dtype name",
    "diffv2.model.flops.PEAK_BF16_FLOPS": "constant table: GPU name -> peak bf16 FLOP/s (MFU)",
    "diffv2.infer.inference.DTYPES": "constant table: dtype name -> torch dtype",
    "diffv2.model.kernels._SDPA_BACKENDS": "constant table: backend name -> SDPBackend",
    "diffv2.infer.weights.DTYPE_NAMES": "constant table: dtype name -> torch dtype",
    "diffv2.model.weight_files.ARCH_FIELDS_BY_VARIANT": "constant table: variant -> architecture fields of a checkpoint",
    "diffv2.model.weight_files.HF_CONFIG_FIELDS": "constant table: HF config key -> ModelConfig field",
    "diffv2.infer.hf.configuration_diffv2.DiffV2Config.keys_to_ignore_at_inference": "HF API convention (class attribute "
                                                                                 "read by transformers)",
    "diffv2.infer.hf.modeling_diffv2.DiffV2ForCausalLM._no_split_modules": "HF API convention (class attribute read by "
                                                                      "transformers/accelerate)",
    "diffv2.train.sink.SUMMARIES": "constant table: metric -> W&B summary (min/max)",
    "diffv2.train.sink.WANDB_NAME_FORBIDDEN": "constant set: characters W&B refuses in names",
    "monitoring.spikes.EVENT_COLUMNS": "constant list: columns of the spike event table",
    "monitoring.lambda_stats.QUANTILES": "constant table: quantile name -> q",
    "analysis.claims.ARM_KEYS": "constant list: the claims report's per-arm columns",
    "analysis.wandb_report.SECTIONS": "constant list: the W&B report's panels",
    "analysis.wandb_report.HEATMAPS": "constant list: the W&B report's heatmap keys",
}

# Rebound with `global`, and why that is right: the state belongs to torch's process-wide default process group.
GLOBAL_ALLOWED = {
    "diffv2.parallel.dist._CONTROL": "the gloo group for host-side agreement: created with torch's process-wide "
                                     "default process group (dist.init) and destroyed with it (dist.shutdown); two "
                                     "trainers in one process share that group, so they share this one too",
}


def _modname(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _is_mutable(value) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    if isinstance(value, ast.Call):
        name = _call_name(value)
        return name not in IMMUTABLE_CALLS and (name in MUTABLE_CALLS or name[:1].isupper())
    return False


def _is_cache(decorator) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name in CACHES


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _scope_state(body, prefix: str, where: str, out: dict) -> None:
    """Mutable assignments in a module or class body (and in module-level if/try/with blocks), classes recursively."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            for block in blocks:
                _scope_state(block, prefix, where, out)
        elif isinstance(node, ast.ClassDef):
            _scope_state(node.body, f"{prefix}{node.name}.", where, out)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and _is_mutable(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[f"{prefix}{name.id}"] = f"{where}:{node.lineno} {ast.unparse(node)[:80]}"


def module_state() -> dict:
    """qualified name -> 'file:line code' of every piece of module-level state found (see the module doc)."""
    found = {}
    for path, tree in _sources():
        mod, rel = _modname(path), path.relative_to(ROOT).as_posix()
        _scope_state(tree.body, f"{mod}.", rel, found)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(_is_cache, node.decorator_list)):
                qual = _qualname(tree, node)
                found[f"{mod}.{qual}"] = f"{rel}:{node.lineno} @{ast.unparse(node.decorator_list[0])} {node.name}"
            if isinstance(node, ast.Global):
                for name in node.names:
                    found.setdefault(f"{mod}.{name}", f"{rel}:{node.lineno} global {name}")
    return found


def _qualname(tree, target) -> str:
    """Dotted class path of a function (`Class.method`), `name` for a module-level or nested function."""
    def walk(body, prefix):
        for node in body:
            if node is target:
                return prefix + node.name
            if isinstance(node, ast.ClassDef):
                hit = walk(node.body, f"{prefix}{node.name}.")
                if hit:
                    return hit
        return None
    return walk(tree.body, "") or target.name


def global_statements() -> list:
    return [(f"{_modname(path)}.{name}", f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
            for path, tree in _sources() for node in ast.walk(tree) if isinstance(node, ast.Global)
            for name in node.names]


def test_no_global_statement():
    bad = [f"{where} global {name.rsplit('.', 1)[1]}" for name, where in global_statements()
           if name not in GLOBAL_ALLOWED]
    assert not bad, ("diffv2/ and monitoring/ keep no state behind `global`: hold it on an object instead\n"
                     + "\n".join(bad))


def test_module_level_state_is_on_the_allow_list():
    found = module_state()
    unlisted = {name: where for name, where in found.items() if name not in ALLOWED and name not in GLOBAL_ALLOWED}
    assert not unlisted, (
        "module-level state not on tests/test_module_state.py's ALLOWED list; hold it on an explicit object (the "
        "trainer, the engine, the model, ...) or, if it is a memo of the process / a constant table, add it to ALLOWED "
        "with a one-line reason:\n" + "\n".join(f"  {name}   ({where})" for name, where in sorted(unlisted.items())))


def test_every_listed_state_exists():
    """The lists stay exact: an entry whose state is gone is deleted (so that nothing can come back under it)."""
    found = module_state()
    stale = sorted(name for name in (*ALLOWED, *GLOBAL_ALLOWED) if name not in found)
    assert not stale, ("no such module-level state any more; delete these entries from ALLOWED / GLOBAL_ALLOWED in "
                       "tests/test_module_state.py:\n" + "\n".join(f"  {name}" for name in stale))


def test_the_scan_finds_each_kind_of_state():
    """Guards the guard: each kind of state the module doc lists is recognised."""
    src = ("import functools, threading\nfrom dataclasses import dataclass, field\n"
           "A = {}\nB: list = []\nC = threading.local()\nD = Thing()\nE = frozenset()\nF = (1, 2)\nG = re.compile('x')\n"
           "if True:\n    H = set()\n"
           "class K:\n    L = [1]\n    M: dict = field(default_factory=dict)\n"
           "    @functools.lru_cache(maxsize=None)\n    def n(self): pass\n"
           "@functools.cache\ndef o(): pass\n")
    tree = ast.parse(src)
    found: dict = {}
    _scope_state(tree.body, "m.", "m.py", found)
    assert set(found) == {"m.A", "m.B", "m.C", "m.D", "m.H", "m.K.L"}
    cached = {_qualname(tree, n) for n in ast.walk(tree)
              if isinstance(n, ast.FunctionDef) and any(map(_is_cache, n.decorator_list))}
    assert cached == {"K.n", "o"}
