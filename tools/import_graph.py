"""The project's import graph, read from the source (stdlib only: nothing is imported or run).

Every `import` / `from ... import` statement of the project's modules (diffv2/, data/, monitoring/, analysis/, launch/,
train.py) counts, wherever it is: module level, inside a function or method ("local") and under
`if TYPE_CHECKING:` ("typing"). Relative imports are resolved; `import a.b` and `from a.b import c` are edges to
the module a.b (`from a import b` is an edge to a.b when a.b is a module; a package's __init__.py is the module
`a`). Only edges between project modules are kept.

    python tools/import_graph.py                               every project edge with its file:line
    python tools/import_graph.py --check                       the layering rules; exit 1 printing each violation
    python tools/import_graph.py --write docs/architecture.md  (re)generate the architecture page

The rules (`violations`): no module of diffv2/ or data/ imports monitoring/; no module of diffv2/, data/ or
monitoring/ imports the offline analysis/; diffv2's layers import downwards only (DIFFV2_LAYERS); no import cycle between project modules;
train.py (the composition root) imports no monitoring module but monitoring.build. tests/test_layering.py asserts
the same and that docs/architecture.md is what `--write` produces.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKGS = ("diffv2", "data", "monitoring", "analysis", "launch")
FILES = ("train.py",)
CORE = ("diffv2", "data")  # must not import monitoring or analysis
ONLINE = ("diffv2", "data", "monitoring")  # training-time code: must not import the offline analysis/
# diffv2/'s own layers, lowest first: a module may import its own layer and the ones before it, never a later one
# ("diffv2" is the top-level modules: config schema, optimizer, safe loading).
DIFFV2_LAYERS = ("diffv2", "diffv2.model", "diffv2.parallel", "diffv2.train", "diffv2.infer")
TRAIN_MONITORING = frozenset({"monitoring.build"})  # the only monitoring modules train.py may import
WRITE_COMMAND = "python tools/import_graph.py --write docs/architecture.md"


class Site(NamedTuple):
    """One import statement behind an edge: file (relative to the root), line, kind (module/local/typing), text."""

    file: str
    line: int
    kind: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


Edges = dict  # (src module, dst module) -> list[Site], sorted by (file, line)


def modname(rel: str) -> str:
    p = rel[:-3].replace("/", ".").replace(os.sep, ".")
    return p[: -len(".__init__")] if p.endswith(".__init__") else p


def project_files(root: str = ROOT) -> dict:
    """Module name -> path of its source file relative to `root`."""
    files = {}
    for pkg in PKGS:
        for dp, dn, fn in os.walk(os.path.join(root, pkg)):
            dn[:] = sorted(d for d in dn if d != "__pycache__" and not d.startswith("."))
            for f in sorted(fn):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dp, f), root).replace(os.sep, "/")
                    files[modname(rel)] = rel
    for f in FILES:
        if os.path.exists(os.path.join(root, f)):
            files[modname(f)] = f
    return dict(sorted(files.items()))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    def __init__(self, mod: str, rel: str, mods: set, edges: defaultdict):
        self.mod, self.rel, self.mods, self.edges = mod, rel, mods, edges
        self.is_pkg = rel.endswith("__init__.py")
        self.depth = self.typing = 0

    def _resolve(self, name: str):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.mods:
                return ".".join(parts[:i])
        return None

    def _scope(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_If(self, node):
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.typing += 1
        for n in node.body:
            self.visit(n)
        self.typing -= 1
        for n in node.orelse:
            self.visit(n)

    def _add(self, dst, node, text):
        if dst and dst != self.mod:
            kind = "typing" if self.typing else "local" if self.depth else "module"
            self.edges[(self.mod, dst)].append(Site(self.rel, node.lineno, kind, text))

    def visit_Import(self, node):
        for a in node.names:
            self._add(self._resolve(a.name), node, f"import {a.name}")

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.mod.split(".")
            if not self.is_pkg:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            full = ".".join(base + ([node.module] if node.module else []))
        else:
            full = node.module or ""
        shown = "." * node.level + (node.module or "")
        for a in node.names:
            sub = f"{full}.{a.name}"
            self._add(sub if sub in self.mods else self._resolve(full), node, f"from {shown} import {a.name}")


def collect(root: str = ROOT) -> Edges:
    """Every project edge: {(src, dst): [Site, ...]}, keys sorted, each edge's sites sorted by file and line."""
    files = project_files(root)
    mods = set(files)
    edges: defaultdict = defaultdict(list)
    for mod, rel in files.items():
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            tree = ast.parse(f.read(), rel)
        _Imports(mod, rel, mods, edges).visit(tree)
    return {key: sorted(edges[key]) for key in sorted(edges)}


