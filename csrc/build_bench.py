"""cffi build script for uksm.bench._swaphelper, the benchmark harness's C.

The swap benchmark's timed loops (the raw I/O floor, the reads of a swapped
array, the kernel side's child workload) are C, so that no interpreter sits
in the loop being timed; they are built like the core (setup.py's
cffi_modules), not compiled at run time.  The header doubles as the cdef:
it holds nothing cffi's parser refuses.
"""

import os

from cffi import FFI

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench")

ffibuilder = FFI()
with open(os.path.join(HERE, "swaphelper.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "uksm.bench._swaphelper",
    '#include "swaphelper.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, "swaphelper.c"))],
    include_dirs=[os.path.relpath(HERE)],
    depends=[os.path.relpath(os.path.join(HERE, "swaphelper.h"))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
