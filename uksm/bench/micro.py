"""uksm.bench.micro - what only the pytest-benchmark microbenchmarks (bench/)
need, beside uksm.bench.measure, which they share with ``python -m uksm bench``.

The COW floors (floor.c's userspace break, compiled at run time, and the
kernel's own copy of a private file page), checksum cost per page in the C
core, memcmp for reference, metadata bytes per page; and the plumbing the
bench_*.py files share: rounds(), need_kernel(), report() and Shared, the
figures measured once per run and reused.

Savings are measured twice, as the kernel sees them: what the pool holds
(its private pages present, from pagemap, plus its frames, the blocks of
its memfd: fstat st_blocks * 512) before and after, and the process's PSS
(with the data read after merging: a merged page's view is mapped in when
touched), each as a fraction of the ideal (one page saved per duplicate
pair).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import time
from typing import Any, Callable, Dict, Optional, TypeVar

import numpy as np

from .. import _core
from ..pool import Pool
from . import kernelksm, measure
from .measure import PAGE, MiB, UksmPairs, pages_of

T = TypeVar("T")

FLOOR_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.c")


# -- the COW floor ---------------------------------------------------------------------


def compile_floor(workdir: str) -> Optional[str]:
    """Build uksm/bench/floor.c with the system cc into @workdir; None without cc."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    exe = os.path.join(workdir, "uksm-floor")
    proc = subprocess.run([cc, "-O2", "-o", exe, FLOOR_SOURCE], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"compiling {FLOOR_SOURCE} failed:\n{proc.stderr}")
    return exe


def run_floor(exe: str, pages: int) -> Dict[str, float]:
    """Run the floor program; its "name value" lines as a dict (us/page)."""
    proc = subprocess.run([exe, str(pages)], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"{exe} failed ({proc.returncode}): {proc.stderr}")
    out = {}
    for line in proc.stdout.splitlines():
        name, value = line.split()
        out[name] = float(value)
    return out


