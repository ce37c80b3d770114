"""Fault injection: the C core's own mmap, mprotect, fallocate and pwrite
calls made to fail on purpose (uksm_inject), at the places the real world
fails them: vm.max_map_count (ENOMEM), a full /dev/shm (ENOSPC), I/O (EIO).
Every failure must surface as a clear exception, a counted skip or a clean
degradation (the pages stay as they were), and no stored byte may change.

Where the kernel does the work itself (copy-on-write of a merged page with
cow="kernel", unmerging by MADV_POPULATE_WRITE) uksm makes no call that
could be failed: those tests check that the work is done regardless."""

import errno
import gc
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest

import uksm
from uksm import _core

PAGE = uksm.PAGE_SIZE
PRIVATE, KSM, ZERO, SWAPPED = (
    uksm.PageState.PRIVATE,
    uksm.PageState.KSM,
    uksm.PageState.ZERO,
    uksm.PageState.SWAPPED,
)
COWS = ["kernel", "signal"]


@pytest.fixture(autouse=True)
def disarm():
    yield
    for op in ("mmap", "mprotect", "fallocate", "pwrite"):
        _core.inject(op, 0, 0, errno.EIO)


@pytest.fixture(params=COWS)
def pool(request):
    """A small pool in each copy-on-write mode; scans driven by pool.scan()."""
    p = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0, cow=request.param)
    yield p
    _core.inject("mmap", 0, 0, errno.EIO)  # let close() unmap
    _core.inject("mprotect", 0, 0, errno.EIO)
    p.close()


def memfd_bytes(pool) -> int:
    """Bytes the kernel has really allocated to the pool's frame store."""
    return os.fstat(pool.fd).st_blocks * 512


def states(pool, a):
    return pool.page_states(a)[0]


def rand(seed, npages):
    return np.random.default_rng(seed).integers(1, 256, npages * PAGE, dtype=np.uint8)


def recount(pool, arrays):
    """KSM frames, KSM mappings and private pages, from the page tables."""
    frames, mappings, private = set(), 0, 0
    for a in arrays:
        st, pfn, _ = pool.page_states(a)
        frames.update(pfn[st == KSM].tolist())
        mappings += int((st == KSM).sum())
        private += int((st == PRIVATE).sum())
    return len(frames), mappings, private


def check_counters(pool, arrays):
    """The counters agree with the page tables and with the kernel.  @arrays
    are all the pool's buffers, every page of them written, so each private
    page is present."""
    s = pool.stats()
    nframes, nmap, nprivate = recount(pool, arrays)
    assert s["bytes_frames"] == memfd_bytes(pool) == nframes * PAGE, (s, nframes)
    assert s["bytes_private"] == nprivate * PAGE, (s, nprivate)
    assert s["bytes_resident"] == s["bytes_private"] + s["bytes_frames"]
    assert s["pages_shared"] == nframes and s["pages_shared"] + s["pages_sharing"] == nmap


# ------------------------------------------------------------ allocation


def test_allocation_commits_nothing_so_a_full_store_only_stops_merging(pool):
    """Allocation takes no frame: with every fallocate of the frame store
    failing (a full /dev/shm) buffers are still handed out and written; the
    merges that need a frame are skipped, the pages stay private."""
    hits = _core.inject_hits("fallocate")  # counted since the process began
    _core.inject("fallocate", 0, -1, errno.ENOSPC)
    data = rand(0, 64)
    a, b = pool.asarray(data), pool.asarray(data)
    c = pool.full(32 * PAGE, 1, dtype=np.uint8)
    s = pool.scan(full_scans=2)
    assert _core.inject_hits("fallocate") > hits
    assert s["pages_sharing"] == 0 and memfd_bytes(pool) == 0
    assert (states(pool, a) == PRIVATE).all() and (states(pool, b) == PRIVATE).all()
    assert np.array_equal(a, data) and np.array_equal(b, data) and (c == 1).all()
    check_counters(pool, [a, b, c])
    _core.inject("fallocate", 0, 0, errno.ENOSPC)
    pool.scan(full_scans=3)
    assert (states(pool, b) == KSM).all() and (states(pool, c) == KSM).all()
    assert np.array_equal(a, data) and np.array_equal(b, data) and (c == 1).all()
    check_counters(pool, [a, b, c])


