"""uksm/_native.pyi, the type stub of the compiled core, against the cdef it
is generated from (tools/gen_stub.py) and against the built module."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from typing import Dict, Set

import uksm._native as native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = os.path.join(ROOT, "tools", "gen_stub.py")
STUB = os.path.join(ROOT, "uksm", "_native.pyi")
CDEF = os.path.join(ROOT, "csrc", "uksm_cdef.h")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, GEN, *args], capture_output=True, text=True, timeout=120)


def _stub_lib() -> tuple[Set[str], Dict[str, int]]:
    """(constants, function -> parameter count) of the stub's _Lib."""
    with open(STUB) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
    consts = {
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    funcs = {
        n.name: len(n.args.posonlyargs) + len(n.args.args)
        for n in cls.body
        if isinstance(n, ast.FunctionDef)
    }
    return consts, funcs


def test_stub_matches_cdef() -> None:
    r = _run("--check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_reports_drift(tmp_path: pathlib.Path) -> None:
    """A function added to the cdef and not to the stub fails the check,
    naming it; regenerating makes it pass."""
    cdef = os.path.join(tmp_path, "cdef.h")
    stub = os.path.join(tmp_path, "stub.pyi")
    with open(CDEF) as f:
        text = f.read()
    with open(cdef, "w") as f:
        f.write(
            text + "\nint uksm_added_since(struct uksm_pool *pool, size_t npages);\n"
            "#define UKSM_ADDED_SINCE ...\n"
        )
    with open(STUB) as f, open(stub, "w") as g:
        g.write(f.read())
    r = _run("--check", "--cdef", cdef, "--stub", stub)
    assert r.returncode == 1
    assert "+    def uksm_added_since(pool: _CData, npages: int, /) -> int: ..." in r.stdout
    assert "+    UKSM_ADDED_SINCE: int" in r.stdout
    assert _run("--cdef", cdef, "--stub", stub).returncode == 0
    assert _run("--check", "--cdef", cdef, "--stub", stub).returncode == 0


def test_stub_matches_built_module() -> None:
    """Every name of the built lib is in the stub with its arity, and the
    stub names nothing the lib lacks (a stale build after a cdef change
    fails here: rebuild with pip install -e .)."""
    consts, funcs = _stub_lib()
    lib = native.lib
    built = set(dir(lib))
    assert built == consts | set(funcs), (
        f"only built: {sorted(built - consts - set(funcs))}, "
        f"only in the stub: {sorted((consts | set(funcs)) - built)}"
    )
    for name in consts:
        assert isinstance(getattr(lib, name), int), name
    for name, nparams in funcs.items():
        ctype = native.ffi.typeof(getattr(lib, name))
        assert len(ctype.args) == nparams, (name, ctype)
