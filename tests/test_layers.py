"""Data flows one way: every import inside the package (module level or inside a
function) goes from a layer to the same or a lower one, and no modules import each other
in a cycle.  Read from the source with ``ast``, so a lazy import counts as much as a
top-level one.  The layers, lowest first:

core -> io -> tiling -> data -> models -> training -> inference -> evaluation -> systems -> export
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

LAYERS = ("core", "io", "tiling", "data", "models", "training", "inference", "evaluation", "systems", "export")
PACKAGE = REPO / "h2g"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "h2g"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "h2g":
                continue
            for alias in node.names:  # `from h2g.export import cohort` imports the module
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    arrows = []
    for source, targets in graph.items():
        for target in targets:
            a, b = layer(source), layer(target)
            if a and b and LAYERS.index(b) > LAYERS.index(a):
                arrows.append(f"{source} ({a}) -> {target} ({b})")
    return sorted(arrows)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_layer(graph):
    assert not [m for m in graph if m != "h2g" and layer(m) is None]


def test_no_import_goes_up_a_layer(graph):
    assert upward(graph) == []


def test_no_modules_import_each_other_in_a_cycle(graph):
    assert cycles(graph) == []


def test_the_checks_see_an_upward_arrow_and_a_cycle():
    """The checks themselves, on a made-up graph: evaluation importing systems is upward,
    two data modules importing each other a cycle."""
    made_up = {"h2g.evaluation.real": {"h2g.systems.h2g.designs"}, "h2g.systems.h2g.designs": set(),
               "h2g.data.cohort": {"h2g.data.multistain"}, "h2g.data.multistain": {"h2g.data.cohort"}}
    assert upward(made_up) == ["h2g.evaluation.real (evaluation) -> h2g.systems.h2g.designs (systems)"]
    assert cycles(made_up) == [["h2g.data.cohort", "h2g.data.multistain"]]
