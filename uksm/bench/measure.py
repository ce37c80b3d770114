"""uksm.bench.measure - the measurements behind uksm's benchmarks, as plain functions.

DOC: Overview

Nothing here knows about pytest or about the report: bench/*.py (the
pytest-benchmark microbenchmarks) and uksm.bench.harness (``python -m uksm
bench``) both call these.  Every figure is taken so that it can be set
beside the kernel's, measured the same way on the same content in the same
process run; each workload therefore comes twice, once in a uksm.Pool and
once in private anonymous memory madvised MADV_MERGEABLE for ksmd
(uksm.bench.kernelksm), and the kernel halves must run inside a
``kernelksm.session()``, which owns the system-wide knobs.

  selftest ports  tools/testing/selftests/mm/ksm_tests.c with its own
                  parameters: -P (ksm_merge_time: a region of '*', madvise,
                  run=1, two full scans, MiB/s), -C (ksm_cow_time: 4000
                  pages, a one-byte write into every other page, first
                  unmerged, then with 2000 distinct contents each in two
                  pages, merged), -D (ksm_unmerge_time: merge a '*' region,
                  then time MADV_UNMERGEABLE / pool.unmerge);
  duplicate pairs 2 x N pages where page i equals page N+i (the workload of
                  the kernel reference workload): wall and CPU seconds
                  until 99% of the pairs share, bytes saved;
  realistic       copies of numpy data with partial overlap, zero-filled
                  regions and a volatile region rewritten while the scanner
                  runs, sampled over time (memory while converging);
  steady state    scanner CPU per page per full scan once nothing is left
                  to merge.

Memory is counted as the kernel counts it: the process's PSS (a frame mapped
k times counts 1/k per mapping, so a merged frame counts once), here its
anonymous and shmem parts only (``pss_private``: the PSS of shared library
pages moves whenever another process maps the same library), and for uksm
also what the pool holds by the kernel's own accounting, ``pool_held``: its
private pages present (anonymous memory, from pagemap) plus its frames (the
memfd's allocated blocks; the memfd holds nothing else), so that the saving
is private bytes before merging less private bytes and frames after; for
the kernel also pages_sharing + ksm_zero_pages.  A merged page is a view of
its frame mapped lazily, so a frame is in PSS only once some view of it has
been touched: uksm's PSS after merging is taken after reading the data, as
the program that owns it would.
"""

from __future__ import annotations

import math
import mmap
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TypedDict

import numpy as np
import psutil

from .. import _core
from ..pool import Pool
from . import kernelksm

PAGE = _core.PAGE_SIZE
MiB = 1 << 20

# ksm_tests.c's parameters.  main() writes run=2, sleep_millisecs=0,
# merge_across_nodes=1 (NUMA only) and pages_to_scan=page_count, whose
# default (-p) is KSM_PAGE_COUNT_DEFAULT = 10; run_vmtests.sh runs
# "ksm_tests -P -s 100"; ksm_cow_time() uses 4000 pages; each merge waits for
# two full scans within KSM_SCAN_LIMIT_SEC_DEFAULT seconds.
SELFTEST_PAGES_TO_SCAN = 10
SELFTEST_SLEEP_MILLISECS = 0
SELFTEST_MIB = 100
SELFTEST_COW_PAGES = 4000
SELFTEST_TIMEOUT = 120.0


class _SampleFigures(TypedDict):
    pss: int  # anon + shmem PSS, less its value before the workload
    resident: int  # uksm: bytes_resident; the kernel: bytes mapped less its saving
    saved_pages: int  # pages_sharing + ksm_zero_pages
    full_scans: int


class Sample(_SampleFigures, total=False):
    """One point of the realistic suite's memory timeline (results.json's
    "samples"); t, seconds since the scanner started, is added by the loop."""

    t: float


# -- helpers -------------------------------------------------------------------


def pss() -> int:
    """This process's whole proportional set size (psutil)."""
    pss: int = psutil.Process().memory_full_info().pss
    return pss


def pss_private() -> int:
    """Anonymous plus shmem PSS of this process, in bytes, from
    /proc/self/smaps_rollup: the pool's memfd and private anonymous memory,
    without file-backed pages whose PSS other processes move.  Falls back to
    the whole PSS on kernels without the split fields."""
    fields: Dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    if "Pss_Anon" in fields and "Pss_Shmem" in fields:
        return fields["Pss_Anon"] + fields["Pss_Shmem"]
    return pss()


def memfd_bytes(pool: Pool) -> int:
    """Bytes the kernel has really allocated to the pool's backing memfd:
    its frames (merged pages), not its private pages."""
    return os.fstat(pool.fd).st_blocks * 512


def pool_held(pool: Pool) -> int:
    """What the kernel holds for @pool, less its swap file's page cache: the
    private pages present (pagemap) plus the frames (memfd blocks)."""
    st = pool.stats()
    held: int = st["bytes_private"] + st["bytes_frames"]
    return held


def touch(arr: np.ndarray) -> int:
    """Read one byte of every page of @arr (the views of merged pages are
    mapped in, and so counted in PSS, only once touched)."""
    return int(pages_of(arr)[:, 0].sum(dtype=np.uint64))