def private_file_cow(pages: int) -> Dict[str, float]:
    """The kernel's own floor under cow="kernel": a merged uksm page is a
    MAP_PRIVATE view of a memfd page, and a write into it is the kernel's
    copy of a private file page.  Here @pages pages of a memfd, mapped
    MAP_PRIVATE and never touched (as a view is after a merge), each get the
    one-byte write UksmPairs.cow makes, with the same numpy statement: us
    per page."""
    fd = os.memfd_create("uksm-cow-floor", os.MFD_CLOEXEC)
    try:
        os.pwrite(fd, b"\x01" * (pages * PAGE), 0)  # the page cache holds them
        m = mmap.mmap(
            fd, pages * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        try:
            arr = np.frombuffer(m, np.uint8).reshape(pages, PAGE)
            t0 = time.perf_counter()
            arr[:, 0] = 0xA5
            dt = time.perf_counter() - t0
            ok = bool(np.all(arr[:, 0] == 0xA5) and np.all(arr[:, 1] == 1))
            del arr
        finally:
            m.close()
        if os.pread(fd, 1, 0) != b"\x01" or not ok:
            raise RuntimeError("a private mapping's write reached the file")
    finally:
        os.close(fd)
    return {"private_file_cow": dt / pages * 1e6}


# -- checksums ---------------------------------------------------------------------------


class ChecksumPages:
    """@n pages of random bytes in a pool, hashed in one batch by the C core
    (the scanner's own path: checksum_range through the direct map)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self._closed = False
        self.pool = Pool(n * PAGE + 16 * MiB)
        self.arr = self.pool.empty(n * PAGE, np.uint8)
        self.arr[:] = np.random.default_rng(seed).integers(0, 256, n * PAGE, dtype=np.uint8)
        self.vpn = self.pool._record(self.arr).vpn
        self.sums = np.empty(n, np.uint64)
        self.states = np.empty(n, np.uint8)

    def batch(self, algo: str) -> float:
        """Seconds to hash all n pages with @algo in one call."""
        code = _core.CHECKSUMS[algo]
        t0 = time.perf_counter()
        self.pool._native.checksum_range(self.vpn, None, self.sums, self.states, code)
        return time.perf_counter() - t0

    def close(self) -> None:
        # the array is a view of the pool's memory: it goes first
        if not self._closed:
            self._closed = True
            del self.arr
            self.pool.close()


_libc = None


def memcmp_seconds(a: np.ndarray, b: np.ndarray) -> float:
    """Seconds for libc memcmp over two equal buffers in one call."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None)
        _libc.memcmp.restype = ctypes.c_int
        _libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    t0 = time.perf_counter()
    r = _libc.memcmp(a.ctypes.data, b.ctypes.data, a.nbytes)
    dt = time.perf_counter() - t0
    if r:
        raise ValueError("memcmp reference buffers differ")
    return dt


# -- metadata ----------------------------------------------------------------------------


def meta_duplicates(n: int, checksum: str = "jhash2") -> Dict[str, Any]:
    """metadata_bytes_per_page with 2 x @n pages merged pairwise."""
    w = UksmPairs(n, checksum)
    try:
        r = w.merge_all()
        st = w.pool.stats()
        return {
            "pages": 2 * n,
            "metadata_bytes_per_page": st["metadata_bytes_per_page"],
            "metadata_bytes": st["metadata_bytes"],
            "pages_sharing": st["pages_sharing"],
            "wall": r["wall"],
        }
    finally:
        w.close()


def meta_unique(n: int, checksum: str = "jhash2") -> Dict[str, Any]:
    """metadata_bytes_per_page with @n pages that are all different, after
    two full scans (every page then sits in the unstable tree)."""
    pool = Pool(n * PAGE + 16 * MiB, pages_to_scan=10000, sleep_millisecs=0, checksum=checksum)
    try:
        arr = pool.empty(n * PAGE, np.uint8)
        pages = pages_of(arr)
        pages.view(np.uint64)[:, 0] = np.arange(n, dtype=np.uint64) + 1
        pages.view(np.uint64)[:, 1:] = 0x9E3779B97F4A7C15
        t0 = time.perf_counter()
        st = pool.scan(2)
        wall = time.perf_counter() - t0
        del pages, arr
        return {
            "pages": n,
            "metadata_bytes_per_page": st["metadata_bytes_per_page"],
            "metadata_bytes": st["metadata_bytes"],
            "pages_unshared": st["pages_unshared"],
            "pages_sharing": st["pages_sharing"],
            "wall": wall,
        }
    finally:
        pool.close()


# -- the bench_*.py files' plumbing ------------------------------------------------------


def rounds(benchmark: Any, real: int = 3) -> int:
    """Rounds for a heavy pedantic benchmark: 1 in the smoke run."""
    return 1 if benchmark.disabled else real


def need_kernel() -> None:
    """Skip the calling benchmark where the kernel's KSM cannot be driven."""
    import pytest

    if not kernelksm.available():
        pytest.skip("kernel KSM side needs root and a writable /sys/kernel/mm/ksm")


def report(benchmark: Any, line: str, **extra: Any) -> None:
    """One human-readable line (shown with -s) and the figures in extra_info."""
    for key, value in extra.items():
        benchmark.extra_info[key] = value
    print("\n  " + line)


class Shared:
    """Figures measured once per run and reused by every benchmark that needs
    them (the kernel's convergence, the floor), keyed by what was measured."""

    def __init__(self, tmpdir: str) -> None:
        self.tmpdir = tmpdir
        self.cache: Dict[Any, Any] = {}

    def get(self, key: Any, compute: Callable[[], T]) -> T:
        if key not in self.cache:
            self.cache[key] = compute()
        value: T = self.cache[key]
        return value

    def kernel_converge(self, n: int, nrounds: int) -> Optional[Dict[str, Any]]:
        """Median kernel figures for the pairs workload, or None without KSM."""
        if not kernelksm.available():
            return None

        def compute() -> Dict[str, Any]:
            res = measure.kernel_converge_rounds(n, nrounds)
            return {"rounds": res, **measure.summarize(res)}

        return self.get(("kernel_converge", n), compute)

    def floor(self, pages: int) -> Optional[Dict[str, float]]:
        """floor.c's figures (us/page), or None without a C compiler."""

        def compute() -> Optional[Dict[str, float]]:
            exe = self.get("floor_exe", lambda: compile_floor(self.tmpdir))
            if exe is None:
                return None
            return run_floor(exe, pages)

        return self.get(("floor", pages), compute)
