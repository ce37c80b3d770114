"""cffi build script for uksm._native, the C core (out-of-line API mode).

setup.py names this file in cffi_modules, so `pip install .` and
`pip install -e .` both compile it.  The C sources are listed one by one,
one file per mechanism; the cdef is read from a declarations-only header
because cffi's parser accepts no preprocessor lines, while the real header
(uksm.h) keeps its include guards and is what the C itself includes.

handler.c (the NEP 49 handler) includes numpy's headers, so numpy is a
build requirement too; its functions that take Python objects are called
through ctypes.PyDLL (uksm/handler.py), the GIL held, since cffi's cdef has
no PyObject.

UKSM_SANITIZE=address,undefined builds the core with those sanitizers.
"""

import os

import numpy
from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    "frame.c",
    "pool.c",
    "checksum.c",
    "merge.c",
    "fault.c",
    "migrate.c",
    "swap.c",
    "inject.c",
    "xxh3.c",
    "lock.c",
    "pyglue.c",
    "handler.c",
]

ffibuilder = FFI()
with open(os.path.join(HERE, "uksm_cdef.h")) as f:
    ffibuilder.cdef(f.read())

extra_compile_args = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link_args = []
sanitize = os.environ.get("UKSM_SANITIZE")
if sanitize:
    extra_compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    extra_link_args += [f"-fsanitize={sanitize}"]

ffibuilder.set_source(
    "uksm._native",
    '#include "uksm.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE), numpy.get_include()],
    depends=[os.path.relpath(os.path.join(HERE, h)) for h in ("uksm.h", "uksm_internal.h")],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
