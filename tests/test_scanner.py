"""The scanner's policy (uksm.scanner), against the kernel's definitions.

Volatility and the checksum gate, both checksums, jhash2 against a port of
include/linux/jhash.h, keyhole pruning of stale stable nodes, smart_scan,
the scan-time advisor, max_page_sharing chains, unmerge, the metadata
budget, and the VMA budget.  All on real pools; the only thing ever changed
behind the scanner's back is the map count limit (a test's lower one).
"""

import struct
import time

import numpy as np
import pytest

import uksm
import uksm.scanner
from uksm import _core

from conftest import KSM, NORMAL, page, states

PAGE = uksm.PAGE_SIZE


def random_pages(n: int, seed: int) -> np.ndarray:
    """@n pages of random, pairwise different, non-zero content."""
    return np.random.default_rng(seed).integers(1, 256, (n, PAGE), dtype=np.uint8)


def count_maps() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


# --- volatility and the checksum gate ------------------------------------------------


@pytest.fixture
def gate_pool():
    """smart_scan off: a page that failed to merge for a while is then
    skipped (as in Linux), which would blur what the checksum gate does."""
    p = uksm.Pool("16MiB", pages_to_scan=1000, smart_scan=False)
    yield p
    p.close()


def test_page_rewritten_every_scan_never_merges(gate_pool):
    pool = gate_pool
    a = pool.zeros(PAGE, np.uint8)
    b = pool.zeros(PAGE, np.uint8)
    for v in range(1, 7):
        a[:] = v  # both change, identically, between every two scans
        b[:] = v
        st = pool.scan(full_scans=1)
        assert st["pages_shared"] == 0 and st["pages_sharing"] == 0
        assert st["pages_volatile"] == 2, st
        assert st["pages_unshared"] == 0
        assert states(pool, a)[0] == NORMAL and states(pool, b)[0] == NORMAL
    # stable for one scan: it passes the gate on the next and merges
    st = pool.scan(full_scans=1)
    assert st["pages_shared"] == 1 and st["pages_sharing"] == 1, st
    assert st["pages_volatile"] == 0
    assert states(pool, a)[0] == KSM and states(pool, b)[0] == KSM
    assert (a == 6).all() and (b == 6).all()


def test_formerly_volatile_pages_merge_with_smart_scan(pool):
    """With smart_scan (the default) pages that kept changing have aged and
    may be skipped for a few visits, but they still merge, within the
    longest skip (8 visits)."""
    a = pool.zeros(PAGE, np.uint8)
    b = pool.zeros(PAGE, np.uint8)
    for v in range(1, 7):
        a[:] = v
        b[:] = v
        pool.scan(full_scans=1)
        assert states(pool, a)[0] == NORMAL
    for extra in range(1, 12):  # noqa: B007  (the scans it took: the assertion's message)
        if pool.scan(full_scans=1)["pages_shared"]:
            break
    assert states(pool, a)[0] == KSM and states(pool, b)[0] == KSM, extra
    assert (a == 6).all() and (b == 6).all()


def test_volatile_page_never_merges_even_when_equal_at_scan_time(gate_pool):
    pool = gate_pool
    content = random_pages(3, seed=1)
    a = pool.asarray(content)
    b = pool.asarray(content)
    for k in range(6):
        # b's page 1 changes between every two scans; on even rounds it is
        # equal to a's page 1 when the scan looks, but it was not stable
        if k % 2 == 0:
            page(b, 1)[:] = content[1]
        else:
            page(b, 1)[0] ^= 0xFF
        pool.scan(full_scans=1)
        if k:
            sb, sa = states(pool, b), states(pool, a)
            assert sb[1] == NORMAL and sa[1] == NORMAL, (k, sa, sb)
            assert sb[0] == KSM and sb[2] == KSM
    st = pool.stats()
    assert st["pages_unshared"] == 1, st  # a's stable page 1 waits in the tree
    assert st["pages_volatile"] == 1, st  # b's page 1