def runq_wait() -> Optional[float]:
    """Seconds this thread has spent runnable but waiting for a CPU
    (/proc/thread-self/schedstat): on a shared 2-vCPU VM, the part of wall
    time that is other people's load, not ours."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def median(values: Sequence[Optional[float]]) -> float:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else float("nan")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing, NaN, or b is zero."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def summarize(
    results: List[Dict[str, Any]],
    keys: Sequence[str] = (
        "wall",
        "cpu",
        "saved_pss",
        "saved_held",
        "scanner_cpu",
        "runq_wait",
        "us_per_page",
    ),
) -> Dict[str, float]:
    """Medians over rounds of the numeric figures present."""
    out: Dict[str, float] = {}
    for k in keys:
        vals = [r[k] for r in results if r.get(k) is not None]
        if vals:
            out[k] = median(vals)
    return out


def pages_of(arr: np.ndarray) -> np.ndarray:
    """@arr as (pages, PAGE) bytes: row i is page i."""
    return arr.reshape(-1).view(np.uint8).reshape(-1, PAGE)


def fill_pairs(arr: np.ndarray, n: int) -> None:
    """kernel_ksm_reference.c's content: page i of 2n gets bytes (i % n) & 0xff
    with the u32 i % n at byte offset 8, so page i equals page n + i and no
    two other pages are equal."""
    pages = arr.reshape(-1).view(np.uint8)[: 2 * n * PAGE].reshape(2 * n, PAGE)
    idx = np.arange(2 * n, dtype=np.int64) % n
    pages[:] = (idx & 0xFF).astype(np.uint8)[:, None]
    pages.view(np.uint32)[:, 2] = idx.astype(np.uint32)


def expected_sharing(pages: int, max_page_sharing: int = 256) -> int:
    """pages_sharing once @pages equal pages are all merged: ceil(p / max)
    KSM pages, each mapped by up to max_page_sharing of them."""
    return pages - math.ceil(pages / max_page_sharing)


def _kernel_reset() -> None:
    """Unmerge everything ksmd merged and stop it (between rounds)."""
    kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
    kernelksm.write("run", kernelksm.KSM_RUN_STOP)


# -- uksm: the duplicate-pairs workload ----------------------------------------------


class UksmPairs:
    """A pool holding 2 x @n pages where page i equals page n + i."""

    def __init__(
        self,
        n: int,
        checksum: str = "jhash2",
        pages_to_scan: int = 10000,
        sleep_millisecs: int = 0,
        **knobs: Any,
    ) -> None:
        self.n = n
        self._closed = False
        self.pool = Pool(
            2 * n * PAGE + 16 * MiB,
            pages_to_scan=pages_to_scan,
            sleep_millisecs=sleep_millisecs,
            checksum=checksum,
            **knobs,
        )
        self.arr = self.pool.empty(2 * n * PAGE, np.uint8)
        fill_pairs(self.arr, n)

    def converge(
        self,
        driver: str = "scan",
        target: float = 0.99,
        timeout: float = 300.0,
        poll: float = 0.002,
    ) -> Dict[str, Any]:
        """Scan until pages_sharing >= target * n; wall and process CPU time.

        driver "scan": pool.scan(1) in this thread, checking after each full
        scan (the checksum gate makes the pairs merge only during the second
        scan, so the check costs nothing in granularity).  driver "thread":
        pool.start(), polling stats() every @poll seconds as the kernel
        reference polls sysfs; "scanner_cpu" then leaves out this thread's
        polling, the figure closest to ksmd's own CPU time."""
        pool, n = self.pool, self.n
        want = math.ceil(target * n)
        held0, pss0 = pool_held(pool), pss_private()
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
        touch(self.arr)
        st = pool.stats()
        ideal = n * PAGE
        saved_held = held0 - (st["bytes_private"] + st["bytes_frames"])
        saved_pss = pss0 - pss_private()
        return {
            "wall": wall,
            "cpu": cpu,
            "scanner_cpu": cpu - mine if driver == "thread" else cpu,
            # the scanning thread's wait for a CPU (scan driver only)
            "runq_wait": (
                q1 - q0 if driver == "scan" and q0 is not None and q1 is not None else None
            ),
            "converged": ok,
            "full_scans": st["full_scans"],
            "pages_sharing": st["pages_sharing"],
            "ksm_zero_pages": st["ksm_zero_pages"],
            # private bytes before less private bytes and frames after
            "saved_held": saved_held / ideal,
            "saved_pss": saved_pss / ideal,
            "saved_held_bytes": saved_held,
            "saved_pss_bytes": saved_pss,
            "bytes_private": st["bytes_private"],
            "bytes_frames": st["bytes_frames"],
            "saved_counter_bytes": (st["pages_sharing"] + st["ksm_zero_pages"]) * PAGE,
            "metadata_bytes_per_page": st["metadata_bytes_per_page"],
        }

    def merge_all(self, timeout: float = 300.0) -> Dict[str, Any]:
        """Scan until every pair is merged (setup for the COW benchmark)."""
        r = self.converge("scan", target=1.0 - 1.5 / self.n, timeout=timeout)
        if not r["converged"]:
            raise RuntimeError(f"uksm did not merge the pairs: {r}")
        return r

    def cow(self) -> Dict[str, Any]:
        """One byte written into each merged page n..2n-1: each write breaks
        COW on a frame shared by two pages.  Verifies the contents after."""
        pages = pages_of(self.arr)
        n = self.n
        state, _, _ = self.pool.page_states(self.arr)
        merged = int(np.count_nonzero(state[n:] != _core.PTE_PRIVATE))
        before = self.pool.stats()["cow_breaks"] + self.pool.stats()["zero_page_cows"]
        t0 = time.perf_counter()
        pages[n:, 0] = 0xA5
        dt = time.perf_counter() - t0
        st = self.pool.stats()
        breaks = st["cow_breaks"] + st["zero_page_cows"] - before
        idx = np.arange(n) & 0xFF
        intact = bool(
            np.array_equal(pages[:n, 0], idx.astype(np.uint8))
            and np.all(pages[n:, 0] == 0xA5)
            and np.array_equal(pages[n:, 1], idx.astype(np.uint8))
        )
        return {
            "us_per_page": dt / n * 1e6,
            "pages": n,
            "merged_before": merged,
            "cow_faults": breaks,
            "contents_ok": intact,
        }

    def close(self) -> None:
        # the array is a view of the pool's memory: it goes first
        if not self._closed:
            self._closed = True
            del self.arr
            self.pool.close()


