"""Migration: pool.compact() and pool.shrink() (csrc/migrate.c).

The frame store (the memfd) holds only stable KSM frames; private pages are
anonymous memory and never move.  Merges take the lowest free frame, but COW
breaks and frees give frames back wherever they are, so the memfd keeps its
high-water size; compaction moves the highest live frames into the lowest
holes (the views and the scanner's stable nodes follow) and cuts the file
after them, never below what a private mapping of the store still covers
(pages copied on write above the cut get anonymous memory of their own
first), and not at all while a fork epoch is open.  shrink(nbytes) takes
frames off the top of the store for good, moving what lives there below.

Real fragmentation, real frames moved under real mappings: every check is
against numpy shadow copies and the kernel's own view (fstat of the memfd,
/proc/self/maps, /proc/self/pagemap, smaps)."""

import errno
import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import uksm

from conftest import KSM, PRIVATE, kernel_private_bytes, run_isolated, states

PAGE = uksm.PAGE_SIZE
COWS = ["kernel", "signal"]
HERE = os.path.dirname(os.path.abspath(__file__))


# -- the kernel's view ------------------------------------------------------------


def maps_count() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def memfd_frames(pool):
    """(st_size, st_blocks) of the frame store, in pages."""
    st = os.fstat(pool.fd)
    return st.st_size // PAGE, st.st_blocks * 512 // PAGE


