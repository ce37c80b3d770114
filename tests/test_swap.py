"""The swap area (issue 3): shared pages swappable under a resident budget.

Real files and real faults throughout: every pool swaps to a file of its own
in a temporary directory, pages go out through the clock (reference hints,
then eviction) and come back through the SIGSEGV handler; full disks are a
real 1 MiB tmpfs and a real RLIMIT_FSIZE, a failed write is the core's own
fault-injection hook, a corrupted slot is a byte really flipped in the swap
file.  Every data check compares against numpy shadow copies held outside
the pool.  Tests that may (rightly) kill their process - a checksum failure,
fork - run in a subprocess.

Forcing eviction: ``pool.max_resident = <smaller>`` reclaims at once (two
revolutions of the clock: hint, then evict).  A locked one-page "ballast"
takes the single frame a budget of one page leaves, so that squeezing the
budget to one page evicts every other evictable page.
"""
import errno
import gc
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

import numpy as np
import pytest

import uksm
from uksm import _core

PAGE = uksm.PAGE_SIZE
NORMAL, KSM, ZERO, SWAPPED = 1, 2, 3, 4
KiB, MiB = 1 << 10, 1 << 20


# --------------------------------------------------------------------------- helpers

def make_pool(directory, capacity="16MiB", max_resident="8MiB", batch="64KiB", **kw):
    return uksm.Pool(capacity, max_resident=max_resident, swap_path=str(directory),
                     swap_batch=batch, pages_to_scan=1000, sleep_millisecs=0, **kw)


@pytest.fixture
def swdir():
    d = tempfile.mkdtemp(prefix="uksm-swaptest-")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def page(a, i):
    return a.view(np.uint8).reshape(-1)[i * PAGE:(i + 1) * PAGE]


def states(pool, a):
    return pool.page_states(a)[0]


def info(pool, a):
    s, pfn, mc = pool.page_states(a)
    return s.copy(), pfn.copy(), mc.copy()


def swap_fds(directory):
    """fds of this process open on a nameless file in @directory (the swap
    file): its /proc link is '<dir>/#<ino> (deleted)' or '<dir>/name (deleted)'."""
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


def the_swap_fd(directory):
    fds = swap_fds(directory)
    assert len(fds) == 1, f"expected one swap file in {directory}, found {fds}"
    return fds[0][0]


def ballast(pool):
    """A locked page: with max_resident one page, everything else must go."""
    b = pool.full(PAGE, 0xB1, dtype=np.uint8)
    pool.lock(b)
    return b


def squeeze(pool):
    """Evict everything evictable (a ballast page takes the one frame left)."""
    pool.max_resident = PAGE


def rand_pages(rng, n):
    # never an all-zero page: use_zero_pages would merge it with the zero page
    return rng.integers(1, 256, n * PAGE, dtype=np.uint8)


def run_py(code, timeout=60, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_within_budget(pool, budget, batch, where):
    st = pool.stats()
    memfd = os.fstat(pool.fd).st_blocks * 512
    assert st["bytes_resident"] <= budget + batch, (where, st["bytes_resident"], budget, batch)
    assert memfd <= budget + batch, (where, "memfd blocks", memfd, budget, batch)


# ---------------------------------------------------- 1. four times the budget

def test_workload_four_times_budget_shadow_and_residency(swdir):
    budget, batch = 1 * MiB, 128 * KiB
    pool = make_pool(swdir, capacity="32MiB", max_resident=budget, batch=batch)
    rng = np.random.default_rng(1234)
    narr, npg = 32, 32                      # 32 x 128 KiB = 4 MiB = 4 x budget
    popular = [rand_pages(rng, 1) for _ in range(6)]
    arrs, shadows = [], []

    def check_all(where):
        for k, (a, s) in enumerate(zip(arrs, shadows)):
            assert np.array_equal(a, s), f"{where}: array {k} differs from its shadow"
        assert_within_budget(pool, budget, batch, where)

    # phase 1: allocate and fill, a quarter of the pages duplicates of a few
    for k in range(narr):
        s = rand_pages(rng, npg)
        for j in range(0, npg, 4):
            s[j * PAGE:(j + 1) * PAGE] = popular[rng.integers(len(popular))]
        a = pool.empty(npg * PAGE, np.uint8)
        a[:] = s
        arrs.append(a)
        shadows.append(s)
        assert_within_budget(pool, budget, batch, f"after allocating array {k}")
    st = pool.stats()
    assert st["swap_outs"] >= (narr * npg * PAGE - budget - batch) // PAGE
    assert st["pages_swapped"] > 0 and st["swap_slots_used"] > 0
    assert st["swap_errors"] == 0
    check_all("after fill")

    # phase 2: merge what is resident
    st = pool.scan(full_scans=2)
    assert st["pages_sharing"] > 0, "no duplicate page merged"
    check_all("after merge")

    # phase 3: random reads, page-wise and element-wise
    for _ in range(3):
        for _ in range(400):
            k, j = int(rng.integers(narr)), int(rng.integers(npg))
            assert np.array_equal(page(arrs[k], j), page(shadows[k], j)), (k, j)
        idx = rng.integers(0, npg * PAGE, 200)
        for k in rng.integers(0, narr, 8):
            assert np.array_equal(arrs[k][idx], shadows[k][idx])
        assert_within_budget(pool, budget, batch, "after random reads")

    # phase 4: random writes (swapped, merged and private pages alike)
    for _ in range(3):
        for _ in range(300):
            k, j = int(rng.integers(narr)), int(rng.integers(npg))
            off = j * PAGE + int(rng.integers(PAGE - 64))
            v = rng.integers(1, 256, 64, dtype=np.uint8)
            arrs[k][off:off + 64] = v
            shadows[k][off:off + 64] = v
        for _ in range(20):     # whole pages made duplicates again
            k, j = int(rng.integers(narr)), int(rng.integers(npg))
            p = popular[rng.integers(len(popular))]
            page(arrs[k], j)[:] = p
            page(shadows[k], j)[:] = p
        assert_within_budget(pool, budget, batch, "after random writes")
    check_all("after random writes")

    # phase 5: merge again, squeeze the budget, then read it all back twice
    pool.scan(full_scans=2)
    check_all("after second merge")
    pool.max_resident = budget // 2
    assert_within_budget(pool, budget // 2, batch, "after lowering the budget")
    budget //= 2
    check_all("after lowering the budget")
    pool.max_resident = budget * 2
    budget *= 2
    check_all("after raising the budget")
    st = pool.stats()
    assert st["swap_ins"] > 0 and st["swap_errors"] == 0
    assert st["pages_swapped"] == int(sum((states(pool, a) == SWAPPED).sum() for a in arrs))


# ------------------------------------------ 2. a shared frame: one slot, one write

@pytest.mark.parametrize("nmappers", [2, 8, 40])
def test_shared_frame_one_slot_one_write_and_swap_cache(swdir, nmappers):
    pool = make_pool(swdir)
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
        s, slot, _ = info(pool, a)
        assert s[0] == SWAPPED
        slots.add(int(slot[0]))
    assert len(slots) == 1, f"mappers of one frame on several slots: {slots}"
    assert after["swap_slots_used"] == 1
    assert after["pages_swapped"] == nmappers
    assert after["bytes_resident"] == PAGE            # the ballast only
    assert after["pages_shared"] == 0 and after["pages_sharing"] == 0
    assert states(pool, ball)[0] == NORMAL

    # touch (read) every mapper: one read from the file, the rest from the cache
    for a in arrs:
        assert np.array_equal(a, content)
    back = [info(pool, a) for a in arrs]
    assert all(s[0][0] == KSM for s in back), [int(s[0][0]) for s in back]
    assert len({int(s[1][0]) for s in back}) == 1, "sharing did not survive swapping"
    assert all(int(s[2][0]) == nmappers for s in back)
    st = pool.stats()
    assert st["swap_ins"] - after["swap_ins"] == 1
    assert st["swap_cache_hits"] - after["swap_cache_hits"] == nmappers - 1
    assert st["swap_slots_used"] == 0 and st["pages_swapped"] == 0
    assert st["pages_shared"] == 1 and st["pages_sharing"] == nmappers - 1
    assert st["bytes_resident"] == 2 * PAGE

    # a write after swap-in is an ordinary COW break; the others stay shared
    arrs[0][7] ^= 0xFF
    assert states(pool, arrs[0])[0] == NORMAL
    assert arrs[0][7] == content[7] ^ 0xFF and np.array_equal(arrs[0][8:], content[8:])
    for a in arrs[1:]:
        assert np.array_equal(a, content)
    if nmappers > 2:
        rest = [info(pool, a) for a in arrs[1:]]
        assert all(int(s[2][0]) == nmappers - 1 and s[0][0] == KSM for s in rest)


def test_first_touches_of_a_swapped_shared_page_are_writes(swdir):
    """Writes to a swapped shared page: each writer gets its own COW copy,
    the other mappers still share one swapped-in frame, and the slot is
    read from the file once (the swap cache serves the rest, as the
    kernel's does: a write fault on a page in the swap cache with other
    swap references copies it and leaves the cached page to them)."""
    pool = make_pool(swdir)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(4), 1)
    arrs = [pool.asarray(content) for _ in range(5)]
    pool.scan(full_scans=2)
    squeeze(pool)
    assert all(states(pool, a)[0] == SWAPPED for a in arrs)
    for k in (2, 4):                                # two writers touch first
        arrs[k][100 + k] = content[100 + k] ^ 0x55
    for k in (2, 4):
        assert states(pool, arrs[k])[0] == NORMAL
        expect = content.copy()
        expect[100 + k] ^= 0x55
        assert np.array_equal(arrs[k], expect)
    readers = [arrs[0], arrs[1], arrs[3]]
    for a in readers:
        assert np.array_equal(a, content)
    rest = [info(pool, a) for a in readers]
    assert all(s[0][0] == KSM and int(s[2][0]) == 3 for s in rest)
    assert len({int(s[1][0]) for s in rest}) == 1
    st = pool.stats()
    assert st["swap_outs"] == 1
    assert st["bytes_resident"] == 4 * PAGE and st["swap_slots_used"] == 0
    assert ball[0] == 0xB1
    assert st["swap_ins"] == 1, (
        f"the slot of one shared frame was read {st['swap_ins']} times: the first "
        "writer's COW break reused (took over) the swap-cache frame, so the next "
        f"mapper missed the cache (swap_cache_hits={st['swap_cache_hits']})")


def test_swap_cache_survives_a_partial_swap_in_and_a_second_eviction(swdir):
    """Some mappers swapped in, then the cached frame evicted again: the
    remaining mappers still read the right data, from one slot."""
    pool = make_pool(swdir)
    ball = ballast(pool)
    content = rand_pages(np.random.default_rng(5), 1)
    arrs = [pool.asarray(content) for _ in range(6)]
    pool.scan(full_scans=2)
    squeeze(pool)
    for a in arrs[:3]:
        assert np.array_equal(a, content)
    st = pool.stats()
    assert st["swap_cache_hits"] == 2 and st["swap_slots_used"] == 1
    pool.max_resident = "8MiB"
    squeeze(pool)           # the cached frame (3 mappers) goes out again
    assert all(states(pool, a)[0] == SWAPPED for a in arrs)
    for a in arrs:
        assert np.array_equal(a, content)
    assert len({int(pool.page_states(a)[1][0]) for a in arrs}) <= 2
    del ball
    del arrs
    gc.collect()
    st = pool.stats()
    assert st["swap_slots_used"] == 0 and st["pages_swapped"] == 0


def test_background_scanner_swaps_while_a_thread_writes(swdir):
    """kswapd: the scanner thread merges and reclaims while the test thread
    reads and writes at random; the shadows agree throughout."""
    budget, batch = 512 * KiB, 64 * KiB
    pool = make_pool(swdir, max_resident="16MiB", batch=batch)
    rng = np.random.default_rng(77)
    popular = [rand_pages(rng, 1) for _ in range(4)]
    shadows = []
    for _ in range(8):
        s = rand_pages(rng, 64)
        for j in range(0, 64, 3):
            s[j * PAGE:(j + 1) * PAGE] = popular[j % 4]
        shadows.append(s)
    arrs = [pool.asarray(s) for s in shadows]       # 2 MiB, 4 x the budget below
    pool.max_resident = budget
    pool.start()
    try:
        end = time.monotonic() + 1.5
        rounds = 0
        while time.monotonic() < end or rounds < 3:
            for _ in range(200):
                k, j = int(rng.integers(8)), int(rng.integers(64))
                if rng.integers(2):
                    off = j * PAGE + int(rng.integers(PAGE - 8))
                    v = rng.integers(1, 256, 8, dtype=np.uint8)
                    arrs[k][off:off + 8] = v
                    shadows[k][off:off + 8] = v
                else:
                    assert np.array_equal(page(arrs[k], j), page(shadows[k], j)), (k, j)
            rounds += 1
        pool.stop()
        for k, (a, s) in enumerate(zip(arrs, shadows)):
            assert np.array_equal(a, s), k
    finally:
        pool.stop()
    st = pool.stats()
    assert st["swap_outs"] > 0 and st["swap_ins"] > 0 and st["swap_errors"] == 0
    assert st["full_scans"] > 0


# --------------------------------------------------------------- 3. mlock

def test_locked_pages_never_leave_memory(swdir):
    budget, batch = 512 * KiB, 64 * KiB
    pool = make_pool(swdir, max_resident=budget, batch=batch)
    rng = np.random.default_rng(3)
    lk_data = rand_pages(rng, 32)
    locked = pool.asarray(lk_data)
    pool.lock(locked)
    others, shadows = [], []
    for _ in range(16):                     # 2 MiB through a 512 KiB budget
        s = rand_pages(rng, 32)
        others.append(pool.asarray(s))
        shadows.append(s)
        assert not (states(pool, locked) == SWAPPED).any()
    assert pool.stats()["swap_outs"] > 0
    squeeze(pool)
    assert (states(pool, locked) == NORMAL).all()
    assert all((states(pool, a) == SWAPPED).all() for a in others)
    assert pool.stats()["bytes_resident"] == locked.nbytes
    for a, s in zip(others, shadows):       # pressure from swap-ins too
        assert np.array_equal(a, s)
        assert not (states(pool, locked) == SWAPPED).any()
    assert np.array_equal(locked, lk_data)

    # locking a swapped buffer brings it in
    pool.lock(others[0])
    assert (states(pool, others[0]) == NORMAL).all()
    squeeze(pool)
    assert (states(pool, others[0]) == NORMAL).all()
    pool.unlock(others[0])

    # a pin inside a lock ends without ending the lock
    with pool.pin(locked):
        pass
    pool.max_resident = budget
    squeeze(pool)
    assert (states(pool, locked) == NORMAL).all(), "unpinning unlocked the buffer"

    # unlocked, they may go
    pool.unlock(locked)
    b = ballast(pool)
    pool.max_resident = budget
    squeeze(pool)
    assert (states(pool, locked) == SWAPPED).all()
    assert (states(pool, b) == NORMAL).all()
    assert np.array_equal(locked, lk_data)


def test_locked_merged_page_keeps_shared_frame_resident(swdir):
    pool = make_pool(swdir)
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
    assert states(pool, ball)[0] == NORMAL


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
    assert states(pool, ball)[0] == NORMAL


# --------------------------------------------------------------- 4. groups

def test_group_limit_swaps_its_own_pages_only(swdir):
    glimit, batch = 256 * KiB, 64 * KiB
    pool = make_pool(swdir, capacity="32MiB", max_resident="16MiB", batch=batch)
    rng = np.random.default_rng(11)
    other_data = rand_pages(rng, 256)
    other = pool.asarray(other_data)                # 1 MiB, default group
    g = pool.group("g", max_resident=glimit)
    h = pool.group("h")                             # no limit of its own
    h_data = rand_pages(rng, 64)
    harr = h.asarray(h_data)
    garrs, gsh = [], []
    for _ in range(8):                              # 1 MiB through 256 KiB
        s = rand_pages(rng, 32)
        garrs.append(g.asarray(s))
        gsh.append(s)
        gs = g.stats()
        assert gs["bytes_resident"] <= glimit + batch, gs
    assert g.stats()["pages_swapped"] > 0
    for a, s in zip(garrs, gsh):                    # swap-ins, and direct reclaim
        assert np.array_equal(a, s)
        assert g.stats()["bytes_resident"] <= glimit + batch
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


def test_group_charging_of_cow_breaks_and_swap_ins(swdir):
    pool = make_pool(swdir)
    ball = ballast(pool)
    g1, g2 = pool.group("g1"), pool.group("g2")
    content = rand_pages(np.random.default_rng(12), 4)
    same = np.tile(content[:PAGE], 4)               # 4 identical pages
    a1 = g1.asarray(same)
    a2 = g2.asarray(same)
    assert g1.stats()["bytes_resident"] == 4 * PAGE
    assert g2.stats()["bytes_resident"] == 4 * PAGE
    pool.scan(full_scans=2)
    assert (states(pool, a1) == KSM).all() and (states(pool, a2) == KSM).all()
    r1, r2 = g1.stats()["bytes_resident"], g2.stats()["bytes_resident"]
    assert r1 + r2 == PAGE, (r1, r2)                # one frame for eight pages

    # COW breaks: charged to the group that wrote
    page(a2, 0)[0] ^= 1
    page(a2, 3)[9] ^= 1
    assert g2.stats()["bytes_resident"] - r2 == 2 * PAGE
    assert g1.stats()["bytes_resident"] == r1

    # swap-in: the frame is charged to the group that faulted first
    squeeze(pool)
    assert (states(pool, a1) == SWAPPED).all() and (states(pool, a2) == SWAPPED).all()
    assert g1.stats()["bytes_resident"] == 0 and g2.stats()["bytes_resident"] == 0
    assert g1.stats()["pages_swapped"] == 4 and g2.stats()["pages_swapped"] == 4
    ins1, ins2 = g1.stats()["swap_ins"], g2.stats()["swap_ins"]
    assert int(a2[PAGE + 5]) == same[PAGE + 5]      # a2's page 1: shared slot
    assert g2.stats()["bytes_resident"] == PAGE and g2.stats()["swap_ins"] == ins2 + 1
    assert g1.stats()["bytes_resident"] == 0 and g1.stats()["swap_ins"] == ins1
    assert np.array_equal(page(a1, 1), page(same, 1))   # the swap cache: no new frame
    assert g1.stats()["bytes_resident"] == 0
    assert int(pool.page_states(a1)[1][1]) == int(pool.page_states(a2)[1][1])
    # a2's COW-broken page 0 has a slot of its own: a swap-in charged to g2
    assert page(a2, 0)[0] == same[0] ^ 1
    assert g2.stats()["bytes_resident"] == 2 * PAGE and g2.stats()["swap_ins"] == ins2 + 2
    assert g1.stats()["bytes_resident"] == 0
    # a COW break of a swapped-in shared frame is charged to the writer too
    page(a1, 1)[0] ^= 1
    assert g1.stats()["bytes_resident"] == PAGE
    expect = same.copy()
    expect[0] ^= 1
    expect[3 * PAGE + 9] ^= 1
    assert np.array_equal(a2, expect)
    expect1 = same.copy()
    expect1[PAGE] ^= 1
    assert np.array_equal(a1, expect1)
    assert ball[0] == 0xB1


# ------------------------------------------------ 5. freed while swapped

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
    # some in again (partly through the swap cache), some still out
    assert np.array_equal(shared[0], dup) and np.array_equal(shared[1], dup)
    page(private[0], 3)[0] ^= 1
    assert int(private[1][5 * PAGE]) >= 1
    pool.free(private[2])                   # explicitly, while swapped
    private[2] = None
    pool.free(shared[5])
    shared[5] = None
    st = pool.stats()
    # 134 swapped, less: 2 shared read, 2 private touched, 16 + 1 freed
    assert st["pages_swapped"] == 8 * 16 + 6 - 2 - 2 - 16 - 1
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
    assert states(pool, ball)[0] == NORMAL


# ---------------------------------------------- 6. full disks and failed writes

def _workload_with_errors(pool, rng, narr, npg):
    """Allocate and fill @narr arrays of @npg pages each under a budget the
    swap file cannot hold; return (arrays, shadows, warnings issued)."""
    arrs, shadows = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(narr):
            s = rand_pages(rng, npg)
            a = pool.empty(npg * PAGE, np.uint8)
            a[:] = s
            arrs.append(a)
            shadows.append(s)
    return arrs, shadows, [w for w in caught if issubclass(w.category, uksm.UksmSwapWarning)]


def _assert_nothing_lost(pool, arrs, shadows):
    for k, (a, s) in enumerate(zip(arrs, shadows)):
        assert np.array_equal(a, s), f"array {k} lost or zeroed data"
        # whole pages of zeroes would be a lost page: shadows have none
        assert not (a.reshape(-1, PAGE) == 0).all(axis=1).any()


def test_enospc_small_tmpfs_loses_nothing(swdir):
    mnt = os.path.join(swdir, "mnt")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", mnt],
                       capture_output=True, text=True)
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
            assert st["swap_slots_used"] <= 256          # 1 MiB of tmpfs
            assert st["bytes_resident"] > budget, "eviction should have stopped"
            errors_in_alloc = st["swap_errors"]
            _assert_nothing_lost(pool, arrs, shadows)
            with pytest.warns(uksm.UksmSwapWarning):
                pool.max_resident = budget
            _assert_nothing_lost(pool, arrs, shadows)
            # room again: free most, and eviction works again
            del arrs[4:], shadows[4:]
            gc.collect()
            pool.max_resident = 256 * KiB
            st = pool.stats()
            assert st["bytes_resident"] <= 256 * KiB + 64 * KiB
            _assert_nothing_lost(pool, arrs, shadows)
            del arrs
            gc.collect()
            assert pool.stats()["swap_slots_used"] == 0
            # the allocations that hit the full disk must have said so
            assert warned, ("swap writes failed during allocation (swap_errors="
                            f"{errors_in_alloc}) but no UksmSwapWarning was issued")
        finally:
            pool.close()
            del pool
            gc.collect()
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        os.rmdir(mnt)


def test_efbig_rlimit_fsize_loses_nothing(swdir):
    code = f"""
        import errno, gc, json, os, resource, signal, warnings
        import numpy as np
        import uksm
        PAGE = uksm.PAGE_SIZE
        assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
        pool = uksm.Pool("16MiB", max_resident="512KiB", swap_batch="64KiB",
                         swap_path={swdir!r})
        # the limit binds the pool's memfd too: grow it first, then limit
        big = pool.empty(16 * 64 * PAGE, np.uint8)
        pool.free(big)
        del big
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
            alloc_warned = sum(issubclass(w.category, uksm.UksmSwapWarning) for w in caught)
            st = pool.stats()
            ok1 = all(np.array_equal(a, s) for a, s in zip(arrs, shadows))
            pool.max_resident = "512KiB"
            set_warned = sum(issubclass(w.category, uksm.UksmSwapWarning) for w in caught)
        ok2 = all(np.array_equal(a, s) for a, s in zip(arrs, shadows))
        st2 = pool.stats()
        print(json.dumps(dict(errors=st["swap_errors"], errno=st["last_swap_errno"],
                              resident=st["bytes_resident"], file=st["swap_file_bytes"],
                              slots=st["swap_slots_used"], alloc_warned=alloc_warned,
                              set_warned=set_warned, ok1=ok1, ok2=ok2,
                              errors2=st2["swap_errors"])))
    """
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok1"] and out["ok2"], "data lost or zeroed after EFBIG"
    assert out["errors"] > 0 and out["errors2"] >= out["errors"]
    assert out["errno"] == errno.EFBIG, out
    assert out["file"] <= 512 * KiB and out["slots"] <= 128
    assert out["resident"] > 512 * KiB
    assert out["set_warned"] > 0
    assert out["alloc_warned"] > 0, ("swap writes failed with EFBIG during allocation "
                                     f"but no UksmSwapWarning was issued: {out}")


def test_eio_injected_pwrite_loses_nothing(swdir):
    budget, batch = 512 * KiB, 64 * KiB
    pool = make_pool(swdir, max_resident="8MiB", batch=batch)
    rng = np.random.default_rng(23)
    arrs, shadows = [], []
    for _ in range(8):                              # 2 MiB, all resident
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
        # more pressure while the disk is "broken": allocations and writes
        more, more_sh, warned = _workload_with_errors(pool, rng, 4, 32)
        arrs += more
        shadows += more_sh
        for a, s in zip(arrs, shadows):
            a[::4096] = 7
            s[::4096] = 7
        _assert_nothing_lost(pool, arrs, shadows)
        assert pool.stats()["swap_outs"] == before["swap_outs"]
    finally:
        _core.inject("pwrite", 0, 0, errno.EIO)     # fail=0: disarmed
    # healed: eviction works again, data intact
    pool.max_resident = "8MiB"
    pool.max_resident = budget
    st = pool.stats()
    assert st["swap_outs"] > before["swap_outs"]
    assert st["bytes_resident"] <= budget + batch
    _assert_nothing_lost(pool, arrs, shadows)
    assert warned, "swap writes failed (EIO) during allocation but no UksmSwapWarning"


def test_eio_in_the_middle_of_a_batch_keeps_the_written_part_safe(swdir):
    """The first writes succeed, a later one fails: what was swapped reads
    back, what was not stays resident."""
    pool = make_pool(swdir, max_resident="8MiB", batch="16KiB")     # 4-page batches
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
    finally:
        _core.inject("pwrite", 0, 0, errno.EIO)     # fail=0: disarmed
    _assert_nothing_lost(pool, arrs, shadows)


# --------------------------------------------- 7. a flipped byte in the swap file

CORRUPT_CHILD = """
    import os, sys
    import numpy as np
    import uksm
    PAGE = uksm.PAGE_SIZE
    swdir = sys.argv[1]
    shared = sys.argv[2] == "shared"
    pool = uksm.Pool("16MiB", max_resident="8MiB", swap_path=swdir)
    ball = pool.full(PAGE, 0xB1, dtype=np.uint8)
    pool.lock(ball)
    arrs = [pool.full(PAGE, 0x5A, dtype=np.uint8) for _ in range(3 if shared else 1)]
    if shared:
        pool.scan(full_scans=2)
    pool.max_resident = PAGE
    state, slot, _ = pool.page_states(arrs[0])
    assert state[0] == 4, state
    prefix = os.path.realpath(swdir) + "/"
    fds = []
    for n in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + n).startswith(prefix):
                fds.append(int(n))
        except OSError:
            pass
    assert len(fds) == 1, fds
    off = int(slot[0]) * PAGE + 1234
    b = os.pread(fds[0], 1, off)
    assert b == bytes([0x5A]), b
    os.pwrite(fds[0], bytes([0x5A ^ 0x01]), off)
    print("corrupted", flush=True)
    v = arrs[-1][1234]          # the touch: must not return
    print("READ", int(v), int(arrs[-1].sum()), flush=True)
"""


@pytest.mark.parametrize("kind", ["private", "shared"])
def test_flipped_byte_in_swap_file_is_fatal_not_wrong_data(swdir, kind):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CORRUPT_CHILD), swdir, kind],
                       capture_output=True, text=True, timeout=60)
    assert "corrupted" in r.stdout, (r.stdout, r.stderr)
    assert "READ" not in r.stdout, f"wrong data returned: {r.stdout!r}"
    assert r.returncode == -6, (r.returncode, r.stderr)     # SIGABRT
    assert "uksm: fatal" in r.stderr and "checksum" in r.stderr, r.stderr


def test_intact_slots_read_back_after_another_slot_is_corrupted(swdir):
    """Corruption is per slot: untouched corrupted slots do not harm others
    (and an in-process check that the checksum is not over-eager)."""
    pool = make_pool(swdir)
    ball = ballast(pool)
    a = pool.full(4 * PAGE, 0x33, dtype=np.uint8)
    a.reshape(4, PAGE)[np.arange(4), 0] = [1, 2, 3, 4]       # 4 distinct pages
    squeeze(pool)
    st, slot, _ = info(pool, a)
    assert (st == SWAPPED).all() and len(set(slot.tolist())) == 4
    fd = the_swap_fd(swdir)
    off = int(slot[3]) * PAGE + 100
    os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0x80]), off)
    for i in range(3):
        assert page(a, i)[0] == i + 1 and (page(a, i)[1:] == 0x33).all()
    assert ball[0] == 0xB1


# ------------------------------------------------------------ 8. the file

def test_swap_file_is_private_nameless_and_in_swap_path(swdir):
    before = set(os.listdir(swdir))
    pool = make_pool(swdir)
    fds = swap_fds(swdir)
    assert len(fds) == 1, fds
    fd, link = fds[0]
    assert link.endswith("(deleted)"), link            # O_TMPFILE '#ino' or unlinked
    assert os.path.dirname(link.split(" (deleted)")[0]) == os.path.realpath(swdir)
    st = os.fstat(fd)
    assert st.st_nlink == 0
    assert st.st_mode & 0o7777 == 0o600, oct(st.st_mode)
    assert st.st_dev == os.stat(swdir).st_dev
    assert set(os.listdir(swdir)) == before, "the swap file has a name"
    # it is the file the pool writes to
    ball = ballast(pool)
    a = pool.full(8 * PAGE, 0x42, dtype=np.uint8)
    a.reshape(8, PAGE)[:, 0] = np.arange(1, 9)
    squeeze(pool)
    _, slot, _ = info(pool, a)
    assert os.fstat(fd).st_size >= (int(slot.max()) + 1) * PAGE
    assert os.fstat(fd).st_size >= pool.stats()["swap_file_bytes"] >= 8 * PAGE
    expect = np.full(PAGE, 0x42, np.uint8)
    expect[0] = 3
    assert os.pread(fd, PAGE, int(slot[2]) * PAGE) == expect.tobytes()
    assert os.fstat(fd).st_mode & 0o7777 == 0o600
    assert set(os.listdir(swdir)) == before
    # closing the pool closes the file once the arrays are gone
    pool.close()
    del a, ball, pool
    gc.collect()
    assert swap_fds(swdir) == []


def test_swap_path_file_name_and_default_directory(swdir):
    target = os.path.join(swdir, "swapfile")
    pool = make_pool(target)            # a path in a directory: that directory
    fds = swap_fds(swdir)
    assert len(fds) == 1 and not os.path.exists(target)
    pool.close()
    del pool
    gc.collect()
    tmp = tempfile.gettempdir()
    before = {fd for fd, _ in swap_fds(tmp)}
    p2 = uksm.Pool("4MiB", max_resident="1MiB")
    new = [(fd, link) for fd, link in swap_fds(tmp) if fd not in before]
    new = [(fd, link) for fd, link in new if link.endswith("(deleted)")
           and not link.startswith("/memfd:")]
    assert len(new) == 1, new
    assert os.fstat(new[0][0]).st_mode & 0o777 == 0o600
    p2.close()


# --------------------------------------------- 9. syscalls and swapped pages

def test_syscalls_on_swapped_pages_efault_and_pin(swdir):
    pool = make_pool(swdir)
    ball = ballast(pool)
    data = rand_pages(np.random.default_rng(31), 16)
    a = pool.asarray(data)
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    out = os.path.join(swdir, "out.bin")

    # the kernel reading a swapped page: EFAULT (documented), no wrong bytes
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with pytest.raises(OSError) as ei:
            os.write(fd, a)
        assert ei.value.errno == errno.EFAULT
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        a.tofile(out)
    assert os.path.getsize(out) == 0
    assert (states(pool, a) == SWAPPED).all()       # the failures swapped nothing in

    # inside pin(): swapped in, resident, writable; the kernel may read it
    with pool.pin(a):
        assert (states(pool, a) == NORMAL).all()
        a.tofile(out)
        fd = os.open(out, os.O_WRONLY | os.O_APPEND)
        try:
            assert os.write(fd, a) == a.nbytes
        finally:
            os.close(fd)
        pool.max_resident = "8MiB"
        squeeze(pool)                               # pinned: stays
        assert (states(pool, a) == NORMAL).all()
    got = np.fromfile(out, np.uint8)
    assert np.array_equal(got[:a.nbytes], data) and np.array_equal(got[a.nbytes:], data)

    # after the pin it can be swapped again; readinto a swapped buffer fails
    pool.max_resident = "8MiB"
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    new = rand_pages(np.random.default_rng(32), 16)
    new.tofile(out)
    with open(out, "rb", buffering=0) as f:
        with pytest.raises(OSError) as ei:
            f.readinto(a)
        assert ei.value.errno == errno.EFAULT
    assert np.array_equal(a, data), "a failed readinto changed the buffer"
    squeeze(pool)
    # readinto a pinned buffer works
    with pool.pin(a):
        with open(out, "rb", buffering=0) as f:
            assert f.readinto(a) == a.nbytes
    assert np.array_equal(a, new)
    pool.max_resident = "8MiB"
    squeeze(pool)
    assert (states(pool, a) == SWAPPED).all()
    assert np.array_equal(a, new)
    assert ball[0] == 0xB1


def test_pin_of_merged_and_swapped_buffer_for_readinto(swdir):
    """A buffer whose pages are merged and swapped (one slot for all):
    pin gives each page a private writable frame, readinto lands there,
    and the other sharers keep their data."""
    pool = make_pool(swdir)
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
        assert (states(pool, a) == NORMAL).all()
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
    pool = uksm.Pool("32MiB", max_resident="8MiB", swap_batch="64KiB", swap_path=swdir)
    ball = pool.full(PAGE, 0xB1, dtype=np.uint8)
    pool.lock(ball)
    dup = rng.integers(1, 256, PAGE, dtype=np.uint8)
    shadows = [rng.integers(1, 256, 32 * PAGE, dtype=np.uint8) for _ in range(8)]
    shadows += [np.tile(dup, 4) for _ in range(4)]
    arrs = [pool.asarray(s) for s in shadows]
    pool.scan(full_scans=2)
    pool.max_resident = PAGE
    assert all((pool.page_states(a)[0] == 4).all() for a in arrs)
    # half of one array back in, so the parent has resident and swapped pages
    assert np.array_equal(arrs[0][:16 * PAGE], shadows[0][:16 * PAGE])
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


def test_fork_child_has_its_own_swap(swdir):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK_CHILD), swdir],
                       capture_output=True, text=True, timeout=60)
    assert "CHILD ok 0" in r.stdout, (r.stdout, r.stderr)
    assert r.returncode == 0 and "PARENT ok" in r.stdout, (r.returncode, r.stdout, r.stderr)
