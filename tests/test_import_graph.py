"""The package's import graph, read from the source (function-local imports included): no cycle, no
library module importing the research harness, no layer importing a layer above it, and inside
`moe_unlearn.unlearning` no stage importing a later one.

A new module needs a line in LAYERS (its layer is that of the longest listed prefix)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_unlearn"

# lowest first; a module may import its own layer and those below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("moe_unlearn", "moe_unlearn.errors", "moe_unlearn.registry", "moe_unlearn.validate",
              "moe_unlearn.atomic", "moe_unlearn.testing", "moe_unlearn.kernels", "moe_unlearn.log",
              "moe_unlearn.config_aliases")),
    ("model access", ("moe_unlearn.arch", "moe_unlearn.ops", "moe_unlearn.data", "moe_unlearn.loading",
                      "moe_unlearn.identity", "moe_unlearn.training", "moe_unlearn.distributed",
                      "moe_unlearn.sharding")),
    ("attribution and adapters", ("moe_unlearn.attribution", "moe_unlearn.loramoe")),
    ("unlearning", ("moe_unlearn.unlearning", "moe_unlearn.memory")),
    ("evaluation", ("moe_unlearn.eval", "moe_unlearn.locate")),
    ("integrations", ("moe_unlearn.integrations",)),  # other training stacks driving the library
    # the research harness: the bench world and models, the frontier, the demo (the library never imports it)
    ("harness", ("moe_unlearn.bench_model", "moe_unlearn.frontier", "moe_unlearn.demo",
                 "moe_unlearn.loramoe.demo_task")),
    ("cli", ("moe_unlearn.cli", "moe_unlearn.commands")),
]

# the stages of moe_unlearn.unlearning, lowest first (a stage may import its own group and earlier ones)
STAGES: list[tuple[str, ...]] = [
    ("tensor", "ablate", "anchor", "checkpointing", "prefix_cache", "objectives", "routing", "sam"),
    ("methods", "scopes"),
    ("adapters", "projection", "trace"),
    ("config",),
    ("checks", "patch"),
    ("fusion", "targets", "plan", "batches"),
    ("params", "runner"),
    ("references",),
    ("step", "outputs", "undo"),
    ("fit",),
    ("engine",),
    ("__init__",),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _targets(mods: dict[str, Path], cur: str, node: ast.AST) -> list[str]:
    """The package modules an import statement names (`from pkg import sub` names pkg.sub)."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = cur.split(".") if mods[cur].name == "__init__.py" else cur.split(".")[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        out = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    return [m for m in out if m in mods and m != cur]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {t for n in ast.walk(tree) for t in _targets(mods, name, n)}
    return graph


GRAPH = _graph()


def _layer(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            match = module == p if p == "moe_unlearn" else (module == p or module.startswith(p + "."))
            if match and len(p) > best:
                best, level = len(p), i
    if level is None:
        pytest.fail(f"{module} has no layer: add it to LAYERS in tests/test_import_graph.py")
    return level


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert "moe_unlearn.unlearning.plan" in GRAPH["moe_unlearn.unlearning.engine"]
    assert "moe_unlearn.attribution" in GRAPH["moe_unlearn.unlearning.targets"]  # a function-local import


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_cycles_are_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_layer_imports_a_higher_one_and_the_library_never_imports_the_harness():
    bad = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
           for a, targets in sorted(GRAPH.items()) for b in sorted(targets) if _layer(b) > _layer(a)]
    assert bad == []
    harness = next(i for i, (name, _) in enumerate(LAYERS) if name == "harness")
    assert all(_layer(a) >= harness for a, targets in GRAPH.items() for b in targets if _layer(b) == harness)


def test_unlearning_stages_import_only_earlier_ones():
    stage = {f"moe_unlearn.unlearning{'' if m == '__init__' else '.' + m}": i
             for i, group in enumerate(STAGES) for m in group}
    unlearning = [m for m in GRAPH if m == "moe_unlearn.unlearning" or m.startswith("moe_unlearn.unlearning.")]
    missing = sorted(set(unlearning) - set(stage))
    assert missing == [], f"add {missing} to STAGES in tests/test_import_graph.py"
    bad = [f"{a} imports {b}" for a in unlearning for b in sorted(GRAPH[a]) if b in stage and stage[b] > stage[a]]
    assert bad == []


def test_no_private_names_are_imported_across_modules():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_unlearn"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []
