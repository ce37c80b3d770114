"""bench/measure.py - the measurements behind uksm's benchmarks, as plain functions.

Nothing here knows about pytest: the bench_*.py files call these, and so
can a command line (``python -m uksm bench``).  Every figure is taken so that
it can be set beside the kernel's, measured the same way in the same run:

  convergence   2 x N pages where page i equals page N+i (the workload of
                shared/tools/kernel_ksm_reference.c); wall and CPU seconds
                until pages_sharing reaches 99% of N, for uksm (process CPU)
                and for ksmd (its utime+stime);
  merge time    the selftests' -P workload (ksm_tests.c ksm_merge_time):
                a region of '*' bytes, the time for two full scans, MiB/s;
  COW break     a one-byte write into each merged page, us/page, beside the
                bare floor of bench/floor.c;
  checksum      jhash2 and xxhash over a batch of pages in the C core, and
                memcmp for reference, us/page;
  metadata      stats()["metadata_bytes_per_page"] after merging.

Savings are measured twice, as the kernel sees them: blocks of the pool's
memfd (fstat st_blocks * 512) and the process's PSS, each as a fraction of
the ideal (one page saved per duplicate pair).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import statistics
import subprocess
import time
from typing import Dict, List, Optional

import numpy as np
import psutil

import uksm
from uksm import _core, kernelksm

PAGE = uksm.PAGE_SIZE
MiB = 1 << 20
FLOOR_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.c")


# -- helpers -------------------------------------------------------------------

def pss() -> int:
    """This process's proportional set size: a frame mapped k times counts 1/k
    per mapping, so a merged frame counts once however many pages map it."""
    return psutil.Process().memory_full_info().pss


def memfd_bytes(pool: uksm.Pool) -> int:
    """Bytes the kernel has really allocated to the pool's backing memfd."""
    return os.fstat(pool.fd).st_blocks * 512


def runq_wait() -> Optional[float]:
    """Seconds this thread has spent runnable but waiting for a CPU
    (/proc/thread-self/schedstat): on a shared 2-vCPU VM, the part of wall
    time that is other people's load, not ours."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fill_pairs(arr: np.ndarray, n: int) -> None:
    """kernel_ksm_reference.c's content: page i of 2n gets bytes (i % n) & 0xff
    with the u32 i % n at byte offset 8, so page i equals page n + i and no
    two other pages are equal."""
    pages = arr.reshape(-1).view(np.uint8)[: 2 * n * PAGE].reshape(2 * n, PAGE)
    idx = np.arange(2 * n, dtype=np.int64) % n
    pages[:] = (idx & 0xFF).astype(np.uint8)[:, None]
    pages.view(np.uint32)[:, 2] = idx.astype(np.uint32)


def _pages(arr: np.ndarray) -> np.ndarray:
    flat = arr.reshape(-1).view(np.uint8)
    return flat.reshape(-1, PAGE)


# -- uksm: the duplicate-pairs workload ----------------------------------------------

class UksmPairs:
    """A pool holding 2 x @n pages where page i equals page n + i."""

    def __init__(self, n: int, checksum: str = "jhash2", pages_to_scan: int = 10000,
                 sleep_millisecs: int = 0, **knobs) -> None:
        self.n = n
        self.pool = uksm.Pool(2 * n * PAGE + 16 * MiB, pages_to_scan=pages_to_scan,
                              sleep_millisecs=sleep_millisecs, checksum=checksum, **knobs)
        self.arr = self.pool.empty(2 * n * PAGE, np.uint8)
        fill_pairs(self.arr, n)

    def converge(self, driver: str = "scan", target: float = 0.99,
                 timeout: float = 300.0, poll: float = 0.002) -> Dict:
        """Scan until pages_sharing >= target * n; wall and process CPU time.

        driver "scan": pool.scan(1) in this thread, checking after each full
        scan (the checksum gate makes the pairs merge only during the second
        scan, so the check costs nothing in granularity).  driver "thread":
        pool.start(), polling stats() every @poll seconds as the kernel
        reference polls sysfs; "scanner_cpu" then leaves out this thread's
        polling, the figure closest to ksmd's own CPU time."""
        pool, n = self.pool, self.n
        want = math.ceil(target * n)
        memfd0, pss0 = memfd_bytes(pool), pss()
        q0 = runq_wait()
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        ok = False
        if driver == "scan":
            while True:
                st = pool.scan(1)
                if st["pages_sharing"] >= want:
                    ok = True
                    break
                if time.perf_counter() - t0 > timeout:
                    break
        elif driver == "thread":
            pool.start()
            try:
                while True:
                    st = pool.stats()
                    if st["pages_sharing"] >= want:
                        ok = True
                        break
                    if time.perf_counter() - t0 > timeout:
                        break
                    time.sleep(poll)
            finally:
                pool.stop()
        else:
            raise ValueError(f"driver must be 'scan' or 'thread', not {driver!r}")
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        mine = time.thread_time() - m0
        q1 = runq_wait()
        st = pool.stats()
        ideal = n * PAGE
        return {
            "wall": wall,
            "cpu": cpu,
            "scanner_cpu": cpu - mine if driver == "thread" else cpu,
            # the scanning thread's wait for a CPU (scan driver only)
            "runq_wait": q1 - q0 if driver == "scan" and q0 is not None else None,
            "converged": ok,
            "full_scans": st["full_scans"],
            "pages_sharing": st["pages_sharing"],
            "ksm_zero_pages": st["ksm_zero_pages"],
            "saved_memfd": (memfd0 - memfd_bytes(pool)) / ideal,
            "saved_pss": (pss0 - pss()) / ideal,
            "metadata_bytes_per_page": st["metadata_bytes_per_page"],
        }

    def merge_all(self, timeout: float = 300.0) -> Dict:
        """Scan until every pair is merged (setup for the COW benchmark)."""
        r = self.converge("scan", target=1.0 - 1.5 / self.n, timeout=timeout)
        if not r["converged"]:
            raise RuntimeError(f"uksm did not merge the pairs: {r}")
        return r

    def cow(self) -> Dict:
        """One byte written into each merged page n..2n-1: each write breaks
        COW on a frame shared by two pages.  Verifies the contents after."""
        pages = _pages(self.arr)
        n = self.n
        state, _, _ = self.pool.page_states(self.arr)
        merged = int(np.count_nonzero(state[n:] != _core.PTE_NORMAL))
        before = self.pool.stats()["cow_breaks"] + self.pool.stats()["zero_page_cows"]
        t0 = time.perf_counter()
        pages[n:, 0] = 0xA5
        dt = time.perf_counter() - t0
        st = self.pool.stats()
        breaks = st["cow_breaks"] + st["zero_page_cows"] - before
        idx = np.arange(n) & 0xFF
        intact = bool(np.array_equal(pages[:n, 0], idx.astype(np.uint8))
                      and np.all(pages[n:, 0] == 0xA5)
                      and np.array_equal(pages[n:, 1], idx.astype(np.uint8)))
        return {"us_per_page": dt / n * 1e6, "pages": n, "merged_before": merged,
                "cow_faults": breaks, "contents_ok": intact}

    def close(self) -> None:
        self.arr = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None


# -- the kernel: the same workload in private anonymous memory ----------------------

class KernelPairs:
    """2 x @n private anonymous pages, page i equal to page n + i.  Needs an
    open kernelksm.session()."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.mm, self.arr = kernelksm.alloc_private(2 * n * PAGE)
        fill_pairs(self.arr, n)

    def converge(self, pages_to_scan: int = 10000, sleep_millisecs: int = 0,
                 target: float = 0.99, timeout: float = 300.0) -> Dict:
        n = self.n
        pss0 = pss()
        c = kernelksm.converge(self.mm, math.ceil(target * n), pages_to_scan,
                               sleep_millisecs, timeout)
        return {"wall": c.wall, "cpu": c.cpu, "converged": c.converged,
                "full_scans": c.full_scans, "pages_sharing": c.pages_sharing,
                "saved_pss": (pss0 - pss()) / (n * PAGE)}

    def cow(self) -> Dict:
        pages = _pages(self.arr)
        n = self.n
        sharing0 = int(kernelksm.read("pages_sharing"))
        t0 = time.perf_counter()
        pages[n:, 0] = 0xA5
        dt = time.perf_counter() - t0
        return {"us_per_page": dt / n * 1e6, "pages": n,
                "pages_sharing_before": sharing0,
                "pages_sharing_after": int(kernelksm.read("pages_sharing"))}

    def close(self) -> None:
        self.arr = None
        if self.mm is not None:
            kernelksm.free_private(self.mm)
            self.mm = None


def kernel_converge_rounds(n: int, rounds: int, pages_to_scan: int = 10000,
                           sleep_millisecs: int = 0, timeout: float = 300.0) -> List[Dict]:
    """@rounds kernel convergences of the pairs workload, each on fresh memory."""
    out = []
    with kernelksm.session(pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs):
        for _ in range(rounds):
            w = KernelPairs(n)
            try:
                out.append(w.converge(pages_to_scan, sleep_millisecs, timeout=timeout))
            finally:
                w.close()
            kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
            kernelksm.write("run", kernelksm.KSM_RUN_STOP)
    return out


def summarize(results: List[Dict], keys=("wall", "cpu", "saved_pss", "saved_memfd",
                                         "scanner_cpu", "runq_wait", "us_per_page")) -> Dict:
    """Medians over rounds of the numeric figures present."""
    out = {}
    for k in keys:
        vals = [r[k] for r in results if r.get(k) is not None]
        if vals:
            out[k] = median(vals)
    return out


# -- the selftests' -P workload: merge time of a region of '*' ------------------------

def expected_sharing(pages: int, max_page_sharing: int = 256) -> int:
    """pages_sharing once @pages equal pages are all merged: ceil(p / max)
    KSM pages, each mapped by up to max_page_sharing of them."""
    return pages - math.ceil(pages / max_page_sharing)


def uksm_merge_time(mib: int, checksum: str = "jhash2", pages_to_scan: int = 10000,
                    extra_scans: int = 20, target: float = 0.99) -> Dict:
    """ksm_merge_time() on a pool: fill @mib MiB with '*', time two full scans
    (the selftest's definition of merge time).  Then keep scanning, up to
    @extra_scans more, until pages_sharing reaches @target of what full
    merging gives, and report how long that took (None if it never did)."""
    pages = mib * MiB // PAGE
    pool = uksm.Pool(mib * MiB + 16 * MiB, pages_to_scan=pages_to_scan,
                     sleep_millisecs=0, checksum=checksum)
    try:
        arr = pool.full(mib * MiB, ord("*"), np.uint8)
        expect = expected_sharing(pages, pool.max_page_sharing)
        t0, c0 = time.perf_counter(), time.process_time()
        st = pool.scan(2)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sharing2 = st["pages_sharing"]
        t_target, scans = None, 2
        while st["pages_sharing"] < target * expect and scans < 2 + extra_scans:
            st = pool.scan(1)
            scans += 1
        if st["pages_sharing"] >= target * expect:
            t_target = time.perf_counter() - t0
        result = {
            "mib": mib, "wall": wall, "cpu": cpu, "mib_per_s": mib / wall,
            "pages_sharing": sharing2, "expected_sharing": expect,
            "merged_fraction": sharing2 / expect,
            "wall_to_target": t_target, "scans_to_target": scans if t_target else None,
            "merged_fraction_final": st["pages_sharing"] / expect,
            "merges_skipped_vma": st["merges_skipped_vma"],
        }
        del arr
        return result
    finally:
        pool.close()


def kernel_merge_time(mib: int, pages_to_scan: int = 10000, timeout: float = 120.0) -> Dict:
    """ksm_merge_time() itself: '*' region, MADV_MERGEABLE, run=1, two full
    scans.  Needs an open kernelksm.session()."""
    pages = mib * MiB // PAGE
    mm, arr = kernelksm.alloc_private(mib * MiB)
    try:
        arr[:] = ord("*")
        expect = expected_sharing(pages, int(kernelksm.read("max_page_sharing")))
        c = kernelksm.converge(mm, 0, pages_to_scan, 0, timeout, min_full_scans=2)
        return {"mib": mib, "wall": c.wall, "cpu": c.cpu, "mib_per_s": mib / c.wall,
                "pages_sharing": c.pages_sharing, "expected_sharing": expect,
                "merged_fraction": c.pages_sharing / expect, "full_scans": c.full_scans,
                "converged": c.converged}
    finally:
        del arr
        kernelksm.free_private(mm)
        kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
        kernelksm.write("run", kernelksm.KSM_RUN_STOP)


# -- the COW floor ---------------------------------------------------------------------

def compile_floor(workdir: str) -> Optional[str]:
    """Build bench/floor.c with the system cc into @workdir; None without cc."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    exe = os.path.join(workdir, "uksm-floor")
    proc = subprocess.run([cc, "-O2", "-o", exe, FLOOR_SOURCE],
                          capture_output=True, text=True)
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


# -- checksums ---------------------------------------------------------------------------

class ChecksumPages:
    """@n pages of random bytes in a pool, hashed in one batch by the C core
    (the scanner's own path: checksum_range through the direct map)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.pool = uksm.Pool(n * PAGE + 16 * MiB)
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
        self.arr = None
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

def meta_duplicates(n: int, checksum: str = "jhash2") -> Dict:
    """metadata_bytes_per_page with 2 x @n pages merged pairwise."""
    w = UksmPairs(n, checksum)
    try:
        r = w.merge_all()
        st = w.pool.stats()
        return {"pages": 2 * n, "metadata_bytes_per_page": st["metadata_bytes_per_page"],
                "metadata_bytes": st["metadata_bytes"], "pages_sharing": st["pages_sharing"],
                "wall": r["wall"]}
    finally:
        w.close()


def meta_unique(n: int, checksum: str = "jhash2") -> Dict:
    """metadata_bytes_per_page with @n pages that are all different, after
    two full scans (every page then sits in the unstable tree)."""
    pool = uksm.Pool(n * PAGE + 16 * MiB, pages_to_scan=10000, sleep_millisecs=0,
                     checksum=checksum)
    try:
        arr = pool.empty(n * PAGE, np.uint8)
        pages = _pages(arr)
        pages.view(np.uint64)[:, 0] = np.arange(n, dtype=np.uint64) + 1
        pages.view(np.uint64)[:, 1:] = 0x9E3779B97F4A7C15
        t0 = time.perf_counter()
        st = pool.scan(2)
        wall = time.perf_counter() - t0
        del pages, arr
        return {"pages": n, "metadata_bytes_per_page": st["metadata_bytes_per_page"],
                "metadata_bytes": st["metadata_bytes"], "pages_unshared": st["pages_unshared"],
                "pages_sharing": st["pages_sharing"], "wall": wall}
    finally:
        pool.close()
