"""The package's layering, checked from its source: no import cycles, and lower layers never import upper ones.

Every ``import`` statement in ``ernie45/`` counts, also those inside functions (a lazy import that closes a cycle
is still a cycle in the design; it only hides it from the interpreter). ``if TYPE_CHECKING:`` blocks are the one
exception: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ernie45"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes of a module, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> the ernie45 modules it imports (a ``from pkg import name`` of a submodule counts as that submodule)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            for t in targets:
                while t and t not in files:  # `import ernie45.bridge.io as x` names a module; strip attributes
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("ernie45"):
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def test_the_package_has_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles in ernie45/:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# the layers of docs/architecture.md, lowest first: a module may import its own layer and the ones below it
LAYERS = [
    ("ernie45.errors", "ernie45.config", "ernie45.layout"),
    ("ernie45.megatron",),
    ("ernie45.bridge",),
]


def _layer(mod: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_lower_layers_never_import_upper_ones():
    graph = import_graph()
    wrong = []
    for mod, deps in sorted(graph.items()):
        low = _layer(mod)
        if low is None:
            continue
        for dep in sorted(deps):
            up = _layer(dep)
            if up is None or up > low:
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "layering broken:\n" + "\n".join(wrong)


def test_the_graph_sees_relative_absolute_and_lazy_imports():
    # the walker itself must not be blind: known edges of today's tree are found
    graph = import_graph()
    assert "ernie45.errors" in graph["ernie45.config"]
    assert "ernie45.config" in graph["ernie45.megatron.model"]
    assert any(d.startswith("ernie45.train") for d in graph["ernie45.cli"])  # a function-local import