def test_alloc_mmap_enomem_is_a_memory_error_naming_the_map_limit(pool):
    a = pool.full(16 * PAGE, 3, dtype=np.uint8)
    before = pool.stats()
    _core.inject("mmap", 0, 1, errno.ENOMEM)
    with pytest.raises(MemoryError) as exc:
        pool.empty(8 * PAGE, np.uint8)
    assert "max_map_count" in str(exc.value)
    after = pool.stats()
    assert after["bytes_resident"] == before["bytes_resident"]
    assert after["bytes_mapped"] == before["bytes_mapped"]
    assert after["buffers"] == before["buffers"]
    assert (a == 3).all()
    b = pool.full(8 * PAGE, 4, dtype=np.uint8)  # and then it works again
    assert (b == 4).all() and pool.stats()["bytes_mapped"] == 24 * PAGE


def test_alloc_mmap_other_errors_name_the_call(pool):
    _core.inject("mmap", 0, 1, errno.EPERM)
    with pytest.raises(OSError) as exc:
        pool.empty(8 * PAGE, np.uint8)
    assert exc.value.errno == errno.EPERM and "mmap" in str(exc.value)
    assert pool.stats()["bytes_mapped"] == 0
    assert (pool.full(8 * PAGE, 2, dtype=np.uint8) == 2).all()


# --------------------------------------------------------------- merging


@pytest.mark.parametrize("op", ["mprotect", "mmap"])
def test_merge_failures_are_counted_skips(pool, op):
    data = rand(0, 64)
    a, b = pool.asarray(data), pool.asarray(data)
    pool.scan(full_scans=1)
    hits = _core.inject_hits(op)  # counted since the process began
    _core.inject(op, 0, -1, errno.ENOMEM)
    s = pool.scan(full_scans=1)
    assert _core.inject_hits(op) > hits
    assert s["merges_skipped_vma"] > 0 and s["pages_sharing"] == 0
    assert np.array_equal(a, data) and np.array_equal(b, data)
    check_counters(pool, [a, b])
    _core.inject(op, 0, 0, errno.ENOMEM)
    a[:PAGE] = 1  # still writable everywhere
    b[-PAGE:] = 2
    check_counters(pool, [a, b])
    a[:PAGE] = data[:PAGE]
    b[-PAGE:] = data[-PAGE:]
    pool.scan(full_scans=3)
    assert (states(pool, b) == KSM).all()
    assert np.array_equal(a, data) and np.array_equal(b, data)
    check_counters(pool, [a, b])


# ------------------------------------------------------------ unmerging


