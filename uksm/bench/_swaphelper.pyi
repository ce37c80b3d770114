# The benchmark harness's C (csrc/bench/swaphelper.c), built by
# csrc/build_bench.py (cffi, API mode) from the cdef csrc/bench/swaphelper.h:
# every constant and function declared there, by hand (keep the two in
# step).  Only uksm.bench.swapbench calls it.
from typing import TypeAlias

from cffi import FFI

_CData: TypeAlias = FFI.CData

class _Lib:
    SWAPBENCH_WRITE_S: int
    SWAPBENCH_SYNC_S: int
    SWAPBENCH_READ_SEQ_COLD_S: int
    SWAPBENCH_READ_SEQ_WARM_S: int
    SWAPBENCH_RAND_COLD_S: int
    SWAPBENCH_RAND_WARM_S: int
    SWAPBENCH_NOUT: int

    @staticmethod
    def swapbench_floor(
        dir: bytes | _CData,
        pages: int,
        samples: int,
        seed: int,
        out: _CData,
        lat_cold: _CData,
        lat_warm: _CData,
        punch: _CData,
        nsamples: _CData,
        what: _CData,
        /,
    ) -> int: ...
    @staticmethod
    def swapbench_read_seq(p: _CData, len: int, seconds: _CData, /) -> int: ...
    @staticmethod
    def swapbench_read_pages(p: _CData, pages: _CData, n: int, seconds: _CData, /) -> int: ...
    @staticmethod
    def swapbench_child(in_fd: int, out_fd: int, pages: int, seed: int, /) -> int: ...
    @staticmethod
    def swapbench_majflt() -> int: ...

ffi: FFI
lib: _Lib
