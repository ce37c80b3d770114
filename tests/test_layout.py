"""The package's layout: its modules import one another one way only.

Every import between uksm's modules counts, wherever it is written: at
module level, inside a function (a "lazy" import still ties the two
modules together), under `if TYPE_CHECKING:`, relative or absolute.  A
cycle among them is a design error even when Python happens to load it:
the two modules are one concept split in two, or a callee that knows its
caller.  The pool owns its swap area and its groups; the bindings sit
below the policy, install() above the pool.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "uksm"


def _module_name(path: Path, top: Path) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: Optional[str]) -> str:
    """The absolute name of `from <level dots><module> import ...` in @current."""
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base.pop()
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    """{module: the uksm modules it imports}, over every .py file in @root."""
    files = {_module_name(p, root.parent): p for p in root.rglob("*.py")}
    graph: Dict[str, Set[str]] = {name: set() for name in files}
    # extension modules (the C core, uksm._native: its stub or its build)
    native = {_module_name(p, root.parent).split(".cpython")[0]
              for pattern in ("*.pyi", "*.so") for p in root.rglob(pattern)}

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                # `from . import handler` imports the module uksm.handler;
                # `from . import PAGE_SIZE` the package uksm itself
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files or sub in native else base)
            # (an extension module imports none of the package's modules)
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of @graph as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in graph}
    stack: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        colour[n] = GREY
        stack.append(n)
        for m in sorted(graph[n]):
            if colour[m] == GREY:
                return stack[stack.index(m):] + [m]
            if colour[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = BLACK
        return None

    for n in sorted(graph):
        if colour[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The parser itself: relative, absolute, lazy and TYPE_CHECKING
    imports all make edges, and a cycle through them is found."""
    pkg = tmp_path / "uksm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("import uksm.b\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import A\n")
    (pkg / "d.py").write_text("from . import A, _native\nfrom ._native import lib\n"
                              "import os\n")
    (pkg / "_native.pyi").write_text("")
    graph = import_graph(pkg)
    assert graph["uksm"] == {"uksm.a"}
    assert graph["uksm.a"] == {"uksm.b"}
    assert graph["uksm.b"] == {"uksm.sub.c"}
    assert graph["uksm.sub.c"] == {"uksm.a"}
    assert graph["uksm.d"] == {"uksm"}
    assert find_cycle(graph) == ["uksm.a", "uksm.b", "uksm.sub.c", "uksm.a"]
    (pkg / "sub" / "c.py").write_text("")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycle_between_uksm_modules() -> None:
    graph = import_graph()
    assert "uksm.pool" in graph and graph["uksm.pool"], "the parser found no imports"
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail("uksm's modules import each other in a cycle: " + " -> ".join(cycle))
