"""The package's layout: its modules import one another one way only.

Every import between uksm's modules counts, wherever it is written: at
module level, inside a function (a "lazy" import still ties the two
modules together), under `if TYPE_CHECKING:`, relative or absolute.  A
cycle among them is a design error even when Python happens to load it:
the two modules are one concept split in two, or a callee that knows its
caller.  The pool owns its swap area and its groups; the bindings sit
below the policy, install() above the pool.

The C core is held to the same rule, file by file: a non-static function
defined in one csrc/*.c file and named in another is an edge, and so is
one named by a static inline function of a header that the other file
uses (uksm_unlock() calls frame.c's uksm_direct_zap(), so every file that
unlocks depends on frame.c).  The frame store (frame.c) is at the
bottom, the pool (pool.c) at the top.  Two files stand outside: handler.c
and pyglue.c are the glue through which numpy and Python enter the pool's
public API from above, and pool.c frees the handler's event queue when
the pool goes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "uksm"
CSRC = PACKAGE.parent / "csrc"
# numpy's and Python's way in, above the pool (see above)
C_GLUE = frozenset({"handler.c", "pyglue.c"})


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
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    """{module: the uksm modules it imports}, over every .py file in @root."""
    files = {_module_name(p, root.parent): p for p in root.rglob("*.py")}
    graph: Dict[str, Set[str]] = {name: set() for name in files}
    # extension modules (the C core, uksm._native: its stub or its build)
    native = {
        _module_name(p, root.parent).split(".cpython")[0]
        for pattern in ("*.pyi", "*.so")
        for p in root.rglob(pattern)
    }

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
                return stack[stack.index(m) :] + [m]
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
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import A\n"
    )
    (pkg / "d.py").write_text("from . import A, _native\nfrom ._native import lib\nimport os\n")
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


# -- the C core ------------------------------------------------------------

_C_NOISE = re.compile(r"""//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'""", re.S)
_IDENT = re.compile(r"\b[A-Za-z_]\w*\b")
_FUNC_HEAD = re.compile(r"(\w+)\s*\((?:[^()]|\([^()]*\))*\)\s*$")


def _c_functions(src: str) -> Dict[str, Tuple[bool, str]]:
    """{name: (is_static, body)} of the functions defined at file scope in
    @src (comments and literals already blanked).  A macro whose expansion
    says `static` (xxh3.c's AVX2_INLINE) counts as static."""
    static_macros = {
        m.group(1)
        for m in re.finditer(r"^\s*#\s*define\s+(\w+)\b(.*?)(?<!\\)$", src, re.M | re.S)
        if "static" in m.group(2).split()
    }
    found: Dict[str, Tuple[bool, str]] = {}
    depth, head_start, body_start = 0, 0, 0
    head = ""
    for i, ch in enumerate(src):
        if ch == "{":
            if depth == 0:
                head, body_start = src[head_start:i], i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                lines = [ln for ln in head.splitlines() if not ln.lstrip().startswith("#")]
                text = "\n".join(lines)
                m = _FUNC_HEAD.search(text)
                if m and not re.search(r"[=;]|\b(struct|union|enum)\s+\w+\s*$", text[: m.start()]):
                    words = set(_IDENT.findall(text[: m.start()]))
                    found[m.group(1)] = (
                        "static" in words or bool(words & static_macros),
                        src[body_start : i + 1],
                    )
                head_start = i + 1
        elif ch == ";" and depth == 0:
            head_start = i + 1
    return found


def c_call_graph(root: Path = CSRC, skip: FrozenSet[str] = frozenset()) -> Dict[str, Set[str]]:
    """{file: the other files whose non-static functions it names}, over
    @root/*.c less @skip, each header's static inline functions expanded
    into what they name in turn."""

    def text(p: Path) -> str:
        return _C_NOISE.sub(lambda m: " " if m.group(0)[0] == "/" else '""', p.read_text())

    sources = {p.name: text(p) for p in sorted(root.glob("*.c")) if p.name not in skip}
    inline: Dict[str, Set[str]] = {}
    for h in sorted(root.glob("*.h")):
        for name, (_static, body) in _c_functions(text(h)).items():
            inline[name] = set(_IDENT.findall(body))
    owner: Dict[str, str] = {}
    for name, src in sources.items():
        for fn, (static, _body) in _c_functions(src).items():
            if not static:
                owner[fn] = name

    def names(idents: Set[str]) -> Set[str]:
        seen: Set[str] = set()
        todo = list(idents)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            todo.extend(inline.get(n, ()))
        return seen

    graph: Dict[str, Set[str]] = {name: set() for name in sources}
    for name, src in sources.items():
        for ident in names(set(_IDENT.findall(src))):
            if ident in owner and owner[ident] != name:
                graph[name].add(owner[ident])
    return graph


def test_c_graph_sees_calls_through_header_inlines(tmp_path: Path) -> None:
    """The parser itself: a direct call, a call made by a header's static
    inline function, a function named without a call (a pointer), and a
    static function (no edge) are told apart, and a cycle is found."""
    (tmp_path / "x.h").write_text(
        "/* b() */\nstatic inline int helper(void)\n{\n\treturn b_put(1);\n}\n"
    )
    (tmp_path / "a.c").write_text(
        '#include "x.h"\nint a_entry(void)\n{\n\tconst char *s = "c_fn()";\n\treturn helper();\n}\n'
    )
    (tmp_path / "b.c").write_text(
        "#define LOCAL static \\\n\tinline\nstruct s { int x; };\n"
        "LOCAL int b_local(void) { return 0; }\n"
        "int b_put(int n)\n{\n\treturn n + b_local();\n}\n"
    )
    (tmp_path / "c.c").write_text(
        "static int c_fn(int (*f)(void))\n{\n\treturn f ? f() : 0;\n}\n"
        "int c_go(void)\n{\n\treturn c_fn(a_entry) + b_local;\n}\n"
    )
    graph = c_call_graph(tmp_path)
    assert graph == {"a.c": {"b.c"}, "b.c": set(), "c.c": {"a.c"}}
    assert find_cycle(graph) is None
    (tmp_path / "b.c").write_text("int b_put(int n)\n{\n\treturn c_go() + n;\n}\n")
    assert find_cycle(c_call_graph(tmp_path)) == ["a.c", "b.c", "c.c", "a.c"]
    assert find_cycle(c_call_graph(tmp_path, skip=frozenset({"c.c"}))) is None


def test_no_call_cycle_between_c_files() -> None:
    graph = c_call_graph(skip=C_GLUE)
    # the parser found the calls it must: the pool owns swap and the store
    assert {"frame.c", "swap.c", "merge.c", "migrate.c"} <= graph["pool.c"]
    assert graph["frame.c"] == set(), "the frame store calls out: " + str(graph["frame.c"])
    assert "pool.c" not in graph["swap.c"] and "frame.c" in graph["swap.c"]
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail("csrc's files call each other in a cycle: " + " -> ".join(cycle))


def test_every_c_function_has_a_caller() -> None:
    """A non-static function is called from another file (directly or
    through a header's inline function), or is the Python side's (named in
    the cdef, or looked up by ctypes in uksm/); one its own file alone
    calls should be static, and one nobody calls is dead."""
    cdef = set(_IDENT.findall(_C_NOISE.sub(" ", (CSRC / "uksm_cdef.h").read_text())))
    python = set(_IDENT.findall("".join(p.read_text() for p in PACKAGE.rglob("*.py"))))
    graph_users: Dict[str, Set[str]] = {}
    sources = {p.name: _C_NOISE.sub(" ", p.read_text()) for p in sorted(CSRC.glob("*.c"))}
    headers = "".join(_C_NOISE.sub(" ", p.read_text()) for p in CSRC.glob("*.h"))
    inline_bodies = "".join(body for _s, body in _c_functions(headers).values())
    for name, src in sources.items():
        for fn, (static, _body) in _c_functions(src).items():
            if static:
                continue
            users = {o for o, s in sources.items() if o != name and re.search(rf"\b{fn}\b", s)}
            if re.search(rf"\b{fn}\b", inline_bodies):
                users.add("a header's inline function")
            graph_users[f"{name}:{fn}"] = users
            if not users and fn not in cdef and fn not in python:
                pytest.fail(f"{name}: {fn}() is not static, yet no other file calls it")
    assert "frame.c:uksm_frame_put" in graph_users, "the parser found no functions"
