"""Migration: pool.compact() and pool.shrink() (seed patches 7 and 8).

Real fragmentation, real frames moved under real mappings: every check is
against numpy shadow copies and the kernel's own view (fstat of the memfd,
/proc/self/maps)."""
import gc
import os
import threading
import time

import numpy as np
import pytest

import uksm

from conftest import KSM, NORMAL, memfd_bytes, states

PAGE = uksm.PAGE_SIZE
CLUSTER = 16 * PAGE          # the memfd is truncated in 64 KiB clusters


def maps_count() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def fragment(pool, nbufs=40, pages=128, seed=0):
    """Allocate, merge, free every other buffer, COW some merged pages."""
    rng = np.random.default_rng(seed)
    bufs = [pool.asarray(rng.standard_normal(pages * PAGE // 8)) for _ in range(nbufs)]
    dups = [pool.asarray(b) for b in bufs[: nbufs // 2]]
    pool.scan(full_scans=2)
    for i in range(0, nbufs, 2):
        bufs[i] = None
    gc.collect()
    for d in dups[1::3]:
        d.reshape(pages, -1)[::7, 0] += 1.0
    live = [b for b in bufs if b is not None] + dups
    return live, [np.array(a) for a in live]


def test_compact_shrinks_the_memfd_to_the_live_data():
    with uksm.Pool("256MiB", checksum="xxhash") as pool:
        live, shadow = fragment(pool)
        before = os.fstat(pool.fd)
        resident = pool.stats()["bytes_resident"]
        assert before.st_size > 2 * resident          # really fragmented
        result = pool.compact()
        after = os.fstat(pool.fd)
        assert after.st_size <= resident + CLUSTER
        assert after.st_blocks * 512 <= resident + CLUSTER
        assert memfd_bytes(pool) == pool.stats()["bytes_resident"] == resident
        assert result["memfd_size_before"] == before.st_size
        assert result["memfd_size_after"] == after.st_size
        assert result["frames_moved"] > 0 and result["frames_skipped"] == 0
        for a, s in zip(live, shadow):
            assert np.array_equal(a, s)
        # a second compaction has nothing left to do
        assert pool.compact()["frames_moved"] == 0


def test_stable_nodes_follow_their_frames():
    """After moving KSM frames, new copies still merge into them (the stable
    nodes were moved by pfn, not lost), and writes still COW correctly."""
    with uksm.Pool("256MiB", checksum="xxhash") as pool:
        live, shadow = fragment(pool)
        pool.scan(full_scans=1)                   # sweeps the stale nodes out
        nodes = pool._scanner.stable.nr_alive
        shared = pool.stats()["pages_shared"]
        assert nodes == shared
        pool.compact()
        assert pool._scanner.stable.nr_alive == nodes
        k = len(live) // 2                       # dups[0]: merged, never written
        copy = pool.asarray(shadow[k])
        pool.scan(full_scans=2)
        assert pool.stats()["pages_shared"] == shared     # no new KSM frame
        assert (states(pool, copy) == KSM).all()
        copy[0] = 42.0
        assert np.array_equal(live[k], shadow[k]) and copy[0] == 42.0


def test_compact_coalesces_scattered_frames_into_fewer_vmas():
    """Random-order COW breaks scatter a buffer over the memfd, a mapping per
    page; compaction lays each buffer on consecutive frames again."""
    with uksm.Pool("128MiB", checksum="xxhash") as pool:
        a = pool.full(4096 * 512, 1.0)               # 4096 identical pages...
        holes = [pool.full(512, float(i)) for i in range(64)]
        pool.scan(full_scans=2)
        del holes
        gc.collect()
        rng = np.random.default_rng(1)
        view = a.reshape(4096, 512)
        for i in rng.permutation(4096)[:1500]:       # ...COW-broken in random order
            view[i, 1] = float(i)
        shadow = np.array(a)
        before = maps_count()
        result = pool.compact()
        after = maps_count()
        assert after < before - 100, (before, after)
        assert result["vmas_after"] < result["vmas_before"]
        assert np.array_equal(a, shadow)


def test_writers_during_compaction_lose_nothing():
    with uksm.Pool("256MiB", checksum="xxhash") as pool:
        live, shadow = fragment(pool, nbufs=24, pages=64)
        stop = threading.Event()
        errors = []
        lock = threading.Lock()

        def writer(seed):
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    k = int(rng.integers(len(live)))
                    i = int(rng.integers(live[k].size))
                    v = float(rng.integers(1 << 20))
                    with lock:                        # shadow and array agree
                        live[k][i] = v
                        shadow[k][i] = v
            except Exception as exc:                  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        moved = 0
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                # keep fragmenting so every round has frames to move
                junk = [pool.full(PAGE // 8 * 8, 1.0) for _ in range(8)]
                del junk[::2]
                moved += pool.compact()["frames_moved"]
                pool.scan(full_scans=1)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "writer stuck"
        assert not errors
        assert moved > 0
        for a, s in zip(live, shadow):
            assert np.array_equal(a, s)


def test_shrink_migrates_shared_frames_out_of_the_removed_range():
    with uksm.Pool("64MiB", checksum="xxhash", cow_reserve="1MiB") as pool:
        filler = pool.empty(40 << 20, np.uint8)       # low frames
        rng = np.random.default_rng(2)
        data = rng.standard_normal(512 * 512)           # 2 MiB: high frames
        a = pool.asarray(data)
        b = pool.asarray(data)
        pool.scan(full_scans=2)
        assert (states(pool, b) == KSM).all()
        _, pfns, _ = pool.page_states(a)
        top_before = int(pfns.max())
        del filler
        gc.collect()
        cap = pool.capacity
        result = pool.shrink("32MiB")
        assert pool.capacity == cap - (32 << 20)
        _, pfns, mapcount = pool.page_states(a)
        limit = (cap - (32 << 20)) // PAGE + pool._native.nr_frames - cap // PAGE
        assert top_before >= (32 << 20) // PAGE and int(pfns.max()) < limit
        assert (mapcount == 2).all() and (states(pool, b) == KSM).all()
        assert result["frames_moved"] >= 512
        assert np.array_equal(a, data) and np.array_equal(b, data)
        # no stable node points past the new top (patch 8)
        st = pool._scanner.stable
        alive = st.alive[: st.n]
        assert (st.pfn[: st.n][alive] < limit).all()
        assert os.fstat(pool.fd).st_size <= limit * PAGE
        # the sharing survives: a third copy merges into the moved frames
        c = pool.asarray(data)
        pool.scan(full_scans=2)
        assert (states(pool, c) == KSM).all()
        b[0] = 7.0                                     # COW still works
        assert a[0] == data[0] and b[0] == 7.0
        with pytest.raises(uksm.PoolFullError):
            pool.empty(pool.capacity, np.uint8)


def test_shrink_refuses_what_does_not_fit_and_keeps_everything():
    with uksm.Pool("16MiB") as pool:
        a = pool.full(10 << 20, 3, dtype=np.uint8)
        cap = pool.capacity
        with pytest.raises(uksm.PoolFullError):
            pool.shrink("8MiB")
        assert pool.capacity == cap and (a == 3).all()
        with pytest.raises(ValueError):
            pool.shrink(1000)                          # not page aligned
        with pytest.raises(ValueError):
            pool.shrink(-4096)


def test_pinned_pages_are_never_moved():
    with uksm.Pool("64MiB") as pool:
        filler = pool.empty(8 << 20, np.uint8)
        a = pool.full(1 << 20, 5, dtype=np.uint8)
        del filler
        gc.collect()
        with pool.pin(a):
            _, pfns, _ = pool.page_states(a)
            pool.compact()
            _, after, _ = pool.page_states(a)
            assert np.array_equal(pfns, after)
            assert (states(pool, a) == NORMAL).all()
            with pytest.raises(uksm.UksmError):
                pool.shrink(pool.capacity - (1 << 20))
        assert (a == 5).all()
        pool.compact()                                  # unpinned: it moves
        _, after, _ = pool.page_states(a)
        assert int(after.min()) == 0
