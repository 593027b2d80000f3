"""The architecture as a test, read from the code's own imports (module level and inside functions):

- replay/core imports only torch, numpy and the standard library;
- nothing imports the CLI (replay/cli) but the CLI itself and `python -m replay`;
- only the CLI imports the stages; a stage imports another only when it composes them (round, eval);
- no import cycle anywhere in replay/, stages/, schemas/.

The checks are pure functions over an import graph, tested first on small graphs that break each rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("replay", "stages", "schemas")
CORE_MAY_IMPORT = {"torch", "numpy"}
CLI_ENTRY = {"replay.__main__"}  # `python -m replay` runs the CLI
COMPOSING_STAGES = {"stages.round", "stages.eval"}  # round: generate -> score -> learn; eval: generate + score


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module `path` imports at run time (not under `if TYPE_CHECKING`), by absolute name:
    internal modules resolved to the module (not the package) they name; external ones by top-level name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    annotations_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                        and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                        for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m if m.split(".")[0] in PACKAGES else m.split(".")[0] for m in found}


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def internal(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    stdlib = set(sys.stdlib_module_names)
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if in_package(module, "replay.core") and not in_package(target, "replay.core") \
                    and target not in CORE_MAY_IMPORT | stdlib:
                problems.append(f"{module} -> {target}: replay.core imports only torch, numpy, stdlib")
            if in_package(target, "replay.cli") and not in_package(module, "replay.cli") and module not in CLI_ENTRY:
                problems.append(f"{module} -> {target}: nothing imports the CLI")
            if in_package(target, "stages") and target != "stages" and not in_package(module, "replay.cli"):
                if not in_package(module, "stages"):
                    problems.append(f"{module} -> {target}: only the CLI imports the stages")
                elif module not in COMPOSING_STAGES and module != "stages":
                    problems.append(f"{module} -> {target}: stages do not import each other")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):  # Tarjan; the graph is small, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -- the checks themselves, on graphs that break each rule -----------------------------------------
@pytest.mark.parametrize("graph, expected", [
    ({"replay.core.loss": {"torch", "math", "replay.store"}, "replay.store": set()}, "replay.core imports only"),
    ({"replay.core.loss": {"pandas"}}, "replay.core imports only"),
    ({"replay.store": {"replay.cli.app"}, "replay.cli.app": set()}, "nothing imports the CLI"),
    ({"replay.learn.loop": {"stages.learn"}, "stages.learn": set()}, "only the CLI imports the stages"),
    ({"stages.learn": {"stages.generate"}, "stages.generate": set()}, "stages do not import each other"),
])
def test_checker_catches_each_upward_import(graph, expected):
    problems = layering_violations(graph)
    assert len(problems) == 1 and expected in problems[0]


def test_checker_allows_the_intended_edges():
    graph = {"replay.cli.stage_commands": {"stages.learn", "replay.cli.app"}, "replay.cli.app": set(),
             "replay.__main__": {"replay.cli"}, "replay.cli": {"replay.cli.app"},
             "stages.round": {"stages.learn"}, "stages.learn": {"replay.store", "schemas"},
             "replay.core.loss": {"torch", "replay.core", "math"}, "replay.core": set()}
    assert layering_violations(graph) == []


def test_cycle_finder():
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]
    assert cycles({"a.x": {"a.x"}}) == [["a.x"]]
    assert cycles({"a.x": {"a.y", "os"}, "a.y": {"os"}}) == []


def test_resolves_relative_and_from_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "replay" / "read"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "plots.py").write_text("")
    (pkg / "report.py").write_text("from . import plots\nfrom .. import store\nfrom ..storage.local import x\n"
                                   "def f():\n    import torch.nn\n    from stages.learn import run\n"
                                   "if TYPE_CHECKING:\n    from replay.cli import app\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules = {"replay.read", "replay.read.plots", "replay.read.report", "replay.store", "replay.storage.local"}
    assert imports_of(pkg / "report.py", modules) == {"replay.read.plots", "replay.store", "replay.storage.local",
                                                     "torch", "stages.learn"}


# -- the house ----------------------------------------------------------------------------------------
def test_the_code_keeps_its_layers():
    graph = import_graph()
    assert {"replay.cli.app", "replay.core.loss", "stages.learn", "replay.read.doctor"} <= set(graph)  # sanity
    assert layering_violations(graph) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_module_directory_is_a_package_the_wheel_ships():
    """A hand-kept package list once left replay/learn out of the wheel; a directory of modules without
    __init__.py is skipped by setuptools' finder. Every directory holding Python code must ship."""
    import tomllib

    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(ROOT), include=include))
    code_dirs = {module_name(p.parent / "__init__.py") for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                 if "__pycache__" not in p.parts}
    assert code_dirs <= shipped, f"directories of code the wheel would not ship: {sorted(code_dirs - shipped)}"
