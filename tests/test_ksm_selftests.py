"""Ports of the kernel's KSM selftests to uksm.

tools/testing/selftests/mm/ksm_tests.c: -M (merge), -U (unmerge), -Z (zero
pages), each judged by assert_ksm_pages_count(); and
tools/testing/selftests/mm/ksm_functional_tests.c where it applies:
unmerging leaves no page mapping a frame twice (range_maps_duplicates),
ksm_zero_pages through merge, unmerge and write faults, and merging in a
forked child.  MADV_MERGEABLE/UNMERGEABLE become pool.merge/pool.unmerge,
"run=1 and wait for two full scans" becomes pool.scan(full_scans=2), and
pagemap's pfns become pool.page_states().

Every test that merges also checks the saving where the kernel accounts
for it: what the kernel holds for the pool (the anonymous memory in its
range, for the private pages, plus the frame store memfd's allocated
blocks, for the KSM frames) must fall to the deduplicated size, and the
process's PSS must fall by roughly the bytes merged.  The buffers are
several MiB so that the PSS signal stands well above its noise.  PSS is
read as conftest.pss_bytes reads it (/proc/self/smaps_rollup) less its
file-backed part: the PSS of shared library pages moves whenever another
process maps or unmaps the same library, which says nothing about us.
"""

import gc
import os

import numpy as np
import pytest

import uksm

from conftest import PAGE, kernel_resident_bytes, memfd_bytes, pss_bytes

PTE_PRIVATE, PTE_KSM, PTE_ZERO = uksm.PageState.PRIVATE, uksm.PageState.KSM, uksm.PageState.ZERO
COW_MODES = ["kernel", "signal"]
MiB = 1 << 20
PSS_MIN_SIGNAL = 4 * MiB  # below this the PSS check would measure noise


@pytest.fixture(scope="module", autouse=True)
def warm_up():
    """One merge/unmerge cycle first, so that lazily allocated interpreter
    and library state does not land inside a test's PSS window."""
    with uksm.Pool("8MiB", pages_to_scan=1000, sleep_millisecs=0) as p:
        a = p.empty((512, PAGE), dtype=np.uint8)
        fill_groups(a, 2)
        p.scan(full_scans=2)
        p.page_states(a)
        p.buffer_stats(a)
        p.unmerge(a)
        pss_private()
        del a
        gc.collect()


def pss_private() -> int:
    """Anonymous plus shmem (the memfd) PSS of this process, in bytes."""
    fields = {}
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
    return pss_bytes()


def make_pool(**kw):
    kw.setdefault("pages_to_scan", 1000)
    kw.setdefault("sleep_millisecs", 0)
    return uksm.Pool(kw.pop("capacity", "64MiB"), **kw)


def pages(arr: np.ndarray) -> np.ndarray:
    """@arr as (pages, 4096) bytes: row i is page i."""
    return arr.view(np.uint8).reshape(-1, PAGE)


def fill_groups(arr: np.ndarray, group: int, base: int = 0) -> None:
    """Pages [g*group, (g+1)*group) all hold the same content, '*' bytes
    stamped with g + base in their first word; groups differ from each other."""
    p = pages(arr)
    p[:] = ord("*")
    words = p.view(np.uint32)
    words[:, 0] = np.arange(len(p), dtype=np.uint32) // group + base + 1


def expected_counts(dupl_page_count: int, max_page_sharing: int):
    """(pages_shared, pages_sharing) as ksm_tests.c assert_ksm_pages_count()
    computes them for @dupl_page_count pages of one content."""
    n, m = dupl_page_count, max_page_sharing
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def same(x: np.ndarray, y) -> bool:
    """x == y everywhere, compared 16 pages at a time: an array-sized
    temporary would land in the malloc heap and blur the PSS readings."""
    xb = x.view(np.uint8).reshape(-1)
    yb = y.view(np.uint8).reshape(-1) if isinstance(y, np.ndarray) else None
    step = 16 * PAGE
    for i in range(0, xb.size, step):
        if yb is None:
            if not (xb[i : i + step] == y).all():
                return False
        elif not np.array_equal(xb[i : i + step], yb[i : i + step]):
            return False
    return True


