"""The import structure of the package, measured: internal imports, the share deferred into function
bodies, wrong-way imports between layers, modules in import cycles, lines of code, and the import time
of ``haina --help`` and ``haina plugins``.

``python -m haina.tools.bench.imports`` (from a source checkout). Pure AST over the source folders, so a
broken module cannot hide an edge; ``tests/test_layers.py`` asserts on the same graph.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout: tools/bench/imports.py

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
    deferred: bool  # inside a function body: runs when the function is first called


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package, by dotted name: core/a/b.py -> haina.core.a.b, core/a/__init__.py -> haina.core.a."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            modules[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    nodes: Iterable[ast.AST], runtime: bool = True, deferred: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement under ``nodes`` (functions, classes, try/if blocks), with whether it ever runs
    and whether it is deferred into a function body."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, runtime, deferred
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.body, False, deferred)
            yield from _imports(node.orelse, runtime, deferred)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _imports(ast.iter_child_nodes(node), runtime, True)
        else:
            yield from _imports(ast.iter_child_nodes(node), runtime, deferred)


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
        for node, runtime, deferred in _imports([tree]):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                origin = _absolute(module, path.name == "__init__.py", node)
                submodules = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in modules]
                targets = submodules if len(submodules) == len(node.names) else [origin, *submodules]
            edges += [Edge(module, t, node.lineno, runtime, deferred) for t in targets if t.startswith("haina.")]
    return edges


def layer(module: str) -> str:
    return module.split(".")[1]


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


@dataclass(frozen=True)
class ImportReport:
    internal: int  # import statements naming a haina module (under TYPE_CHECKING excluded)
    deferred: int
    wrong_way: int
    in_cycles: int
    lines: int
    help_import_s: float | None
    plugins_import_s: float | None


def wrong_way(modules: dict[str, Path]) -> list[Edge]:
    return [e for e in import_edges(modules) if layer(e.target) not in ALLOWED[layer(e.source)]]


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    return [c for c in strongly_connected(dependency_graph(modules)) if len(c) > 1]


def import_seconds(*args: str) -> float:
    """Sum of the top-level imports ``python -X importtime -m haina.tools.cli ARGS`` reports."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "haina.tools.cli", *args],
                         capture_output=True, text=True, check=True).stderr
    total = 0
    for line in out.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( +)\S", line)
        if match and len(match.group(2)) == 1:
            total += int(match.group(1))
    return total / 1e6


def measure(root: Path = ROOT, with_help: bool = True) -> ImportReport:
    modules = source_modules(root)
    statements = {(e.source, e.line): e for e in import_edges(modules) if e.runtime}
    return ImportReport(
        internal=len(statements),
        deferred=sum(e.deferred for e in statements.values()),
        wrong_way=len(wrong_way(modules)),
        in_cycles=sum(len(c) for c in cycles(modules)),
        lines=sum(len(p.read_text(encoding="utf-8").splitlines()) for p in modules.values()),
        help_import_s=import_seconds("--help") if with_help else None,
        plugins_import_s=import_seconds("plugins") if with_help else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="source checkout to measure (default: this one)")
    parser.add_argument("--no-help-time", action="store_true", help="skip timing `haina --help` and `haina plugins` (of this install)")
    args = parser.parse_args(argv)
    if not (args.root / "core").is_dir():
        sys.exit(f"haina.tools.bench.imports: no source checkout at {args.root} (give --root)")
    r = measure(args.root, with_help=not args.no_help_time)
    print(f"internal imports      {r.internal}")
    print(f"deferred into bodies  {r.deferred} ({r.deferred / max(r.internal, 1):.1%})")
    print(f"wrong-way imports     {r.wrong_way}")
    print(f"modules in cycles     {r.in_cycles}")
    print(f"lines of code         {r.lines:,} (core, plugins, data_spark, tools)")
    if r.help_import_s is not None and r.plugins_import_s is not None:
        print(f"haina --help imports  {r.help_import_s:.2f} s")
        print(f"haina plugins imports {r.plugins_import_s:.2f} s")


if __name__ == "__main__":
    main()
