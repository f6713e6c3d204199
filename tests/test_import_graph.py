"""No import cycle anywhere in sd2mnn: every module's imports, at module level and inside
functions, form a graph with no loop (an import inside a function must not hide one)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import sd2mnn

SRC = Path(sd2mnn.__file__).parent


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not ``__init__``)."""
    files = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Each import statement that can run: anywhere in the file, except under ``if TYPE_CHECKING``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that importing (or calling into) ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # a relative import, from the package this module sits in
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            # "from P import m" imports the module P.m where there is one, else a name of P.
            found.add(submodule if submodule in modules else base)
    # Importing a.b.c runs the package a.b first, unless it is one this module sits in (already running).
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    found |= {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)} - own
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as the modules along it (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_in_sd2mnn():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    # The check itself: a cycle hidden by an import inside a function is found and named.
    graph = {"a": {"b"}, "b": set(), "c": set()}
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    graph["b"] = imported_modules("b", tmp_path / "b.py", set(graph))
    assert find_cycle(graph) == ["a", "b", "a"]
    graph["b"] = set()
    assert find_cycle(graph) is None


def test_the_graph_knows_the_tokenization_order():
    graph = import_graph()
    assert "sd2mnn.tokenization.reader" in graph["sd2mnn.tokenization.writer"]
    assert "sd2mnn.tokenization.writer" not in graph["sd2mnn.tokenization.reader"]


@pytest.mark.parametrize("name", sorted(m for m in module_files() if not m.endswith("__main__")))
def test_every_module_imports(name):
    importlib.import_module(name)