def range_maps_duplicates(pool, *arrays) -> bool:
    """ksm_functional_tests.c: does any frame back two of these pages?  A
    private page is anonymous memory of its own (no frame); only views of
    frames can be duplicates."""
    pfns = []
    for a in arrays:
        state, pfn, _ = pool.page_states(a)
        pfns.append(pfn[state == PTE_KSM])
    pfns = np.concatenate(pfns)
    return len(np.unique(pfns)) != len(pfns)


class KernelView:
    """The kernel's accounting of a pool: what it holds for it (anonymous
    pages in the pool's range plus the memfd's blocks), the memfd's blocks
    alone (the KSM frames), and the process's PSS.

    take() before an operation, after() at once when it returns (before
    verifying any data), then check_saving() or check_growth().  Both first
    read one byte of every merged page of @arrays: a fresh view maps its
    frame only when touched, and PSS counts a frame's share only for the
    views that map it."""

    def __init__(self, pool, *arrays):
        self.pool = pool
        self.arrays = arrays
        self.take()

    def map_views(self):
        for a in self.arrays:
            ksm = np.flatnonzero(self.pool.page_states(a)[0] == PTE_KSM)
            int(pages(a)[ksm, 0].sum())

    def take(self):
        gc.collect()
        self.map_views()
        self.resident = kernel_resident_bytes(self.pool)
        self.memfd = memfd_bytes(self.pool)
        self.pss = pss_private()

    def after(self):
        gc.collect()
        self.map_views()
        self.resident_after = kernel_resident_bytes(self.pool)
        self.memfd_after = memfd_bytes(self.pool)
        self.pss_after = pss_private()
        self.stats_after = self.pool.stats()

    def check_frames(self) -> None:
        """uksm's figures are the kernel's: its frames the memfd's blocks,
        one per KSM page (pages_shared), and its resident bytes all that
        the kernel holds for the pool."""
        s = self.stats_after
        assert s["bytes_resident"] == self.resident_after, (
            s["bytes_resident"],
            self.resident_after,
        )
        assert s["bytes_frames"] == self.memfd_after == s["pages_shared"] * PAGE, (
            s["bytes_frames"],
            self.memfd_after,
            s["pages_shared"],
        )

    def check_saving(self, pages_expected: int, saved_bytes: int) -> None:
        """After merging: the kernel holds @pages_expected pages for the
        pool (frames and private pages left), and PSS fell by about
        @saved_bytes."""
        self.check_frames()
        resident = self.resident_after
        assert resident == pages_expected * PAGE, (resident, pages_expected * PAGE)
        assert self.resident - resident == saved_bytes
        if saved_bytes >= PSS_MIN_SIGNAL:
            drop = self.pss - self.pss_after
            assert 0.75 * saved_bytes <= drop <= 1.25 * saved_bytes + MiB, (
                f"PSS fell by {drop / MiB:.2f} MiB, {saved_bytes / MiB:.2f} MiB were merged"
            )

    def check_growth(self, pages_expected: int, grown_bytes: int) -> None:
        """After unmerging or COW: the kernel holds @pages_expected pages
        for the pool, and PSS rose by about @grown_bytes."""
        self.check_frames()
        resident = self.resident_after
        assert resident == pages_expected * PAGE, (resident, pages_expected * PAGE)
        assert resident - self.resident == grown_bytes
        if grown_bytes >= PSS_MIN_SIGNAL:
            rise = self.pss_after - self.pss
            assert 0.75 * grown_bytes <= rise <= 1.25 * grown_bytes + MiB, (
                f"PSS rose by {rise / MiB:.2f} MiB, {grown_bytes / MiB:.2f} MiB were unmerged"
            )


# -- ksm_tests.c -M: check_ksm_merge ---------------------------------------------


