"""The layers of docs/architecture.md hold: each package imports only the packages below it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

PKG = ROOT / "ctbridge"
# package -> the ctbridge packages (and top-level modules) it may import
ALLOWED = {
    "atomicfile": set(),
    "conntrack": {"conntrack"},
    "sync": {"sync", "conntrack"},
    "config": {"config", "sync", "conntrack", "atomicfile"},
    "daemon": {"daemon", "config", "sync", "conntrack", "atomicfile"},
    "lab": {"lab", "daemon.control", "daemon.conntrackd", "config", "conntrack"},
    "cli": {"cli", "daemon", "config", "conntrack", "__version__"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """The ctbridge modules a file imports, as 'package' or 'package.module' below ctbridge."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
            for name in ("body", "orelse"):
                block = getattr(node, name, None)
                if isinstance(block, list):
                    setattr(node, name, [b for b in block if not (
                        isinstance(b, ast.If) and isinstance(b.test, ast.Name) and b.test.id == "TYPE_CHECKING")])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ctbridge":
            base = node.module.split(".")[1:]
            found |= {".".join([*base, alias.name]) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "ctbridge"}
    return found


def _allowed(layer: str, imported: str) -> bool:
    return any(imported == a or imported.startswith(a + ".") for a in ALLOWED[layer])


def test_each_package_imports_only_the_layers_below() -> None:
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        layer = _layer(path)
        if layer not in ALLOWED:
            continue  # ctbridge/__init__.py, __main__.py
        wrong += [f"{path.relative_to(PKG)} imports ctbridge.{m}" for m in _imports(path) if not _allowed(layer, m)]
    assert wrong == []


def test_every_package_is_in_a_layer() -> None:
    layers = {_layer(p) for p in PKG.rglob("*.py")} - {"__init__", "__main__"}
    assert layers == set(ALLOWED)


def test_the_sync_engines_parts_import_neither_its_front_nor_each_other_in_a_cycle() -> None:
    """ctbridge.sync.engine owns the parts (internal, external, session, recovery, sender, ...):
    a part reaches the front only through a callback it was given, never by importing it, and
    the modules of sync/ import one another without a cycle (annotations' imports included)."""
    sync = PKG / "sync"
    graph = {p.stem: {m.split(".")[1] for m in _imports(p) if m.startswith("sync.")} for p in sync.glob("*.py")}
    assert [name for name, deps in graph.items() if "engine" in deps] == []
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name not in done:
            for dep in graph.get(name, set()):
                visit(dep, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


# Sizes a newcomer can read in one sitting (docs/architecture.md): a module, a class's methods,
# a function. A longer function is allowed only as a measured hot loop that says so.
MODULE_LINES = 600
CLASS_METHODS = 30
FUNCTION_LINES = 80
HOT_LOOP = "# hot loop"


def test_modules_classes_and_functions_stay_readable() -> None:
    """No module of ctbridge over MODULE_LINES lines, no class over CLASS_METHODS methods, no
    function over FUNCTION_LINES lines unless a comment in it says it is a measured hot loop."""
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        name = path.relative_to(PKG)
        if len(lines) > MODULE_LINES:
            wrong.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if len(methods) > CLASS_METHODS:
                    wrong.append(f"{name}: class {node.name} has {len(methods)} methods")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                body = lines[node.lineno - 1:node.end_lineno]
                if len(body) > FUNCTION_LINES and not any(HOT_LOOP in line for line in body):
                    wrong.append(f"{name}: {node.name}() has {len(body)} lines")
    assert wrong == []
