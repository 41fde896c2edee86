"""The import graph of ``orchestrator`` and ``model_parallel``: no circles, and the layers hold.

Every import counts: at module level, inside functions and under
``TYPE_CHECKING`` (a circle hidden by a deferred import is still one module
that cannot be understood, or moved, without the other). Read from the
source with ``ast``, so the test imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "model_parallel")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_time_nodes(tree: ast.Module) -> list[ast.AST]:
    """The nodes that run when the module is imported: not function bodies, not ``TYPE_CHECKING``."""
    found: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if _is_type_checking(child):
                continue
            todo.append(child)
    return found


def import_graph(*, at_import_only: bool = False) -> dict[str, set[str]]:
    """Each module's imports of other modules of ours (``from a import b``: ``a.b`` if a module).

    ``at_import_only``: only the imports that run when the module is imported.
    """
    paths = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = _import_time_nodes(tree) if at_import_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules:
                    deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        # a package's __init__ is imported with its modules; not counted as an edge back
        graph[name] = {
            d for d in deps if d in modules and d != name and not name.startswith(d + ".")
        }
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circles() -> None:
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


# Login-node code (orchestrator.config, .planning, .launch, .status) does not load
# orchestrator.runtime when it is imported. Any exception is listed with its
# reason; a new one fails the test (move the shared piece, or defer the import to
# the function that turns this process into a rank).
LOGIN_PACKAGES = ("config", "planning", "launch", "status")
LOGIN_TO_RUNTIME: dict[tuple[str, str], str] = {
    # none today: what both sides share is in orchestrator.protocol (a leaf), and
    # the command line asks dist_env and starts train inside the function that
    # makes this process a rank
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "orchestrator" else ""


def _login_to_runtime() -> set[tuple[str, str]]:
    graph = import_graph(at_import_only=True)
    return {
        (module, dep)
        for module, deps in graph.items()
        if _package(module) in LOGIN_PACKAGES
        for dep in deps
        # the package itself (``from orchestrator.runtime import x``) is a docstring
        if _package(dep) == "runtime" and dep != "orchestrator.runtime"
    }


def test_login_node_code_does_not_load_the_runtime() -> None:
    found = _login_to_runtime()
    new = sorted(found - LOGIN_TO_RUNTIME.keys())
    gone = sorted(LOGIN_TO_RUNTIME.keys() - found)
    assert not new, "login-node code imports orchestrator.runtime: " + "; ".join(
        f"{a} -> {b}" for a, b in new
    )
    assert not gone, "remove the exceptions that no longer hold: " + "; ".join(
        f"{a} -> {b}" for a, b in gone
    )


def test_deferred_imports_are_not_counted_at_import() -> None:
    # cli hands this process to the training loop inside an allocation, in a function
    assert ("orchestrator.launch.cli", "orchestrator.runtime.train") not in _login_to_runtime()
    assert "orchestrator.runtime.train" in import_graph()["orchestrator.launch.cli"]


def test_the_runtime_never_imports_launch() -> None:
    graph = import_graph()
    found = sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if _package(module) == "runtime"
        for dep in deps
        if _package(dep) == "launch"
    )
    assert not found, "orchestrator.runtime imports orchestrator.launch: " + "; ".join(found)


def test_the_protocol_is_a_leaf() -> None:
    # both sides import it: it must bring neither the runtime nor torch along
    assert import_graph()["orchestrator.protocol"] == set()
    tree = ast.parse((ROOT / "orchestrator" / "protocol.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"torch", "deepspeed", "numpy"}, imported
