"""The package's shape: wings in a fixed order (every import, function-level included, goes down or stays in its
wing), a module graph without cycles, files and functions of a size a reader can hold."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vidfusion"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
ARGPARSE_TABLES = {("args.py", "build_parser")}  # a table of options, read line by line
# bottom to top; wings on one floor may not import each other (client.py imports nothing of vidfusion: HTTP only)
FLOORS = [("errors", "devices", "client"), ("media",), ("models",), ("sampling",), ("checkpoints",), ("lora",),
          ("pipelines",), ("training", "scale"), ("serve",), ("cli",)]
FLOOR = {wing: i for i, floor in enumerate(FLOORS) for wing in floor}
FACE = {"vidfusion", "vidfusion.utils", "vidfusion.__main__"}  # the public face: above every wing, imported by none
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "utils.py", "errors.py", "devices.py", "client.py"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """vidfusion modules `path` imports anywhere (module level or inside functions)."""
    name = module_name(path, package)
    parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vidfusion"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parent.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "vidfusion":
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import loading` names a module
    modules = {module_name(p, package) for p in package.rglob("*.py")}
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


def package_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, package): imports_of(p, package) for p in package.rglob("*.py")}


def wing(module: str) -> str:
    """vidfusion.models.unet3d -> models; vidfusion.errors -> errors."""
    return module.split(".")[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up the floors, sideways into another wing of its floor, or into the public face."""
    found = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target in FACE:
                if importer not in FACE:
                    found.append(f"{importer} imports the package's face {target}")
            elif importer not in FACE and wing(importer) != wing(target) and \
                    FLOOR[wing(target)] >= FLOOR[wing(importer)]:
                found.append(f"{importer} ({wing(importer)}) imports {target} ({wing(target)}), a wing not below it")
    return found


def test_every_module_is_in_a_wing():
    """The flat folder holds the public face and the leaves only; every folder is a wing with its docstring."""
    assert {p.name for p in PACKAGE.glob("*.py")} <= TOP_LEVEL_FILES
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(FLOOR) - {"errors", "devices", "client"}
    for folder in folders:
        assert ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())), folder
    graph = package_graph()
    assert all(m in FACE or wing(m) in FLOOR for m in graph)


def test_wings_import_only_downwards():
    found = upward_imports(package_graph())
    assert not found, "imports against the wing order:\n" + "\n".join(found)


def test_the_wing_check_finds_a_planted_upward_import(tmp_path):
    """Catches a checker that cannot fail: a models module importing a new, import-free cli module (no cycle), a
    leaf importing the package root, and training importing scale (same floor) are each named."""
    package = tmp_path / "vidfusion"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    (package / "cli" / "planted.py").write_text("X = 1\n")
    config = package / "models" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _planted():\n    from ..cli import planted\n    return planted\n")
    train = package / "training" / "data.py"
    train.write_text(train.read_text() + "\n\ndef _side():\n    from ..scale.batch import run\n    return run\n")
    graph = package_graph(package)
    assert not cycles(graph)  # the planted imports close no cycle: only the wing order can catch them
    found = upward_imports(graph)
    assert any("vidfusion.models.config (models) imports vidfusion.cli.planted (cli)" in f for f in found), found
    assert any(f.startswith("vidfusion.training.data (training) imports vidfusion.scale.batch") for f in found)
    assert {f.split()[0] for f in found} == {"vidfusion.models.config", "vidfusion.training.data"}, found
    metadata = package / "media" / "metadata.py"
    metadata.write_text(metadata.read_text() + "\n\ndef _root():\n    import vidfusion\n    return vidfusion\n")
    assert "vidfusion.media.metadata imports the package's face vidfusion" in upward_imports(package_graph(package))


def test_no_import_cycles():
    found = cycles(package_graph())
    assert not found, f"import cycles: {found}"


def test_the_cycle_finder_finds_one():
    """Catches a checker that cannot fail: a two-module loop and a function-level import are seen."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    pipeline = imports_of(PACKAGE / "pipelines" / "text_to_video.py")
    assert "vidfusion.sampling.samplers" in pipeline and "vidfusion.pipelines.auto" not in pipeline


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