@pytest.mark.parametrize(
    "dupl, max_sharing, groups",
    [
        (10, 256, 300),  # the selftest's default page count, 300 contents
        (2048, 256, 1),  # 8 MiB of one content: a chain of 8 dups
        (2000, 256, 1),  # ... with a partly filled last dup
        (25, 10, 100),  # more duplicates than max_page_sharing: 3 dups each
        (21, 10, 100),  # remainder 1: the 21st page cannot merge
        (20, 10, 100),  # exactly two full dups
    ],
)
def test_check_ksm_merge(dupl, max_sharing, groups):
    with make_pool(max_page_sharing=max_sharing) as pool:
        n = dupl * groups
        a = pool.empty((n, PAGE), dtype=np.uint8)
        fill_groups(a, dupl)
        ref = a.copy()
        kv = KernelView(pool, a)
        assert kv.resident == n * PAGE and kv.memfd == 0

        s = pool.scan(full_scans=2)
        kv.after()

        shared, sharing = expected_counts(dupl, max_sharing)
        assert (s["pages_shared"], s["pages_sharing"]) == (shared * groups, sharing * groups), s
        if shared > 1:
            assert (s["stable_node_chains"], s["stable_node_dups"]) == (groups, shared * groups), s
        else:
            assert (s["stable_node_chains"], s["stable_node_dups"]) == (0, 0), s
        state, pfn, mapcount = pool.page_states(a)
        assert np.count_nonzero(state == PTE_KSM) == (shared + sharing) * groups
        assert mapcount.max() <= max_sharing
        assert len(np.unique(pfn[state == PTE_KSM])) == shared * groups
        assert same(a, ref)
        kv.check_saving(n - sharing * groups, sharing * groups * PAGE)


# -- ksm_tests.c -U: check_ksm_unmerge -------------------------------------------


