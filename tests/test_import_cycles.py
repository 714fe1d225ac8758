"""The package-level import graph of megatron_avar has no cycles, and the leaf packages import nothing else.

Nodes are the subpackages (``megatron_avar.eval``) and the top-level modules (``megatron_avar.cli``); an edge
A -> B is any import of B anywhere in A, imports inside functions included (a lazy import is still a
dependency: it only moves the failure to run time). Read with ``ast``, so nothing is imported or executed.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = "megatron_avar"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Cycles known and not fixed yet, each with the reason. The test fails when one of them disappears too,
# so that this list only ever shrinks.
KNOWN_CYCLES: dict[frozenset[str], str] = {}

# Packages that must not import anything else from megatron_avar, so that every command can use them.
LEAF_PACKAGES = ("grading",)


def _node_names() -> set[str]:
    names = {path.name for path in ROOT.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    return names | {path.stem for path in ROOT.glob("*.py") if path.stem != "__init__"}


def _module_parts(path: Path) -> list[str]:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_modules(tree: ast.AST, path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in ``tree``; relative imports resolved; for ``from X import y``
    both X and X.y (y may be a submodule)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _module_parts(path) if path.name == "__init__.py" else _module_parts(path)[:-1]
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(module, node.lineno)] + [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph() -> dict[tuple[str, str], list[str]]:
    """(source node, target node) -> the "file:line" sites of that edge; no self-edges."""
    nodes = _node_names()
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        parts = _module_parts(path)
        if len(parts) < 2:  # megatron_avar/__init__.py: the package itself, not a node
            continue
        source = parts[1]
        for module, line in _imported_modules(ast.parse(path.read_text(), str(path)), path):
            names = module.split(".")
            if len(names) > 1 and names[0] == PACKAGE and names[1] in nodes and names[1] != source:
                site = f"{path.relative_to(ROOT.parent)}:{line}"
                if site not in edges[(source, names[1])]:
                    edges[(source, names[1])].append(site)
    return dict(edges)


def strongly_connected(edges) -> list[set[str]]:
    """The strongly connected components with more than one node (Tarjan): each holds at least one cycle."""
    successors: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        successors[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(successors[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(successors):
        if node not in index:
            visit(node)
    return components


def _describe(component: set[str], edges) -> str:
    lines = [" <-> ".join(sorted(component)) + ":"]
    for (source, target), sites in sorted(edges.items()):
        if source in component and target in component:
            lines.append(f"  {source} -> {target}: {', '.join(sites)}")
    return "\n".join(lines)


def test_no_import_cycles_between_packages():
    edges = import_graph()
    cycles = strongly_connected(edges)
    unknown = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not unknown, "import cycles between megatron_avar packages:\n" + "\n".join(
        _describe(c, edges) for c in unknown)
    stale = set(KNOWN_CYCLES) - {frozenset(c) for c in cycles}
    assert not stale, f"no longer cycles, remove them from KNOWN_CYCLES: {[sorted(c) for c in stale]}"


def test_leaf_packages_import_nothing_else_from_megatron_avar():
    for leaf in LEAF_PACKAGES:
        outgoing = {target: sites for (source, target), sites in import_graph().items() if source == leaf}
        assert not outgoing, f"{PACKAGE}.{leaf} must stay a leaf, but imports {outgoing}"


def test_the_graph_sees_lazy_and_relative_imports():
    # A guard on the reader itself: an import inside a function and a relative import both count.
    path = ROOT / "eval" / "x.py"  # never written: only its name is used to resolve the relative import
    tree = ast.parse("def f():\n    from megatron_avar.grading import grade\nfrom ..roles import TokenRole\n")
    modules = [module for module, _ in _imported_modules(tree, path)]
    assert "megatron_avar.grading" in modules and "megatron_avar.roles" in modules
