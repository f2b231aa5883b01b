"""The package's shape: no import cycles under vlm/, the core never imports the embedded default
(vlm/embedded/) or the tools (vlm/bench/), and every file stays small.

The import graph is read from the source with `ast`, not by importing: an edge A -> B for every
`import` / `from ... import` in A (relative imports resolved; imports inside functions count,
they are still a dependency; `if TYPE_CHECKING:` imports do not, they never run) that names module
B of the package, or a name in B. Importing `vlm.x.y` also runs the `__init__` of `vlm` and `vlm.x`;
those implicit edges are left out, as they are in any package that re-exports from its `__init__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vlm"
MAX_LINES = 400
TOO_LONG: dict[str, str] = {}
"""Files allowed over MAX_LINES (path relative to vlm/ -> why); empty, keep it so."""
KNOWN_CYCLES: list[set[str]] = []
"""Import cycles still to be removed (each the set of modules in one strongly connected component)."""
NOT_CORE = ("vlm.embedded", "vlm.bench")
"""The embedded default and the tools: they may use the core, the core never imports them..."""
LAZY_EXCEPTIONS = {("vlm.cli", "vlm.bench.fusion")}
"""...except these, inside a function (`vlm bench fusion` runs the bench)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, in_function: bool = False):
    """(import node, inside a function?) for every import that runs."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif _is_type_checking(node):
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]), in_function)
        else:
            lazy = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _imports(node, lazy)


def import_graph() -> dict[str, dict[str, bool]]:
    """module -> {imported module of the package: only ever imported inside functions?}."""
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, dict[str, bool]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, bool] = {}
        for node, lazy in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in base
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[target] = edges.get(target, True) and lazy
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, bool]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_under_vlm() -> None:
    found = cycles(import_graph())
    new = [sorted(c) for c in found if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, f"import cycles under vlm/: {new}"
    stale = [sorted(k) for k in KNOWN_CYCLES if not any(c <= k for c in found)]
    assert not stale, f"these cycles are gone; remove them from KNOWN_CYCLES: {stale}"


def test_the_core_never_imports_the_embedded_default_or_the_tools() -> None:
    wrong = [
        f"{importer} -> {target}" + (" (at module level)" if not lazy else "")
        for importer, edges in import_graph().items() if not importer.startswith(NOT_CORE)
        for target, lazy in edges.items() if target.startswith(NOT_CORE)
        and not ((importer, target) in LAZY_EXCEPTIONS and lazy)
    ]
    assert not wrong, wrong


def test_no_file_under_vlm_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(PACKAGE)) not in TOO_LONG
    }
    assert not long, f"over {MAX_LINES} lines (split them, or list them in TOO_LONG with a reason): {long}"


if __name__ == "__main__":  # print the graph's cycles and the edges inside them
    g = import_graph()
    for c in cycles(g):
        print(sorted(c))
        for v in sorted(c):
            print("   ", v, "->", sorted(w + (" (lazy)" if g[v][w] else "") for w in g[v] if w in c))