@pytest.mark.parametrize("cow", COW_MODES)
def test_check_ksm_unmerge_by_write(cow):
    """Merge pairs of equal pages, change one byte in each page: KSM must
    unmerge them all by itself, and one more scan finds nothing to merge."""
    with make_pool(cow=cow) as pool:
        n = 4096  # 16 MiB, 2048 pairs
        a = pool.empty((n, PAGE), dtype=np.uint8)
        fill_groups(a, 2)
        kv = KernelView(pool, a)
        s = pool.scan(full_scans=2)
        kv.after()
        shared, sharing = expected_counts(2, pool.max_page_sharing)
        assert (s["pages_shared"], s["pages_sharing"]) == (shared * n // 2, sharing * n // 2), s
        kv.check_saving(n // 2, n // 2 * PAGE)

        kv.take()
        p = pages(a)
        p[0::2, 4] = ord("-")
        p[1::2, 4] = ord("+")
        s = pool.scan(full_scans=1)
        kv.after()
        assert (s["pages_shared"], s["pages_sharing"]) == (0, 0), s
        assert (pool.page_states(a)[0] == PTE_PRIVATE).all()
        assert not range_maps_duplicates(pool, a)
        kv.check_growth(n, n // 2 * PAGE)
        assert (p[0::2, 4] == ord("-")).all() and (p[1::2, 4] == ord("+")).all()
        assert all((p[i : i + 16, 5:] == ord("*")).all() for i in range(0, n, 16))


def test_unmerge_api_unmerges_only_that_buffer():
    with make_pool() as pool:
        n = 2048  # 8 MiB each
        a = pool.empty((n, PAGE), dtype=np.uint8)
        b = pool.empty((n, PAGE), dtype=np.uint8)
        fill_groups(a, 4)
        fill_groups(b, 4, base=n)  # b's contents differ from a's
        ref_a, ref_b = a.copy(), b.copy()
        kv = KernelView(pool, a, b)
        s = pool.scan(full_scans=2)
        kv.after()
        assert (s["pages_shared"], s["pages_sharing"]) == (2 * n // 4, 2 * 3 * n // 4), s
        kv.check_saving(2 * n // 4, 2 * 3 * n // 4 * PAGE)
        merged_a = pool.buffer_stats(a)["pages_merged"]
        assert merged_a == n

        kv.take()
        assert pool.unmerge(a) == merged_a
        kv.after()
        s = pool.stats()
        assert (s["pages_shared"], s["pages_sharing"]) == (n // 4, 3 * n // 4), s
        assert (pool.page_states(a)[0] == PTE_PRIVATE).all()
        assert (pool.page_states(b)[0] == PTE_KSM).all()
        assert not range_maps_duplicates(pool, a)
        assert same(a, ref_a) and same(b, ref_b)
        kv.check_growth(n + n // 4, 3 * n // 4 * PAGE)
        assert s["bytes_resident"] == kernel_resident_bytes(pool)
        assert s["bytes_private"] == n * PAGE and s["bytes_frames"] == n // 4 * PAGE

        # unmerged: writing breaks no COW and changes the written page only
        cows = pool.stats()["cow_breaks"]
        pages(a)[1, :8] = 0xEE
        assert pool.stats()["cow_breaks"] == cows
        assert (pages(a)[1, :8] == 0xEE).all()
        assert (pages(a)[0] == pages(ref_a)[0]).all()
        assert same(pages(a)[2:], pages(ref_a)[2:])
        assert kernel_resident_bytes(pool) == (n + n // 4) * PAGE

        # and it is no longer scanned (MADV_UNMERGEABLE)
        pool.scan(full_scans=2)
        assert pool.buffer_stats(a)["pages_merged"] == 0
        assert pool.buffer_stats(a)["mergeable"] is False


# -- ksm_tests.c -Z: check_ksm_zero_page_merge -----------------------------------


@pytest.mark.parametrize("page_count", [10, 2048])
@pytest.mark.parametrize("use_zero_pages", [True, False])
def test_check_ksm_zero_page_merge(use_zero_pages, page_count):
    with make_pool(use_zero_pages=use_zero_pages) as pool:
        z = pool.empty((page_count, PAGE), dtype=np.uint8)
        z[:] = 1  # memset(map, 0, ...) over
        z[:] = 0  # pages that were really used
        kv = KernelView(pool, z)
        assert kv.resident == page_count * PAGE and kv.memfd == 0

        s = pool.scan(full_scans=2)
        kv.after()

        state = pool.page_states(z)[0]
        if use_zero_pages:
            # merged with the zero page, not with each other: no KSM pages,
            # no frames at all
            assert (s["pages_shared"], s["pages_sharing"]) == (0, 0), s
            assert s["ksm_zero_pages"] == page_count
            assert (state == PTE_ZERO).all()
            kv.check_saving(0, page_count * PAGE)
        else:
            shared, sharing = expected_counts(page_count, pool.max_page_sharing)
            assert (s["pages_shared"], s["pages_sharing"]) == (shared, sharing), s
            assert s["ksm_zero_pages"] == 0
            assert np.count_nonzero(state == PTE_KSM) == shared + sharing
            assert not (state == PTE_ZERO).any()
            kv.check_saving(page_count - sharing, sharing * PAGE)
        assert not z.any()


# -- ksm_functional_tests.c ----------------------------------------------------


@pytest.mark.parametrize("cow", COW_MODES)
def test_unmerge_then_cow(cow):
    """test_unmerge(): after MADV_UNMERGEABLE no frame backs two pages; then
    writes are plain writes (no COW faults) and hit only their page."""
    with make_pool(cow=cow) as pool:
        n = 2048
        a = pool.empty((n, PAGE), dtype=np.uint8)
        pages(a)[:] = 0xCF
        pages(a).view(np.uint32)[:, 1] = np.arange(n, dtype=np.uint32) // 8
        ref = a.copy()
        kv = KernelView(pool, a)
        s = pool.scan(full_scans=2)
        kv.after()
        assert (s["pages_shared"], s["pages_sharing"]) == (n // 8, 7 * n // 8), s
        assert range_maps_duplicates(pool, a)
        kv.check_saving(n // 8, 7 * n // 8 * PAGE)

        kv.take()
        assert pool.unmerge(a) == n
        kv.after()
        assert not range_maps_duplicates(pool, a)
        assert same(a, ref)
        kv.check_growth(n, 7 * n // 8 * PAGE)
        # no frame is left: every page is private anonymous memory
        assert memfd_bytes(pool) == 0

        before = pool.stats()
        pages(a)[::3, 100] = 0x11
        ref.view(np.uint8).reshape(-1, PAGE)[::3, 100] = 0x11
        s = pool.stats()
        assert s["cow_breaks"] == before["cow_breaks"]
        assert s["cow_breaks_signal"] == before["cow_breaks_signal"]
        assert same(a, ref)
        assert kernel_resident_bytes(pool) == s["bytes_resident"] == n * PAGE


@pytest.mark.parametrize("cow", COW_MODES)
def test_write_breaks_cow_of_the_written_page_only(cow):
    with make_pool(cow=cow) as pool:
        n, g = 2048, 8
        a = pool.empty((n, PAGE), dtype=np.uint8)
        fill_groups(a, g)
        ref = a.copy()
        kv = KernelView(pool, a)
        pool.scan(full_scans=2)
        kv.after()
        kv.check_saving(n // g, (n - n // g) * PAGE)
        state0, pfn0, mc0 = pool.page_states(a)
        assert (state0 == PTE_KSM).all() and (mc0 == g).all()

        before = pool.stats()
        k = 5 * g + 3  # a page in the middle of group 5
        pages(a)[k, 1000:1004] = 0x77
        pages(ref)[k, 1000:1004] = 0x77
        after = pool.stats()
        state, pfn, mc = pool.page_states(a)
        # the writer has a private page: no frame, and no mapcount
        assert state[k] == PTE_PRIVATE and pfn[k] == 0 and mc[k] == 0
        others = np.arange(n) != k
        assert (state[others] == PTE_KSM).all() and (pfn[others] == pfn0[others]).all()
        group = slice(5 * g, 6 * g)
        assert (mc[group][np.arange(g) != 3] == g - 1).all()
        assert after["cow_breaks"] == before["cow_breaks"] + 1
        assert after["cow_breaks_signal"] == before["cow_breaks_signal"] + (cow == "signal")
        assert after["pages_sharing"] == before["pages_sharing"] - 1
        assert after["pages_shared"] == before["pages_shared"]
        assert same(a, ref)  # the copy kept the rest of the page
        # one private page more; the frames are as they were
        assert memfd_bytes(pool) == n // g * PAGE == after["bytes_frames"]
        assert kernel_resident_bytes(pool) == (n // g + 1) * PAGE == after["bytes_resident"]

        # writing every page of one group leaves no KSM frame for it: the
        # frame goes back to the kernel with its last view, and each page
        # is one private page
        pages(a)[6 * g : 7 * g, 0] = 0x99
        pages(ref)[6 * g : 7 * g, 0] = 0x99
        s = pool.stats()
        assert s["pages_shared"] == n // g - 1
        st, pf, mc = pool.page_states(a)
        assert (st[6 * g : 7 * g] == PTE_PRIVATE).all() and not mc[6 * g : 7 * g].any()
        assert pfn0[6 * g] not in pf[st == PTE_KSM]
        assert memfd_bytes(pool) == s["bytes_frames"] == (n // g - 1) * PAGE
        assert s["bytes_private"] == (g + 1) * PAGE
        assert kernel_resident_bytes(pool) == s["bytes_resident"] == (n // g + g) * PAGE
        assert same(a, ref)


@pytest.mark.parametrize("cow", COW_MODES)
def test_unmerge_zero_pages(cow):
    """test_unmerge_zero_pages(): ksm_zero_pages after merging, after
    unmerging half of the region, and after write faults on the other half."""
    with make_pool(use_zero_pages=True, cow=cow) as pool:
        half = 1024  # 2 x 4 MiB
        lo = pool.empty((half, PAGE), dtype=np.uint8)
        hi = pool.empty((half, PAGE), dtype=np.uint8)
        for z in (lo, hi):
            z[:] = 0xFF
            z[:] = 0
        kv = KernelView(pool, lo, hi)
        s = pool.scan(full_scans=2)
        kv.after()
        assert s["ksm_zero_pages"] == 2 * half
        kv.check_saving(0, 2 * half * PAGE)

        assert pool.unmerge(lo) == half
        s = pool.stats()
        assert s["ksm_zero_pages"] == half
        assert (pool.page_states(lo)[0] == PTE_PRIVATE).all()
        assert not lo.any()

        zcows = s["zero_page_cows"]
        stamps = np.arange(half, dtype=np.uint32) + 1
        pages(hi).view(np.uint32)[:, 0] = stamps
        s = pool.stats()
        assert s["ksm_zero_pages"] == 0
        assert s["zero_page_cows"] == zcows + half
        assert (pool.page_states(hi)[0] == PTE_PRIVATE).all()
        assert not range_maps_duplicates(pool, lo, hi)
        assert (pages(hi).view(np.uint32)[:, 0] == stamps).all()
        assert not pages(hi)[:, 4:].any() and not lo.any()
        # every page is a private page again, and the kernel sees them all
        assert s["bytes_resident"] == s["bytes_private"] == 2 * half * PAGE
        assert kernel_resident_bytes(pool) == s["bytes_resident"]
        assert memfd_bytes(pool) == 0


def test_merge_reenables_scanning():
    with make_pool() as pool:
        n = 2048
        a = pool.empty((n, PAGE), dtype=np.uint8)
        fill_groups(a, 4)
        ref = a.copy()
        pool.scan(full_scans=2)
        assert pool.buffer_stats(a)["pages_merged"] == n
        pool.unmerge(a)
        pool.scan(full_scans=2)
        assert pool.buffer_stats(a)["pages_merged"] == 0
        assert kernel_resident_bytes(pool) == n * PAGE and memfd_bytes(pool) == 0

        kv = KernelView(pool, a)
        pool.merge(a)
        assert pool.buffer_stats(a)["mergeable"] is True
        s = pool.scan(full_scans=2)
        kv.after()
        assert (s["pages_shared"], s["pages_sharing"]) == (n // 4, 3 * n // 4), s
        assert pool.buffer_stats(a)["pages_merged"] == n
        kv.check_saving(n // 4, 3 * n // 4 * PAGE)
        assert same(a, ref)
        pool.merge(a)  # already mergeable: no change
        assert pool.stats()["pages_tracked"] == n


def test_merge_in_forked_child():
    """test_prctl_fork(): merging still works in a forked child, and the
    child's writes to merged pages never reach the parent."""
    with make_pool() as pool:
        n = 1024
        a = pool.empty((n, PAGE), dtype=np.uint8)
        fill_groups(a, 2)
        pool.scan(full_scans=2)
        ref = a.copy()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no pytest here
            code = 1
            try:
                os.close(r)
                ok = same(a, ref)
                pages(a)[0, :] = 0x42  # COW break in the child
                ok &= (pages(a)[0] == 0x42).all() and (pages(a)[1] == pages(ref)[1]).all()
                b = pool.empty((n, PAGE), dtype=np.uint8)
                fill_groups(b, 2, base=10 * n)
                s = pool.scan(full_scans=2)
                # a keeps n/2 - 1 sharers (page 1 is its frame's last mapper)
                ok &= s["pages_sharing"] == (n // 2 - 1) + n // 2
                ok &= pool.buffer_stats(b)["pages_ksm"] == n
                # its first merge gave it a frame store of its own
                ok &= s["fork_detaches"] == 1
                os.write(w, b"%d" % s["pages_sharing"])
                code = 0 if ok else 2
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            child_sharing = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, child_sharing)
        assert same(a, ref)  # the child's write stayed there
        s = pool.stats()
        assert (s["pages_shared"], s["pages_sharing"]) == (n // 2, n // 2)
        assert (pool.page_states(a)[0] == PTE_KSM).all()
        assert memfd_bytes(pool) == n // 2 * PAGE == s["bytes_resident"]
