"""The layers import one way (core <- plugins, data_spark <- tools) and no modules import each other in a ring.

The graph is :mod:`haina.tools.bench.imports`'s: pure AST over the source folders, deferred imports inside
functions included (they run sooner or later), so a broken module cannot hide an edge.
"""

from __future__ import annotations

from haina.tools.bench.imports import (
    ALLOWED,
    ROOT,
    cycles,
    dependency_graph,
    layer,
    source_modules,
    strongly_connected,
    wrong_way,
)


def test_layers_import_one_way() -> None:
    """core must stay usable without plugins or tools, and nothing but tools may reach across to data_spark."""
    modules = source_modules()
    assert modules, f"no sources found under {ROOT}"
    wrong = sorted(
        f"{e.source} imports {e.target} ({layer(e.source)} may import only "
        f"{' and '.join(sorted(ALLOWED[layer(e.source)]))}; {modules[e.source].relative_to(ROOT)}:{e.line})"
        for e in wrong_way(modules)
    )
    assert not wrong, f"{len(wrong)} wrong-way import(s):\n" + "\n".join(wrong)


def test_strongly_connected_finds_rings() -> None:
    """The cycle finder itself, on a graph small enough to check by eye."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d"], ["e"]]


def test_no_import_cycles() -> None:
    """A ring of imports makes the import order decide which names exist yet: the usual source of
    half-initialised-module errors, and a sign that two layers or modules should be one or be split."""
    modules = source_modules()
    graph = dependency_graph(modules)
    rings = sorted(cycles(modules), key=len, reverse=True)
    report = []
    for ring in rings:
        members = set(ring)
        links = sorted(f"{m} -> {t}" for m in ring for t in graph[m] if t in members)
        report.append(f"cycle of {len(ring)}: {', '.join(ring)}\n    " + "\n    ".join(links))
    assert not rings, f"{len(rings)} import cycle(s):\n" + "\n".join(report)