def store_mappings_past_eof(pool) -> list:
    """The private mappings of the frame store that reach past its end of
    file: a page there that was copied on write would be unmapped by the
    cut (truncate_pagecache() drops private COWed pages too), and a view
    there would SIGBUS.  Compaction must never leave one."""
    st = os.fstat(pool.fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 5 or parts[4] != str(st.st_ino) or parts[3] != dev:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            end = int(parts[2], 16) + hi - lo
            if parts[1][3] == "p" and end > st.st_size:
                out.append(line.strip())
    return out


def pagemap(a: np.ndarray) -> np.ndarray:
    """/proc/self/pagemap entries of @a's pages (PFNs need CAP_SYS_ADMIN)."""
    addr = a.__array_interface__["data"][0]
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        return np.frombuffer(f.read(8 * (a.nbytes // PAGE)), np.uint64).copy()


# -- building fragmentation -----------------------------------------------------------


def rand_pages(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, PAGE), dtype=np.uint8)


def merged_pair(pool, data):
    """Two pool copies of @data, for the scanner to merge."""
    return pool.asarray(data), pool.asarray(data)


def fragment(pool, npairs=24, pages=128, seed=0):
    """Merge @npairs pairs of distinct pages (frames [0, npairs * pages) in
    order), then scatter the live frames: free every other pair (holes of
    a pair each), COW-write both sharers of every third page of a quarter of
    the pairs, differently (those frames are freed), and one sharer of every
    fifth page of another quarter (those frames keep one view).
    Returns (live arrays, their shadows, the never-written sharer of the top
    pair: all its frames lie above the line and move)."""
    rng = np.random.default_rng(seed)
    pairs = [merged_pair(pool, rand_pages(rng, pages)) for _ in range(npairs)]
    s = pool.scan(full_scans=2)
    assert s["pages_shared"] == npairs * pages and s["pages_sharing"] == npairs * pages
    for i in range(0, npairs, 2):
        a, b = pairs[i]
        pairs[i] = None
        pool.free(a)
        pool.free(b)
        del a, b
    for i in range(1, npairs, 4):
        pairs[i][0][::3, 0] ^= 1
        pairs[i][1][::3, 0] ^= 2  # both copied, and not equal again
    for i in range(3, npairs, 4):
        pairs[i][1][::5, 1] ^= 1  # one copied: the frame keeps a view
    assert npairs % 4 == 0  # the top pair is one written one-sided
    live = [x for p in pairs if p is not None for x in p]
    return live, [np.array(x) for x in live], pairs[-1][0]


def snapshot(pool, arrays):
    return [pool.page_states(a) for a in arrays]


# -- compaction ------------------------------------------------------------------------


@pytest.mark.parametrize("cow", COWS)
def test_compact_shrinks_the_memfd_to_the_live_frames(cow):
    with uksm.Pool("64MiB", checksum="xxhash", cow=cow) as pool:
        live, shadow, top = fragment(pool)
        s = pool.stats()  # reconciles the kernel's COWs
        nlive = s["pages_shared"]
        size, blocks = memfd_frames(pool)
        assert 0 < nlive and size >= 2 * nlive  # really fragmented
        assert blocks == nlive and s["bytes_frames"] == nlive * PAGE  # holes punched
        before = snapshot(pool, live)
        top_pfns = pool.page_states(top)[1]
        assert int(top_pfns.min()) >= nlive  # the top pair is above the line
        private = kernel_private_bytes(pool)

        result = pool.compact()

        assert memfd_frames(pool) == (nlive, nlive)  # cut to exactly the live frames
        assert result["memfd_size_before"] == size * PAGE
        assert result["memfd_size_after"] == nlive * PAGE
        assert result["size_released"] == (size - nlive) * PAGE
        assert result["memfd_bytes_after"] == nlive * PAGE
        assert result["frames_moved"] > 0 and result["frames_skipped"] == 0
        assert result["bytes_moved"] == result["frames_moved"] * PAGE
        assert store_mappings_past_eof(pool) == []
        s2 = pool.stats()
        assert (s2["pages_shared"], s2["pages_sharing"]) == (nlive, s["pages_sharing"])
        assert s2["bytes_frames"] == nlive * PAGE
        # private pages (the COWed ones included) are memory the kernel holds
        # once, before and after: evacuating them above the cut copies nothing twice
        assert kernel_private_bytes(pool) == private
        assert s2["bytes_private"] == s["bytes_private"]
        for _, (st0, _pfn0, mc0), (st1, pfn1, mc1) in zip(live, before, snapshot(pool, live)):
            assert np.array_equal(st0, st1) and np.array_equal(mc0, mc1)
            ksm = st1 == KSM
            assert (pfn1[ksm] < nlive).all()
            assert (pfn1[~ksm] == 0).all()
        # the top pair moved, and both sharers still share each frame
        st1, pfn1, mc1 = pool.page_states(top)
        assert (st1 == KSM).all() and (pfn1 < nlive).all()
        assert not np.array_equal(pfn1, top_pfns)
        for a, sh in zip(live, shadow):
            assert np.array_equal(a, sh)
        # a second compaction has nothing left to do
        again = pool.compact()
        assert again["frames_moved"] == 0 and memfd_frames(pool) == (nlive, nlive)


@pytest.mark.parametrize("cow", COWS)
def test_stable_nodes_follow_their_frames(cow):
    """After moving KSM frames, new copies still merge into them (the stable
    nodes were moved by pfn, not lost: pages_shared does not grow), and
    writes still COW correctly."""
    with uksm.Pool("64MiB", checksum="xxhash", cow=cow) as pool:
        live, shadow, top = fragment(pool)
        pool.scan(full_scans=1)  # sweeps the stale nodes out
        nodes = pool._scanner.stable.nr_alive
        s = pool.stats()
        shared, sharing = s["pages_shared"], s["pages_sharing"]
        assert nodes == shared
        _, pfn0, _ = pool.page_states(top)
        assert pool.compact()["frames_moved"] > 0
        assert pool._scanner.stable.nr_alive == nodes
        st1, pfn1, mc1 = pool.page_states(top)
        assert (st1 == KSM).all() and (pfn1 < shared).all() and (pfn1 != pfn0).all()
        # no stable node points at a frame that is not a live KSM frame now
        st = pool._scanner.stable
        alive = st.alive[: st.n]
        assert (st.pfn[: st.n][alive] < shared).all()

        k = next(i for i, a in enumerate(live) if a is top)
        copy = pool.asarray(shadow[k])
        s = pool.scan(full_scans=2)
        assert s["pages_shared"] == shared  # no new KSM frame
        assert s["pages_sharing"] == sharing + copy.nbytes // PAGE
        st2, pfn2, mc2 = pool.page_states(copy)
        assert (st2 == KSM).all() and np.array_equal(pfn2, pfn1)
        assert np.array_equal(mc2, mc1 + 1)
        copy[0, 0] ^= 0xFF
        assert np.array_equal(live[k], shadow[k]) and copy[0, 0] == shadow[k][0, 0] ^ 0xFF
        top[-1, -1] ^= 0xFF
        assert np.array_equal(copy[-1], shadow[k][-1])
        top[-1, -1] ^= 0xFF
        for a, sh in zip(live, shadow):
            assert np.array_equal(a, sh)


@pytest.mark.parametrize("cow", COWS)
def test_stable_node_chains_follow_their_frames(cow):
    """1000 equal pages at max_page_sharing 256: one chain of four frames
    (256, 256, 256, 232 views) above a freed filler.  Each moves with all its
    views, and the chain keeps them: 24 more copies fill the moved, not yet
    full frame instead of making a fifth."""
    with uksm.Pool("64MiB", checksum="xxhash", cow=cow) as pool:
        rng = np.random.default_rng(11)
        filler = merged_pair(pool, rand_pages(rng, 1024))
        pool.scan(full_scans=2)
        a = pool.full((1000, PAGE), 7, np.uint8)
        s = pool.scan(full_scans=2)
        assert (s["stable_node_chains"], s["stable_node_dups"]) == (1, 4)
        _, pfn, _ = pool.page_states(a)
        frames, views = np.unique(pfn, return_counts=True)
        assert np.array_equal(frames, np.arange(1024, 1028))
        assert sorted(views) == [232, 256, 256, 256]
        del filler
        gc.collect()
        result = pool.compact()
        assert result["frames_moved"] == 4 and result["frames_skipped"] == 0
        st, pfn2, mc = pool.page_states(a)
        assert (st == KSM).all() and np.array_equal(pfn2, pfn - 1024)
        b = pool.full((24, PAGE), 7, np.uint8)
        s = pool.scan(full_scans=2)
        assert (s["pages_shared"], s["stable_node_dups"]) == (4, 4)
        st, pfn_b, mc_b = pool.page_states(b)
        room = int(frames[views == 232][0]) - 1024  # the one not full
        assert (st == KSM).all() and (pfn_b == room).all() and (mc_b == 256).all()
        assert memfd_frames(pool) == (4, 4)
        assert (a == 7).all() and (b == 7).all()
        a[::3, 0] = 1  # COW from the moved frames
        assert (a[::3, 0] == 1).all() and (a[1::3] == 7).all() and (b == 7).all()


@pytest.mark.parametrize("cow", COWS)
def test_compact_coalesces_scattered_frames_into_fewer_vmas(cow):
    """Merges into scattered one-frame holes give a buffer a mapping per page;
    compaction lays its frames out consecutively again, in one mapping per run."""
    K = 1024
    with uksm.Pool("64MiB", checksum="xxhash", cow=cow) as pool:
        rng = np.random.default_rng(1)
        f = merged_pair(pool, rand_pages(rng, K))  # frames [0, K)
        g = merged_pair(pool, rand_pages(rng, 2 * K))  # frames [K, 3K)
        pool.scan(full_scans=2)
        g[0][::2, 0] ^= 1
        g[1][::2, 0] ^= 2  # every other frame of g freed: 1-frame holes
        assert pool.stats()["pages_shared"] == 2 * K
        data = rand_pages(rng, K)
        a, b = merged_pair(pool, data)
        pool.scan(full_scans=2)
        st, pfn, _ = pool.page_states(a)
        assert (st == KSM).all()
        assert (np.diff(pfn.astype(np.int64)) == 2).all()  # scattered into the holes
        del f, g
        gc.collect()
        before = maps_count()
        result = pool.compact()
        after = maps_count()
        assert result["frames_moved"] == K and result["frames_skipped"] == 0
        assert after < before - K, (before, after)  # a and b: a VMA per page before
        assert result["vmas_after"] < result["vmas_before"] - K
        st, pfn, mc = pool.page_states(a)
        assert (st == KSM).all() and np.array_equal(pfn, np.arange(K)) and (mc == 2).all()
        assert np.array_equal(pool.page_states(b)[1], pfn)
        assert memfd_frames(pool) == (K, K)
        assert np.array_equal(a, data) and np.array_equal(b, data)


@pytest.mark.parametrize("cow", COWS)
def test_writers_during_compaction_lose_nothing(cow):
    """Threads keep writing (shadowed) into merged pairs, the same bytes into
    both sharers, so their pages are COWed, freed, merged again elsewhere
    and moved, while pool.compact() and pool.scan() run in a loop."""
    with uksm.Pool("64MiB", checksum="xxhash", cow=cow) as pool:
        rng = np.random.default_rng(3)
        words = PAGE // 8
        pairs = [
            merged_pair(pool, rng.integers(0, 1 << 62, (64, words), dtype=np.int64))
            for _ in range(32)
        ]
        assert pool.scan(full_scans=2)["pages_shared"] == 32 * 64
        shadow = [np.array(a) for a, _ in pairs]
        stop = threading.Event()
        errors = []
        lock = threading.Lock()
        writes = [0]

        def writer(seed):
            r = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    k, i = int(r.integers(len(pairs))), int(r.integers(64))
                    j, v = int(r.integers(words)), int(r.integers(1 << 62))
                    with lock:  # shadow and arrays agree
                        pairs[k][0][i, j] = v
                        pairs[k][1][i, j] = v
                        shadow[k][i, j] = v
                        writes[0] += 1
                    time.sleep(2e-4)
            except Exception as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        moved = rounds = 0
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                # junk merged and partly freed: holes below the pairs' frames
                junk = [pool.asarray(rand_pages(rng, 16)) for _ in range(4)]
                junk += [pool.asarray(j) for j in junk]
                pool.scan(full_scans=1)
                del junk[::3]
                moved += pool.compact()["frames_moved"]
                rounds += 1
                assert store_mappings_past_eof(pool) == []
                del junk
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "writer stuck"
        assert not errors
        assert moved > 0 and rounds > 1 and writes[0] > 100
        s = pool.stats()
        assert s["cow_breaks"] > 0
        for (a, b), sh in zip(pairs, shadow):
            assert np.array_equal(a, sh) and np.array_equal(b, sh)
        # quiet now: one more compaction cuts the store to the live frames
        pool.compact()
        nlive = pool.stats()["pages_shared"]
        assert memfd_frames(pool) == (nlive, nlive)
        for (a, b), sh in zip(pairs, shadow):
            assert np.array_equal(a, sh) and np.array_equal(b, sh)


def test_kernel_writers_during_compaction_lose_nothing():
    """cow="kernel": a syscall writing into a merged page (readv) is copied
    on write by the kernel, like a user-space write (csrc/uksm.h).  While
    compaction moves that page's frame the page is write-protected, and a
    kernel write cannot wait in our handler as a user-space one does: it
    fails with EFAULT, as documented (pin() is the guarantee).  What must
    never happen is a write lost or half done: a call either lands whole
    or fails whole and changes nothing."""
    N = 2048
    src = os.memfd_create("uksm-test-src")
    try:
        srcbytes = np.random.default_rng(9).integers(0, 256, PAGE, np.uint8)
        os.write(src, srcbytes.tobytes())
        with uksm.Pool("64MiB", cow="kernel") as pool:
            rng = np.random.default_rng(9)
            for _ in range(5):
                a, b, data = high_pair(pool, rng, N, N)  # frames [N, 2N)
                shadow = data.copy()
                go, stop, errors = threading.Event(), threading.Event(), []

                def kernel_writer(a, shadow, go, stop, errors):
                    r = np.random.default_rng(10)
                    go.wait()
                    for i in r.permutation(N):
                        if stop.is_set():
                            break
                        off, n = int(r.integers(PAGE - 64)), int(r.integers(1, 64))
                        try:
                            got = os.preadv(src, [memoryview(a[i])[off : off + n]], off)
                            shadow[i, off : off + got] = srcbytes[off : off + got]
                        except OSError as exc:
                            if exc.errno != errno.EFAULT:
                                errors.append(exc)
                        except Exception as exc:
                            errors.append(exc)

                t = threading.Thread(target=kernel_writer, args=(a, shadow, go, stop, errors))
                t.start()
                go.set()
                try:
                    moved = pool.compact()["frames_moved"]
                finally:
                    stop.set()
                    t.join(timeout=30)
                assert moved == N
                assert not errors, f"{len(errors)} failed: {errors[0]!r}"
                assert np.array_equal(a, shadow) and np.array_equal(b, data)
                pool.free(a)
                pool.free(b)
                del a, b
    finally:
        os.close(src)


# -- compaction and pages copied on write: never cut under one ---------------------------


def _isolated(fn: str, *args, timeout: float = 120) -> str:
    return run_isolated("test_migrate", fn, *args, timeout=timeout)


def cut_under_cowed_pages(cow: str, how: str) -> None:
    """(in a child interpreter) a and b share n frames; pages of a are copied
    on write, b is freed, and compaction cuts the store after the live
    frames.  The copied pages live in a's mappings of the store at the
    offsets of the frames they came from, above the cut: they must keep the
    written bytes (and not SIGBUS), also once the store grows over those
    offsets again.

    high, high-reconciled: a's frames are [F, F + n) above a freed filler,
    its upper half is written (and, cow="kernel", read(2) into); compaction
    moves the lower half down to [0, n/2) and cuts there (the -reconciled
    variant lets stats() learn of the kernel's copies first, the other
    leaves that to compaction).  straddle: frames [0, n), the upper half
    and the frame just below it copied: nothing moves, a's one mapping of the
    store straddles the cut.  sparse: every other page written.  unmerge:
    all of a made private by unmerge(), no frame left at all."""
    n, F = 256, 1024
    with uksm.Pool("64MiB", cow=cow, sleep_millisecs=0) as pool:
        rng = np.random.default_rng(5)
        base = F if how.startswith("high") else 0
        filler = merged_pair(pool, rand_pages(rng, F)) if base else None
        data = rand_pages(rng, n)
        a, b = merged_pair(pool, data)
        pool.scan(full_scans=2)
        _, pfn, mc = pool.page_states(a)
        assert np.array_equal(pfn, np.arange(base, base + n)) and (mc == 2).all()
        del filler
        gc.collect()
        expect = data.copy()
        copied = np.zeros(n, bool)  # a's pages written: private now
        if how.startswith("high"):
            a[n // 2 :, 7] = 0xAB  # COW of the highest frames' views
            expect[n // 2 :, 7] = 0xAB
            copied[n // 2 :] = True
            if cow == "kernel":  # and a kernel write: the kernel's COW too
                r, w = os.pipe()
                os.write(w, b"\x5a" * 100)
                assert os.readv(r, [memoryview(a[n - 1])[1000:1100]]) == 100
                os.close(r)
                os.close(w)
                expect[n - 1, 1000:1100] = 0x5A
            live, moved = n // 2, n // 2
        elif how == "straddle":
            a[n // 2 - 1 :, 3] = 0x77
            expect[n // 2 - 1 :, 3] = 0x77
            copied[n // 2 - 1 :] = True
            b[n // 2 - 1, 3] = 0x76  # both copied: that frame is freed too
            live, moved = n // 2 - 1, 0
        elif how == "sparse":
            a[::2, 3] = 0x55
            expect[::2, 3] = 0x55
            copied[::2] = True
            live, moved = n // 2, n // 4
        else:
            assert how == "unmerge"
            assert pool.unmerge(a) == n
            copied[:] = True
            live, moved = 0, 0
        pool.free(b)
        del b
        if how.endswith("reconciled"):
            pool.stats()
        result = pool.compact()
        past = store_mappings_past_eof(pool)
        assert past == [], past  # checked before a is touched
        assert result["frames_skipped"] == 0
        assert result["frames_moved"] == moved, result
        assert memfd_frames(pool) == (live, live), result  # the cut was made
        assert pool.stats()["pages_shared"] == live
        st, pfn, mc = pool.page_states(a)
        assert (st == KSM).sum() == live and (pfn[st == KSM] < live).all()
        assert np.array_equal(st == PRIVATE, copied)
        assert np.array_equal(a, expect)
        # the store grows again over the offsets the copied pages came from:
        # a must not see the new frames
        c = merged_pair(pool, rand_pages(rng, base + n))
        pool.scan(full_scans=2)
        assert memfd_frames(pool)[1] == live + base + n
        assert np.array_equal(a, expect)
        a[:, 8] = 0x11  # the copies are still a's, writable
        expect[:, 8] = 0x11
        assert np.array_equal(a, expect)
        del c
        pool.compact()
        assert store_mappings_past_eof(pool) == []
        assert np.array_equal(a, expect)
    print("ok")


@pytest.mark.parametrize("how", ["high", "high-reconciled", "straddle", "sparse", "unmerge"])
@pytest.mark.parametrize("cow", COWS)
def test_compaction_never_cuts_the_file_under_a_cowed_page(cow, how):
    assert _isolated("cut_under_cowed_pages", cow, how).strip() == "ok"


@pytest.mark.parametrize("cow", COWS)
def test_pinned_pages_are_untouched_by_compaction(cow):
    """A pinned buffer is private anonymous memory: compaction and shrink move
    its sharer's frames but leave its pages alone (same physical pages, same
    bytes), and the store is not cut under them while they stay in their
    mapping of it."""
    n, F = 256, 1024
    with uksm.Pool("64MiB", cow=cow) as pool:
        rng = np.random.default_rng(6)
        filler = merged_pair(pool, rand_pages(rng, F))
        data = rand_pages(rng, n)
        a, b = merged_pair(pool, data)
        pool.scan(full_scans=2)
        assert np.array_equal(pool.page_states(a)[1], np.arange(F, F + n))
        del filler
        gc.collect()
        with pool.pin(a):
            st, pfn, mc = pool.page_states(a)
            assert (st == PRIVATE).all() and (pfn == 0).all()
            pm = pagemap(a)
            assert (pm >> 63 == 1).all()  # present, written
            result = pool.compact()
            assert result["frames_moved"] == n  # b's frames moved
            assert np.array_equal(pool.page_states(b)[1], np.arange(n))
            past = store_mappings_past_eof(pool)
            assert past == [], past  # checked before a is touched
            assert np.array_equal(pagemap(a), pm)  # the very same pages
            assert (states(pool, a) == PRIVATE).all()
            assert np.array_equal(a, data) and np.array_equal(b, data)
            # pinned pages are no frames: a shrink neither moves nor refuses them
            pool.shrink((64 << 20) - 2 * n * PAGE)
            assert store_mappings_past_eof(pool) == []
            assert np.array_equal(pagemap(a), pm)
            assert np.array_equal(a, data) and np.array_equal(b, data)
            a[0, 0] ^= 1  # still writable
            a[0, 0] ^= 1
        # unpinned and rescanned, a shares b's (moved) frames; then the store
        # can be cut to them
        s = pool.scan(full_scans=2)
        st, pfn, mc = pool.page_states(a)
        assert (st == KSM).all() and np.array_equal(pfn, np.arange(n)) and (mc == 2).all()
        assert s["pages_shared"] == n
        pool.compact()
        assert memfd_frames(pool) == (n, n)
        assert np.array_equal(a, data) and np.array_equal(b, data)


# -- shrink: offlining the top of the frame store ---------------------------------------


def high_pair(pool, rng, filler_pages: int, n: int):
    """A merged pair whose frames lie at [filler_pages, filler_pages + n):
    a filler pair takes the low frames first, one copy of it is freed to
    make room, and after the merge the other: holes below the pair."""
    f1, f2 = merged_pair(pool, rand_pages(rng, filler_pages))
    pool.scan(full_scans=2)
    pool.free(f2)
    del f2
    data = rand_pages(rng, n)
    a, b = merged_pair(pool, data)
    pool.scan(full_scans=2)
    pool.free(f1)
    del f1
    _, pfn, mc = pool.page_states(a)
    assert np.array_equal(pfn, np.arange(filler_pages, filler_pages + n)) and (mc == 2).all()
    return a, b, data


@pytest.mark.parametrize("cow", COWS)
def test_shrink_migrates_shared_frames_out_of_the_removed_range(cow):
    with uksm.Pool("16MiB", checksum="xxhash", cow=cow) as pool:  # 4096 frames
        rng = np.random.default_rng(2)
        n = 128
        a, b, data = high_pair(pool, rng, 2048, n)  # frames [2048, 2176)
        limit = 1024
        result = pool.shrink(3072 * PAGE)  # frames [1024, 4096) go
        st, pfn, mc = pool.page_states(a)
        assert (st == KSM).all() and (pfn < limit).all() and (mc == 2).all()
        assert np.array_equal(pool.page_states(b)[1], pfn)
        assert result["frames_moved"] == n and result["frames_skipped"] == 0
        assert np.array_equal(a, data) and np.array_equal(b, data)
        # no stable node points past the new top (patch 8)
        st_ = pool._scanner.stable
        alive = st_.alive[: st_.n]
        assert alive.any() and (st_.pfn[: st_.n][alive] < limit).all()
        assert memfd_frames(pool) == (n, n)
        assert store_mappings_past_eof(pool) == []
        # the sharing survives: a third copy merges into the moved frames
        c = pool.asarray(data)
        s = pool.scan(full_scans=2)
        assert s["pages_shared"] == n
        assert (states(pool, c) == KSM).all() and np.array_equal(pool.page_states(c)[1], pfn)
        b[0, 0] ^= 0xFF  # COW still works
        assert np.array_equal(a, data) and b[0, 0] == data[0, 0] ^ 0xFF
        # the store stays within its new size: merges beyond it find no frame
        # and leave their pages private, intact
        more = rand_pages(rng, 1000)
        m1, m2 = merged_pair(pool, more)
        s = pool.scan(full_scans=2)
        assert s["pages_shared"] == limit
        for x in (a, c, m1, m2):
            st, pfn, _ = pool.page_states(x)
            assert (pfn[st == KSM] < limit).all()
        assert (states(pool, m1) == KSM).sum() == limit - n
        assert memfd_frames(pool)[0] <= limit
        assert np.array_equal(m1, more) and np.array_equal(m2, more)
        assert np.array_equal(a, data) and np.array_equal(c, data)


@pytest.mark.parametrize("cow", COWS)
def test_shrink_refuses_what_does_not_fit_and_keeps_everything(cow):
    with uksm.Pool("32MiB", cow=cow) as pool:  # 8192 frames
        rng = np.random.default_rng(4)
        data = rand_pages(rng, 2560)
        a, b = merged_pair(pool, data)
        s = pool.scan(full_scans=2)
        assert s["pages_shared"] == 2560
        cap = pool.capacity
        before = snapshot(pool, (a, b))
        size = memfd_frames(pool)
        with pytest.raises(uksm.PoolFullError):
            pool.shrink("24MiB")  # 2048 frames left < 2560 live
        assert pool.capacity == cap
        for (st0, pfn0, mc0), (st1, pfn1, mc1) in zip(before, snapshot(pool, (a, b))):
            assert np.array_equal(st0, st1) and np.array_equal(pfn0, pfn1)
            assert np.array_equal(mc0, mc1)
        assert memfd_frames(pool) == size
        assert np.array_equal(a, data) and np.array_equal(b, data)
        with pytest.raises(ValueError):
            pool.shrink(1000)  # not page aligned
        with pytest.raises(ValueError):
            pool.shrink(-4096)
        # nothing was taken away: 4096 frames may still go (2560 live fit)
        pool.shrink("16MiB")
        assert np.array_equal(a, data) and np.array_equal(b, data)
        with pytest.raises(uksm.PoolFullError):
            pool.shrink(2048 * PAGE)  # 2048 left < 2560 live
        assert (states(pool, a) == KSM).all() and np.array_equal(a, data)


@pytest.mark.parametrize("skip", [0, 1], ids=["no-view-moves", "one-sharer-moves"])
@pytest.mark.parametrize("cow", COWS)
def test_shrink_whose_remaps_fail_is_refused_and_keeps_everything(cow, skip):
    """Views that cannot be remapped (mmap ENOMEM: vm.max_map_count) keep
    their frame in the range to be removed: shrink is refused (UksmError),
    the store keeps its size and the file stays under every view; with one
    sharer moved and the other not, the frame is two frames, each with its
    bytes.  Once mmap works again the same shrink goes through."""
    n, limit = 128, 1024
    with uksm.Pool("16MiB", cow=cow) as pool:
        rng = np.random.default_rng(8)
        a, b, data = high_pair(pool, rng, 2048, n)  # frames [2048, 2176)
        try:
            uksm._core.inject("mmap", skip, -1, errno.ENOMEM)
            with pytest.raises(uksm.UksmError):
                pool.shrink(3072 * PAGE)
        finally:
            uksm._core.inject("mmap", 0, 0, errno.ENOMEM)
        assert store_mappings_past_eof(pool) == []
        sa, pa, ma = pool.page_states(a)
        sb, pb, mb = pool.page_states(b)
        assert (sa == KSM).all() and (sb == KSM).all()
        assert np.array_equal(pb, np.arange(2048, 2048 + n))  # b could not move
        if skip:
            assert (pa < n).all() and (ma == 1).all() and (mb == 1).all()
        else:
            assert np.array_equal(pa, pb) and (ma == 2).all()
        s = pool.stats()
        assert s["pages_shared"] + s["pages_sharing"] == 2 * n
        assert np.array_equal(a, data) and np.array_equal(b, data)

        pool.shrink(3072 * PAGE)  # nothing was removed before
        for x in (a, b):
            st, pfn, _ = pool.page_states(x)
            assert (st == KSM).all() and (pfn < limit).all()
        assert memfd_frames(pool)[0] <= limit and store_mappings_past_eof(pool) == []
        a[0, 0] ^= 0xFF  # COW on either sharer
        b[-1, -1] ^= 0xFF
        assert a[0, 0] == data[0, 0] ^ 0xFF and np.array_equal(b[0], data[0])
        assert b[-1, -1] == data[-1, -1] ^ 0xFF and np.array_equal(a[-1], data[-1])


def _wait_child(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} hung for {timeout}s")


@pytest.mark.parametrize("cow", COWS)
def test_frames_a_forked_child_may_map_are_neither_cut_nor_offlined(cow):
    """Frames the parent frees, or moves away from, while a child lives are
    deferred (the child's views still map them): compaction moves live
    frames around them and does not cut the store, shrink refuses a range
    holding one (UksmError, nothing removed), and the child reads its copies
    intact.  Once the child is gone, both go ahead."""
    with uksm.Pool("16MiB", cow=cow) as pool:  # 4096 frames
        rng = np.random.default_rng(7)
        f1, f2 = merged_pair(pool, rand_pages(rng, 2048))
        pool.scan(full_scans=2)
        pool.free(f2)
        del f2
        data, edata = rand_pages(rng, 128), rand_pages(rng, 64)
        a, b = merged_pair(pool, data)
        e, e2 = merged_pair(pool, edata)
        pool.scan(full_scans=2)
        pool.free(f1)
        del f1
        assert np.array_equal(pool.page_states(a)[1], np.arange(2048, 2176))
        assert np.array_equal(pool.page_states(e)[1], np.arange(2176, 2240))
        size = memfd_frames(pool)[0]
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 3
            try:
                os.close(wfd)
                os.read(rfd, 1)  # the parent is done
                code = (
                    0
                    if all(
                        np.array_equal(x, d)
                        for x, d in ((a, data), (b, data), (e, edata), (e2, edata))
                    )
                    else 1
                )
            finally:
                os._exit(code)
        try:
            os.close(rfd)
            pool.free(a)
            pool.free(b)
            del a, b
            assert pool.stats()["frames_deferred"] == 128
            with pytest.raises(uksm.UksmError):
                pool.shrink("8MiB")  # [2048, 4096) holds deferred frames
            result = pool.compact()  # e moves below, around them
            assert result["frames_moved"] == 64 and result["frames_skipped"] == 0
            st, pfn, mc = pool.page_states(e)
            assert (st == KSM).all() and np.array_equal(pfn, np.arange(64)) and (mc == 2).all()
            assert np.array_equal(e, edata) and np.array_equal(e2, edata)
            s = pool.stats()
            assert s["frames_deferred"] == 128 + 64  # e's old frames: the child's
            assert memfd_frames(pool) == (size, 64 + 128 + 64)  # not cut, not punched
        finally:
            os.write(wfd, b"x")
            os.close(wfd)
            status = _wait_child(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        uksm._core.fork_poll()
        assert pool.stats()["frames_deferred"] == 0
        assert memfd_frames(pool)[1] == 64
        pool.compact()
        assert memfd_frames(pool) == (64, 64)
        pool.shrink("8MiB")  # nothing was removed before
        pool.shrink("4MiB")
        with pytest.raises(uksm.PoolFullError):
            pool.shrink(1024 * PAGE - 32 * PAGE)  # 32 frames < 64 live
        assert store_mappings_past_eof(pool) == []
        assert (states(pool, e) == KSM).all()
        assert np.array_equal(e, edata) and np.array_equal(e2, edata)


def test_capacity_after_shrink_is_the_limit_allocation_obeys():
    """capacity is the most the live buffers may span (PoolFullError beyond
    it); shrink() takes frames off the store.  Whatever shrink does to
    capacity, the figure reported afterwards must be the one allocation
    obeys."""
    with uksm.Pool("1MiB", sleep_millisecs=0) as pool:  # 256 pages
        pool.shrink(128 * PAGE)
        cap = pool.capacity
        assert pool.stats()["capacity"] == cap
        a = pool.empty(cap - PAGE, np.uint8)  # fits
        with pytest.raises(uksm.PoolFullError):
            pool.empty(2 * PAGE, np.uint8)  # does not
        del a
