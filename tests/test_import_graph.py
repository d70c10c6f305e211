"""The package's import graph, read from the source with ``ast`` (nothing is imported), and rules on it.

Every import counts: module-level, function-local, under ``if TYPE_CHECKING``, absolute and relative
(``from . import x``, ``from ..a import b``). A rule is a test over :func:`import_graph`; add one by writing a
test that calls it (and :func:`cycles` or :func:`importers`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "ncp"


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (the folder of ``package``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(root: Path = PACKAGE, package: str = "ncp") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, wherever in the file the import is.

    ``from X import name`` is an edge to the module ``X.name`` when there is one, else to ``X``; ``import
    a.b.c`` to the longest of a.b.c, a.b, a that is a module of the package. Imports of other packages are
    left out; importing a submodule is not counted as importing its parent package (``ncp.data.batch`` runs
    ``ncp/data/__init__.py`` first, which every module under ``ncp.data`` would otherwise "import").
    """
    modules = modules_of(root, package)

    def module(dotted: str | None) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]  # the package of `name`
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(module(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in modules else module(base))
        graph[name] = {d for d in deps if d is not None and d != name}
    return graph


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def cycles(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """The import cycles among the modules under ``prefix`` (strongly connected components of more than one
    module; a module never counts as importing itself), each sorted, with edges leaving ``prefix`` ignored."""
    nodes = [n for n in graph if within(n, prefix)]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if not within(w, prefix):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return sorted(found)


def importers(graph: dict[str, set[str]], target: str) -> dict[str, list[str]]:
    """Module -> the modules under ``target`` it imports, for every module outside ``target`` that imports one."""
    return {m: sorted(d for d in deps if within(d, target))
            for m, deps in sorted(graph.items()) if not within(m, target) and any(within(d, target) for d in deps)}


def entry_points(graph: dict[str, set[str]]) -> set[str]:
    """The ``python -m`` launchers: the ``__main__`` modules."""
    return {m for m in graph if m.rpartition(".")[2] == "__main__"}


# ---------------------------------------------------------------- the graph reader itself


def test_every_import_form_is_an_edge(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.sub import a\n",
        "top.py": "import os\nimport pkg.sub.b\n",
        "sub/__init__.py": "from . import a\n",
        "sub/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..top import X\n",
        "sub/b.py": "def f():\n    from .a import g\n    from pkg import top\n",
        "sub/c.py": "from .. import sub\nfrom ..sub.a import h\nimport pkg.sub.nothing.deeper\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": {"pkg.sub.a"},
        "pkg.top": {"pkg.sub.b"},
        "pkg.sub": {"pkg.sub.a"},
        "pkg.sub.a": {"pkg.top"},
        "pkg.sub.b": {"pkg.sub.a", "pkg.top"},
        "pkg.sub.c": {"pkg.sub", "pkg.sub.a"},
    }
    assert cycles(graph, "pkg") == [["pkg.sub.a", "pkg.sub.b", "pkg.top"]]
    assert cycles(graph, "pkg.sub") == []
    assert importers(graph, "pkg.top") == {"pkg.sub.a": ["pkg.top"], "pkg.sub.b": ["pkg.top"]}


# ---------------------------------------------------------------- the rules


def test_no_import_cycle_in_ncp_data():
    """The source contract (ncp.data.contract) is imported by the backends, the factory (ncp.data.sources)
    imports the backends: nothing under ncp.data imports, however indirectly, a module that imports it."""
    found = cycles(import_graph(), "ncp.data")
    assert not found, "import cycles in ncp.data:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_import_cycle_in_the_package():
    """No module of ncp imports, however indirectly, a module that imports it (function-local and
    TYPE_CHECKING imports included: a cycle hidden in a function is still a cycle)."""
    found = cycles(import_graph(), "ncp")
    assert not found, "import cycles in ncp:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_only_the_world_imports_the_world():
    """ncp.world builds the demo world; generic code (the core, data, models, training, evaluation, scoring)
    runs without it. Only ncp.world itself and the ``python -m`` launchers may import it."""
    graph = import_graph()
    found = {m: deps for m, deps in importers(graph, "ncp.world").items() if m not in entry_points(graph)}
    assert not found, "modules outside ncp.world that import it:\n" + "\n".join(
        f"{m}: {', '.join(deps)}" for m, deps in found.items())


# The layers of docs/internals.md, lowest first. A module may import its own layer and the layers below it,
# never one above: the core never reaches up into the trainer, an entry point or the world.
LAYERS = [
    ("leaves", ["ncp.paths", "ncp.families", "ncp.files", "ncp._torch_abi", "ncp._build_checks", "ncp.ops", "ncp.objectives",
                "ncp.schedule", "ncp.config", "ncp.pipelines", "ncp.preempt", "ncp.run_dir"]),
    ("models", ["ncp.models"]),
    ("core", ["ncp.criterion", "ncp.step", "ncp.timestep_scale", "ncp.flops", "ncp.optim", "ncp.checkpoint"]),
    ("data", ["ncp.data"]),
    ("scoring and sampling", ["ncp.scoring", "ncp.sampling", "ncp.validation", "ncp.metrics"]),
    ("trainer", ["ncp.trainer"]),
    ("entry points", ["ncp.train", "ncp.evaluate", "ncp.report", "ncp.export", "ncp.cache", "ncp.generate",
                      "ncp.onpolicy"]),
    ("world", ["ncp.world"]),
]


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(within(module, p) for p in prefixes):
            return rank
    return None


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if m != "ncp" and layer_of(m) is None]
    assert not missing, f"modules in no layer of LAYERS (add them, and to docs/internals.md): {missing}"


def test_imports_go_down_the_layers():
    graph = import_graph()
    up = [(m, d) for m, deps in graph.items() if m != "ncp" for d in deps
          if d != "ncp" and layer_of(d) > layer_of(m)]
    assert not up, "imports that reach up a layer:\n" + "\n".join(
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})" for m, d in up)
