"""Swap-in of runs: the layout that lets the kernel read swapped pages back
at the disk's speed, and the accounting of what was read back.

A swapped page is a MAP_PRIVATE view of its slot, and the kernel swaps it in
through its own file fault path (readahead, fault-around).  That is only as
fast as the disk when a run of neighbouring pages sits on a run of
neighbouring slots, mapped as one view: one vma, no per-page mapping for
the fault path to stop at.  These tests check that layout on the real page
tables (/proc/self/maps, pagemap through page_states), and that a run read
back, written or swapped in explicitly is counted as what it is.  Speed is a
benchmark's business; the swapin script quoted in the swap benchmarks
measures it.
"""

import gc
import os
import tempfile

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE
PRIVATE, KSM, ZERO, SWAPPED = 1, 2, 3, 4
MiB = 1 << 20
COWS = ["kernel", "signal"]


@pytest.fixture
def swdir():
    d = tempfile.mkdtemp(prefix="uksm-swapin-")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def make_pool(directory, cow="kernel", capacity="256MiB", batch="2MiB"):
    """A pool with a locked one-page ballast (kept on it): with the budget
    squeezed to one page, the ballast takes it and every other page goes."""
    pool = uksm.Pool(
        capacity, max_resident=capacity, swap_path=str(directory), swap_batch=batch, cow=cow
    )
    ballast = pool.full(PAGE, 0xB1, dtype=np.uint8)
    pool.lock(ballast)
    return pool, ballast


def fill(arr, seed):
    """Incompressible, never an all-zero page (use_zero_pages would take it)."""
    src = np.random.default_rng(seed).integers(1, 256, arr.nbytes, dtype=np.uint8)
    arr.view(np.uint8).reshape(-1)[:] = src
    return src


def vmas(arr):
    """The mappings /proc/self/maps shows over @arr's pages."""
    lo = arr.__array_interface__["data"][0]
    hi = lo + arr.nbytes
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if a < hi and b > lo:
                out.append(line.rstrip())
    return out


def swap_out(pool, arr):
    """Everything but one locked page out: the budget squeezed to a page."""
    pool.max_resident = PAGE
    assert (pool.page_states(arr)[0] == SWAPPED).all()


@pytest.mark.parametrize("cow", COWS)
def test_contiguous_buffer_goes_to_consecutive_slots_as_one_view(swdir, cow):
    """64 MiB swapped out in 2 MiB batches: the slots follow the addresses,
    and the views of neighbouring batches are one vma (the kernel merges
    views of consecutive file offsets), not one per batch nor per page."""
    pool, ball = make_pool(swdir, cow)
    arr = pool.empty(64 * MiB, np.uint8)
    src = fill(arr, 1)
    before = len(vmas(arr))
    swap_out(pool, arr)
    state, slot, _ = pool.page_states(arr)
    assert (np.diff(slot.astype(np.int64)) == 1).all(), "slots not consecutive"
    maps = vmas(arr)
    # the array's range may start or end inside a wider mapping: a few,
    # never a count that grows with the pages
    assert len(maps) <= max(before, 3), maps
    assert pool.stats()["pages_swapped"] == arr.nbytes // PAGE
    assert np.array_equal(arr, src)
    del arr
    del ball
    gc.collect()
    pool.close()


@pytest.mark.parametrize("cow", COWS)
def test_run_read_back_stays_swapped_and_cached_then_writes_cow(swdir, cow):
    """A run read back is the kernel's swap-in: the views map the slots'
    cached pages, nothing goes through uksm's handler, and the pages stay
    SWAPPED (pages_swapped unchanged, swap_ins 0, the slots counted in
    bytes_swap_cached).  A write to every eighth page then copies just that
    page: those become private (swap_ins, pages_swapped down by as many),
    the neighbours still read their slot, and no write is lost.  With
    cow="kernel" the copies do not split the view."""
    pool, ball = make_pool(swdir, cow)
    n = 16 * MiB // PAGE
    arr = pool.empty(n * PAGE, np.uint8)
    src = fill(arr, 2)
    swap_out(pool, arr)
    st0 = pool.stats()
    assert st0["bytes_swap_cached"] == 0
    assert np.array_equal(arr, src)  # the sequential read: swap-in
    st = pool.stats()
    assert st["pages_swapped"] == st0["pages_swapped"] == n
    assert st["swap_ins"] == st0["swap_ins"]
    assert st["bytes_swap_cached"] == n * PAGE
    assert st["transit_faults"] == st0["transit_faults"]
    assert st["cow_breaks_signal"] == st0["cow_breaks_signal"]
    assert (pool.page_states(arr)[0] == SWAPPED).all()
    nmaps = len(vmas(arr))
    by_page = arr.reshape(n, PAGE)
    written = np.arange(0, n, 8)
    by_page[written, 100] ^= 0xFF
    src.reshape(n, PAGE)[written, 100] ^= 0xFF
    state = pool.page_states(arr)[0]
    assert (state[written] == PRIVATE).all()
    assert (np.delete(state, written) == SWAPPED).all()
    st = pool.stats()
    assert st["pages_swapped"] == n - written.size
    assert st["swap_ins"] - st0["swap_ins"] == written.size
    assert st["swap_slots_used"] == n - written.size
    if cow == "kernel":
        assert len(vmas(arr)) == nmaps, "a copy on write split the view"
    else:
        # signal mode: the handler opens each written page (an mprotect,
        # a vma of its own), as for a merged page
        assert len(vmas(arr)) <= nmaps + 2 * written.size
    assert np.array_equal(arr, src)
    del arr, by_page
    gc.collect()
    st = pool.stats()
    assert st["pages_swapped"] == 0 and st["swap_slots_used"] == 0
    del ball
    pool.close()


def test_swapped_out_again_after_writes_reuses_a_run_of_slots(swdir):
    """Pages swapped in by writes and swapped out again: the batch takes the
    lowest run of free slots it can, so a buffer whose every page was
    freed from its slot goes back to one run, one view."""
    pool, ball = make_pool(swdir)
    arr = pool.empty(8 * MiB, np.uint8)
    src = fill(arr, 3)
    swap_out(pool, arr)
    pool.max_resident = pool.capacity
    arr += 1  # every page copied: every slot freed
    src += 1
    assert pool.stats()["swap_slots_used"] == 0
    swap_out(pool, arr)
    slot = pool.page_states(arr)[1].astype(np.int64)
    assert (np.diff(slot) == 1).all()
    assert len(vmas(arr)) <= 3
    assert np.array_equal(arr, src)
    del arr
    del ball
    gc.collect()
    pool.close()


@pytest.mark.parametrize("cow", COWS)
def test_lock_swaps_a_run_in_private(swdir, cow):
    """pool.lock() of a swapped buffer (swap_in_range: the slots read ahead,
    then MADV_POPULATE_WRITE): every page private, counted as swapped in,
    its slot freed, the contents the same; cold and with some of the slots
    already in the page cache."""
    pool, ball = make_pool(swdir, cow)
    n = 8 * MiB // PAGE
    arr = pool.empty(n * PAGE, np.uint8)
    src = fill(arr, 4)
    swap_out(pool, arr)
    assert arr[:: PAGE * 4].sum() > 0  # a quarter of the slots cached
    st0 = pool.stats()
    pool.lock(arr)
    st = pool.stats()
    assert (pool.page_states(arr)[0] == PRIVATE).all()
    assert st["pages_swapped"] == 0 and st["swap_slots_used"] == 0
    assert st["swap_ins"] - st0["swap_ins"] == n
    assert np.array_equal(arr, src)
    pool.unlock(arr)
    del arr
    del ball
    gc.collect()
    pool.close()


def _fd_flags(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0


def test_slots_are_written_direct_where_the_file_system_allows(swdir):
    """Pageout writes from the page to the disk (O_DIRECT) where the swap
    directory's file system takes direct I/O: no copy of the batch sits in
    the page cache while the pass is giving memory back.  The descriptor is
    the pool's own, on its swap file, write-only; it goes with the pool."""
    try:
        probe = os.open(swdir, os.O_TMPFILE | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError:
        pytest.skip("no O_DIRECT on this file system: the writes are buffered")
    st_probe = os.fstat(probe)
    os.close(probe)
    before = set(os.listdir("/proc/self/fd"))
    pool, ball = make_pool(swdir)
    new = [int(x) for x in set(os.listdir("/proc/self/fd")) - before]
    direct = []
    for fd in new:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == st_probe.st_dev and st.st_nlink == 0 and _fd_flags(fd) & os.O_DIRECT:
            direct.append(fd)
    assert len(direct) == 1, new
    ino = os.fstat(direct[0]).st_ino
    assert _fd_flags(direct[0]) & os.O_ACCMODE == os.O_WRONLY
    arr = pool.empty(4 * MiB, np.uint8)
    src = fill(arr, 5)
    swap_out(pool, arr)
    assert pool.stats()["bytes_swap_cached"] == 0
    assert np.array_equal(arr, src)
    del arr, ball
    gc.collect()
    pool.close()
    try:
        assert os.fstat(direct[0]).st_ino != ino, "the direct descriptor outlived the pool"
    except OSError:
        pass