# -- the kernel: the same workload in private anonymous memory ----------------------


class KernelPairs:
    """2 x @n private anonymous pages, page i equal to page n + i.  Needs an
    open kernelksm.session()."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._closed = False
        self.mm, self.arr = kernelksm.alloc_private(2 * n * PAGE)
        fill_pairs(self.arr, n)

    def converge(
        self,
        pages_to_scan: int = 10000,
        sleep_millisecs: int = 0,
        target: float = 0.99,
        timeout: float = 300.0,
    ) -> Dict[str, Any]:
        n = self.n
        pss0 = pss_private()
        zero0 = kernelksm.counters().get("ksm_zero_pages", 0)
        c = kernelksm.converge(
            self.mm, math.ceil(target * n), pages_to_scan, sleep_millisecs, timeout
        )
        saved = pss0 - pss_private()
        zero = kernelksm.counters().get("ksm_zero_pages", 0) - zero0
        return {
            "wall": c.wall,
            "cpu": c.cpu,
            "converged": c.converged,
            "full_scans": c.full_scans,
            "pages_sharing": c.pages_sharing,
            "saved_pss": saved / (n * PAGE),
            "saved_pss_bytes": saved,
            "saved_counter_bytes": (c.pages_sharing + zero) * PAGE,
        }

    def cow(self) -> Dict[str, Any]:
        pages = pages_of(self.arr)
        n = self.n
        sharing0 = int(kernelksm.read("pages_sharing"))
        t0 = time.perf_counter()
        pages[n:, 0] = 0xA5
        dt = time.perf_counter() - t0
        return {
            "us_per_page": dt / n * 1e6,
            "pages": n,
            "pages_sharing_before": sharing0,
            "pages_sharing_after": int(kernelksm.read("pages_sharing")),
        }

    def close(self) -> None:
        # the array holds a buffer export of the mapping: it goes first
        if not self._closed:
            self._closed = True
            del self.arr
            kernelksm.free_private(self.mm)


def kernel_converge_rounds(
    n: int,
    rounds: int,
    pages_to_scan: int = 10000,
    sleep_millisecs: int = 0,
    timeout: float = 300.0,
) -> List[Dict[str, Any]]:
    """@rounds kernel convergences of the pairs workload, each on fresh memory."""
    out: List[Dict[str, Any]] = []
    with kernelksm.session(pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs):
        for _ in range(rounds):
            w = KernelPairs(n)
            try:
                out.append(w.converge(pages_to_scan, sleep_millisecs, timeout=timeout))
            finally:
                w.close()
            _kernel_reset()
    return out


# -- ksm_tests.c, ported --------------------------------------------------------------
#
# Each uksm port does what the selftest does with "madvise, run=1, wait for
# two full scans" replaced by pool.scan(full_scans=2) (a pool's buffers are
# mergeable from birth); each kernel port is the selftest itself, in Python.


def _uksm_selftest_pool(nbytes: int, checksum: str, **knobs: Any) -> Pool:
    knobs.setdefault("pages_to_scan", SELFTEST_PAGES_TO_SCAN)
    knobs.setdefault("sleep_millisecs", SELFTEST_SLEEP_MILLISECS)
    return Pool(nbytes + 16 * MiB, checksum=checksum, **knobs)


def kernel_merge_pages(
    mm: mmap.mmap, pages_to_scan: int = SELFTEST_PAGES_TO_SCAN, timeout: float = SELFTEST_TIMEOUT
) -> kernelksm.Convergence:
    """ksm_merge_pages(): MADV_MERGEABLE, run=1, wait for two full scans
    ("merging occurs only after 2 scans"), run=0.  Inside a session."""
    return kernelksm.converge(
        mm, 0, pages_to_scan, SELFTEST_SLEEP_MILLISECS, timeout, min_full_scans=2
    )


def uksm_merge_time(
    mib: int = SELFTEST_MIB,
    checksum: str = "jhash2",
    extra_scans: int = 20,
    target: float = 0.99,
    **knobs: Any,
) -> Dict[str, Any]:
    """ksm_merge_time() on a pool: fill @mib MiB with '*', time two full scans
    (the selftest's definition of merge time).  Then keep scanning, up to
    @extra_scans more, until pages_sharing reaches @target of what full
    merging gives, and report how long that took (None if it never did)."""
    pages = mib * MiB // PAGE
    pool = _uksm_selftest_pool(mib * MiB, checksum, **knobs)
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
            "mib": mib,
            "wall": wall,
            "cpu": cpu,
            "mib_per_s": mib / wall,
            "pages_sharing": sharing2,
            "expected_sharing": expect,
            "merged_fraction": sharing2 / expect,
            "wall_to_target": t_target,
            "scans_to_target": scans if t_target else None,
            "merged_fraction_final": st["pages_sharing"] / expect,
            "merges_skipped_vma": st["merges_skipped_vma"],
        }
        del arr
        return result
    finally:
        pool.close()


def kernel_merge_time(
    mib: int = SELFTEST_MIB,
    pages_to_scan: int = SELFTEST_PAGES_TO_SCAN,
    timeout: float = SELFTEST_TIMEOUT,
) -> Dict[str, Any]:
    """ksm_merge_time() itself: a '*' region, then the clock runs over
    MADV_MERGEABLE, run=1 and two full scans.  Inside a session."""
    pages = mib * MiB // PAGE
    mm, arr = kernelksm.alloc_private(mib * MiB)
    try:
        arr[:] = ord("*")
        expect = expected_sharing(pages, int(kernelksm.read("max_page_sharing")))
        t0 = time.perf_counter()
        c = kernel_merge_pages(mm, pages_to_scan, timeout)
        wall = time.perf_counter() - t0
        return {
            "mib": mib,
            "wall": wall,
            "cpu": c.cpu,
            "mib_per_s": mib / wall,
            "pages_sharing": c.pages_sharing,
            "expected_sharing": expect,
            "merged_fraction": c.pages_sharing / expect,
            "full_scans": c.full_scans,
            "converged": c.converged,
        }
    finally:
        del arr
        kernelksm.free_private(mm)
        _kernel_reset()


def _cow_pairs(pages: np.ndarray) -> None:
    """ksm_cow_time()'s pairs: pages 2k and 2k+1 get their first k+1 bytes
    set to '+' (over '*'), so 2000 distinct contents each sit in two pages
    ("page_count must be less than 2*page_size")."""
    npairs = len(pages) // 2
    pairs = pages[: 2 * npairs].reshape(npairs, 2, PAGE)
    prefix = np.arange(PAGE)[None, :] < (np.arange(npairs) + 1)[:, None]
    np.copyto(pairs, np.uint8(ord("+")), where=prefix[:, None, :])


def _cow_writes(pages: np.ndarray) -> float:
    """The timed loop: memset(page i, '-', 1) for every even page i."""
    t0 = time.perf_counter()
    pages[0 : len(pages) - 1 : 2, 0] = ord("-")
    return time.perf_counter() - t0


def _cow_result(npages: int, unmerged: float, merged: float, **extra: Any) -> Dict[str, Any]:
    written = npages // 2
    mib = written * PAGE / MiB
    return {
        "pages": npages,
        "pages_written": written,
        "unmerged_s": unmerged,
        "merged_s": merged,
        "unmerged_us_per_page": unmerged / written * 1e6,
        "merged_us_per_page": merged / written * 1e6,
        "unmerged_mib_per_s": mib / unmerged if unmerged else None,
        "merged_mib_per_s": mib / merged if merged else None,
        **extra,
    }


def uksm_cow_time(
    npages: int = SELFTEST_COW_PAGES, checksum: str = "jhash2", **knobs: Any
) -> Dict[str, Any]:
    """ksm_cow_time() on a pool: @npages of '*'; time a one-byte write into
    every other page (unmerged); make 2000 pairs, merge (two full scans),
    and time the same writes again: each is now a COW break."""
    pool = _uksm_selftest_pool(npages * PAGE, checksum, **knobs)
    try:
        arr = pool.full(npages * PAGE, ord("*"), np.uint8)
        pages = pages_of(arr)
        unmerged = _cow_writes(pages)
        _cow_pairs(pages)
        pool.scan(2)
        state, _, _ = pool.page_states(arr)
        merged_before = int(np.count_nonzero(state[0 : npages - 1 : 2] == _core.PTE_KSM))
        c0 = pool.stats()["cow_breaks"]
        merged = _cow_writes(pages)
        cow = pool.stats()["cow_breaks"] - c0
        ok = bool(
            np.all(pages[0 : npages - 1 : 2, 0] == ord("-")) and np.all(pages[1::2, 0] == ord("+"))
        )
        del pages, arr, state
        return _cow_result(
            npages,
            unmerged,
            merged,
            written_merged_before=merged_before,
            cow_faults=cow,
            contents_ok=ok,
        )
    finally:
        pool.close()


def kernel_cow_time(
    npages: int = SELFTEST_COW_PAGES,
    pages_to_scan: int = SELFTEST_PAGES_TO_SCAN,
    timeout: float = SELFTEST_TIMEOUT,
) -> Dict[str, Any]:
    """ksm_cow_time() itself, in private anonymous memory.  Inside a session."""
    mm, arr = kernelksm.alloc_private(npages * PAGE)
    try:
        arr[:] = ord("*")
        pages = pages_of(arr)
        unmerged = _cow_writes(pages)
        _cow_pairs(pages)
        c = kernel_merge_pages(mm, pages_to_scan, timeout)
        sharing = int(kernelksm.read("pages_sharing"))
        merged = _cow_writes(pages)
        after = int(kernelksm.read("pages_sharing"))
        del pages
        return _cow_result(
            npages,
            unmerged,
            merged,
            written_merged_before=c.pages_sharing,
            pages_sharing_before=sharing,
            pages_sharing_after=after,
        )
    finally:
        del arr
        kernelksm.free_private(mm)
        _kernel_reset()


def uksm_unmerge_time(
    mib: int = SELFTEST_MIB, checksum: str = "jhash2", **knobs: Any
) -> Dict[str, Any]:
    """ksm_unmerge_time() on a pool: merge a '*' region (two full scans),
    then time pool.unmerge() of it (MADV_UNMERGEABLE)."""
    pool = _uksm_selftest_pool(2 * mib * MiB, checksum, **knobs)
    try:
        arr = pool.full(mib * MiB, ord("*"), np.uint8)
        st = pool.scan(2)
        t0 = time.perf_counter()
        unmerged = pool.unmerge(arr)
        wall = time.perf_counter() - t0
        after = pool.stats()
        del arr
        return {
            "mib": mib,
            "wall": wall,
            "mib_per_s": mib / wall,
            "pages_sharing_before": st["pages_sharing"],
            "pages_unmerged": unmerged,
            "pages_sharing_after": after["pages_sharing"],
        }
    finally:
        pool.close()


def kernel_unmerge_time(
    mib: int = SELFTEST_MIB,
    pages_to_scan: int = SELFTEST_PAGES_TO_SCAN,
    timeout: float = SELFTEST_TIMEOUT,
) -> Dict[str, Any]:
    """ksm_unmerge_time() itself: merge a '*' region, then time
    madvise(MADV_UNMERGEABLE) over it.  Inside a session."""
    mm, arr = kernelksm.alloc_private(mib * MiB)
    try:
        arr[:] = ord("*")
        c = kernel_merge_pages(mm, pages_to_scan, timeout)
        t0 = time.perf_counter()
        mm.madvise(mmap.MADV_UNMERGEABLE)
        wall = time.perf_counter() - t0
        return {
            "mib": mib,
            "wall": wall,
            "mib_per_s": mib / wall,
            "pages_sharing_before": c.pages_sharing,
            "pages_sharing_after": int(kernelksm.read("pages_sharing")),
        }
    finally:
        del arr
        kernelksm.free_private(mm)
        _kernel_reset()


# -- realistic numpy data -------------------------------------------------------------


def build_realistic(alloc: Callable[[int], np.ndarray], size: int, seed: int = 0) -> Dict[str, Any]:
    """Lay out the realistic workload in arrays from @alloc(nbytes) (page-aligned,
    float64).  @size is the size of the base dataset; with B = size:

      weights       B   a dataset of random floats (the original)
      replica       B   an exact copy of it (a second worker's copy)
      finetuned     B   the copy with its second quarter changed (75% overlap)
      concat        B   the first half of the dataset, then new data (50%)
      grad_buffer  B/2  zero-filled, written (an optimizer buffer, zeroed)
      padded       B/2  a quarter of new data, then zero padding
      volatile     B/4  random floats rewritten while the scanner runs

    Returns the arrays by name and the ideal saving in pages: duplicate pages
    beyond the first copy, plus the zero pages (merged with the zero page,
    use_zero_pages=1), never the volatile ones.  The copies come from the
    same numbers, so the overlap is page-exact as well as value-exact."""
    rng = np.random.default_rng(seed)
    n = max(size // 8, 4 * PAGE // 8)
    n -= n % (4 * PAGE // 8)  # quarters stay page-aligned
    q = n // 4
    # Random numbers go straight into the arrays (out=): a temporary of this
    # size would come from malloc's heap once glibc has raised its mmap
    # threshold, and stay in the PSS after it is freed.
    out = {}
    out["weights"] = base = alloc(n * 8)
    rng.standard_normal(out=base)
    out["replica"] = a = alloc(n * 8)
    a[:] = base
    out["finetuned"] = a = alloc(n * 8)
    a[:] = base
    rng.standard_normal(out=a[q : 2 * q])
    out["concat"] = a = alloc(n * 8)
    a[: 2 * q] = base[: 2 * q]
    rng.standard_normal(out=a[2 * q :])
    out["grad_buffer"] = a = alloc(2 * q * 8)
    a[:] = 1.0
    a[:] = 0.0
    out["padded"] = a = alloc(2 * q * 8)
    rng.standard_normal(out=a[: q // 2])
    a[q // 2 :] = 0.0
    out["volatile"] = a = alloc(q * 8)
    rng.standard_normal(out=a)
    del base, a
    pq = q * 8 // PAGE  # pages in a quarter
    ideal = (
        4 * pq  # replica
        + 3 * pq  # finetuned
        + 2 * pq  # concat
        + 2 * pq  # grad_buffer: zero pages
        + 2 * pq
        - (q // 2 * 8 + PAGE - 1) // PAGE
    )  # padded's zero tail
    total = sum(x.nbytes for x in out.values())
    return {
        "arrays": out,
        "ideal_pages": ideal,
        "total_bytes": total,
        "volatile_bytes": out["volatile"].nbytes,
    }


def touch_volatile(arr: np.ndarray, step: float = 1.0) -> None:
    """One word per page changes: the page's checksum never settles."""
    arr.reshape(-1)[:: PAGE // arr.itemsize] += step


def _timeline_loop(
    sample: Callable[[], Sample],
    volatile: np.ndarray,
    ideal_pages: int,
    target: float,
    timeout: float,
    tail: float,
    interval: float,
) -> Dict[str, Any]:
    """Sample memory every @interval seconds, rewriting the volatile region
    each time, until the saving reaches @target of @ideal_pages, then for
    @tail seconds more.  Returns the samples and the time to target."""
    samples: List[Sample] = []
    t0 = time.perf_counter()
    reached: Optional[float] = None
    want = target * ideal_pages
    while True:
        touch_volatile(volatile)
        now = time.perf_counter() - t0
        s = sample()
        s["t"] = now
        samples.append(s)
        if reached is None and s["saved_pages"] >= want:
            reached = now
        if reached is not None and now - reached >= tail:
            break
        if now > timeout:
            break
        time.sleep(interval)
    return {"samples": samples, "time_to_target": reached, "converged": reached is not None}


def uksm_realistic(
    size: int,
    checksum: str = "jhash2",
    target: float = 0.99,
    timeout: float = 120.0,
    tail: float = 0.5,
    interval: float = 0.05,
    **knobs: Any,
) -> Dict[str, Any]:
    """The realistic workload in a pool, merged by the background scanner
    (pool.start(), as ksmd's run=1) while this thread rewrites the volatile
    region and samples memory: PSS (anon + shmem, less the PSS before the
    pool) and bytes_resident (private pages present and frames, by pagemap
    and the memfd's blocks), and the saving by the counters.  While it
    converges a merged page's view is not mapped in until touched, so the
    PSS samples count a frame only once something reads it; the final
    sample is taken after the data is read."""
    knobs.setdefault("pages_to_scan", 10000)
    knobs.setdefault("sleep_millisecs", 0)
    pss0 = pss_private()
    pool = Pool(6 * size + 32 * MiB, checksum=checksum, **knobs)
    try:
        w = build_realistic(lambda nbytes: pool.empty(nbytes // 8, np.float64), size)
        arrays = w["arrays"]

        def sample() -> Sample:
            st = pool.stats()
            saved = st["pages_sharing"] + st["ksm_zero_pages"]
            return {
                "pss": pss_private() - pss0,
                "resident": st["bytes_resident"],
                "saved_pages": saved,
                "full_scans": st["full_scans"],
            }

        before = sample()
        c0, m0 = time.process_time(), time.thread_time()
        pool.start()
        try:
            tl = _timeline_loop(
                sample, arrays["volatile"], w["ideal_pages"], target, timeout, tail, interval
            )
        finally:
            pool.stop()
        cpu = time.process_time() - c0 - (time.thread_time() - m0)
        # the data read, as its owner would: a frame is in PSS once a view
        # of it has been touched
        checks = _check_realistic(arrays)
        for a in arrays.values():
            touch(a)
        after = sample()
        del arrays, w["arrays"]
        return {
            **tl,
            "ideal_pages": w["ideal_pages"],
            "total_bytes": w["total_bytes"],
            "pss_before": before["pss"],
            "pss_after": after["pss"],
            "resident_before": before["resident"],
            "resident_after": after["resident"],
            "saved_pss_bytes": before["pss"] - after["pss"],
            "saved_counter_bytes": after["saved_pages"] * PAGE,
            "saved_fraction": after["saved_pages"] / w["ideal_pages"],
            "scanner_cpu": cpu,
            "full_scans": after["full_scans"],
            "compactions": pool.stats().get("compactions"),
            "contents_ok": checks,
        }
    finally:
        pool.close()


def _check_realistic(arrays: Dict[str, np.ndarray]) -> bool:
    """Merging must not have changed a value."""
    n = len(arrays["weights"])
    q = n // 4
    w = arrays["weights"]
    return bool(
        np.array_equal(arrays["replica"], w)
        and np.array_equal(arrays["finetuned"][:q], w[:q])
        and np.array_equal(arrays["finetuned"][2 * q :], w[2 * q :])
        and np.array_equal(arrays["concat"][: 2 * q], w[: 2 * q])
        and not arrays["grad_buffer"].any()
        and not arrays["padded"][q // 2 :].any()
    )


def kernel_realistic(
    size: int,
    target: float = 0.99,
    timeout: float = 120.0,
    tail: float = 0.5,
    interval: float = 0.05,
    pages_to_scan: int = 10000,
    sleep_millisecs: int = 0,
) -> Dict[str, Any]:
    """The realistic workload in private anonymous memory, one mapping per
    array, all MADV_MERGEABLE, merged by ksmd; the same sampling, with the
    kernel's saving as pages_sharing + ksm_zero_pages and "resident" as the
    bytes mapped less that saving.  Inside a session."""
    sess = kernelksm.current_session()
    regions: List[mmap.mmap] = []

    def alloc(nbytes: int) -> np.ndarray:
        mm, arr = kernelksm.alloc_private(nbytes)
        regions.append(mm)
        return arr.view(np.float64)

    pss0 = pss_private()
    try:
        w = build_realistic(alloc, size)
        arrays = w["arrays"]
        total = w["total_bytes"]
        c0 = kernelksm.counters()

        def sample() -> Sample:
            c = kernelksm.counters()
            saved = (
                c["pages_sharing"]
                - c0["pages_sharing"]
                + c.get("ksm_zero_pages", 0)
                - c0.get("ksm_zero_pages", 0)
            )
            return {
                "pss": pss_private() - pss0,
                "resident": total - saved * PAGE,
                "saved_pages": saved,
                "full_scans": c["full_scans"] - c0["full_scans"],
            }

        before = sample()
        sess.apply(**_scan_knobs(pages_to_scan, sleep_millisecs))
        for mm in regions:
            kernelksm.mark_mergeable(mm)
        cpu0 = kernelksm.ksmd_cpu_seconds()
        with sess.ksmd_running():
            tl = _timeline_loop(
                sample, arrays["volatile"], w["ideal_pages"], target, timeout, tail, interval
            )
        cpu = kernelksm.ksmd_cpu_seconds() - cpu0
        checks = _check_realistic(arrays)  # read, as uksm's are
        for a in arrays.values():
            touch(a)
        after = sample()
        del arrays, w["arrays"]
        return {
            **tl,
            "ideal_pages": w["ideal_pages"],
            "total_bytes": total,
            "pss_before": before["pss"],
            "pss_after": after["pss"],
            "resident_before": before["resident"],
            "resident_after": after["resident"],
            "saved_pss_bytes": before["pss"] - after["pss"],
            "saved_counter_bytes": after["saved_pages"] * PAGE,
            "saved_fraction": after["saved_pages"] / w["ideal_pages"],
            "scanner_cpu": cpu,
            "full_scans": after["full_scans"],
            "contents_ok": checks,
        }
    finally:
        for mm in regions:
            kernelksm.free_private(mm)
        _kernel_reset()


def _scan_knobs(pages_to_scan: int, sleep_millisecs: int) -> Dict[str, Any]:
    """pages_to_scan is the advisor's while it is on: leave it out then."""
    knobs = {"sleep_millisecs": sleep_millisecs}
    if not kernelksm.has("advisor_mode") or kernelksm.read("advisor_mode") == "none":
        knobs["pages_to_scan"] = pages_to_scan
    return knobs


# -- steady state: the cost of watching memory that has nothing left to merge -----------


def fill_steady(arr: np.ndarray, seed: int = 0) -> int:
    """@arr's pages: the first half duplicate pairs (page i equals page
    P/4 + i), the second half random, all different.  Returns the pages
    that merging saves (P/4)."""
    pages = pages_of(arr)
    npages = len(pages)
    quarter = npages // 4
    fill_pairs(pages[: 2 * quarter], quarter)
    pages[: 2 * quarter].view(np.uint32)[:, 3] = 0xFFFFFFFF  # no zero page among them
    rest = pages[2 * quarter :]
    rng = np.random.default_rng(seed)
    for i in range(0, len(rest), 4096):  # no page-sized temporaries
        chunk = rest[i : i + 4096]
        chunk[:] = rng.integers(0, 256, chunk.shape, dtype=np.uint8)
    return quarter


def uksm_steady(
    size: int,
    warmup_scans: int = 8,
    scans: int = 8,
    min_seconds: float = 0.0,
    checksum: str = "jhash2",
    driver: str = "scan",
    timeout: float = 120.0,
    **knobs: Any,
) -> Dict[str, Any]:
    """Scanner CPU per page per full scan once everything mergeable is merged.

    Converges first (the pairs share), scans @warmup_scans more full scans
    (smart_scan's skip counts and the advisor settle), then measures @scans
    full scans (more while less than @min_seconds have passed).  driver
    "scan" runs the scanner in this thread (pool.scan, batches of at least
    16384 pages, as ksmd with pages_to_scan=10000 and sleep_millisecs=0);
    "thread" runs the background scanner with the pool's pages_to_scan and
    sleep_millisecs (needed for the advisor, which retunes them) and takes
    its CPU as the process's less this polling thread's."""
    knobs.setdefault("pages_to_scan", 10000)
    knobs.setdefault("sleep_millisecs", 0)
    pool = Pool(size + 16 * MiB, checksum=checksum, **knobs)
    try:
        arr = pool.empty(size, np.uint8)
        want = fill_steady(arr)
        npages = arr.nbytes // PAGE
        t0 = time.perf_counter()
        st = pool.stats()
        while st["pages_sharing"] < want:
            st = pool.scan(1)
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"uksm did not merge the steady-state pairs: {st}")
        t_conv = time.perf_counter() - t0

        def run_scans(count: int, min_s: float) -> Dict[str, Any]:
            s0 = pool.stats()
            t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            if driver == "scan":
                while True:
                    s = pool.scan(1)
                    if (
                        s["full_scans"] - s0["full_scans"] >= count
                        and time.perf_counter() - t0 >= min_s
                    ):
                        break
                mine = 0.0
            else:
                pool.start()
                try:
                    # start the window as a full scan ends
                    first = s0["full_scans"]
                    while pool.stats()["full_scans"] == first:
                        time.sleep(0.002)
                        if time.perf_counter() - t0 > timeout:
                            raise RuntimeError("uksm steady-state scans timed out")
                    s0 = pool.stats()
                    t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
                    while True:
                        time.sleep(0.01)
                        s = pool.stats()
                        if (
                            s["full_scans"] - s0["full_scans"] >= count
                            and time.perf_counter() - t0 >= min_s
                        ):
                            break
                        if time.perf_counter() - t0 > timeout:
                            raise RuntimeError("uksm steady-state scans timed out")
                finally:
                    pool.stop()
                mine = time.thread_time() - m0
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0 - mine
            s = pool.stats()
            return {
                "wall": wall,
                "cpu": cpu,
                "full_scans": s["full_scans"] - s0["full_scans"],
                "pages_scanned": s["pages_scanned"] - s0["pages_scanned"],
                "pages_skipped": s["pages_skipped"] - s0["pages_skipped"],
                "pages_to_scan": s["pages_to_scan"],
                "last_full_scan_seconds": s["last_full_scan_seconds"],
            }

        run_scans(warmup_scans, 0.0)
        m = run_scans(scans, min_seconds)
        final = pool.stats()
        del arr
        return {
            **m,
            "pages": npages,
            "converge_wall": t_conv,
            "us_per_page_per_scan": m["cpu"] / (m["full_scans"] * npages) * 1e6,
            "pages_sharing": final["pages_sharing"],
            "wanted_sharing": want,
        }
    finally:
        pool.close()


def kernel_steady(
    size: int,
    warmup_scans: int = 8,
    scans: int = 8,
    min_seconds: float = 0.0,
    pages_to_scan: int = 10000,
    sleep_millisecs: int = 0,
    timeout: float = 120.0,
) -> Dict[str, Any]:
    """kernel_steady: uksm_steady's workload and measurement for ksmd, whose
    CPU time is read from /proc (kernelksm.ksmd_cpu_seconds).  The session's
    knobs (smart_scan, the advisor) are the caller's.  Inside a session."""
    sess = kernelksm.current_session()
    mm, arr = kernelksm.alloc_private(size)
    try:
        want = fill_steady(arr)
        npages = arr.nbytes // PAGE
        c = kernelksm.converge(mm, want, pages_to_scan, sleep_millisecs, timeout)
        if not c.converged:
            raise RuntimeError(f"ksmd did not merge the steady-state pairs: {c}")

        def wait_scans(count: int, min_s: float) -> Dict[str, Any]:
            # start the window as a full scan ends, as pool.scan(1) does
            first = int(kernelksm.read("full_scans"))
            t_wait = time.perf_counter()
            while int(kernelksm.read("full_scans")) == first:
                time.sleep(0.001)
                if time.perf_counter() - t_wait > timeout:
                    raise RuntimeError("ksmd steady-state scans timed out")
            k0 = kernelksm.counters()
            t0, cpu0 = time.perf_counter(), kernelksm.ksmd_cpu_seconds()
            while True:
                time.sleep(0.002)
                k = kernelksm.counters()
                if (
                    k["full_scans"] - k0["full_scans"] >= count
                    and time.perf_counter() - t0 >= min_s
                ):
                    break
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError("ksmd steady-state scans timed out")
            wall = time.perf_counter() - t0
            cpu = kernelksm.ksmd_cpu_seconds() - cpu0
            return {
                "wall": wall,
                "cpu": cpu,
                "full_scans": k["full_scans"] - k0["full_scans"],
                "pages_scanned": k.get("pages_scanned", 0) - k0.get("pages_scanned", 0),
                "pages_skipped": k.get("pages_skipped", 0) - k0.get("pages_skipped", 0),
                "pages_to_scan": int(kernelksm.read("pages_to_scan")),
            }

        sess.apply(**_scan_knobs(pages_to_scan, sleep_millisecs))
        with sess.ksmd_running():
            wait_scans(warmup_scans, 0.0)
            m = wait_scans(scans, min_seconds)
        sharing = int(kernelksm.read("pages_sharing"))
        # ksmd visits (or smart-skips) every page of its list once per full
        # scan; far more than our region means other processes' mergeable
        # memory was on the list too, and the CPU figure is not ours alone.
        per_scan = (m["pages_scanned"] + m["pages_skipped"]) / max(m["full_scans"], 1)
        m["foreign_pages"] = per_scan > 1.5 * npages + m["pages_to_scan"]
        return {
            **m,
            "pages": npages,
            "converge_wall": c.wall,
            "us_per_page_per_scan": m["cpu"] / (m["full_scans"] * npages) * 1e6,
            "pages_sharing": sharing,
            "wanted_sharing": want,
        }
    finally:
        del arr
        kernelksm.free_private(mm)
        _kernel_reset()
