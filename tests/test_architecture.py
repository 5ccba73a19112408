"""The package's shape: a module graph without cycles (function-level imports included), files and functions of a
size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vidfusion"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
ARGPARSE_TABLES = {("cli_args.py", "build_parser")}  # a table of options, read line by line


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """vidfusion modules `path` imports anywhere (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vidfusion"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "vidfusion":
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import loading` names a module
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph() -> dict[str, set[str]]:
    # the package's __init__ re-exports the public names: an edge into it is not a layer
    return {module_name(p): imports_of(p) - {"vidfusion"} for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    found = cycles(package_graph())
    assert not found, f"import cycles: {found}"


def test_the_cycle_finder_finds_one():
    """Catches a checker that cannot fail: a two-module loop and a function-level import are seen."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    pipeline = imports_of(PACKAGE / "pipeline.py")
    assert "vidfusion.sampling" in pipeline and "vidfusion.auto" not in pipeline


def test_modules_and_functions_stay_readable():
    long_modules = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) >
                    MAX_MODULE_LINES}
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    long_functions = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and (path.name, node.name) not in ARGPARSE_TABLES:
                    long_functions.append(f"{path.name}:{node.name} ({length})")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
