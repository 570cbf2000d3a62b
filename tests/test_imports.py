"""No import cycles among the project's modules: every import statement counts, also those inside functions (a
lazy import still ties two modules together); only imports under `if TYPE_CHECKING:` are left out."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("npc_engine", "kernels", "bridge", "demo_game")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path: Path, module: str) -> list[str]:
    """Dotted names of everything the file imports (`from X import Y` gives X.Y: a module, or a name in module X)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
               and "TYPE_CHECKING" in ast.unparse(stmt.test) for node in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports: each imported name's longest dotted prefix that is a module (a
    package's __init__ running before its submodule's is no edge: Python initialises parents first)."""
    modules = project_modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {module: {owner(name) for name in imported_names(path, module)} - {None, module}
            for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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


def test_the_walk_finds_a_cycle_and_the_imports_it_must_see(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.hidden\n"
                      "def f():\n    from . import sibling\n    from .sub import name\n")
    assert imported_names(source, "pkg.mod") == ["typing.TYPE_CHECKING", "pkg.sibling", "pkg.sub.name"]
    graph = import_graph()
    assert "kernels.rows_linear" in graph["kernels.fp8"] and "kernels.prefix" in graph["npc_engine.model"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []
