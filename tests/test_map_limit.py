"""Merging under vm.max_map_count: a merged page that cuts a mapping in the
middle costs two mappings, so scattered duplicates run out of mappings
long before they run out of pages.  Merging must spend the limit up to
map_count_reserve and no further (the program's own mmap never fails for
it), choose the merges that save most pages per mapping, lose no data,
and say what it left unmerged.

A limit below the sysctl's is set per scanner (map_count_limit), so that
these tests need neither root nor a lowered system-wide limit, which would
starve every other process; the real sysctl is exercised through the
reserve knob, which makes the real limit bite just as well.
"""

import mmap

import numpy as np
import pytest

import uksm

from conftest import PAGE, run_isolated

KSM = uksm.PageState.KSM


def count_maps() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def scattered(pool, npairs: int, seed: int, value: int = 7):
    """2 * npairs pages: even pages unique, odd pages all @value: each odd
    page merged is a view cutting anonymous memory on both sides."""
    rng = np.random.default_rng(seed)
    exp = rng.integers(0, 255, (2 * npairs, PAGE), dtype=np.uint8)
    exp[1::2] = value
    a = pool.empty(exp.shape, np.uint8)
    a[:] = exp
    return a, exp


def child_scattered_fill_budget(cow: str) -> None:
    reserve, want = 256, 600
    pool = uksm.Pool(
        "64MiB",
        pages_to_scan=20000,
        sleep_millisecs=0,
        cow=cow,
        max_page_sharing=65535,
        map_count_reserve=reserve,
    )
    a, exp = scattered(pool, 2000, 1)
    sc = pool._scanner
    # a limit that leaves the merges 2 * want mappings beyond what exists
    limit = count_maps() + reserve + 2 * want
    sc.map_count_limit = limit
    sc.recount_maps()
    st = pool.scan(full_scans=3)
    maps = count_maps()
    assert maps <= limit - reserve, (maps, limit, reserve)
    st = pool.stats()
    assert st["map_count_max"] == limit and st["map_count_reserve"] == reserve, st
    assert abs(st["map_count"] - maps) <= 4, (st["map_count"], maps)
    # the budget is spent: every merged odd page costs 2 (the first, the
    # frame's own view, 2 more), and no more than 2 mappings stay unused
    sharing = st["pages_sharing"]
    assert st["pages_shared"] == 1, st
    assert want - 4 <= sharing + 1 <= want, (sharing, want)
    # 2000 equal pages: one frame and 1999 sharers would have saved 1999
    assert st["pages_unmerged_map_limit"] == 1999 - sharing, st
    assert st["merges_skipped_vma"] >= 1999 - sharing, st
    assert np.array_equal(a, exp)
    # the reserve is the program's: it can still map most of it
    held = [mmap.mmap(-1, PAGE) for _ in range(reserve - 32)]
    for m in held:
        m[0] = 1  # one VMA each (shared anonymous)
    # and writes into merged pages lose nothing (signal mode: near the limit
    # the handler makes whole runs writable instead of splitting)
    a[1::4, 5] = 9
    exp[1::4, 5] = 9
    a[::2, 0] = 3
    exp[::2, 0] = 3
    assert np.array_equal(a, exp)
    del held
    # with the limit lifted, the rest merges (smart scan backs off pages
    # that failed for a while: up to 8 visits)
    sc.map_count_limit = None
    pool.scan(full_scans=12)
    st = pool.stats()
    assert st["pages_unmerged_map_limit"] == 0, st
    assert st["pages_sharing"] + st["pages_shared"] >= 1990, st
    assert np.array_equal(a, exp)
    pool.close()
    print("ok", cow, sharing)


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_scattered_duplicates_fill_the_budget(cow):
    assert "ok" in run_isolated("test_map_limit", "child_scattered_fill_budget", cow, timeout=120)


def child_pools_share_the_budget() -> None:
    reserve, want = 128, 800
    pools = [
        uksm.Pool(
            "32MiB",
            pages_to_scan=20000,
            sleep_millisecs=0,
            max_page_sharing=65535,
            map_count_reserve=reserve,
        )
        for _ in range(2)
    ]
    arrs = [scattered(p, 1000, 10 + i, value=20 + i) for i, p in enumerate(pools)]
    limit = count_maps() + reserve + 2 * want
    for p in pools:
        p._scanner.map_count_limit = limit
    for p in pools:
        p.scan(full_scans=3)
    maps = count_maps()
    assert maps <= limit - reserve, (maps, limit)
    st = [p.stats() for p in pools]
    merged = sum(s["pages_sharing"] + s["pages_shared"] for s in st)
    # one budget between them: the first took what it could, the second the rest
    assert want - 8 <= merged <= want, (merged, st)
    for a, exp in arrs:
        assert np.array_equal(a, exp)
    for p in pools:
        p.close()
    print("ok", merged)


def test_pools_share_one_budget():
    assert "ok" in run_isolated("test_map_limit", "child_pools_share_the_budget")


