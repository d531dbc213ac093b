"""The layering of the source (tools/import_graph.py, read from the AST; nothing is imported): the core (diffv2/) and
data/ never import monitoring/, no import cycle between project modules, train.py (the composition root) imports only
monitoring.build from monitoring/, and docs/architecture.md is the page the tool generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G = _load_tool()
EDGES = G.collect(str(ROOT))


def _sites(pairs) -> str:
    return "\n".join(f"  {site.where} [{site.kind}] {site.text}   ({s} -> {d})"
                     for s, d in sorted(pairs) for site in EDGES[(s, d)])


def test_the_graph_sees_the_project():
    """Guards the guard: the scan finds the packages and the kinds of import it must count."""
    mods = G.project_files(str(ROOT))
    assert {"train", "diffv2.train.trainer", "diffv2.model.transformer", "data.dataset", "monitoring.build"} <= set(mods)
    assert ("diffv2.model.transformer", "diffv2.model.attention") in EDGES
    kinds = {site.kind for sites in EDGES.values() for site in sites}
    assert kinds == {"module", "local", "typing"}


def test_core_and_data_do_not_import_monitoring():
    bad = [(s, d) for (s, d) in EDGES if G.top(s) in ("diffv2", "data") and G.top(d) == "monitoring"]
    assert not bad, f"diffv2/ and data/ must not import monitoring/; offending imports:\n{_sites(bad)}"


def test_training_code_does_not_import_analysis():
    bad = [(s, d) for (s, d) in EDGES if G.top(s) in G.ONLINE and G.top(d) == "analysis"]
    assert not bad, f"diffv2/, data/ and monitoring/ must not import the offline analysis/; found:\n{_sites(bad)}"


def test_diffv2_layers_import_downwards():
    """diffv2/ < diffv2/model/ < diffv2/parallel/ < diffv2/train/ < diffv2/infer/: the model never imports
    parallelism or the loop, parallelism never the loop, the loop never inference."""
    subs = frozenset(G.DIFFV2_LAYERS[1:])
    order = {u: i for i, u in enumerate(G.DIFFV2_LAYERS)}
    units = {(s, d): (G.unit(s, subs), G.unit(d, subs)) for (s, d) in EDGES}
    bad = [e for e, (us, ud) in units.items() if us in order and ud in order and order[ud] > order[us]]
    assert not bad, f"an upward import between diffv2's layers {G.DIFFV2_LAYERS}:\n{_sites(bad)}"
    assert {"diffv2.model.transformer", "diffv2.parallel.engine", "diffv2.train.trainer",
            "diffv2.infer.generate"} <= set(G.project_files(str(ROOT))), "the layers' folders moved: update the rule"


def test_no_import_cycle():
    cycles = G.sccs(EDGES)
    inside = [(s, d) for comp in cycles for (s, d) in EDGES if s in comp and d in comp]
    assert cycles == [], f"import cycles {cycles}; their imports:\n{_sites(inside)}"


def test_train_imports_only_monitoring_build():
    monitoring = {(s, d) for (s, d) in EDGES if s == "train" and G.top(d) == "monitoring"}
    assert {d for _, d in monitoring} <= {"monitoring.build"}, (
        f"train.py is the composition root: from monitoring/ it imports monitoring.build only; found:\n"
        f"{_sites(monitoring)}")


def test_the_architecture_page_is_generated_from_the_source():
    page = ROOT / "docs" / "architecture.md"
    assert page.exists() and page.read_text(encoding="utf-8") == G.render(str(ROOT)), (
        f"docs/architecture.md is out of date with the imports; regenerate it with `{G.WRITE_COMMAND}`")


def test_the_tool_reports_each_kind_of_violation(tmp_path, capsys):
    """On a made-up tree: a relative import, a function-local and a TYPE_CHECKING import into monitoring/, a cycle
    and a train.py import of a monitor are each found with their file:line; `--check` exits 1."""
    files = {
        "diffv2/__init__.py": "",
        "diffv2/a.py": "from . import b\n",
        "diffv2/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from monitoring.m import X\n",
        "diffv2/c.py": "def f():\n    import monitoring.m\n",
        "diffv2/sub/__init__.py": "",
        "diffv2/sub/d.py": "from ..a import thing\nimport diffv2.sub\n",
        "monitoring/__init__.py": "",
        "monitoring/m.py": "from diffv2 import a\n",
        "monitoring/build.py": "from monitoring import m\n",
        "data/__init__.py": "",
        "diffv2/model/__init__.py": "",
        "diffv2/model/x.py": "from diffv2.train import y\n",
        "diffv2/train/__init__.py": "",
        "diffv2/train/y.py": "",
        "analysis/__init__.py": "",
        "analysis/z.py": "",
        "monitoring/w.py": "import analysis.z\n",
        "train.py": "from monitoring.build import build\nfrom monitoring.m import X\nimport diffv2.sub.d\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges = G.collect(str(tmp_path))
    assert set(edges) == {("diffv2.a", "diffv2.b"), ("diffv2.b", "monitoring.m"), ("diffv2.c", "monitoring.m"),
                          ("diffv2.sub.d", "diffv2.a"), ("diffv2.sub.d", "diffv2.sub"), ("monitoring.m", "diffv2.a"),
                          ("monitoring.build", "monitoring.m"), ("train", "monitoring.build"),
                          ("train", "monitoring.m"), ("train", "diffv2.sub.d"), ("diffv2.model.x", "diffv2.train.y"),
                          ("monitoring.w", "analysis.z")}
    assert [s.kind for s in edges[("diffv2.b", "monitoring.m")]] == ["typing"]
    assert [s.where for s in edges[("diffv2.c", "monitoring.m")]] == ["diffv2/c.py:2"]
    assert [s.kind for s in edges[("diffv2.c", "monitoring.m")]] == ["local"]
    assert G.sccs(edges) == [["diffv2.a", "diffv2.b", "monitoring.m"]]
    assert G.main(["--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    for where in ("diffv2/b.py:3", "diffv2/c.py:2", "train.py:2", "monitoring/m.py:1", "diffv2/a.py:1",
                  "diffv2/model/x.py:1", "monitoring/w.py:1"):
        assert where in out
    assert "train.py:1" not in out
    assert G.render(str(tmp_path)) == G.render(str(tmp_path))
