"""Dependencies point down the pipeline: a walk over every import statement of the package
(module-level and function-level alike; a function-level import only hides a cycle)."""
import ast
from pathlib import Path

import fqt_compiler

PACKAGE = Path(fqt_compiler.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: package modules it imports}``; importing a package counts as importing its
    ``__init__``, ``from package import submodule`` as importing the submodule."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = ".".join(filter(None, (base if node.level else "", node.module or "")))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in paths else base)
        graph[name] = {e for e in edges if e in paths and e != name}
    return graph


def _cycle(graph) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_imports():
    graph = import_graph()
    assert "fqt_compiler.codegen.builder" in graph["fqt_compiler.codegen.gemm"]
    assert "fqt_compiler.runtime.jit" in graph["fqt_compiler.runtime.gemm"]


def test_no_import_cycle():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_codegen_imports_nothing_above_it():
    above = ("fqt_compiler.runtime", "fqt_compiler.passes", "fqt_compiler.compiler", "fqt_compiler.cross",
             "fqt_compiler.debug", "fqt_compiler.report")
    for name, edges in import_graph().items():
        if name.startswith("fqt_compiler.codegen"):
            bad = {e for e in edges if e == "fqt_compiler" or e.startswith(above)}
            assert not bad, f"{name} imports {bad}"


def test_runtime_does_not_import_observers():
    """The runtime emits events; the debug ladder and the reports subscribe to them."""
    for name, edges in import_graph().items():
        if name.startswith("fqt_compiler.runtime"):
            assert not edges & {"fqt_compiler.debug", "fqt_compiler.report", "fqt_compiler"}, name