def sccs(edges) -> list:
    """Strongly connected components with more than one module (the import cycles), each sorted, largest first.
    `edges`: an iterable of (src, dst) pairs (a dict from `collect` works)."""
    graph: dict = {}
    for s, d in edges:
        graph.setdefault(s, set()).add(d)
        graph.setdefault(d, set())
    index: dict = {}
    low: dict = {}
    on_stack: set = set()
    stack: list = []
    out: list = []
    for start in sorted(graph):  # Tarjan's algorithm, iterative (no recursion limit)
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return sorted((c for c in out if len(c) > 1), key=lambda c: (-len(c), c))


def top(mod: str) -> str:
    return mod.split(".")[0]


def unit(mod: str, subpackages: frozenset) -> str:
    """The node of the package graph: a subpackage of diffv2/ (diffv2.model, ...) or a top-level package."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and ".".join(parts[:2]) in subpackages else parts[0]


def _site_lines(src: str, dst: str, sites) -> list:
    return [f"    {site.where} [{site.kind}] {site.text}   ({src} -> {dst})" for site in sites]


def violations(edges: Edges) -> list:
    """One line per broken rule and import site; [] when the layering holds."""
    out = []
    for (s, d), sites in edges.items():
        if top(s) in CORE and top(d) == "monitoring":
            out.append(f"{s} imports {d}: {'/'.join(CORE)} must not import monitoring/")
            out += _site_lines(s, d, sites)
        if top(s) in ONLINE and top(d) == "analysis":
            out.append(f"{s} imports {d}: training-time code ({'/'.join(ONLINE)}) must not import analysis/")
            out += _site_lines(s, d, sites)
    layer = {u: i for i, u in enumerate(DIFFV2_LAYERS)}
    subs = frozenset(DIFFV2_LAYERS[1:])
    for (s, d), sites in edges.items():
        us, ud = unit(s, subs), unit(d, subs)
        if us in layer and ud in layer and layer[ud] > layer[us]:
            out.append(f"{s} imports {d}: {us.replace('.', '/')}/ must not import {ud.replace('.', '/')}/ (diffv2's "
                       f"layers, lowest first: {' < '.join(DIFFV2_LAYERS)})")
            out += _site_lines(s, d, sites)
    for (s, d), sites in edges.items():
        if s == "train" and top(d) == "monitoring" and d not in TRAIN_MONITORING:
            out.append(f"train imports {d}: train.py may import only {', '.join(sorted(TRAIN_MONITORING))} "
                       f"from monitoring/")
            out += _site_lines(s, d, sites)
    for comp in sccs(edges):
        members = set(comp)
        out.append(f"import cycle between {len(comp)} modules: {', '.join(comp)}")
        for (s, d), sites in edges.items():
            if s in members and d in members:
                out += _site_lines(s, d, sites)
    return out


INTRO = """\
# Architecture

Imports point one way only. `python tools/import_graph.py --check` (and `tests/test_layering.py`) enforces it: no
module of `diffv2/` or `data/` imports `monitoring/`; nothing that runs during training imports the offline
`analysis/`; inside `diffv2/` the layers below import downwards only; no import cycle between project modules;
`train.py` imports nothing from `monitoring/` but `monitoring.build`.

