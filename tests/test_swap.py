"""The swap area: shared pages swappable under a resident budget.

Real files and real page tables throughout: every pool swaps to a file of
its own in a temporary directory.  A swapped page is a MAP_PRIVATE view of
its slot, so the program and the kernel read it back through the page cache
with no fault and no handler, and a write makes it private again.  Full
disks are a real 1 MiB tmpfs and a real RLIMIT_FSIZE, a failed write is the
core's own fault-injection hook.  Every data check compares against numpy
shadow copies held outside the pool; residency is checked by the pool's own
stats() and, where it matters, by the kernel's figures through psutil.
Tests that change process-wide limits or identities, or fork, run in a
subprocess.

Forcing eviction: ``pool.max_resident = <smaller>`` reclaims at once.  A
locked one-page "ballast" takes the single page a budget of one page leaves,
so that squeezing the budget to one page evicts every other evictable page.
Reads of swapped pages fill the page cache, which counts as resident until
the next reclaim pass (the background scanner's kswapd, here ``kswapd()``)
drops it; allocation commits nothing, so it reclaims nothing either.
"""

import errno
import gc
import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import numpy as np
import psutil
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
KiB, MiB = 1 << 10, 1 << 20
COWS = ["kernel", "signal"]

# --------------------------------------------------------------------------- helpers


def make_pool(directory, capacity="16MiB", max_resident="8MiB", batch="64KiB", **kw):
    return uksm.Pool(
        capacity,
        max_resident=max_resident,
        swap_path=str(directory),
        swap_batch=batch,
        pages_to_scan=1000,
        sleep_millisecs=0,
        **kw,
    )


@pytest.fixture
def swdir():
    d = tempfile.mkdtemp(prefix="uksm-swaptest-")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def page(a, i):
    return a.view(np.uint8).reshape(-1)[i * PAGE : (i + 1) * PAGE]


def states(pool, a):
    return pool.page_states(a)[0]


def info(pool, a):
    s, pfn, mc = pool.page_states(a)
    return s.copy(), pfn.copy(), mc.copy()


def kswapd(pool):
    """One pass of the background reclaimer: drop the slots' cached pages
    and evict down to the budget (what the scanner thread does each round)."""
    pool._reclaim()


def swap_fds(directory):
    """(fd, link) of this process's descriptors open on a nameless file in
    @directory: its /proc link is '<dir>/#<ino> (deleted)' (O_TMPFILE) or
    '<dir>/name (deleted)'.  The pool holds its swap file two or three times
    (read-write, read-only for the views, and O_DIRECT for writing slots
    where the file system has it)."""
    prefix = os.path.realpath(directory) + "/"
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith(prefix):
            out.append((int(name), link))
    return out


def swap_files(directory):
    """The distinct files behind swap_fds(): {(st_dev, st_ino): [fds]}."""
    files = {}
    for fd, _ in swap_fds(directory):
        st = os.fstat(fd)
        files.setdefault((st.st_dev, st.st_ino), []).append(fd)
    return files


def the_swap_fd(directory):
    files = swap_files(directory)
    assert len(files) == 1, f"expected one swap file in {directory}, found {files}"
    return next(iter(files.values()))[0]


def ballast(pool):
    """A locked page: with max_resident one page, everything else must go."""
    b = pool.full(PAGE, 0xB1, dtype=np.uint8)
    pool.lock(b)
    return b


def squeeze(pool):
    """Evict everything evictable (a ballast page takes the one page left)."""
    pool.max_resident = PAGE


def rand_pages(rng, n):
    # never an all-zero page: use_zero_pages would merge it with the zero page
    return rng.integers(1, 256, n * PAGE, dtype=np.uint8)


def run_py(code, timeout=60, env=None):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_within_budget(pool, budget, batch, where):
    st = pool.stats()
    memfd = os.fstat(pool.fd).st_blocks * 512
    assert st["bytes_resident"] <= budget + batch, (where, st["bytes_resident"], budget, batch)
    assert st["bytes_resident"] == (
        st["bytes_private"] + st["bytes_frames"] + st["bytes_swap_cached"]
    ), (where, st)
    assert st["bytes_frames"] == memfd, (where, "memfd blocks", memfd, st["bytes_frames"])
    assert st["pss_bytes"] <= budget + batch, (where, "pss", st["pss_bytes"])


def kernel_mem():
    """This process's (pss, rss) as the kernel counts them."""
    m = psutil.Process().memory_full_info()
    return m.pss, m.rss


# ---------------------------------------------------- 1. four times the budget


@pytest.mark.parametrize("cow", COWS)
def test_workload_four_times_budget_shadow_and_residency(swdir, cow):
    budget, batch = 1 * MiB, 128 * KiB
    pool = make_pool(swdir, capacity="32MiB", max_resident=budget, batch=batch, cow=cow)
    rng = np.random.default_rng(1234)
    narr, npg = 32, 32  # 32 x 128 KiB = 4 MiB = 4 x budget
    popular = [rand_pages(rng, 1) for _ in range(6)]
    arrs, shadows = [], []

    def check_all(where):
        for k, (a, s) in enumerate(zip(arrs, shadows)):
            assert np.array_equal(a, s), f"{where}: array {k} differs from its shadow"
        kswapd(pool)
        assert_within_budget(pool, budget, batch, where)

    # phase 1: allocate and fill, a quarter of the pages duplicates of a few;
    # kswapd keeps the pool under budget as it goes
    for k in range(narr):
        s = rand_pages(rng, npg)
        for j in range(0, npg, 4):
            s[j * PAGE : (j + 1) * PAGE] = popular[rng.integers(len(popular))]
        a = pool.empty(npg * PAGE, np.uint8)
        a[:] = s
        arrs.append(a)
        shadows.append(s)
        kswapd(pool)
        assert_within_budget(pool, budget, batch, f"after filling array {k}")
    st = pool.stats()
    assert st["swap_outs"] >= (narr * npg * PAGE - budget - batch) // PAGE
    assert st["pages_swapped"] > 0 and st["swap_slots_used"] > 0
    assert st["swap_errors"] == 0
    check_all("after fill")

    # phase 2: merge what is resident
    st = pool.scan(full_scans=2)
    assert st["pages_sharing"] > 0, "no duplicate page merged"
    check_all("after merge")

    # phase 3: random reads, page-wise and element-wise, and by the kernel
    out = os.path.join(swdir, "out.npy")
    for _ in range(3):
        for _ in range(400):
            k, j = int(rng.integers(narr)), int(rng.integers(npg))
            assert np.array_equal(page(arrs[k], j), page(shadows[k], j)), (k, j)
        idx = rng.integers(0, npg * PAGE, 200)
        for k in rng.integers(0, narr, 8):
            assert np.array_equal(arrs[k][idx], shadows[k][idx])
        k = int(rng.integers(narr))
        np.save(out, arrs[k])
        assert np.array_equal(np.load(out), shadows[k])
        kswapd(pool)
        assert_within_budget(pool, budget, batch, "after random reads")
    assert pool.stats()["swap_ins"] == 0, "reads made swapped pages private"

    # phase 4: random writes (swapped, merged and private pages alike)
    for _ in range(3):
        for _ in range(300):
            k, j = int(rng.integers(narr)), int(rng.integers(npg))
            off = j * PAGE + int(rng.integers(PAGE - 64))
            v = rng.integers(1, 256, 64, dtype=np.uint8)
            arrs[k][off : off + 64] = v
            shadows[k][off : off + 64] = v
        for _ in range(20):  # whole pages made duplicates again
            k, j = int(rng.integers(narr)), int(rng.integers(npg))
            p = popular[rng.integers(len(popular))]
            page(arrs[k], j)[:] = p
            page(shadows[k], j)[:] = p
        kswapd(pool)
        assert_within_budget(pool, budget, batch, "after random writes")
    check_all("after random writes")
    assert pool.stats()["swap_ins"] > 0, "writes to swapped pages not counted"

    # phase 5: merge again, squeeze the budget, then read it all back twice
    pool.scan(full_scans=2)
    check_all("after second merge")
    pool.max_resident = budget // 2
    assert_within_budget(pool, budget // 2, batch, "right after lowering the budget")
    budget //= 2
    check_all("after lowering the budget")
    pool.max_resident = budget * 2
    budget *= 2
    check_all("after raising the budget")
    st = pool.stats()
    assert st["swap_errors"] == 0
    assert st["pages_swapped"] == int(sum((states(pool, a) == SWAPPED).sum() for a in arrs))


@pytest.mark.parametrize("cow", COWS)
def test_residency_by_the_kernels_own_count(swdir, cow):
    """What the kernel charges the process (psutil's PSS and RSS) follows
    the budget: 8 MiB written through a 1 MiB budget costs about 1 MiB, and
    reading it all back costs page cache only until the next pass."""
    budget, batch = 1 * MiB, 128 * KiB
    slack = 768 * KiB  # the interpreter's own churn
    pool = make_pool(swdir, capacity="16MiB", max_resident=budget, batch=batch, cow=cow)
    npg, narr = 64, 32  # 32 x 256 KiB = 8 MiB
    arrs = [pool.empty(npg * PAGE, np.uint8) for _ in range(narr)]
    gc.collect()
    pss0, rss0 = kernel_mem()
    for k, a in enumerate(arrs):
        a[:] = rand_pages(np.random.default_rng(k), npg)
        kswapd(pool)
    pss1, rss1 = kernel_mem()
    st = pool.stats()
    assert st["bytes_resident"] <= budget + batch
    assert pss1 - pss0 <= budget + batch + slack, (pss1 - pss0, st)
    assert rss1 - rss0 <= budget + batch + slack, (rss1 - rss0, st)
    assert st["pages_swapped"] >= (narr * npg * PAGE - budget - batch) // PAGE

    for k, a in enumerate(arrs):  # every byte read back
        assert np.array_equal(a, rand_pages(np.random.default_rng(k), npg)), k
    st = pool.stats()
    assert st["swap_ins"] == 0 and st["bytes_swap_cached"] > budget
    kswapd(pool)
    pss2, _ = kernel_mem()
    assert pool.stats()["bytes_resident"] <= budget + batch
    assert pss2 - pss0 <= budget + batch + slack, (pss2 - pss0, pool.stats())


# ------------------------------------------ 2. a shared frame: one slot, one write


@pytest.mark.parametrize("cow", COWS)
@pytest.mark.parametrize("nmappers", [2, 40])
def test_shared_frame_one_slot_one_write(swdir, nmappers, cow):
    pool = make_pool(swdir, cow=cow)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(nmappers), 1)
    arrs = [pool.asarray(content) for _ in range(nmappers)]
    pool.scan(full_scans=2)
    s0 = [info(pool, a) for a in arrs]
    assert all(s[0][0] == KSM for s in s0)
    assert len({int(s[1][0]) for s in s0}) == 1 and s0[0][2][0] == nmappers

    before = pool.stats()
    squeeze(pool)
    after = pool.stats()
    assert after["swap_outs"] - before["swap_outs"] == 1, "a shared frame written more than once"
    slots = set()
    for a in arrs:
        s, slot, mapcount = info(pool, a)
        assert s[0] == SWAPPED and mapcount[0] == nmappers
        slots.add(int(slot[0]))
    assert len(slots) == 1, f"mappers of one frame on several slots: {slots}"
    assert after["swap_slots_used"] == 1
    assert after["pages_swapped"] == nmappers
    assert after["bytes_resident"] == PAGE  # the ballast only
    assert after["bytes_frames"] == 0
    assert after["pages_shared"] == 0 and after["pages_sharing"] == 0
    assert states(pool, ball)[0] == PRIVATE

    # read every mapper, by the program and by the kernel: right bytes, and
    # they all stay views of the one slot, sharing its one cached page
    path = os.path.join(swdir, "out.bin")
    for a in arrs:
        assert np.array_equal(a, content)
        with open(path, "wb", buffering=0) as f:
            assert f.write(a) == PAGE
        assert np.fromfile(path, np.uint8).tobytes() == content.tobytes()
    back = [info(pool, a) for a in arrs]
    assert all(s[0][0] == SWAPPED for s in back), [int(s[0][0]) for s in back]
    assert {int(s[1][0]) for s in back} == slots, "a read moved a page off its slot"
    st = pool.stats()
    assert st["swap_ins"] == after["swap_ins"], "reads counted as swap-ins"
    assert st["swap_slots_used"] == 1 and st["pages_swapped"] == nmappers
    assert st["bytes_swap_cached"] == PAGE, "one slot read back into more than one page"
    assert st["bytes_resident"] == 2 * PAGE

    # a write to one mapper makes it private; the others stay on the slot
    arrs[0][7] ^= 0xFF
    assert states(pool, arrs[0])[0] == PRIVATE
    assert arrs[0][7] == content[7] ^ 0xFF and np.array_equal(arrs[0][8:], content[8:])
    for a in arrs[1:]:
        assert np.array_equal(a, content)
    rest = [info(pool, a) for a in arrs[1:]]
    assert all(s[0][0] == SWAPPED and int(s[2][0]) == nmappers - 1 for s in rest)
    st = pool.stats()
    assert st["swap_ins"] - after["swap_ins"] == 1
    assert st["pages_swapped"] == nmappers - 1 and st["swap_slots_used"] == 1
    # a swapped page written is a swap-in, not a copy on write, in either mode
    assert st["cow_breaks_signal"] == after["cow_breaks_signal"]

    # the next pass drops the cached page and evicts the written one
    kswapd(pool)
    st = pool.stats()
    assert st["bytes_swap_cached"] == 0 and st["bytes_resident"] == PAGE
    assert states(pool, arrs[0])[0] == SWAPPED
    assert arrs[0][7] == content[7] ^ 0xFF
    assert all(np.array_equal(a, content) for a in arrs[1:])
    assert ball[0] == 0xB1


@pytest.mark.parametrize("cow", COWS)
def test_swapped_shared_page_read_back_counts_once_for_the_kernel(swdir, cow):
    """512 views of one swapped frame, all read: the kernel maps one cached
    page 512 times (RSS 512 pages, PSS one page), as with the frame itself."""
    pool = make_pool(swdir, max_page_sharing=1024, cow=cow)
    ball = ballast(pool)
    a = pool.full(512 * PAGE, 0x5A, dtype=np.uint8)
    pool.scan(full_scans=2)
    assert (states(pool, a) == KSM).all()
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    assert len(set(pool.page_states(a)[1].tolist())) == 1
    gc.collect()
    pss0, rss0 = kernel_mem()
    assert int(a[::PAGE].sum()) == 512 * 0x5A  # one byte of each page
    pss1, rss1 = kernel_mem()
    assert rss1 - rss0 >= 500 * PAGE, rss1 - rss0
    assert pss1 - pss0 <= 32 * PAGE, ("one shared slot counted per view", pss1 - pss0)
    st = pool.stats()
    assert st["bytes_swap_cached"] == PAGE and st["bytes_resident"] == 2 * PAGE
    assert st["rss_bytes"] == PAGE + 512 * PAGE
    assert ball[0] == 0xB1


def test_pss_bytes_of_read_back_shared_slot_agrees_with_the_kernel(swdir):
    pool = make_pool(swdir, max_page_sharing=1024)
    ball = ballast(pool)
    a = pool.full(512 * PAGE, 0x5A, dtype=np.uint8)
    pool.scan(full_scans=2)
    squeeze(pool)
    gc.collect()
    before, (pss0, _) = pool.stats()["pss_bytes"], kernel_mem()
    assert int(a[::PAGE].sum()) == 512 * 0x5A
    after, (pss1, _) = pool.stats()["pss_bytes"], kernel_mem()
    assert abs((after - before) - (pss1 - pss0)) <= 32 * PAGE, (after - before, pss1 - pss0)
    assert ball[0] == 0xB1


@pytest.mark.parametrize("cow", COWS)
def test_writes_to_a_swapped_shared_page_make_the_writers_private(swdir, cow):
    """Writers to a swapped shared page each get a private copy of the slot,
    with their write and the rest of the page; the other mappers stay views
    of the slot, read the old bytes, and keep it alive."""
    pool = make_pool(swdir, cow=cow)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(4), 1)
    arrs = [pool.asarray(content) for _ in range(5)]
    pool.scan(full_scans=2)
    squeeze(pool)
    assert all(states(pool, a)[0] == SWAPPED for a in arrs)
    for k in (2, 4):  # two writers touch first
        arrs[k][100 + k] = content[100 + k] ^ 0x55
    for k in (2, 4):
        assert states(pool, arrs[k])[0] == PRIVATE
        expect = content.copy()
        expect[100 + k] ^= 0x55
        assert np.array_equal(arrs[k], expect)
    readers = [arrs[0], arrs[1], arrs[3]]
    for a in readers:
        assert np.array_equal(a, content)
    rest = [info(pool, a) for a in readers]
    assert all(s[0][0] == SWAPPED and int(s[2][0]) == 3 for s in rest)
    assert len({int(s[1][0]) for s in rest}) == 1
    st = pool.stats()
    assert st["swap_outs"] == 1 and st["swap_ins"] == 2
    assert st["swap_slots_used"] == 1 and st["pages_swapped"] == 3
    assert st["bytes_private"] == 3 * PAGE  # ballast and the two writers
    assert ball[0] == 0xB1
    # the last readers written too: the slot is freed
    for a in readers:
        a[0] ^= 1
    st = pool.stats()
    assert st["swap_slots_used"] == 0 and st["pages_swapped"] == 0 and st["swap_ins"] == 5
    for a in readers:
        assert a[0] == content[0] ^ 1 and np.array_equal(a[1:], content[1:])


def test_cached_slots_dropped_by_the_next_pass_then_read_again(swdir):
    """Slots read back sit in the page cache, counted resident, until the
    next pass drops them; the views stay on their slots and read the same
    bytes again from the file."""
    pool = make_pool(swdir)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(5), 1)
    arrs = [pool.asarray(content) for _ in range(6)]
    priv = pool.asarray(rand_pages(np.random.default_rng(6), 8))
    pool.scan(full_scans=2)
    squeeze(pool)
    slots = info(pool, priv)[1]
    for a in arrs[:3]:
        assert np.array_equal(a, content)
    assert np.array_equal(priv, rand_pages(np.random.default_rng(6), 8))
    st = pool.stats()
    assert st["bytes_swap_cached"] == 9 * PAGE and st["swap_slots_used"] == 9
    assert st["bytes_resident"] == 10 * PAGE
    kswapd(pool)
    st = pool.stats()
    assert st["bytes_swap_cached"] == 0 and st["bytes_resident"] == PAGE
    assert all(states(pool, a)[0] == SWAPPED for a in arrs)
    assert (info(pool, priv)[1] == slots).all()
    for a in arrs:
        assert np.array_equal(a, content)
    assert np.array_equal(priv, rand_pages(np.random.default_rng(6), 8))
    assert len({int(pool.page_states(x)[1][0]) for x in arrs}) == 1
    del ball, arrs, priv, a
    gc.collect()
    st = pool.stats()
    assert st["swap_slots_used"] == 0 and st["pages_swapped"] == 0
    assert st["bytes_resident"] == 0


def test_a_reclaim_batch_never_takes_a_page_twice(swdir):
    """The clock hand left in the middle of a buffer, then a batch wanting
    more than there is to evict: its walk goes once round the page table
    and must not come back to the pages it has already taken."""
    pool = make_pool(swdir, capacity="4MiB", max_resident="4MiB", batch="32KiB")
    ball = pool.full(16 * PAGE, 1, dtype=np.uint8)
    pool.lock(ball)
    z = pool.asarray(rand_pages(np.random.default_rng(14), 4))
    pool.max_resident = 18 * PAGE  # z's first two pages: the hand stops on the third
    pool.max_resident = PAGE  # the rest, in one batch
    st = pool.stats()
    assert (states(pool, z) == SWAPPED).all()
    assert st["pages_swapped"] == 4 and st["swap_slots_used"] == 4, st
    assert st["swap_outs"] == 4
    del z
    gc.collect()
    st = pool.stats()
    assert st["pages_swapped"] == 0 and st["swap_slots_used"] == 0, st
    assert ball[0] == 1


def test_pages_reading_as_the_zero_page_cost_nothing(swdir):
    """Untouched pages, and pages merged with the zero page, read as the
    kernel's zero page: not resident for the kernel (RSS), so neither for
    stats() nor for the budget, and never worth a swap slot."""
    pool = make_pool(swdir)
    untouched = pool.zeros(256 * PAGE, np.uint8)
    zeroed = pool.full(256 * PAGE, 1, dtype=np.uint8)
    zeroed.fill(0)
    pool.scan(full_scans=2)
    assert (states(pool, zeroed) == ZERO).all()
    assert pool.stats()["bytes_resident"] == 0
    assert int(untouched.sum()) == 0 and int(zeroed.sum()) == 0
    st = pool.stats()
    assert st["bytes_private"] == 0 and st["bytes_resident"] == 0, st
    assert st["rss_bytes"] == 0, st
    squeeze(pool)
    assert pool.stats()["swap_outs"] == 0, "pages of zeroes written to swap"


# ------------------------------------------------- 3. writers racing reclaim


def _background_workload(pool, rng, seconds):
    """The scanner thread merges and reclaims while this thread reads and
    writes at random, checking every page against its shadow after each
    round; returns (arrays, shadows)."""
    popular = [rand_pages(rng, 1) for _ in range(4)]
    shadows = []
    for _ in range(8):
        s = rand_pages(rng, 64)
        for j in range(0, 64, 3):
            s[j * PAGE : (j + 1) * PAGE] = popular[j % 4]
        shadows.append(s)
    arrs = [pool.asarray(s) for s in shadows]  # 2 MiB, 4 x the budget below
    pool.max_resident = 512 * KiB
    pool.start()
    try:
        end = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < end or rounds < 3:
            for _ in range(200):
                k, j = int(rng.integers(8)), int(rng.integers(64))
                if rng.integers(2):
                    off = j * PAGE + int(rng.integers(PAGE - 8))
                    v = rng.integers(1, 256, 8, dtype=np.uint8)
                    arrs[k][off : off + 8] = v
                    shadows[k][off : off + 8] = v
                else:
                    assert np.array_equal(page(arrs[k], j), page(shadows[k], j)), (k, j)
            for k, (a, s) in enumerate(zip(arrs, shadows)):
                assert np.array_equal(a, s), (rounds, k)
            rounds += 1
    finally:
        pool.stop()
    return arrs, shadows


# The races below are timing-dependent: a lost write shows within a second
# or two when there is one, so the variant expected to lose runs longer.
RACE_SECONDS = {"kernel": 6.0, "signal": 1.5}


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_background_scanner_swaps_while_a_thread_writes(swdir, cow):
    """kswapd: the scanner thread merges and reclaims while the test thread
    reads and writes at random; the shadows agree throughout."""
    pool = make_pool(swdir, max_resident="16MiB", batch="64KiB", cow=cow)
    arrs, shadows = _background_workload(pool, np.random.default_rng(77), RACE_SECONDS[cow])
    for k, (a, s) in enumerate(zip(arrs, shadows)):
        assert np.array_equal(a, s), k
    st = pool.stats()
    assert st["swap_outs"] > 0 and st["swap_ins"] > 0 and st["swap_errors"] == 0
    assert st["full_scans"] > 0


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_write_after_read_of_a_swapped_page_survives_concurrent_reclaim(swdir, cow):
    """A page read back (its view maps the cached slot) and then written:
    the write must survive reclaim passes running in another thread."""
    pool = make_pool(swdir, max_resident="16MiB", cow=cow)
    rng = np.random.default_rng(1)
    n = 512
    shadow = rand_pages(rng, n)
    a = pool.asarray(shadow)
    pool.max_resident = 512 * KiB
    stop = threading.Event()

    def reclaimer():
        while not stop.is_set():
            kswapd(pool)

    t = threading.Thread(target=reclaimer)
    t.start()
    try:
        end = time.monotonic() + RACE_SECONDS[cow]
        while time.monotonic() < end:
            for _ in range(200):
                j = int(rng.integers(n))
                off = j * PAGE + int(rng.integers(PAGE - 8))
                v = rng.integers(1, 256, 8, dtype=np.uint8)
                assert a[j * PAGE + 4000] == shadow[j * PAGE + 4000]  # read first
                a[off : off + 8] = v
                shadow[off : off + 8] = v
            lost = np.flatnonzero((a.reshape(n, PAGE) != shadow.reshape(n, PAGE)).any(axis=1))
            assert lost.size == 0, f"writes lost on {lost.size} pages, e.g. {lost[:8].tolist()}"
    finally:
        stop.set()
        t.join()
    assert pool.stats()["swap_outs"] > n


# --------------------------------------------------------------- 4. mlock


def test_locked_pages_never_leave_memory(swdir):
    budget, batch = 512 * KiB, 64 * KiB
    pool = make_pool(swdir, max_resident=budget, batch=batch)
    rng = np.random.default_rng(3)
    lk_data = rand_pages(rng, 32)
    locked = pool.asarray(lk_data)
    pool.lock(locked)
    others, shadows = [], []
    for _ in range(16):  # 2 MiB through a 512 KiB budget
        s = rand_pages(rng, 32)
        others.append(pool.asarray(s))
        shadows.append(s)
        kswapd(pool)
        assert not (states(pool, locked) == SWAPPED).any()
    assert pool.stats()["swap_outs"] > 0
    squeeze(pool)
    assert (states(pool, locked) == PRIVATE).all()
    assert all((states(pool, a) == SWAPPED).all() for a in others)
    assert pool.stats()["bytes_resident"] == locked.nbytes
    for a, s in zip(others, shadows):  # pressure from reads too
        assert np.array_equal(a, s)
        kswapd(pool)
        assert not (states(pool, locked) == SWAPPED).any()
    assert np.array_equal(locked, lk_data)

    # locking a swapped buffer brings it in, private
    pool.lock(others[0])
    assert (states(pool, others[0]) == PRIVATE).all()
    assert np.array_equal(others[0], shadows[0])
    squeeze(pool)
    assert (states(pool, others[0]) == PRIVATE).all()
    assert pool.stats()["bytes_private"] == locked.nbytes + others[0].nbytes
    pool.unlock(others[0])

    # a pin inside a lock ends without ending the lock
    with pool.pin(locked):
        pass
    pool.max_resident = budget
    squeeze(pool)
    assert (states(pool, locked) == PRIVATE).all(), "unpinning unlocked the buffer"

    # unlocked, they may go
    pool.unlock(locked)
    b = ballast(pool)
    pool.max_resident = budget
    squeeze(pool)
    assert (states(pool, locked) == SWAPPED).all()
    assert (states(pool, b) == PRIVATE).all()
    assert np.array_equal(locked, lk_data)


@pytest.mark.parametrize("cow", COWS)
def test_locked_merged_page_keeps_shared_frame_resident(swdir, cow):
    pool = make_pool(swdir, cow=cow)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(7), 1)
    x, y, z = (pool.asarray(content) for _ in range(3))
    pool.lock(x)
    pool.lock(y)
    pool.scan(full_scans=2)
    sx, sy, sz = info(pool, x), info(pool, y), info(pool, z)
    assert sx[0][0] == sy[0][0] == sz[0][0] == KSM, "locked pages must still merge"
    assert sx[1][0] == sy[1][0] == sz[1][0]
    squeeze(pool)
    # z is not locked, but its frame is: nobody leaves
    assert [states(pool, a)[0] for a in (x, y, z)] == [KSM] * 3
    assert pool.stats()["swap_outs"] == 0
    pool.unlock(x)
    pool.max_resident = "8MiB"
    squeeze(pool)
    assert [states(pool, a)[0] for a in (x, y, z)] == [KSM] * 3, "y still locks the frame"
    pool.unlock(y)
    pool.max_resident = "8MiB"
    squeeze(pool)
    assert [states(pool, a)[0] for a in (x, y, z)] == [SWAPPED] * 3
    assert len({int(pool.page_states(a)[1][0]) for a in (x, y, z)}) == 1
    assert pool.stats()["swap_outs"] == 1
    for a in (x, y, z):
        assert np.array_equal(a, content)
    assert states(pool, ball)[0] == PRIVATE


def test_lock_then_merge_into_an_existing_shared_frame(swdir):
    """Merged first, one mapper locked afterwards: the frame stays in."""
    pool = make_pool(swdir)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(8), 1)
    arrs = [pool.asarray(content) for _ in range(4)]
    pool.scan(full_scans=2)
    assert all(states(pool, a)[0] == KSM for a in arrs)
    pool.lock(arrs[2])
    squeeze(pool)
    assert all(states(pool, a)[0] == KSM for a in arrs)
    pool.unlock(arrs[2])
    pool.max_resident = "8MiB"
    squeeze(pool)
    assert all(states(pool, a)[0] == SWAPPED for a in arrs)
    assert states(pool, ball)[0] == PRIVATE


# --------------------------------------------------------------- 5. groups


def test_group_limit_swaps_its_own_pages_only(swdir):
    glimit, batch = 256 * KiB, 64 * KiB
    pool = make_pool(swdir, capacity="32MiB", max_resident="16MiB", batch=batch)
    rng = np.random.default_rng(11)
    other_data = rand_pages(rng, 256)
    other = pool.asarray(other_data)  # 1 MiB, default group
    g = pool.group("g", max_resident=glimit)
    h = pool.group("h")  # no limit of its own
    h_data = rand_pages(rng, 64)
    harr = h.asarray(h_data)
    garrs, gsh = [], []
    for _ in range(8):  # 1 MiB through 256 KiB
        s = rand_pages(rng, 32)
        garrs.append(g.asarray(s))
        gsh.append(s)
        # each allocation in the group reclaims it: at most the limit and
        # the array just written
        gs = g.stats()
        assert gs["bytes_resident"] <= glimit + batch + s.nbytes, gs
    assert g.stats()["pages_swapped"] > 0
    for a, s in zip(garrs, gsh):  # reads charge no group
        assert np.array_equal(a, s)
    assert g.stats()["swap_ins"] == 0
    assert not (states(pool, other) == SWAPPED).any(), "another group's pages were swapped"
    assert not (states(pool, harr) == SWAPPED).any(), "another group's pages were swapped"
    assert h.stats()["pages_swapped"] == 0 and h.stats()["bytes_resident"] == harr.nbytes
    assert np.array_equal(other, other_data) and np.array_equal(harr, h_data)
    st = pool.stats()
    assert st["groups"]["g"]["pages_swapped"] == g.stats()["pages_swapped"]
    assert st["groups"]["g"]["max_resident"] == glimit
    assert st["pages_swapped"] == g.stats()["pages_swapped"]
    # lowering the group's limit swaps only its pages, at once
    g.max_resident = 64 * KiB
    assert g.stats()["bytes_resident"] <= 64 * KiB
    assert not (states(pool, other) == SWAPPED).any()
    assert not (states(pool, harr) == SWAPPED).any()
    # writes to its swapped pages are the group's swap-ins
    garrs[0][::PAGE] = 1
    gsh[0][::PAGE] = 1
    assert g.stats()["swap_ins"] > 0 and h.stats()["swap_ins"] == 0
    assert np.array_equal(garrs[0], gsh[0])


def test_reclaim_pass_brings_a_written_group_back_under_its_limit(swdir):
    """Allocation commits nothing, so a group fills up as it is written;
    the next reclaim pass must evict its pages down to its own limit (and
    no other group's).  Counted from the page tables: every page here is
    written, so each private one is resident."""
    glimit, batch = 256 * KiB, 64 * KiB
    pool = make_pool(swdir, capacity="32MiB", max_resident="16MiB", batch=batch)
    rng = np.random.default_rng(12)
    other = pool.asarray(rand_pages(rng, 64))
    g = pool.group("g", max_resident=glimit)
    arrs = [g.empty(64 * PAGE, np.uint8) for _ in range(4)]  # 1 MiB, nothing yet
    for a in arrs:
        a[:] = rand_pages(rng, 64)
    kswapd(pool)
    resident = sum(int((states(pool, a) == PRIVATE).sum()) for a in arrs) * PAGE
    assert resident <= glimit + batch, resident
    assert not (states(pool, other) == SWAPPED).any()


@pytest.mark.parametrize("cow", COWS)
def test_group_charging_of_cow_breaks_and_swapped_writes(swdir, cow):
    pool = make_pool(swdir, cow=cow)
    ball = ballast(pool)
    g1, g2 = pool.group("g1"), pool.group("g2")
    content = rand_pages(np.random.default_rng(12), 1)
    same = np.tile(content, 4)  # 4 identical pages
    a1 = g1.asarray(same)
    a2 = g2.asarray(same)
    assert g1.stats()["bytes_resident"] == 4 * PAGE
    assert g2.stats()["bytes_resident"] == 4 * PAGE
    pool.scan(full_scans=2)
    assert (states(pool, a1) == KSM).all() and (states(pool, a2) == KSM).all()
    r1, r2 = g1.stats()["bytes_resident"], g2.stats()["bytes_resident"]
    assert r1 + r2 == PAGE, (r1, r2)  # one frame for eight pages

    # COW breaks: the private copies are charged to the group that wrote
    page(a2, 0)[0] ^= 1
    page(a2, 3)[9] ^= 1
    assert g2.stats()["bytes_resident"] - r2 == 2 * PAGE
    assert g1.stats()["bytes_resident"] == r1

    # swapped: nothing resident is charged; reads charge nobody either
    squeeze(pool)
    assert (states(pool, a1) == SWAPPED).all() and (states(pool, a2) == SWAPPED).all()
    assert g1.stats()["bytes_resident"] == 0 and g2.stats()["bytes_resident"] == 0
    assert g1.stats()["pages_swapped"] == 4 and g2.stats()["pages_swapped"] == 4
    ins1, ins2 = g1.stats()["swap_ins"], g2.stats()["swap_ins"]
    assert int(a2[PAGE + 5]) == same[PAGE + 5]
    assert np.array_equal(page(a1, 1), page(same, 1))
    assert g1.stats()["bytes_resident"] == 0 and g2.stats()["bytes_resident"] == 0
    assert g1.stats()["swap_ins"] == ins1 and g2.stats()["swap_ins"] == ins2
    assert int(pool.page_states(a1)[1][1]) == int(pool.page_states(a2)[1][1])
    # a write to a swapped page: a private page and a swap-in for the writer
    page(a1, 1)[0] ^= 1
    assert g1.stats()["bytes_resident"] == PAGE and g1.stats()["swap_ins"] == ins1 + 1
    assert g2.stats()["bytes_resident"] == 0 and g2.stats()["swap_ins"] == ins2
    assert g2.stats()["pages_swapped"] == 4 and g1.stats()["pages_swapped"] == 3
    expect = same.copy()
    expect[0] ^= 1
    expect[3 * PAGE + 9] ^= 1
    assert np.array_equal(a2, expect)
    expect1 = same.copy()
    expect1[PAGE] ^= 1
    assert np.array_equal(a1, expect1)
    assert ball[0] == 0xB1


# ------------------------------------------------ 6. freed while swapped


def test_buffers_freed_while_swapped_release_slots_and_frames(swdir):
    pool = make_pool(swdir, max_resident="1MiB")
    rng = np.random.default_rng(13)
    ball = ballast(pool)
    dup = rand_pages(rng, 1)
    private = [pool.asarray(rand_pages(rng, 16)) for _ in range(8)]
    shared = [pool.asarray(dup) for _ in range(6)]
    pool.scan(full_scans=2)
    squeeze(pool)
    st = pool.stats()
    assert st["swap_slots_used"] == 8 * 16 + 1 and st["pages_swapped"] == 8 * 16 + 6
    fd = the_swap_fd(swdir)
    assert os.fstat(fd).st_blocks > 0
    # some read (still swapped), some written (private), some still out
    assert np.array_equal(shared[0], dup) and np.array_equal(shared[1], dup)
    page(private[0], 3)[0] ^= 1
    shared[2][0] ^= 1
    assert int(private[1][5 * PAGE]) >= 1
    pool.free(private[2])  # explicitly, while swapped
    private[2] = None
    pool.free(shared[5])
    shared[5] = None
    st = pool.stats()
    # 134 swapped, less: 2 written, 16 + 1 freed (reads change nothing);
    # 129 slots, less the written private page's and the freed buffer's
    assert st["pages_swapped"] == 8 * 16 + 6 - 2 - 16 - 1
    assert st["swap_slots_used"] == 8 * 16 + 1 - 1 - 16
    del private, shared, ball
    gc.collect()
    st = pool.stats()
    assert st["swap_slots_used"] == 0, st["swap_slots_used"]
    assert st["pages_swapped"] == 0
    assert st["bytes_resident"] == 0
    assert st["memfd_bytes"] == 0
    assert st["pages_shared"] == 0 and st["pages_sharing"] == 0
    assert os.fstat(fd).st_blocks == 0, "freed slots still hold disk blocks"
    # and the slots are reused from the start: the file does not grow
    size = st["swap_file_bytes"]
    ball = ballast(pool)
    again = [pool.asarray(rand_pages(rng, 16)) for _ in range(4)]
    squeeze(pool)
    assert pool.stats()["swap_file_bytes"] == size
    assert pool.stats()["swap_slots_used"] == 64
    assert all((states(pool, a) == SWAPPED).all() for a in again)
    assert states(pool, ball)[0] == PRIVATE


# ---------------------------------------------- 7. full disks and failed writes


def _workload_with_errors(pool, rng, narr, npg):
    """Allocate and fill @narr arrays of @npg pages each under a budget the
    swap file cannot hold, a reclaim pass after each; return (arrays,
    shadows, warnings issued)."""
    arrs, shadows = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(narr):
            s = rand_pages(rng, npg)
            a = pool.empty(npg * PAGE, np.uint8)
            a[:] = s
            arrs.append(a)
            shadows.append(s)
            kswapd(pool)
    return arrs, shadows, [w for w in caught if issubclass(w.category, uksm.UksmSwapWarning)]


def _assert_nothing_lost(pool, arrs, shadows):
    for k, (a, s) in enumerate(zip(arrs, shadows)):
        assert np.array_equal(a, s), f"array {k} lost or zeroed data"
        # whole pages of zeroes would be a lost page: shadows have none
        assert not (a.reshape(-1, PAGE) == 0).all(axis=1).any()


def test_enospc_small_tmpfs_loses_nothing(swdir):
    mnt = os.path.join(swdir, "mnt")
    os.mkdir(mnt)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", mnt], capture_output=True, text=True
    )
    if r.returncode:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        budget = 1 * MiB
        pool = make_pool(mnt, max_resident=budget, batch="64KiB")
        try:
            arrs, shadows, warned = _workload_with_errors(pool, np.random.default_rng(21), 16, 64)
            st = pool.stats()
            assert st["swap_errors"] > 0
            assert st["last_swap_errno"] == errno.ENOSPC
            assert st["swap_slots_used"] <= 256  # 1 MiB of tmpfs
            # a tmpfs swap file is memory itself: it counts as resident
            assert st["bytes_swap_cached"] == st["swap_slots_used"] * PAGE
            assert st["bytes_private"] > budget, "eviction should have stopped"
            errors_in_fill = st["swap_errors"]
            _assert_nothing_lost(pool, arrs, shadows)
            time.sleep(0.25)  # past the core's retry backoff
            with pytest.warns(uksm.UksmSwapWarning):
                pool.max_resident = budget
            _assert_nothing_lost(pool, arrs, shadows)
            # room again: free most, and eviction works again
            del arrs[4:], shadows[4:]
            gc.collect()
            pool.max_resident = 256 * KiB
            st = pool.stats()
            assert st["bytes_private"] + st["bytes_frames"] <= 256 * KiB + 64 * KiB
            assert st["pages_swapped"] > 0
            _assert_nothing_lost(pool, arrs, shadows)
            del arrs
            gc.collect()
            assert pool.stats()["swap_slots_used"] == 0
            # the passes that hit the full disk must have said so
            assert warned, (
                "swap writes failed during the reclaim passes (swap_errors="
                f"{errors_in_fill}) but no UksmSwapWarning was issued"
            )
        finally:
            pool.close()
            del pool
            gc.collect()
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        os.rmdir(mnt)


def test_efbig_rlimit_fsize_loses_nothing(swdir):
    code = f"""
        import errno, gc, json, os, resource, signal, time, warnings
        import numpy as np
        import uksm
        PAGE = uksm.PAGE_SIZE
        assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
        pool = uksm.Pool("16MiB", max_resident="512KiB", swap_batch="64KiB",
                         swap_path={swdir!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, resource.RLIM_INFINITY))
        rng = np.random.default_rng(22)
        arrs, shadows = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(12):
                s = rng.integers(1, 256, 64 * PAGE, dtype=np.uint8)
                a = pool.empty(64 * PAGE, np.uint8)
                a[:] = s
                arrs.append(a); shadows.append(s)
                pool._reclaim()             # the scanner thread's kswapd pass
            pass_warned = sum(issubclass(w.category, uksm.UksmSwapWarning) for w in caught)
            st = pool.stats()
            ok1 = all(np.array_equal(a, s) for a, s in zip(arrs, shadows))
            time.sleep(0.25)                # past the core's retry backoff
            pool.max_resident = "512KiB"
            set_warned = sum(issubclass(w.category, uksm.UksmSwapWarning)
                             for w in caught) - pass_warned
        ok2 = all(np.array_equal(a, s) for a, s in zip(arrs, shadows))
        st2 = pool.stats()
        print(json.dumps(dict(errors=st["swap_errors"], errno=st["last_swap_errno"],
                              resident=st["bytes_resident"], file=st["swap_file_bytes"],
                              slots=st["swap_slots_used"], pass_warned=pass_warned,
                              set_warned=set_warned, ok1=ok1, ok2=ok2,
                              errors2=st2["swap_errors"])))
    """
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok1"] and out["ok2"], "data lost or zeroed after EFBIG"
    assert out["errors"] > 0 and out["errors2"] > out["errors"]
    assert out["errno"] == errno.EFBIG, out
    assert out["file"] <= 512 * KiB and out["slots"] <= 128
    assert out["resident"] > 512 * KiB
    assert out["pass_warned"] > 0, (
        "swap writes failed with EFBIG in the reclaim passes "
        f"but no UksmSwapWarning was issued: {out}"
    )
    assert out["set_warned"] > 0, f"lowering the budget onto a full file did not warn: {out}"


@pytest.mark.parametrize("cow", COWS)
def test_eio_injected_pwrite_loses_nothing(swdir, cow):
    budget, batch = 512 * KiB, 64 * KiB
    pool = make_pool(swdir, max_resident="8MiB", batch=batch, cow=cow)
    rng = np.random.default_rng(23)
    arrs, shadows = [], []
    for _ in range(8):  # 2 MiB, all resident
        s = rand_pages(rng, 64)
        arrs.append(pool.asarray(s))
        shadows.append(s)
    pool.scan(full_scans=2)
    before = pool.stats()
    _core.inject("pwrite", 0, -1, errno.EIO)
    try:
        with pytest.warns(uksm.UksmSwapWarning):
            pool.max_resident = budget
        st = pool.stats()
        assert _core.inject_hits("pwrite") > 0
        assert st["swap_errors"] > before["swap_errors"]
        assert st["last_swap_errno"] == errno.EIO
        assert st["swap_outs"] == before["swap_outs"] and st["pages_swapped"] == 0
        assert st["bytes_resident"] == 2 * MiB > budget
        assert not any((states(pool, a) == SWAPPED).any() for a in arrs)
        _assert_nothing_lost(pool, arrs, shadows)
        # more pressure while the disk is "broken": allocations, writes, passes
        time.sleep(0.25)  # past the core's retry backoff
        more, more_sh, warned = _workload_with_errors(pool, rng, 4, 32)
        arrs += more
        shadows += more_sh
        for a, s in zip(arrs, shadows):
            a[::4096] = 7
            s[::4096] = 7
        _assert_nothing_lost(pool, arrs, shadows)
        assert pool.stats()["swap_outs"] == before["swap_outs"]
    finally:
        _core.inject("pwrite", 0, 0, errno.EIO)  # fail=0: disarmed
    # healed: eviction works again, data intact
    time.sleep(0.25)
    pool.max_resident = "8MiB"
    pool.max_resident = budget
    st = pool.stats()
    assert st["swap_outs"] > before["swap_outs"]
    assert st["bytes_resident"] <= budget + batch
    _assert_nothing_lost(pool, arrs, shadows)
    assert warned, "swap writes failed (EIO) in the reclaim passes but no UksmSwapWarning"


def test_eio_in_the_middle_of_a_batch_keeps_the_written_part_safe(swdir):
    """The first writes succeed, a later one fails: what was swapped reads
    back, what was not stays resident."""
    pool = make_pool(swdir, max_resident="8MiB", batch="16KiB")  # 4-page batches
    rng = np.random.default_rng(24)
    shadows = [rand_pages(rng, 16) for _ in range(8)]
    arrs = [pool.asarray(s) for s in shadows]
    _core.inject("pwrite", 3, -1, errno.EIO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pool.max_resident = 64 * KiB
        assert any(issubclass(w.category, uksm.UksmSwapWarning) for w in caught)
        st = pool.stats()
        assert st["swap_errors"] >= 1 and st["last_swap_errno"] == errno.EIO
        assert 0 < st["swap_outs"] <= 3 * 4
        assert st["pages_swapped"] == st["swap_outs"]
        assert st["bytes_private"] == (8 * 16 - st["swap_outs"]) * PAGE
    finally:
        _core.inject("pwrite", 0, 0, errno.EIO)  # fail=0: disarmed
    _assert_nothing_lost(pool, arrs, shadows)


# ------------------------------------------------------------ 8. the file


def test_swap_file_is_private_nameless_and_in_swap_path(swdir):
    before = set(os.listdir(swdir))
    pool = make_pool(swdir)
    files = swap_files(swdir)
    assert len(files) == 1, files
    fds = next(iter(files.values()))
    for _fd, link in swap_fds(swdir):
        assert link.endswith("(deleted)"), link  # O_TMPFILE '#ino' or unlinked
        assert os.path.dirname(link.split(" (deleted)")[0]) == os.path.realpath(swdir)
    fd = fds[0]
    st = os.fstat(fd)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 0
    assert st.st_mode & 0o7777 == 0o600, oct(st.st_mode)
    assert st.st_uid == os.geteuid()
    assert st.st_dev == os.stat(swdir).st_dev
    assert set(os.listdir(swdir)) == before, "the swap file has a name"
    # it is the file the pool writes to: each slot holds its page's bytes
    ball = ballast(pool)
    a = pool.full(8 * PAGE, 0x42, dtype=np.uint8)
    a.reshape(8, PAGE)[:, 0] = np.arange(1, 9)
    squeeze(pool)
    _, slot, _ = info(pool, a)
    assert len(set(slot.tolist())) == 8
    assert os.fstat(fd).st_size >= (int(slot.max()) + 1) * PAGE
    assert os.fstat(fd).st_size >= pool.stats()["swap_file_bytes"] >= 8 * PAGE
    for i in range(8):
        assert os.pread(fd, PAGE, int(slot[i]) * PAGE) == page(a, i).tobytes()
    assert os.fstat(fd).st_mode & 0o7777 == 0o600
    assert set(os.listdir(swdir)) == before
    # closing the pool closes the file once the arrays are gone
    pool.close()
    del a, ball, pool
    gc.collect()
    assert swap_fds(swdir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_swap_file_is_not_readable_by_another_user(swdir):
    """Swapped pages hold the program's data: another user gets at the swap
    file neither by name (it has none) nor through /proc/<pid>/fd."""
    pool = make_pool(swdir)
    ball = ballast(pool)
    a = pool.full(4 * PAGE, 0x6B, dtype=np.uint8)
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    paths = [f"/proc/{os.getpid()}/fd/{fd}" for fd, _ in swap_fds(swdir)]
    assert paths
    code = f"""
        import os, sys
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        for p in {paths!r}:
            try:
                os.open(p, os.O_RDONLY)
            except PermissionError:
                continue
            print("READABLE", p)
            sys.exit(1)
        print("ok")
    """
    r = run_py(code)
    assert r.returncode == 0 and "ok" in r.stdout, (r.stdout, r.stderr)
    assert (a == 0x6B).all() and ball[0] == 0xB1


def test_swap_path_file_name_and_default_directory(swdir):
    target = os.path.join(swdir, "swapfile")
    pool = make_pool(target)  # a path in a directory: that directory
    assert len(swap_files(swdir)) == 1 and not os.path.exists(target)
    pool.close()
    del pool
    gc.collect()
    tmp = tempfile.gettempdir()
    before = {fd for fd, _ in swap_fds(tmp)}
    p2 = uksm.Pool("4MiB", max_resident="1MiB")
    new = [(fd, link) for fd, link in swap_fds(tmp) if fd not in before]
    new = [
        (fd, link)
        for fd, link in new
        if link.endswith("(deleted)") and not link.startswith("/memfd:")
    ]
    inodes = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd, _ in new}
    assert len(inodes) == 1, new
    assert all(os.fstat(fd).st_mode & 0o777 == 0o600 for fd, _ in new)
    p2.close()


# --------------------------------------------- 9. syscalls and swapped pages


@pytest.mark.parametrize("cow", COWS)
def test_syscalls_on_swapped_pages(swdir, cow):
    """The kernel reads swapped pages like any file-backed memory (write(2),
    np.save, tofile), without bringing them in.  Its writes into them
    (readinto) copy them like the program's own writes with cow='kernel',
    and fail with EFAULT, changing nothing, with cow='signal' (read-only
    views: pin() first)."""
    pool = make_pool(swdir, cow=cow)
    ball = ballast(pool)
    data = rand_pages(np.random.default_rng(31), 16)
    a = pool.asarray(data)
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    out = os.path.join(swdir, "out.bin")

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        assert os.write(fd, a) == a.nbytes
    finally:
        os.close(fd)
    with open(out, "ab") as f:
        a.tofile(f)
    npy = os.path.join(swdir, "out.npy")
    np.save(npy, a)
    got = np.fromfile(out, np.uint8)
    assert np.array_equal(got[: a.nbytes], data) and np.array_equal(got[a.nbytes :], data)
    assert np.array_equal(np.load(npy), data)
    assert (states(pool, a) == SWAPPED).all(), "kernel reads brought pages in"
    assert pool.stats()["swap_ins"] == 0

    new = rand_pages(np.random.default_rng(32), 16)
    new.tofile(out)
    ins = pool.stats()["swap_ins"]
    with open(out, "rb", buffering=0) as f:
        if cow == "kernel":
            assert f.readinto(a) == a.nbytes
        else:
            with pytest.raises(OSError) as ei:
                f.readinto(a)
            assert ei.value.errno == errno.EFAULT
    if cow == "kernel":
        assert np.array_equal(a, new)
        assert (states(pool, a) == PRIVATE).all()
        assert pool.stats()["swap_ins"] - ins == 16
    else:
        assert np.array_equal(a, data), "a failed readinto changed the buffer"
        assert (states(pool, a) == SWAPPED).all()
        # inside pin(): private and writable, for the kernel too
        with pool.pin(a):
            assert (states(pool, a) == PRIVATE).all()
            with open(out, "rb", buffering=0) as f:
                assert f.readinto(a) == a.nbytes
        assert np.array_equal(a, new)

    # a pinned buffer stays in through a squeeze
    with pool.pin(a):
        pool.max_resident = "8MiB"
        squeeze(pool)
        assert (states(pool, a) == PRIVATE).all()
    pool.max_resident = "8MiB"
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    assert np.array_equal(a, new)
    assert ball[0] == 0xB1


@pytest.mark.parametrize("cow", COWS)
def test_pin_of_merged_and_swapped_buffer_for_readinto(swdir, cow):
    """A buffer whose pages are merged and swapped (one slot for all):
    pin makes each page private and writable, readinto lands there, and
    the other sharers keep their data."""
    pool = make_pool(swdir, cow=cow)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(33), 1)
    same = np.tile(content, 8)
    a, b = pool.asarray(same), pool.asarray(same)
    pool.scan(full_scans=2)
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all() and (states(pool, b) == SWAPPED).all()
    src = rand_pages(np.random.default_rng(34), 8)
    path = os.path.join(swdir, "in.bin")
    src.tofile(path)
    with pool.pin(a):
        assert (states(pool, a) == PRIVATE).all()
        with open(path, "rb", buffering=0) as f:
            assert f.readinto(a) == a.nbytes
    assert np.array_equal(a, src)
    assert np.array_equal(b, same)
    pool.max_resident = "8MiB"
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    assert np.array_equal(a, src) and np.array_equal(b, same)
    assert ball[0] == 0xB1


# ------------------------------------------------------------- 10. fork

FORK_CHILD = """
    import gc, os, sys
    import numpy as np
    import uksm
    PAGE = uksm.PAGE_SIZE
    swdir = sys.argv[1]
    rng = np.random.default_rng(41)
    pool = uksm.Pool("32MiB", max_resident="8MiB", swap_batch="64KiB", swap_path=swdir,
                     cow=sys.argv[2])
    ball = pool.full(PAGE, 0xB1, dtype=np.uint8)
    pool.lock(ball)
    dup = rng.integers(1, 256, PAGE, dtype=np.uint8)
    shadows = [rng.integers(1, 256, 32 * PAGE, dtype=np.uint8) for _ in range(8)]
    shadows += [np.tile(dup, 4) for _ in range(4)]
    arrs = [pool.asarray(s) for s in shadows]
    pool.scan(full_scans=2)
    pool.max_resident = PAGE
    assert all((pool.page_states(a)[0] == uksm.PageState.SWAPPED).all() for a in arrs)
    # half of one array written, so the parent has private and swapped pages
    arrs[0][:16 * PAGE:PAGE] ^= 1
    shadows[0][:16 * PAGE:PAGE] ^= 1
    assert np.array_equal(arrs[0], shadows[0])
    parent_stats = pool.stats()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        msg = "ok"
        try:
            for k, (a, s) in enumerate(zip(arrs, shadows)):
                if not np.array_equal(a, s):
                    msg = f"child read wrong data in array {k}"
                    break
            else:
                crng = np.random.default_rng(99)
                for a in arrs:                      # write everything, differently
                    a[:] = crng.integers(1, 256, a.size, dtype=np.uint8)
                mine = [np.array(a) for a in arrs]
                pool.max_resident = "8MiB"
                pool.max_resident = PAGE            # swap out the child's data
                st = pool.stats()
                if st["swap_outs"] <= parent_stats["swap_outs"]:
                    msg = f"child did not swap: {st}"
                del arrs[3]; del mine[3]            # frees slots in the child
                gc.collect()
                extra = [pool.asarray(crng.integers(1, 256, 32 * PAGE, dtype=np.uint8))
                         for _ in range(4)]
                pool.max_resident = "8MiB"
                pool.max_resident = PAGE            # reuses the freed slots
                for k, (a, s) in enumerate(zip(arrs, mine)):
                    if not np.array_equal(a, s):
                        msg = f"child lost its own write in array {k}"
        except BaseException as e:
            msg = f"child raised {e!r}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
    _, status = os.waitpid(pid, 0)
    print("CHILD", msg.decode(), status, flush=True)
    after = pool.stats()
    for key in ("swap_outs", "swap_ins", "pages_swapped", "swap_slots_used", "swap_errors"):
        assert after[key] == parent_stats[key], (key, after[key], parent_stats[key])
    for k, (a, s) in enumerate(zip(arrs, shadows)):
        assert np.array_equal(a, s), f"parent array {k} changed by the child"
    print("PARENT ok", flush=True)
"""


@pytest.mark.parametrize("cow", COWS)
def test_fork_child_has_its_own_swap(swdir, cow):
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FORK_CHILD), swdir, cow],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "CHILD ok 0" in r.stdout, (r.stdout, r.stderr)
    assert r.returncode == 0 and "PARENT ok" in r.stdout, (r.returncode, r.stdout, r.stderr)
