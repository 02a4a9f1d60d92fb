"""The package's structure rules, checked on the source: no import cycle between circuit_finder's
modules (lazy imports inside functions included), no module — nor test, benchmark, example or fuzz
target — using another module's underscore names, and no Python function over 80 lines (docstring
included) without a `long:` reason in a comment just above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "circuit_finder"
MAX_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(f.read_text(), str(f))
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block: imports for annotations only, never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _own_private_names(tree: ast.Module) -> set[str]:
    """Underscore attributes a module assigns itself (``self._x = ...``; ``other._x`` of the same
    class is then the module's own business)."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_")}


def _imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the circuit_finder modules it imports (any import statement, anywhere in the file)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, tree in modules.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
        type_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, is_package)
                # `from pkg import mod` imports pkg.mod (and runs pkg's __init__ only if not yet run by
                # whoever imported this module); `from pkg import name` needs pkg's __init__.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names if f"{base}.{a.name}" != f"{PACKAGE.name}._C"]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    graph = _imports(_modules())
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_detector_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _underscore_uses(name: str, tree: ast.Module) -> list[str]:
    own = _own_private_names(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                    if a.name.startswith("_") and a.name != "_C"]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            receiver = node.value.id if isinstance(node.value, ast.Name) else None
            if receiver in ("self", "cls") or node.attr in own or node.attr == "_C":
                continue
            bad.append(f"{name}:{node.lineno}: .{node.attr}")
    return bad


def test_no_cross_module_underscore_names():
    """No `from x import _name`, and no `obj._name` but on self/cls or an attribute the module
    assigns itself (the C++ extension module `_C` is the binding layer's public face)."""
    bad = [b for name, tree in _modules().items() for b in _underscore_uses(name, tree)]
    assert not bad, "\n".join(bad)


def test_no_underscore_names_outside_the_package():
    """Tests, benchmarks, examples and fuzz targets use circuit_finder (and other libraries) through
    public names too."""
    root = PACKAGE.parents[1]
    bad = []
    for folder in ("tests", "benchmarks", "examples", "fuzz"):
        for f in sorted((root / folder).rglob("*.py")):
            bad += _underscore_uses(str(f.relative_to(root)), ast.parse(f.read_text(), str(f)))
    assert not bad, "\n".join(bad)


def test_functions_are_short():
    long = []
    for f in sorted(PACKAGE.rglob("*.py")):
        lines = f.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                reason = any("long:" in line for line in lines[node.lineno - 3:node.lineno])
                if n > MAX_LINES and not reason:
                    long.append(f"{f.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