def child_runs_before_singles() -> None:
    """Singles first in address order, runs after them: with mappings for
    the runs and a few singles, the runs (16 pages saved for a handful of
    mappings) must not lose to the singles that come first."""
    reserve = 128
    pool = uksm.Pool("64MiB", pages_to_scan=20000, sleep_millisecs=0, map_count_reserve=reserve)
    rng = np.random.default_rng(3)
    exp = rng.integers(0, 255, (6100, PAGE), dtype=np.uint8)
    # singles: pages 0..3999, page 2k + 1 a copy of page 2k (2000 pairs)
    exp[1:4000:2] = exp[0:4000:2]
    # runs: 32 runs of 16 pages from page 4000 on, each a copy of the run before
    for r in range(32):
        s = 4000 + 64 * r
        exp[s + 16 : s + 32] = exp[s : s + 16]
    a = pool.empty(exp.shape, np.uint8)
    a[:] = exp
    sc = pool._scanner
    limit = count_maps() + reserve + 400  # runs: 32 x at most 4; the rest singles
    sc.map_count_limit = limit
    sc.recount_maps()
    pool.scan(full_scans=3)
    assert count_maps() <= limit - reserve
    state = pool.page_states(a)[0]
    runs = np.concatenate([np.arange(4000 + 64 * r, 4000 + 64 * r + 32) for r in range(32)])
    assert (state[runs] == KSM).all(), np.count_nonzero(state[runs] != KSM)
    singles = int(np.count_nonzero(state[:4000] == KSM))
    assert 0 < singles < 4000, singles
    st = pool.stats()
    assert st["pages_unmerged_map_limit"] == 2000 - singles // 2, (st, singles)
    assert np.array_equal(a, exp)
    pool.close()
    print("ok", singles)


def test_runs_merge_before_singles():
    assert "ok" in run_isolated("test_map_limit", "child_runs_before_singles")


def child_real_limit() -> None:
    """The real vm.max_map_count, made to bite by the reserve: the budget is
    what the sysctl says, less the reserve, less the maps there are."""
    with open("/proc/sys/vm/max_map_count") as f:
        real = int(f.read())
    want = 1000
    pool = uksm.Pool("64MiB", pages_to_scan=20000, sleep_millisecs=0, max_page_sharing=65535)
    a, exp = scattered(pool, 3000, 5)
    reserve = real - count_maps() - 2 * want
    assert reserve > 1024, "the test needs a vm.max_map_count of a few thousand"
    pool.map_count_reserve = reserve
    pool.scan(full_scans=3)
    st = pool.stats()
    assert st["map_count_max"] == real == st["max_map_count"], st
    assert count_maps() <= real - reserve
    assert want - 8 <= st["pages_sharing"] + 1 <= want, st
    assert st["pages_unmerged_map_limit"] == 2999 - st["pages_sharing"], st
    assert np.array_equal(a, exp)
    pool.close()
    print("ok", st["pages_sharing"])


def test_real_max_map_count():
    assert "ok" in run_isolated("test_map_limit", "child_real_limit")


def test_map_count_reserve_knob():
    with uksm.Pool("16MiB") as pool:
        st = pool.stats()
        assert pool.map_count_reserve is None
        assert st["map_count_reserve"] == max(1024, st["max_map_count"] // 32)
        assert 0 < st["map_count"] <= st["map_count_max"] == st["max_map_count"]
        assert st["pages_unmerged_map_limit"] == 0
        pool.map_count_reserve = 5000
        assert pool.stats()["map_count_reserve"] == 5000
        pool.map_count_reserve = None
        for bad, exc in [
            (-1, ValueError),
            (2**31, ValueError),
            (1.5, TypeError),
            ("1k", TypeError),
            (True, TypeError),
            (float("nan"), TypeError),
        ]:
            with pytest.raises(exc, match="map_count_reserve"):
                pool.map_count_reserve = bad
            with pytest.raises(exc, match="map_count_reserve"):
                uksm.Pool("16MiB", map_count_reserve=bad)


def child_forked_child_keeps_the_count() -> None:
    """A child forked in the middle of a full scan inherits every mapping
    its parent had: its merges must draw on the budget those leave, not on
    the whole limit of a process with no mappings at all (which took this
    child some 1400 mappings past its budget, past the limit itself)."""
    import os

    reserve, want = 128, 1200
    pool = uksm.Pool(
        "64MiB",
        pages_to_scan=20000,
        sleep_millisecs=0,
        max_page_sharing=65535,
        map_count_reserve=reserve,
    )
    a, exp = scattered(pool, 3000, 2)
    # the program's own mappings, which the child inherits
    held = [mmap.mmap(-1, PAGE) for _ in range(1000)]
    for m in held:
        m[0] = 1
    sc = pool._scanner
    pool.scan(full_scans=1)
    with pool._c.section("test"):
        sc.scan_batch(64)  # merges a few: the count is now in use
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # mappings for want more merged pages and no more
            limit = count_maps() + reserve + 2 * want
            sc.map_count_limit = limit
            pool.scan(full_scans=1)
            maps = count_maps()
            # (a few mappings of the fork itself: the epoch page, the
            # child's own frame store)
            if maps <= limit - reserve + 4 and np.array_equal(a, exp):
                code = 0
            else:
                print("child", maps, limit - reserve, flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.array_equal(a, exp)
    del held
    pool.close()
    print("ok")


def test_forked_child_keeps_the_count():
    assert "ok" in run_isolated("test_map_limit", "child_forked_child_keeps_the_count")
