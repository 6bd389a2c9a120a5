"""The layers import one way (core <- plugins, data_spark <- tools) and no modules import each other in a ring.

Pure AST over the source folders: nothing under haina is imported, so a broken module cannot hide an edge
and the check takes well under a second. Deferred imports inside functions count: they run sooner or later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The folders pyproject's package-dir maps into the haina namespace, and the layers each may import.
FOLDERS = {"core": "haina.core", "plugins": "haina.plugins", "data_spark": "haina.data_spark", "tools": "haina.tools"}
ALLOWED = {
    "core": {"core"},
    "plugins": {"core", "plugins"},
    "data_spark": {"core", "data_spark"},
    "tools": {"core", "plugins", "data_spark", "tools"},
}


@dataclass(frozen=True)
class Edge:
    """One internal import: ``source`` names ``target`` (a module, or a package whose namespace it reads)."""

    source: str
    target: str
    line: int
    runtime: bool  # False under ``if TYPE_CHECKING:``, which never executes


def source_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name: core/a/b.py -> haina.core.a.b, core/a/__init__.py -> haina.core.a."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: Iterable[ast.AST], runtime: bool = True) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``nodes`` (functions, classes, try/if blocks), with whether it ever runs."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, runtime
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.body, runtime=False)
            yield from _imports(node.orelse, runtime)
        else:
            yield from _imports(ast.iter_child_nodes(node), runtime)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The dotted name a (possibly relative) ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """The internal imports of every module. ``from P import x`` is an import of P.x when that is a module, and of
    P itself when x is a name P defines (so P's code must run first)."""
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, runtime in _imports([tree]):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                origin = _absolute(module, path.name == "__init__.py", node)
                submodules = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in modules]
                targets = submodules if len(submodules) == len(node.names) else [origin, *submodules]
            edges += [Edge(module, t, node.lineno, runtime) for t in targets if t.startswith("haina.")]
    return edges


def layer(module: str) -> str:
    return module.split(".")[1]


def test_layers_import_one_way() -> None:
    """core must stay usable without plugins or tools, and nothing but tools may reach across to data_spark."""
    modules = source_modules()
    assert modules, f"no sources found under {ROOT}"
    wrong = sorted(
        f"{e.source} imports {e.target} ({layer(e.source)} may import only "
        f"{' and '.join(sorted(ALLOWED[layer(e.source)]))}; {modules[e.source].relative_to(ROOT)}:{e.line})"
        for e in import_edges(modules)
        if layer(e.target) not in ALLOWED[layer(e.source)]
    )
    assert not wrong, f"{len(wrong)} wrong-way import(s):\n" + "\n".join(wrong)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an import lands in: ``haina.core.config.load`` (from ``import`` of an attribute) -> config."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def dependency_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Which modules each module's code makes Python run. Importing a.b.c runs packages a and a.b first, so those
    count too, except a module's own parent packages: Python has always started them before the module itself."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in import_edges(modules):
        target = _resolve(edge.target, modules)
        if not edge.runtime or target is None:
            continue
        own = set(_ancestors(edge.source))
        implied = {a for a in _ancestors(target) if a in modules and a not in own}
        graph[edge.source] |= ({target} | implied) - {edge.source}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components (iterative, so deep chains cannot hit the recursion limit), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def test_strongly_connected_finds_rings() -> None:
    """The cycle finder itself, on a graph small enough to check by eye."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d"], ["e"]]


def test_no_import_cycles() -> None:
    """A ring of imports makes the import order decide which names exist yet: the usual source of
    half-initialised-module errors, and a sign that two layers or modules should be one or be split."""
    modules = source_modules()
    graph = dependency_graph(modules)
    rings = sorted((c for c in strongly_connected(graph) if len(c) > 1), key=len, reverse=True)
    report = []
    for ring in rings:
        members = set(ring)
        links = sorted(f"{m} -> {t}" for m in ring for t in graph[m] if t in members)
        report.append(f"cycle of {len(ring)}: {', '.join(ring)}\n    " + "\n    ".join(links))
    assert not rings, f"{len(rings)} import cycle(s):\n" + "\n".join(report)