| layer | what it holds | models followed |
|---|---|---|
| `diffv2/` (top-level modules) | the config schema (`config.py`, imports nothing of the project), the optimizer and lr schedules (`optim.py`), checkpoint reading without unpickling (`safe_load.py`) | torchtitan's `config/job_config.py` |
| `diffv2/model/` | the single-device model: attention (DIFF V2, baseline, DIFF V1) in `attention.py`, `transformer.py`, `moe.py`, `ffn.py`, `kernels.py`, `loss.py`, `rope.py`, `kv_cache.py`, head counts (`heads.py`), FLOPs (`flops.py`), weight files (`weight_files.py`). No DTensor, DeepSpeed or collective code: everything else reaches it from outside, through `parallelize_module` plans (tensor parallelism; the weights every head shares stay plain and the engine sums their gradients over the TP ranks) and seams set by the layer that owns them: `Transformer.block_runner` (activation checkpointing), `MoE.dispatch` (expert parallelism), `MoE.count_reducer` (load-balance counts over the ranks), `Attention.combine_fn` (the fused combine of `diffv2/infer/fused_combine.py`), the DeepSpeed `LossForward` subclass (`diffv2/parallel/deepspeed_engine.py`). Monitoring reads one stats channel, the observer slots `Attention.observer` / `Transformer.block_observer` (`diffv2/train/observers.py` fills them): slots, not module hooks, because torch.compile does not guard on hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`), so a hook added to a compiled block after its compilation may never run, while a slot's state reaches the compiled block as an argument (`observe`) that it is guarded on | torchtitan's `models/llama3/model/model.py`, OLMo-core's `nn/` |
| `diffv2/parallel/` | parallelism applied to the model from outside, in one function and order: `parallelize.py` (tensor parallelism `tensor.py` -> expert parallelism `expert.py` -> activation checkpointing `activation_checkpoint.py` -> compile -> FSDP2 -> materialisation of a meta-device build); the engines (`engine.py`: single device and FSDP2 / HSDP / DDP; `deepspeed_engine.py`: ZeRO), the factory (`build.py`: parallelize, optimizer, engine), process groups (`dist.py`), sharded gradient norms (`norms.py`) | torchtitan's `parallelize_llama` and `distributed/` |
| `diffv2/train/` | the training runtime: the loop (`trainer.py`) and its components (`components.py`), the callback interface (`callbacks.py`, `observers.py`), checkpoints, the metric sink, the non-finite guard, step undo, preemption and signals, profiling, fault points, the run record and lock, start-up validation (`validate.py`) and the memory check | torchtitan's `train.py` + `components/`, OLMo-core's `train/` (trainer + callbacks) |
| `diffv2/infer/` | using a trained model: loading a run (`inference.py`), sampling (`generate.py`), the fused DIFF V2 combine for GPU inference (`fused_combine.py`), evaluation (`evaluate.py`, `needle.py`), weight export (`weights.py`) and the Hugging Face export with its remote-code templates (`export_hf.py`, `hf/`) | lingua's `apps/main/generate.py`, `eval.py` |
| `data/` | corpus preparation, tokenizers, megatron-core datasets | Megatron-LM's `tools/preprocess_data.py` |
| `monitoring/` | the online monitors: callbacks the trainer drives (gradient norms, activations, attention logits / sinks, context RMS, λ statistics, MoE routing, throughput, loss spikes), built from the config by `monitoring/build.py` | OLMo-core's `train/callbacks/` |
| `analysis/` | offline report tools over finished runs' `metrics.jsonl`: the comparison report (`compare.py`, `compare_figures.py`, `run_data.py`), the DIFF V2 claims (`claims.py`), the W&B report (`wandb_report.py`) | - |
| `train.py`, `launch/` | the composition root (reads the Hydra config, builds the monitors, hands them to the trainer) and the launchers that drive it (SLURM, torchrun, experiment suites) | torchtitan's `train.py` entry point |

Where a change goes:

| change | files | pattern followed |
|---|---|---|
| a new monitor | one new file, `monitoring/<name>.py`: the monitor (a `Callback` of `diffv2/train/callbacks.py`), its config class (a `MonitorConfig` of `monitoring/spec.py`, with its defaults and checks) and `SPEC`; `monitoring/build.py` finds it, adds `monitoring.<name>.*` to the schema and builds it in hook order | OLMo-core's callbacks: the loop calls hooks, a monitor is a plug-in |
| a new attention variant | `diffv2/model/attention.py` (+ an `AttentionConfig` field when it needs one, its head counts in `diffv2/model/heads.py`) and `configs/attention/<name>.yaml` | one module, the variant a config switch |
| a new engine or parallelism | `diffv2/parallel/` (one plan or `Engine` per file; `diffv2/parallel/build.py` picks it) | torchtitan's `parallelize_llama` (parallelism applied to the model from outside) and its `components` (the trainer built from swappable parts, here `diffv2/train/components.py`) |
| a new step in the loop | a component in `diffv2/train/components.py` or a `Callback` | torchtitan's `train()`, OLMo-core's `_fit_epoch` |
| a new report | `analysis/` | - |

Everything below is generated from the source by `{command}`; do not edit it by hand.
"""

LABELS = {
    "diffv2": "diffv2/ (config, optimizer, safe loading)",
    "diffv2.model": "diffv2/model/ (single-device model)",
    "diffv2.parallel": "diffv2/parallel/ (parallelism, engines)",
    "diffv2.train": "diffv2/train/ (training loop)",
    "diffv2.infer": "diffv2/infer/ (inference, export)",
    "analysis": "analysis/ (offline reports)",
    "data": "data/",
    "monitoring": "monitoring/ (online monitors)",
    "launch": "launch/",
    "train": "train.py (composition root)",
}


def _kinds(sites) -> str:
    """'' when some import of the edge is at module level, else ' (local)', ' (typing)' or ' (local, typing)'."""
    kinds = sorted({site.kind for site in sites})
    return "" if "module" in kinds else f" ({', '.join(kinds)})"


def render(root: str = ROOT) -> str:
    """docs/architecture.md: the intro above, the package graph (mermaid) and the module table. Deterministic."""
    mods = project_files(root)
    edges = collect(root)
    subpackages = frozenset(m for m, rel in mods.items() if rel.endswith("__init__.py") and m.count(".") == 1)
    packages = sorted({unit(m, subpackages) for m in mods})
    pkg_edges = sorted({(unit(s, subpackages), unit(d, subpackages)) for (s, d) in edges
                        if unit(s, subpackages) != unit(d, subpackages)})
    lines = [INTRO.format(command=WRITE_COMMAND), "## Package graph", "",
             "An arrow means \"imports\" (any module of the package, any kind of import).", "",
             "```mermaid", "flowchart TD"]
    node = lambda p: p.replace(".", "_")  # noqa: E731 - mermaid ids have no dots
    lines += [f"    {node(p)}[\"{LABELS.get(p, p.replace('.', '/') + '/')}\"]" for p in packages]
    lines += [f"    {node(s)} --> {node(d)}" for s, d in pkg_edges]
    lines += ["```", "", "## Module imports", "",
              "Project modules only; (local): imported inside a function only, (typing): under `TYPE_CHECKING` only.",
              "", "| module | imports |", "|---|---|"]
    out = defaultdict(list)
    for (s, d), sites in edges.items():
        out[s].append(f"`{d}`{_kinds(sites)}")
    for m in mods:
        lines.append(f"| `{m}` | {', '.join(out[m]) if out[m] else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=ROOT, help="the repository root (default: this checkout)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="print each layering violation; exit 1 if there is one")
    g.add_argument("--write", metavar="PATH", help="write the architecture page (docs/architecture.md) to PATH")
    args = p.parse_args(argv)
    if args.check:
        edges = collect(args.root)
        problems = violations(edges)
        for line in problems:
            print(line)
        n_mods = len(project_files(args.root))
        print(f"{len([x for x in problems if not x.startswith(' ')])} layering violation(s)" if problems else
              f"layering OK: {n_mods} modules, {len(edges)} edges, no violation")
        return 1 if problems else 0
    if args.write:
        text = render(args.root)
        with open(args.write, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"wrote {args.write}")
        return 0
    for (s, d), sites in collect(args.root).items():
        for site in sites:
            print(f"{s} -> {d}   {site.where} [{site.kind}] {site.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