def test_unmerge_needs_no_remap_in_kernel_mode():
    """cow='kernel': unmerge is the kernel's MADV_POPULATE_WRITE, one per
    run: failing every mmap and mprotect of uksm's does not stop it."""
    with uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0) as pool:
        data = np.arange(64 * PAGE // 8, dtype=np.float64)
        a, b = pool.asarray(data), pool.asarray(data)
        pool.scan(full_scans=2)
        assert (states(pool, b) == KSM).all()
        _core.inject("mmap", 0, -1, errno.ENOMEM)
        _core.inject("mprotect", 0, -1, errno.ENOMEM)
        assert pool.unmerge(b) == 64
        _core.inject("mmap", 0, 0, errno.ENOMEM)
        _core.inject("mprotect", 0, 0, errno.ENOMEM)
        assert (states(pool, b) == PRIVATE).all()
        assert np.array_equal(a, data) and np.array_equal(b, data)
        check_counters(pool, [a, b])


def test_unmerge_mprotect_failure_raises_and_keeps_the_data_in_signal_mode():
    """cow='signal': the read-only views must be made writable first; at
    vm.max_map_count that fails, unmerge says so (MemoryError, the kernel's
    ENOMEM) and the pages stay merged, readable and counted."""
    with uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0, cow="signal") as pool:
        data = np.arange(64 * PAGE // 8, dtype=np.float64)
        a, b = pool.asarray(data), pool.asarray(data)
        pool.scan(full_scans=2)
        assert (states(pool, b) == KSM).all()
        _core.inject("mprotect", 0, -1, errno.ENOMEM)
        with pytest.raises(MemoryError):
            pool.unmerge(b)
        _core.inject("mprotect", 0, 0, errno.ENOMEM)
        assert (states(pool, b) == KSM).all()
        assert np.array_equal(a, data) and np.array_equal(b, data)
        check_counters(pool, [a, b])
        assert pool.unmerge(b) == 64
        assert (states(pool, b) == PRIVATE).all()
        assert np.array_equal(b, data)
        check_counters(pool, [a, b])


# -------------------------------------------------------- copy-on-write


def test_kernel_cow_needs_no_call_of_uksms():
    """cow='kernel': a write into a merged page is the kernel's own COW;
    with every mmap and mprotect of uksm's failing it still goes through,
    and reconcile counts it exactly."""
    with uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0) as pool:
        data = np.arange(64 * PAGE // 8, dtype=np.float64)
        a, b = pool.asarray(data), pool.asarray(data)
        pool.scan(full_scans=2)
        hits = _core.inject_hits("mmap") + _core.inject_hits("mprotect")
        _core.inject("mmap", 0, -1, errno.ENOMEM)
        _core.inject("mprotect", 0, -1, errno.ENOMEM)
        b[10 * PAGE // 8] = -1.0
        b[20 * PAGE // 8 + 3] = -2.0
        writes_hits = _core.inject_hits("mmap") + _core.inject_hits("mprotect") - hits
        st = states(pool, b)
        _core.inject("mmap", 0, 0, errno.ENOMEM)
        _core.inject("mprotect", 0, 0, errno.ENOMEM)
        assert writes_hits == 0, "the kernel's COW went through uksm's calls"
        assert b[10 * PAGE // 8] == -1.0 and b[20 * PAGE // 8 + 3] == -2.0
        assert np.array_equal(a, data)
        assert sorted(np.flatnonzero(st == PRIVATE).tolist()) == [10, 20]
        s = pool.stats()
        assert s["cow_breaks"] == 2 and s["cow_breaks_signal"] == 0
        check_counters(pool, [a, b])


def test_signal_cow_mprotect_failure_falls_back_to_the_whole_run():
    """cow='signal': when the one-page mprotect fails (it would split a VMA
    at vm.max_map_count), the handler makes the whole run of views around
    the page writable instead.  The write goes through; the rest of the run
    stays merged, now copied on write by the kernel and counted at the next
    reconcile."""
    with uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0, cow="signal") as pool:
        data = np.arange(64 * PAGE // 8, dtype=np.float64)
        a, b = pool.asarray(data), pool.asarray(data)
        pool.scan(full_scans=2)
        hits = _core.inject_hits("mprotect")
        _core.inject("mprotect", 0, 1, errno.ENOMEM)  # the single-page mprotect fails
        b[10 * PAGE // 8] = -1.0
        assert _core.inject_hits("mprotect") == hits + 1
        assert b[10 * PAGE // 8] == -1.0 and np.array_equal(a, data)
        st = states(pool, b)
        assert st[10] == PRIVATE and (np.delete(st, 10) == KSM).all()
        s = pool.stats()
        assert s["cow_breaks_signal"] == 1 and s["cow_breaks"] == 1
        check_counters(pool, [a, b])
        b[30 * PAGE // 8] = -3.0  # writable now: no signal
        assert states(pool, b)[30] == PRIVATE
        s = pool.stats()
        assert s["cow_breaks_signal"] == 1 and s["cow_breaks"] == 2
        expect = data.copy()
        expect[10 * PAGE // 8] = -1.0
        expect[30 * PAGE // 8] = -3.0
        assert np.array_equal(b, expect) and np.array_equal(a, data)
        check_counters(pool, [a, b])


def test_signal_cow_that_cannot_be_done_ends_the_process_clearly():
    """cow='signal' with no way at all to make the page writable: the write
    cannot be kept and must not be lost silently."""
    code = textwrap.dedent("""
        import errno, numpy as np, uksm
        from uksm import _core
        pool = uksm.Pool("16MiB", cow="signal")
        a = pool.full(8 * 4096, 5, dtype=np.uint8)
        b = pool.full(8 * 4096, 5, dtype=np.uint8)
        pool.scan(full_scans=2)
        assert (pool.page_states(b)[0] == uksm.PageState.KSM).all()
        _core.inject("mmap", 0, -1, errno.ENOMEM)
        _core.inject("mprotect", 0, -1, errno.ENOMEM)
        b[0] = 6
        print("WRONG: the write went on", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode < 0 and "WRONG" not in proc.stdout, proc.stdout + proc.stderr
    assert "uksm: fatal" in proc.stderr and "copy-on-write" in proc.stderr


@pytest.mark.parametrize("cow", COWS)
def test_cow_needs_no_frame_even_in_a_full_pool(cow):
    """A copy on write takes anonymous memory from the kernel, not a frame
    from the pool: a full pool (capacity spanned, no frame reserve) whose
    merged pages are all written keeps every write."""
    with uksm.Pool(
        "4MiB", pages_to_scan=1000, sleep_millisecs=0, cow=cow, use_zero_pages=False
    ) as pool:
        a = pool.full(512 * 512, 1.0)  # 2 MiB of one page, repeated
        filler = pool.full(pool.capacity - a.nbytes, 7, dtype=np.uint8)
        with pytest.raises(uksm.PoolFullError):
            pool.empty(PAGE, np.uint8)
        pool.scan(full_scans=2)
        assert (states(pool, a) == KSM).all() and (states(pool, filler) == KSM).all()
        assert pool.stats()["pages_shared"] <= 8  # two contents, a few frames
        a[:] = 2.0  # 512 copies on write
        assert (a == 2.0).all() and (filler == 7).all()
        assert (states(pool, a) == PRIVATE).all()
        s = pool.stats()
        assert s["cow_breaks"] == 512
        assert s["cow_breaks_signal"] == (512 if cow == "signal" else 0)
        check_counters(pool, [a, filler])


# ---------------------------------------------------- compaction, release


def test_compaction_with_failing_remaps_rolls_forward():
    with uksm.Pool("128MiB", checksum="xxhash", compact_threshold=0) as pool:
        rng = np.random.default_rng(3)
        keep = []
        for _ in range(24):
            x = pool.asarray(rng.standard_normal(64 * PAGE // 8))
            keep.append(x)
            keep.append(pool.asarray(x))  # a twin: KSM frames to move
        pool.scan(full_scans=2)
        del keep[::4]
        gc.collect()
        shadow = [np.array(x) for x in keep]
        for skip in (0, 3, 17, 40):
            _core.inject("mmap", skip, 2, errno.ENOMEM)
            pool.compact()
            _core.inject("mmap", 0, 0, errno.ENOMEM)
            for x, s in zip(keep, shadow):
                assert np.array_equal(x, s)
            check_counters(pool, keep)
        for x in keep[1::3]:  # COW on moved frames
            x[5] = 1.5
        for x, s in zip(keep, shadow):
            s[5] = x[5]
            assert np.array_equal(x, s)
        check_counters(pool, keep)
        result = pool.compact()
        assert os.fstat(pool.fd).st_size <= pool.stats()["bytes_frames"] + 16 * PAGE
        assert result["frames_skipped"] == 0
        check_counters(pool, keep)


def test_release_that_cannot_unmap_keeps_memory_until_retried(pool):
    """A buffer released while nothing can cut its pages off (ENOMEM at
    vm.max_map_count) keeps its private pages and frames: a frame freed
    while a view may still map it would be reused under that view.  The
    release is retried at the next pool call."""
    a = pool.asarray(rand(1, 16))
    b = pool.asarray(rand(2, 16))
    twin = rand(3, 8)
    m1, m2 = pool.asarray(twin), pool.asarray(twin)
    pool.scan(full_scans=2)
    assert (states(pool, m2) == KSM).all()
    check_counters(pool, [a, b, m1, m2])
    before = pool.stats()
    assert before["bytes_private"] == 32 * PAGE and before["bytes_frames"] == 8 * PAGE
    _core.inject("mmap", 0, -1, errno.ENOMEM)
    _core.inject("mprotect", 0, -1, errno.ENOMEM)
    del a, m1
    gc.collect()
    # nothing could cut the pages off: their memory must still be there
    s = pool.stats()
    assert s["bytes_private"] == 32 * PAGE and s["bytes_frames"] == 8 * PAGE
    assert memfd_bytes(pool) == 8 * PAGE
    assert s["pages_shared"] == 8 and s["pages_sharing"] == 8
    _core.inject("mmap", 0, 0, errno.ENOMEM)
    _core.inject("mprotect", 0, 0, errno.ENOMEM)
    c = pool.full(8 * PAGE, 1, dtype=np.uint8)  # the next call retries
    s = pool.stats()
    assert s["bytes_private"] == 24 * PAGE and s["bytes_frames"] == 8 * PAGE
    assert s["pages_shared"] == 8 and s["pages_sharing"] == 0
    assert np.array_equal(b, rand(2, 16)) and np.array_equal(m2, twin) and (c == 1).all()
    check_counters(pool, [b, m2, c])
    del m2
    gc.collect()
    assert pool.stats()["bytes_frames"] == 0 == memfd_bytes(pool)


def test_failed_punch_keeps_the_memory_but_never_the_old_bytes(pool):
    """Frames freed while punching fails keep their memory (and the stats
    say so); the frames are still reused, and nothing of what they held
    shows through in a new buffer or a new merge."""
    secret = np.full(32 * PAGE, 0xAB, np.uint8)
    secret.reshape(32, PAGE)[:, 0] = np.arange(32)  # 32 distinct pages
    a, b = pool.asarray(secret), pool.asarray(secret)
    pool.scan(full_scans=2)
    assert (states(pool, b) == KSM).all() and memfd_bytes(pool) == 32 * PAGE
    hits = _core.inject_hits("fallocate")
    _core.inject("fallocate", 0, -1, errno.EIO)  # punching fails
    del a, b
    gc.collect()
    s = pool.stats()
    _core.inject("fallocate", 0, 0, errno.EIO)
    assert _core.inject_hits("fallocate") > hits
    assert s["pages_shared"] == 0 and s["bytes_private"] == 0
    assert s["bytes_frames"] == memfd_bytes(pool) == 32 * PAGE  # kept, and counted
    c = pool.empty(32 * PAGE, np.uint8)
    assert not c.any()
    other = rand(5, 16)
    x, y = pool.asarray(other), pool.asarray(other)
    pool.scan(full_scans=2)
    assert (states(pool, y) == KSM).all()
    assert np.array_equal(x, other) and np.array_equal(y, other) and not c.any()
    assert memfd_bytes(pool) <= 32 * PAGE, "freed frames were not reused"


# ------------------------------------------------------------------ swap


@pytest.mark.parametrize("op", ["mprotect", "mmap"])
def test_swap_out_with_failing_calls_keeps_pages_resident(pool, op):
    """Eviction write-protects a batch (mprotect), writes it, then maps the
    pages onto their slots (mmap).  Either call failing leaves the pages
    resident, readable and writable, the pool over budget and nothing
    lost; eviction works again once the calls do."""
    swdir = tempfile.mkdtemp(prefix="uksm-injtest-")
    try:
        sp = uksm.Pool(
            "16MiB",
            max_resident="8MiB",
            swap_path=swdir,
            swap_batch="64KiB",
            pages_to_scan=1000,
            sleep_millisecs=0,
            cow=pool.cow,
        )
        shadows = [rand(k, 32) for k in range(4)]
        shadows += [np.tile(rand(9, 1), 8) for _ in range(2)]
        arrs = [sp.asarray(s) for s in shadows]
        sp.scan(full_scans=2)
        assert (states(sp, arrs[-1]) == KSM).all()
        hits = _core.inject_hits(op)
        _core.inject(op, 0, -1, errno.ENOMEM)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a clean skip, not an error
            sp.max_resident = 64 * 1024
        _core.inject(op, 0, 0, errno.ENOMEM)
        assert _core.inject_hits(op) > hits
        s = sp.stats()
        assert s["swap_outs"] == 0 and s["pages_swapped"] == 0 and s["swap_slots_used"] == 0
        assert s["swap_errors"] == 0
        assert s["bytes_private"] == 4 * 32 * PAGE and s["bytes_frames"] == PAGE
        assert not any((states(sp, a) == SWAPPED).any() for a in arrs)
        for a, sh in zip(arrs, shadows):
            assert np.array_equal(a, sh)
            a[::PAGE] ^= 1
            sh[::PAGE] ^= 1
        sp.max_resident = "8MiB"
        sp.max_resident = 64 * 1024
        s = sp.stats()
        assert s["swap_outs"] > 0 and s["bytes_resident"] <= 2 * 64 * 1024
        for a, sh in zip(arrs, shadows):
            assert np.array_equal(a, sh)
        del arrs, a
        sp.close()
        gc.collect()
    finally:
        for name in os.listdir(swdir):
            os.unlink(os.path.join(swdir, name))
        os.rmdir(swdir)