@pytest.mark.parametrize("checksum", ["jhash2", "xxhash"])
def test_checksum_gate_needs_two_full_scans(checksum):
    with uksm.Pool("16MiB", checksum=checksum) as pool:
        content = random_pages(16, seed=2)
        a = pool.asarray(content)
        b = pool.asarray(content)
        st = pool.scan(full_scans=1)
        assert st["pages_shared"] == 0 and st["pages_sharing"] == 0
        assert st["pages_volatile"] == 32
        assert (states(pool, a) == NORMAL).all()
        st = pool.scan(full_scans=1)
        assert st["pages_shared"] == 16 and st["pages_sharing"] == 16
        assert (states(pool, a) == KSM).all() and (states(pool, b) == KSM).all()
        assert np.array_equal(a.reshape(16, PAGE), content)


def _mixed_workload(pool):
    rng = np.random.default_rng(3)
    pats = random_pages(6, seed=4)
    arrs = []
    for _ in range(4):
        a = pool.empty(32 * PAGE, np.uint8)
        kind = rng.integers(0, 10, 32)
        rows = a.reshape(32, PAGE)
        for i in range(32):
            if kind[i] < 6:
                rows[i] = pats[kind[i]]
            elif kind[i] < 8:
                rows[i] = 0
            else:
                rows[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        arrs.append(a)
    return arrs


def test_jhash2_and_xxhash_merge_identically():
    results = {}
    for checksum in ("jhash2", "xxhash"):
        with uksm.Pool("16MiB", checksum=checksum) as pool:
            arrs = _mixed_workload(pool)
            copies = [a.copy() for a in arrs]
            st = pool.scan(full_scans=2)
            info = [pool.page_states(a) for a in arrs]
            st_ = np.concatenate([i[0] for i in info])
            pfn = np.concatenate([i[1] for i in info])
            mc = np.concatenate([i[2] for i in info])
            # pages share a frame exactly when their contents are equal
            flat = np.concatenate([a.reshape(-1, PAGE) for a in arrs])
            _, content_id = np.unique(flat, axis=0, return_inverse=True)
            ksm = st_ == KSM
            for cid in np.unique(content_id[ksm]):
                assert len(np.unique(pfn[ksm & (content_id == cid)])) == 1
            assert len(np.unique(pfn[ksm])) == len(np.unique(content_id[ksm]))
            for a, c in zip(arrs, copies):
                assert np.array_equal(a, c)
            results[checksum] = (
                st_,
                mc,
                {
                    k: st[k]
                    for k in ("pages_shared", "pages_sharing", "ksm_zero_pages", "pages_unshared")
                },
            )
    (s1, m1, k1), (s2, m2, k2) = results["jhash2"], results["xxhash"]
    assert np.array_equal(s1, s2)
    assert np.array_equal(m1, m2)
    assert k1 == k2
    assert k1["pages_shared"] > 0 and k1["ksm_zero_pages"] > 0 and k1["pages_unshared"] > 0


# --- jhash2 against include/linux/jhash.h ---------------------------------------------

M32 = 0xFFFFFFFF


def _rol32(x, k):
    return ((x << k) | (x >> (32 - k))) & M32


def py_jhash2(data: bytes, initval: int) -> int:
    """include/linux/jhash.h jhash2(), line by line, in 32-bit arithmetic."""
    k = struct.unpack(f"<{len(data) // 4}I", data)
    length = len(k)
    a = b = c = (0xDEADBEEF + (length << 2) + initval) & M32
    i = 0
    while length > 3:
        a = (a + k[i]) & M32
        b = (b + k[i + 1]) & M32
        c = (c + k[i + 2]) & M32
        # __jhash_mix
        a = (a - c) & M32
        a ^= _rol32(c, 4)
        c = (c + b) & M32
        b = (b - a) & M32
        b ^= _rol32(a, 6)
        a = (a + c) & M32
        c = (c - b) & M32
        c ^= _rol32(b, 8)
        b = (b + a) & M32
        a = (a - c) & M32
        a ^= _rol32(c, 16)
        c = (c + b) & M32
        b = (b - a) & M32
        b ^= _rol32(a, 19)
        a = (a + c) & M32
        c = (c - b) & M32
        c ^= _rol32(b, 4)
        b = (b + a) & M32
        length -= 3
        i += 3
    if length == 0:
        return c
    if length >= 3:
        c = (c + k[i + 2]) & M32
    if length >= 2:
        b = (b + k[i + 1]) & M32
    a = (a + k[i]) & M32
    # __jhash_final
    c ^= b
    c = (c - _rol32(b, 14)) & M32
    a ^= c
    a = (a - _rol32(c, 11)) & M32
    b ^= a
    b = (b - _rol32(a, 25)) & M32
    c ^= b
    c = (c - _rol32(b, 16)) & M32
    a ^= c
    a = (a - _rol32(c, 4)) & M32
    b ^= a
    b = (b - _rol32(a, 14)) & M32
    c ^= b
    c = (c - _rol32(b, 24)) & M32
    return c


def test_jhash2_matches_linux_definition():
    # the one value readable straight off jhash.h: no words, no mixing
    assert _core.jhash2(b"", 0) == 0xDEADBEEF
    assert _core.jhash2(b"", 17) == 0xDEADBEEF + 17
    rng = np.random.default_rng(5)
    for nwords in list(range(0, 14)) + [1023, 1024]:
        data = rng.integers(0, 256, 4 * nwords, dtype=np.uint8).tobytes()
        for initval in (0, 17, 0xFFFFFFFF):
            assert _core.jhash2(data, initval) == py_jhash2(data, initval), (nwords, initval)
    # calc_checksum is jhash2(page, PAGE_SIZE / 4, 17), as mm/ksm.c had it
    pg = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    assert _core.calc_checksum(pg, "jhash2") == py_jhash2(pg, 17)
    assert _core.calc_checksum(bytes(PAGE), "jhash2") == py_jhash2(bytes(PAGE), 17)
    # the known vector: words 1, 2, 3 (the tail goes through __jhash_final)
    vec = struct.pack("<3I", 1, 2, 3)
    assert _core.jhash2(vec, 0) == py_jhash2(vec, 0)


def test_jhash2_through_the_scanner_uses_page_words():
    """The checksums the scanner gates on are the same jhash2 of the page."""
    with uksm.Pool("16MiB", checksum="jhash2") as pool:
        content = random_pages(2, seed=6)
        a = pool.asarray(content)
        pool.scan(full_scans=1)
        sc = pool._scanner
        vpn = (a.__array_interface__["data"][0] - pool._native.va) // PAGE
        for i in range(2):
            assert int(sc.oldchecksum[vpn + i]) == py_jhash2(content[i].tobytes(), 17)


@pytest.mark.parametrize("checksum", ["jhash2", "xxhash"])
def test_checksum_range_hashes_each_page_it_reports(checksum):
    """uksm_checksum_range over several of its chunks, with pages skipped,
    never written and merged among those it hashes (the prefetch looks one
    hashed page ahead): each hashed page's sum is its own page's checksum,
    every other page's is 0."""
    with uksm.Pool("16MiB", checksum=checksum, use_zero_pages=False) as pool:
        n = 200
        rng = np.random.default_rng(8)
        a = pool.empty(n * PAGE, np.uint8)
        rows = a.reshape(n, PAGE)
        content = random_pages(n, seed=9)
        written = rng.random(n) < 0.8
        written[:8] = True
        rows[written] = content[written]
        twins = pool.asarray(rows[:8])
        pool.scan(full_scans=2)  # rows 0..7 merge with their twins
        vpn = (a.__array_interface__["data"][0] - pool._native.va) // PAGE
        skip = (rng.random(n) < 0.3).astype(np.uint8)
        sums = np.full(n, 12345, np.uint64)
        st = np.zeros(n, np.uint8)
        with pool._c.section("test"):
            pool._native.checksum_range(vpn, skip, sums, st, _core.CHECKSUMS[checksum])
        hashed = 0
        for i in range(n):
            if st[i] == _core.PTE_PRIVATE and not skip[i]:
                assert int(sums[i]) == _core.calc_checksum(rows[i].tobytes(), checksum), i
                hashed += 1
            else:
                assert sums[i] == 0, i
            assert (st[i] == _core.SCAN_UNTOUCHED) == (not written[i]), i
        assert (st[:8] == KSM).all() and hashed > 100
        del twins


# --- keyhole pruning ------------------------------------------------------------------


def test_keyhole_prunes_stale_stable_nodes():
    with uksm.Pool("16MiB", max_page_sharing=2, use_zero_pages=False) as pool:
        content = random_pages(4, seed=7)
        arrs = [pool.asarray(content) for _ in range(4)]
        st = pool.scan(full_scans=2)
        sc = pool._scanner
        # 4 contents x 4 sharers, 2 per frame: 8 KSM frames, 4 chains of 2 dups
        assert st["pages_shared"] == 8 and st["pages_sharing"] == 8, st
        assert st["stable_node_chains"] == 4 and st["stable_node_dups"] == 8, st
        assert sc.stable.nr_alive == 8
        old_pfns = np.unique(np.concatenate([pool.page_states(a)[1] for a in arrs]))

        # COW-write every sharer: every KSM frame loses its last mapper
        for k, a in enumerate(arrs):
            for i in range(4):
                page(a, i)[k] ^= 0xFF
        for a in arrs:
            assert (states(pool, a) == NORMAL).all()
        st = pool.scan(full_scans=1)
        assert sc.stable.nr_alive == 0
        assert st["stable_node_chains"] == 0 and st["stable_node_dups"] == 0
        assert st["pages_shared"] == 0

        # fresh pages with the old contents, in frames that may be the old ones
        fresh = [pool.asarray(content) for _ in range(2)]
        st = pool.scan(full_scans=2)
        for f in fresh:
            assert (states(pool, f) == KSM).all()
            assert np.array_equal(f.reshape(4, PAGE), content)
        assert sc.stable.nr_alive == 4
        for k, a in enumerate(arrs):
            expect = content.copy()
            expect[:, k] ^= 0xFF
            assert np.array_equal(a.reshape(4, PAGE), expect)
        assert len(old_pfns) == 8


def test_stale_node_found_at_lookup_does_not_merge_wrong_content():
    """A stable node whose frame was reused for other content must be seen
    through the keyhole as stale, never used as a merge target."""
    with uksm.Pool("16MiB", use_zero_pages=False) as pool:
        content = random_pages(1, seed=8)
        a = pool.asarray(content)
        b = pool.asarray(content)
        pool.scan(full_scans=2)
        pfn = pool.page_states(a)[1][0]
        page(a, 0)[0] ^= 1
        page(b, 0)[0] ^= 2  # the frame's last mapper: reused in place, new key
        assert pool.page_states(b)[1][0] == pfn and states(pool, b)[0] == NORMAL
        # a page with the node's old checksum: the node is found, and stale
        c = pool.asarray(content)
        pool.scan(full_scans=1)
        assert states(pool, c)[0] == NORMAL
        assert np.array_equal(c.reshape(1, PAGE), content)
        b_expect = content.copy()
        b_expect[0, 0] ^= 2
        assert np.array_equal(b.reshape(1, PAGE), b_expect)


# --- smart_scan ---------------------------------------------------------------------


@pytest.mark.parametrize("smart", [True, False])
def test_smart_scan_skips_unique_pages(smart):
    with uksm.Pool("16MiB", smart_scan=smart) as pool:
        u = pool.asarray(random_pages(64, seed=9))
        skipped = []
        for _ in range(10):
            skipped.append(pool.scan(full_scans=1)["pages_skipped"])
        if smart:
            assert skipped[-1] > skipped[4] > 0, skipped
            # skipping must not hide a page that becomes mergeable
            twin = pool.asarray(u.reshape(64, PAGE)[:8])
            pool.scan(full_scans=12)
            assert (states(pool, twin) == KSM).all()
        else:
            assert skipped[-1] == 0, skipped
        assert pool.stats()["pages_scanned"] > 0


# --- the advisor --------------------------------------------------------------------


def test_advisor_scan_time_tunes_pages_to_scan():
    lo, hi = 200, 5000
    with uksm.Pool(
        "16MiB",
        pages_to_scan=1000,
        advisor_mode="scan-time",
        advisor_target_scan_time=0.001,
        advisor_min_pages_to_scan=lo,
        advisor_max_pages_to_scan=hi,
    ) as pool:
        data = pool.asarray(random_pages(64, seed=10))  # keep it alive: it is the scan
        seen = []
        for _ in range(6):
            time.sleep(0.03)  # the scanner used little CPU: it may speed up
            pool.scan(full_scans=1)
            seen.append(pool.pages_to_scan)
        assert all(lo <= p <= hi for p in seen), seen
        assert seen[-1] != 1000, seen
        assert seen[-1] > 1000, f"a full scan far over target should raise pages_to_scan: {seen}"
        assert pool.stats()["pages_to_scan"] == seen[-1]
        assert pool.stats()["pages_scanned"] >= 6 * 64 and data.any()

    with uksm.Pool(
        "16MiB",
        pages_to_scan=1000,
        advisor_mode="scan-time",
        advisor_target_scan_time=1000.0,
        smart_scan=False,
        advisor_min_pages_to_scan=lo,
        advisor_max_pages_to_scan=hi,
    ) as pool:
        # back-to-back full scans of real pages: the scanner is busy (high
        # CPU share), so the advisor's 10% CPU floor does not hold it up
        data = pool.asarray(random_pages(1024, seed=10))
        seen = []
        for _ in range(6):
            pool.scan(full_scans=1)
            seen.append(pool.pages_to_scan)
        assert all(lo <= p <= hi for p in seen), seen
        assert pool.stats()["pages_scanned"] >= 6 * 1024 and data.any()
        assert seen[-1] == lo, f"a scan far under target should fall to the minimum: {seen}"


def test_advisor_none_leaves_pages_to_scan_alone(pool):
    data = pool.asarray(random_pages(16, seed=11))
    pool.scan(full_scans=4)
    assert pool.pages_to_scan == 1000
    assert pool.stats()["pages_scanned"] == 4 * 16 and data.any()


# --- max_page_sharing chains ----------------------------------------------------------


def test_max_page_sharing_makes_a_chain_of_dups():
    with uksm.Pool("16MiB", max_page_sharing=4, use_zero_pages=False) as pool:
        pg = random_pages(1, seed=12)[0]
        arrs = [pool.asarray(pg) for _ in range(10)]
        st = pool.scan(full_scans=2)
        assert st["stable_node_chains"] == 1, st
        assert st["stable_node_dups"] == 3, st
        assert st["pages_shared"] == 3 and st["pages_sharing"] == 7, st
        mc = np.array([pool.page_states(a)[2][0] for a in arrs])
        assert mc.max() <= 4
        assert all(np.array_equal(a, pg) for a in arrs)
        # more scans change nothing, and never exceed the limit
        st = pool.scan(full_scans=2)
        assert (st["pages_shared"], st["pages_sharing"]) == (3, 7)
        # one more sharer joins the dup that has room
        extra = pool.asarray(pg)
        st = pool.scan(full_scans=2)
        assert states(pool, extra)[0] == KSM
        assert (st["pages_shared"], st["pages_sharing"]) == (3, 8)
        assert pool.page_states(extra)[2][0] <= 4


# --- unmerge ------------------------------------------------------------------------


def test_unmerge_one_buffer_leaves_others_merged(pool):
    content = random_pages(8, seed=13)
    a, b, c = (pool.asarray(content) for _ in range(3))
    pool.scan(full_scans=2)
    assert all((states(pool, x) == KSM).all() for x in (a, b, c))
    assert pool.unmerge(b) == 8
    assert (states(pool, b) == NORMAL).all()
    for x in (a, c):
        s, _, mc = pool.page_states(x)
        assert (s == KSM).all() and (mc == 2).all()
    pool.scan(full_scans=3)
    assert (states(pool, b) == NORMAL).all(), "an unmerged buffer was merged again"
    assert all((states(pool, x) == KSM).all() for x in (a, c))
    for x in (a, b, c):
        assert np.array_equal(x.reshape(8, PAGE), content)
    # and merge() makes it mergeable again
    pool.merge(b)
    pool.scan(full_scans=2)
    assert (states(pool, b) == KSM).all()


# --- metadata ---------------------------------------------------------------------------


def test_metadata_per_page_within_rmap_item_size(pool):
    n = 10000
    rng = np.random.default_rng(14)
    pats = random_pages(100, seed=15)
    a = pool.empty(n * PAGE, np.uint8)
    rows = a.reshape(n, PAGE)
    rows[:] = pats[rng.integers(0, 100, n)]
    rows[::5] = rng.integers(0, 256, (n // 5, PAGE), dtype=np.uint8)
    st = pool.scan(full_scans=2)
    assert st["pages_sharing"] > n // 2
    assert st["pages_tracked"] >= n - st["ksm_zero_pages"]
    assert 0 < st["metadata_bytes_per_page"] <= 64, st["metadata_bytes_per_page"]


# --- the VMA budget ---------------------------------------------------------------------


def test_vma_budget_caps_isolated_merges(monkeypatch):
    headroom = 300
    max_map = uksm.scanner._read_max_map_count()
    with uksm.Pool("64MiB", use_zero_pages=False) as pool:
        n = 1500
        dup = random_pages(n, seed=16)
        # every other page is a duplicate; the pages between are unique, so
        # every merge is an isolated page (+2 VMAs), never a coalescing run
        a = pool.empty(2 * n * PAGE, np.uint8)
        b = pool.empty(2 * n * PAGE, np.uint8)
        a.reshape(2 * n, PAGE)[0::2] = dup
        b.reshape(2 * n, PAGE)[0::2] = dup
        a.reshape(2 * n, PAGE)[1::2] = random_pages(n, seed=17)
        b.reshape(2 * n, PAGE)[1::2] = random_pages(n, seed=18)
        ca, cb = a.copy(), b.copy()

        bound = count_maps() + headroom
        pool._scanner.map_count_limit = bound
        pool.map_count_reserve = 0
        limit = bound
        worst = 0
        for _ in range(4):
            pool.scan(full_scans=1)
            worst = max(worst, count_maps())
        st = pool.stats()
        assert st["merges_skipped_vma"] > 0
        assert 0 < st["pages_sharing"] < n, st["pages_sharing"]
        assert worst <= limit, (worst, limit)
        assert np.array_equal(a, ca) and np.array_equal(b, cb)
        # COW writes into the merged pages still work within the headroom left
        sa = states(pool, a)
        merged = np.flatnonzero(sa == KSM)
        for i in merged[:20]:
            page(a, int(i))[0] ^= 1
            ca[i * PAGE] ^= 1
        assert np.array_equal(a, ca) and np.array_equal(b, cb)

        # with the real limit the rest merges
        pool._scanner.map_count_limit = None
        pool.map_count_reserve = None
        pool.scan(full_scans=2)
        assert pool.stats()["pages_sharing"] >= n - 20
        assert count_maps() <= max_map - pool.stats()["map_count_reserve"]
        assert np.array_equal(a, ca) and np.array_equal(b, cb)


# --- bookkeeping by use, not capacity ------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_of(arr: np.ndarray) -> int:
    """Resident bytes of the mapping that holds @arr (smaps' Rss)."""
    addr = arr.__array_interface__["data"][0]
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                rss += int(line.split()[1]) * 1024
    return rss


def _scan_same_data(capacity: str):
    """The same 16+16 MiB of duplicates merged in a pool of @capacity: the
    process's page-table and resident growth (KiB) across scans and stats."""
    with uksm.Pool(capacity, pages_to_scan=100000, sleep_millisecs=0) as pool:
        a = pool.zeros(2 << 20)
        a[:] = 1
        b = pool.asarray(a)
        pte0 = _status_kib("VmPTE")
        t = time.perf_counter()
        pool.scan(full_scans=2)
        st = pool.stats()
        elapsed = time.perf_counter() - t
        assert st["pages_sharing"] >= 4000, st["pages_sharing"]
        assert np.array_equal(a, b)
        return _status_kib("VmPTE") - pte0, elapsed, st


def test_scan_and_stats_cost_follow_pages_in_use_not_capacity():
    """A pool of many terabytes costs what its buffers cost: the scan and
    stats() visit the buffers' pages, not the reserved range (a walk over
    the range of a 4 TiB pool reads 16 GiB of empty pte table, faulting in
    tens of MiB of page tables for the zero page, and takes seconds)."""
    pte_small, t_small, st_small = _scan_same_data("256MiB")
    pte_big, t_big, st_big = _scan_same_data("4TiB")
    assert st_big["pages_sharing"] == st_small["pages_sharing"]
    assert pte_big <= pte_small + 512, (pte_small, pte_big)
    # generous: the walk took 20x; load on a shared machine is the noise
    assert t_big <= 4 * t_small + 0.2, (t_small, t_big)
    assert st_big["metadata_bytes_per_page"] <= 64


def test_pool_of_the_whole_address_space_is_cheap_to_make():
    """Tables by use: a pool near the 16 TiB limit is made in milliseconds
    and commits nothing, even where its per-page tables could never be
    committed whole (calloc'ed tables of 32 GiB meet the overcommit
    heuristic on any machine with less memory than that)."""
    rss0 = _status_kib("VmRSS")
    t = time.perf_counter()
    with uksm.Pool("7TiB", virtual_size="15TiB") as pool:
        made = time.perf_counter() - t
        st = pool.stats()
        a = pool.asarray(random_pages(512, seed=30))
        b = pool.asarray(a)
        pool.scan(full_scans=2)
        assert pool.stats()["pages_sharing"] == 512
        assert np.array_equal(a, b)
    assert made < 0.5, made
    assert st["metadata_bytes"] < 1 << 20
    assert _status_kib("VmRSS") - rss0 < 16 << 10


def test_freed_buffers_give_their_rmap_slots_back():
    """The rmap tables hold slots for tracked pages only: a freed buffer's
    slots are given back, so churn through a large range leaves the
    tables' resident size at what the live buffers need."""
    with uksm.Pool("1GiB", pages_to_scan=100000, sleep_millisecs=0) as pool:
        sc = pool._scanner
        keep = pool.zeros(1 << 17)  # 256 pages stay
        keep[:] = 5
        for _ in range(3):
            big = pool.zeros(32 << 20)  # 65536 pages (256 MiB): 512 KiB of checksums
            big[:] = 7
            pool.scan(full_scans=1)
            assert _rss_of(sc.oldchecksum) >= 65536 * 8
            pool.free(big)
            del big
            pool.scan(full_scans=1)
            assert _rss_of(sc.oldchecksum) <= 4 * PAGE, _rss_of(sc.oldchecksum)
        assert keep.min() == keep.max() == 5


# --- idle backoff ------------------------------------------------------------------


def test_idle_backoff_slows_a_pool_at_rest_and_wakes_on_change():
    """A full scan that finds nothing new makes the background scanner
    sleep longer per batch
    a changed page or a new buffer puts it back to
    full speed, so new duplicates still merge within two full scans."""
    with uksm.Pool("64MiB", pages_to_scan=100000, sleep_millisecs=0) as pool:
        sc = pool._scanner
        a = pool.asarray(random_pages(64, seed=40))
        b = pool.asarray(a)
        pool.scan(full_scans=2)
        assert sc.sleep_factor() == 1
        pool.scan(full_scans=3)  # nothing changes
        assert sc.idle_scans == 3
        assert sc.sleep_factor() == uksm.scanner.IDLE_FACTOR_MAX
        b[0] = 1 - b[0]  # a COW break and a changed page
        pool.scan(full_scans=1)
        assert sc.idle_scans == 0 and sc.sleep_factor() == 1
        pool.scan(full_scans=2)
        assert sc.idle_scans >= 1
        c = pool.asarray(a)  # a new buffer: at once
        assert sc.idle_scans == 0
        pool.scan(full_scans=2)
        assert np.array_equal(a, c)
        assert pool.stats()["pages_sharing"] >= 2 * 64 - 1
