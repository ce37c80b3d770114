"""A stateful model of a pool (issue 6, part 1): hypothesis drives random
sequences of allocate / free / write / read / scan / unmerge / merge / pin /
compact / shrink against a real pool, keeping a numpy shadow of every live
buffer, and after every step checks

* contents: each live buffer equals its shadow, byte for byte;
* the counters: pages_sharing + pages_shared + pages_unshared +
  pages_volatile == pages_tracked; pages_tracked == pages of mergeable
  buffers less their zero pages; bytes_resident == the memfd's allocated
  blocks; bytes_mapped == the live buffers' pages;
* the page tables (pool.page_states of every live buffer) against the
  counters: pages_shared == distinct KSM frames, pages_shared +
  pages_sharing == KSM ptes, ksm_zero_pages == ZERO ptes, bytes_resident ==
  distinct frames, each frame's mapcount == the ptes mapping it.

Why equality holds for the KSM frames (and not just >=): a buffer's frames
go back in its release callback (uksm_release in the cffi gc callback, or
pool.free), before the Python side reaps its record.  The model drops
buffers by reference count and runs gc.collect(), so when a step ends every
mapped pte belongs to a live buffer; bytes_mapped == the live buffers'
pages is asserted first, and it is what makes the frame counts exact.  A
buffer whose last reference is dropped but not yet collected (a cycle) would
still map its frames: then pages_shared >= the live buffers' KSM frames.

Merging itself is checked after pool.scan(full_scans=2) on a pool without
smart_scan: among the mergeable pages, an all-zero page is the zero page
(use_zero_pages), and for every other content that occurs twice or more at
most one page is left unmerged, and (with max_page_sharing 256, no chains)
only when the content's KSM frame is full.  Errors are predicted exactly:
PoolFullError from allocate/shrink iff the frames would exceed capacity,
from unmerge/pin only then.  After compact/shrink: frames_skipped == 0 and
the live frames lie below live + ANCHOR_RUN (migrate.c's anchored runs).

The model never lets the pages mapped exceed capacity + cow_reserve, since
COW breaks of all of them could then exhaust even the reserve, which ends
the process by design.

A short profile runs by default (~15 s); UKSM_LONG=1 runs a long one
(UKSM_MODEL_EXAMPLES overrides the example count of either) and prints the
number of steps run (STEPS, also kept when a step fails).
"""
import gc
import hashlib
import os
import sys
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule, run_state_machine_as_test)

import uksm

PAGE = uksm.PAGE_SIZE
NORMAL, KSM, ZERO = 1, 2, 3
LONG = os.environ.get("UKSM_LONG") == "1"
RESERVE_PAGES = 256                  # cow_reserve="1MiB"
MAX_LIVE = 14
DTYPES = ["uint8", "int16", "float32", "float64", "complex128"]
PALETTE_SIZE = 5
ANCHOR_RUN = 16                      # csrc/migrate.c: runs left in place

# steps (rules) run, examples (pools) made; quoted in the README
STEPS = {"steps": 0, "examples": 0, "pool_full": 0, "merge_checks": 0}


class Entry:
    """One live buffer: the array the pool returned (or None once dropped
    while a view keeps the buffer alive), an optional view, and the shadow
    of all its pages (tail bytes past nbytes included: they stay zero)."""

    __slots__ = ("arr", "view", "shadow", "nbytes", "npages", "dtype",
                 "mergeable", "unmerge_ok", "addr")

    def __init__(self, arr, shadow):
        self.arr = arr
        self.view = None
        self.nbytes = arr.nbytes
        self.npages = max(1, -(-arr.nbytes // PAGE))
        self.dtype = arr.dtype
        self.shadow = shadow
        self.mergeable = True
        self.unmerge_ok = False      # last unmerge() succeeded: no merged pages
        self.addr = arr.__array_interface__["data"][0]

    def obj(self):
        return self.arr if self.arr is not None else self.view


def flat_bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


class PoolModel(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.pool = None
        self.entries = []
        self.rng = None

    # -- set-up and tear-down ----------------------------------------------------

    @initialize(cap_kib=st.sampled_from([768, 1024, 2048, 4096]),
                checksum=st.sampled_from(["jhash2", "xxhash"]),
                max_page_sharing=st.sampled_from([2, 3, 256]),
                use_zero_pages=st.booleans(), smart_scan=st.sampled_from([False, False, True]),
                seed=st.integers(0, 2**32 - 1))
    def make_pool(self, cap_kib, checksum, max_page_sharing, use_zero_pages,
                  smart_scan, seed):
        STEPS["examples"] += 1
        # a failing example's traceback keeps its arrays, hence its pool,
        # alive until collected; pools are a limited resource (64 slots)
        gc.collect()
        self.pool = uksm.Pool(cap_kib << 10, pages_to_scan=1000, sleep_millisecs=0,
                              checksum=checksum, max_page_sharing=max_page_sharing,
                              use_zero_pages=use_zero_pages, smart_scan=smart_scan,
                              cow_reserve=RESERVE_PAGES * PAGE, compact_threshold=0)
        self.rng = np.random.default_rng(seed)
        self.palette = self.rng.integers(1, 256, (PALETTE_SIZE, PAGE), dtype=np.uint8)
        self.palette[0] = 0                    # the zero page is a palette entry too
        self.max_sharing = max_page_sharing
        self.zero_pages = use_zero_pages
        self.smart = smart_scan
        # start with a few buffers, some of them copies, so that every rule
        # has something to work on from the first step
        for k in range(int(self.rng.integers(2, 6))):
            self._allocate(kind=("palette", "copy", "random", "full")[k % 4],
                          dtype="float64", pages=int(self.rng.integers(1, 40)),
                          extra=0, two_d=False, value=k)

    def teardown(self):
        pool, self.pool = self.pool, None
        self.entries = []
        # teardown runs in hypothesis's `finally`: a failing step's exception
        # is in flight, and its traceback's frames hold the step's arrays,
        # which keep the pool alive (64 pools at most) while hypothesis keeps
        # the exception to report it.  Free those locals; the report keeps
        # the traceback itself.
        exc = sys.exc_info()[1]
        while exc is not None:
            traceback.clear_frames(exc.__traceback__)
            exc = exc.__context__
        gc.collect()
        if pool is None:
            return
        try:
            if not pool.closed:
                s = pool.stats()
                assert s["bytes_mapped"] == 0 and s["bytes_resident"] == 0, s
                assert os.fstat(pool.fd).st_blocks == 0
        finally:
            pool.close()

    # -- helpers ----------------------------------------------------------------

    def _step(self):
        STEPS["steps"] += 1

    def _pick(self, i):
        return self.entries[i % len(self.entries)]

    def _mapped_pages(self):
        return sum(e.npages for e in self.entries)

    def _capacity_pages(self):
        return self.pool.capacity // PAGE

    def _resident_pages(self):
        return self.pool.stats()["bytes_resident"] // PAGE

    def _content(self, kind, nbytes, value):
        """Host bytes (nbytes long) for a new buffer of the given kind."""
        npages = max(1, -(-nbytes // PAGE))
        if kind == "palette":
            idx = self.rng.integers(0, PALETTE_SIZE, npages)
            return self.palette[idx].reshape(-1)[:nbytes].copy()
        if kind == "random":
            return self.rng.integers(0, 256, nbytes, dtype=np.uint8)
        if kind == "copy" and self.entries:
            src = self._pick(value).shadow           # what the array holds (checked)
            out = np.zeros(nbytes, np.uint8)
            n = min(nbytes, src.size)
            out[:n] = src[:n]
            return out
        return np.full(nbytes, value % 4, np.uint8)

    # -- rules --------------------------------------------------------------------

    @precondition(lambda self: len(self.entries) < MAX_LIVE)
    @rule(kind=st.sampled_from(["zeros", "empty", "full", "palette", "copy",
                                "copy", "asarray_self", "random"]),
          dtype=st.sampled_from(DTYPES),
          pages=st.one_of(st.integers(0, 4), st.integers(0, 120)),
          extra=st.sampled_from([0, 0, 8, 1000, PAGE - 16]),
          two_d=st.booleans(), value=st.integers(0, 1000))
    def allocate(self, kind, dtype, pages, extra, two_d, value):
        self._step()
        self._allocate(kind, dtype, pages, extra, two_d, value)

    # more of the common actions: hypothesis picks among rules evenly
    allocate_more = allocate
    allocate_again = allocate

    def _allocate(self, kind, dtype, pages, extra, two_d, value):
        dt = np.dtype(dtype)
        count = (pages * PAGE + extra) // dt.itemsize
        nbytes = count * dt.itemsize
        need = max(1, -(-nbytes // PAGE))
        if kind == "asarray_self" and self.entries:
            # an exact copy of a live array, dtype and shape included
            srce = self._pick(value)
            src = srce.obj()
            nbytes, need = src.nbytes, max(1, -(-src.nbytes // PAGE))
            expect = srce.shadow[:nbytes].copy()
        resident = self._resident_pages()
        full = resident + need > self._capacity_pages()
        if not full and self._mapped_pages() + need > self._capacity_pages() + RESERVE_PAGES:
            # COW breaks of everything mapped could then exhaust even the
            # reserve, which ends the process by design: stay within it
            return
        shape = (count // 2, 2) if two_d and count % 2 == 0 else (count,)
        pool = self.pool
        try:
            if kind == "asarray_self" and self.entries:
                arr = pool.asarray(src)
                del src
            elif kind in ("zeros", "empty"):
                arr = (pool.zeros if kind == "zeros" else pool.empty)(shape, dtype=dt)
            elif kind == "full":
                arr = pool.full(shape, value % 7, dtype=dt)
            else:
                host = self._content(kind, nbytes, value)
                arr = pool.asarray(host.view(dt).reshape(shape))
        except uksm.PoolFullError:
            STEPS["pool_full"] += 1
            assert full, "PoolFullError with room in the pool"
            assert self._resident_pages() == resident
            return
        assert not full, "allocation beyond capacity succeeded"
        # the shadow is the intended content, computed independently of arr
        shadow = np.zeros(need * PAGE, np.uint8)
        if kind == "full":
            shadow[:nbytes] = flat_bytes(np.full(shape, value % 7, dtype=dt))
        elif kind == "asarray_self" and self.entries:
            shadow[:nbytes] = expect
        elif kind not in ("zeros", "empty"):
            shadow[:nbytes] = host
        e = Entry(arr, shadow)
        assert e.nbytes == nbytes and e.npages == need
        if not np.array_equal(flat_bytes(arr), shadow[:nbytes]):
            raise AssertionError(f"new {kind} buffer does not hold what was put in"
                                 + (" (old contents?)" if kind in ("zeros", "empty") else ""))
        assert arr.__array_interface__["data"][0] % PAGE == 0
        self.entries.append(e)

    @precondition(lambda self: self.entries)
    @rule(i=st.integers(0, 1000), how=st.sampled_from(["free", "drop", "drop_nogc"]))
    def free(self, i, how):
        self._step()
        e = self._pick(i)
        if how == "free":
            if e.arr is None:
                return
            if e.view is not None:
                self._expect_in_use(e)
                return
            before = self.pool.stats()["bytes_mapped"]
            self.pool.free(e.arr)
            # the array is PROT_NONE now: drop it without touching it
            e.arr = None
            self.entries.remove(e)
            after = self.pool.stats()["bytes_mapped"]
            assert before - after == e.npages * PAGE
        else:
            e.arr = None
            if e.view is None:
                self.entries.remove(e)
            if how == "drop":
                gc.collect()

    def _expect_in_use(self, e):
        try:
            self.pool.free(e.arr)
        except uksm.BufferInUseError:
            return
        raise AssertionError("free() with a live view did not raise BufferInUseError")

    @precondition(lambda self: self.entries)
    @rule(i=st.integers(0, 1000))
    def take_view(self, i):
        self._step()
        e = self._pick(i)
        if e.view is None and e.nbytes:
            e.view = flat_bytes(e.obj())

    @precondition(lambda self: any(e.view is not None for e in self.entries))
    @rule(i=st.integers(0, 1000))
    def drop_view(self, i):
        self._step()
        withview = [e for e in self.entries if e.view is not None]
        e = withview[i % len(withview)]
        e.view = None
        if e.arr is None:
            self.entries.remove(e)
        gc.collect()

    def _write(self, e, kind, pos, length, value, src_i):
        """One write into e's buffer and its shadow."""
        b = flat_bytes(e.obj())
        n = e.nbytes
        if n == 0:
            return
        if kind == "byte":
            k = pos % n
            v = value & 0xFF
            b[k] = v
            e.shadow[k] = v
        elif kind == "slice":
            dt = e.dtype if e.arr is not None else np.dtype(np.uint8)
            typed = e.obj().reshape(-1)
            m = typed.size
            lo = pos % m
            hi = min(m, lo + 1 + length % (3 * PAGE // dt.itemsize))
            sh = e.shadow[:n].view(dt)
            if value % 2:
                vals = self.rng.integers(0, 120, hi - lo).astype(dt)
                typed[lo:hi] = vals
                sh[lo:hi] = vals
            else:
                typed[lo:hi] = value % 5
                sh[lo:hi] = value % 5
        elif kind in ("page_palette", "page_copy", "page_zero"):
            if n < PAGE:
                return
            p = pos % (n // PAGE)
            if kind == "page_palette":
                data = self.palette[value % PALETTE_SIZE]
            elif kind == "page_zero":
                data = self.palette[0]
            else:
                src = self._pick(src_i)
                q = value % src.npages
                data = src.shadow[q * PAGE:(q + 1) * PAGE].copy()
            b[p * PAGE:(p + 1) * PAGE] = data
            e.shadow[p * PAGE:(p + 1) * PAGE] = data
        elif kind == "page_u64":
            # a whole page written word by word, through a typed view
            if n < PAGE:
                return
            p = pos % (n // PAGE)
            w = b[p * PAGE:(p + 1) * PAGE].view(np.uint64)
            w[:] = value
            e.shadow[p * PAGE:(p + 1) * PAGE].view(np.uint64)[:] = value

    WRITE_KINDS = ["byte", "slice", "page_palette", "page_copy", "page_zero", "page_u64"]

    @precondition(lambda self: self.entries)
    @rule(i=st.integers(0, 1000), kind=st.sampled_from(WRITE_KINDS),
          pos=st.integers(0, 1 << 30), length=st.integers(0, 1 << 20),
          value=st.integers(0, 1 << 16), src_i=st.integers(0, 1000),
          times=st.integers(1, 4))
    def write(self, i, kind, pos, length, value, src_i, times):
        self._step()
        e = self._pick(i)
        for t in range(times):
            self._write(e, kind, pos + 977 * t * PAGE, length, value + t, src_i)

    write_more = write
    write_again = write

    @precondition(lambda self: self.entries)
    @rule(i=st.integers(0, 1000), pos=st.integers(0, 1 << 30), length=st.integers(1, 3 * PAGE))
    def read(self, i, pos, length):
        self._step()
        e = self._pick(i)
        if not e.nbytes:
            return
        b = flat_bytes(e.obj())
        lo = pos % e.nbytes
        hi = min(e.nbytes, lo + length)
        assert bytes(b[lo:hi]) == e.shadow[lo:hi].tobytes()
        assert int(b[lo:hi].sum(dtype=np.uint64)) == int(e.shadow[lo:hi].sum(dtype=np.uint64))
        assert memoryview(e.obj()).nbytes == e.nbytes

    @rule(full_scans=st.sampled_from([1, 2, 2]))
    def scan(self, full_scans):
        self._step()
        before = self.pool.stats()["full_scans"]
        s = self.pool.scan(full_scans=full_scans)
        assert s["full_scans"] == before + full_scans
        if full_scans == 2 and not self.smart:
            self._check_merged()

    scan_more = scan

    @precondition(lambda self: self.entries)
    @rule(i=st.integers(0, 1000))
    def unmerge(self, i):
        self._step()
        e = self._pick(i)
        state = self.pool.page_states(e.obj())[0]
        need = int(np.count_nonzero((state == KSM) | (state == ZERO)))
        resident = self._resident_pages()
        try:
            done = self.pool.unmerge(e.obj())
        except uksm.PoolFullError:
            # as MADV_UNMERGEABLE: a failed unmerge leaves the buffer mergeable
            STEPS["pool_full"] += 1
            assert resident + need > self._capacity_pages(), \
                (f"unmerge refused with room: {resident} + {need} frames, "
                 f"capacity {self._capacity_pages()}")
            e.unmerge_ok = False
            return
        e.mergeable = False
        assert done == need
        e.unmerge_ok = True
        assert (self.pool.page_states(e.obj())[0] == NORMAL).all()

    @precondition(lambda self: any(not e.mergeable for e in self.entries))
    @rule(i=st.integers(0, 1000))
    def merge(self, i):
        self._step()
        cands = [e for e in self.entries if not e.mergeable]
        e = cands[i % len(cands)]
        self.pool.merge(e.obj())
        e.mergeable = True
        e.unmerge_ok = False

    @precondition(lambda self: self.entries)
    @rule(i=st.integers(0, 1000), kind=st.sampled_from(WRITE_KINDS),
          pos=st.integers(0, 1 << 30), length=st.integers(0, 1 << 20),
          value=st.integers(0, 1 << 16), src_i=st.integers(0, 1000),
          scan=st.booleans(), compact=st.booleans())
    def pin(self, i, kind, pos, length, value, src_i, scan, compact):
        """Inside one pin() block: all pages private, a scan merges none of
        them, compaction moves none of them, writes and reads work."""
        self._step()
        e = self._pick(i)
        state = self.pool.page_states(e.obj())[0]
        need = int(np.count_nonzero((state == KSM) | (state == ZERO)))
        resident = self._resident_pages()
        try:
            with self.pool.pin(e.obj()) as a:
                assert a is e.obj()
                st_, pfn, _ = self.pool.page_states(a)
                assert (st_ == NORMAL).all(), st_
                if scan:
                    self.pool.scan(full_scans=2)
                    assert (self.pool.page_states(a)[0] == NORMAL).all()
                if compact:
                    self.pool.compact()
                    assert np.array_equal(self.pool.page_states(a)[1], pfn), \
                        "compaction moved a pinned page"
                self._write(e, kind, pos, length, value, src_i)
                assert np.array_equal(flat_bytes(a), e.shadow[:e.nbytes])
                del a
        except uksm.PoolFullError:
            STEPS["pool_full"] += 1
            assert resident + need > self._capacity_pages()
            return
        if not e.mergeable:
            e.unmerge_ok = True

    @rule(i=st.integers(0, 1000), pos=st.integers(0, 1 << 30), value=st.integers(0, 255),
          write_after=st.booleans())
    def compact(self, i, pos, value, write_after):
        self._step()
        r = self.pool.compact()
        s = self.pool.stats()
        assert r["frames_skipped"] == 0, r
        assert r["memfd_bytes_after"] == s["bytes_resident"]
        assert r["memfd_size_after"] == s["memfd_size"]
        self._check_compacted()
        if write_after and self.entries:
            # a write into a moved page (a COW break if it is merged)
            self._write(self._pick(i), "byte", pos, 0, value, 0)

    @rule(pages=st.integers(1, 96))
    def shrink(self, pages):
        self._step()
        cap = self._capacity_pages()
        if cap - pages < 128:
            return                                   # keep a usable pool
        resident = self._resident_pages()
        fits = resident <= cap - pages
        if fits and self._mapped_pages() > cap - pages + RESERVE_PAGES:
            return                                   # see allocate()
        try:
            self.pool.shrink(pages * PAGE)
        except uksm.PoolFullError:
            STEPS["pool_full"] += 1
            assert not fits, f"shrink by {pages} refused: {resident} of {cap} frames used"
            assert self._capacity_pages() == cap
            return
        assert fits, f"shrink by {pages} succeeded with {resident} of {cap} frames used"
        assert self._capacity_pages() == cap - pages
        self._check_compacted()

    # -- checks -------------------------------------------------------------------

    def _tables(self):
        """Every live buffer's page table, in address order."""
        es = sorted(self.entries, key=lambda e: e.addr)
        info = [self.pool.page_states(e.obj()) for e in es]
        return es, info

    def _check_compacted(self):
        """After compaction (nothing pinned), the live frames lie low in the
        memfd: below the live count plus one anchor run (migrate.c leaves a
        run of ANCHOR_RUN = 16 or more frames that already sits inside that
        bound where it is), and the memfd is truncated to whole 64 KiB
        clusters above the highest live frame."""
        s = self.pool.stats()
        live = s["bytes_resident"] // PAGE
        bound = -(-(live + ANCHOR_RUN) // 16) * 16
        assert s["memfd_size"] <= bound * PAGE, (s["memfd_size"] // PAGE, live)
        es, info = self._tables()
        if not es:
            return
        state = np.concatenate([x[0] for x in info])
        pfn = np.concatenate([x[1] for x in info])
        mapped = pfn[(state == NORMAL) | (state == KSM)]
        if len(mapped):
            assert int(mapped.max()) < s["memfd_size"] // PAGE
            assert int(mapped.max()) < live + ANCHOR_RUN, \
                f"a frame at {int(mapped.max())} after compaction, {live} live"

    def _check_merged(self):
        """After two full scans without smart_scan (see the module doc)."""
        STEPS["merge_checks"] += 1
        es, info = self._tables()
        groups = {}
        frame_mc = {}
        for e, (state, pfn, mc) in zip(es, info):
            for p in range(e.npages):
                if state[p] == KSM:
                    frame_mc[int(pfn[p])] = int(mc[p])
                if not e.mergeable:
                    continue
                data = e.shadow[p * PAGE:(p + 1) * PAGE]
                key = hashlib.blake2b(data.tobytes(), digest_size=16).digest()
                g = groups.setdefault(key, [not data.any(), [], set()])
                g[1].append(int(state[p]))
                if state[p] == KSM:
                    g[2].add(int(pfn[p]))
        for zero, states_, frames in groups.values():
            if zero and self.zero_pages:
                assert all(s == ZERO for s in states_), \
                    f"zero pages left unmerged after 2 full scans: {states_}"
                continue
            if len(states_) < 2:
                continue
            normal = states_.count(NORMAL)
            assert normal <= 1, \
                f"{normal} pages of one content left unmerged after 2 full scans: {states_}"
            if normal == 1 and self.max_sharing >= 256:
                # (with a small max_page_sharing a content has several KSM
                # frames, and a page can be left over for one more scan:
                # see test_leftover_page_finds_a_dup_with_room)
                assert all(frame_mc[f] >= self.max_sharing for f in frames), \
                    (f"a page left unmerged while a KSM frame of its content has room: "
                     f"{[frame_mc[f] for f in frames]} < {self.max_sharing}")

    @invariant()
    def contents_and_counters(self):
        if self.pool is None:
            return
        pool = self.pool
        for e in self.entries:
            b = flat_bytes(e.obj())
            assert b.size == e.nbytes
            if not np.array_equal(b, e.shadow[:e.nbytes]):
                bad = np.flatnonzero(b != e.shadow[:e.nbytes])
                raise AssertionError(
                    f"buffer at {e.addr:#x} differs from its shadow at {len(bad)} bytes, "
                    f"pages {sorted(set((bad // PAGE).tolist()))[:10]}; states "
                    f"{pool.page_states(e.obj())[0][:20]}")
        s = pool.stats()
        assert (s["pages_shared"] + s["pages_sharing"] + s["pages_unshared"]
                + s["pages_volatile"]) == s["pages_tracked"], s
        mapped_pages = sum(e.npages for e in self.entries)
        assert s["bytes_mapped"] == mapped_pages * PAGE, (s["bytes_mapped"], mapped_pages)
        assert s["buffers"] == len(self.entries)
        blocks = os.fstat(pool.fd).st_blocks * 512
        assert s["bytes_resident"] == blocks == s["memfd_bytes"], (s["bytes_resident"], blocks)
        es, info = self._tables()
        if es:
            state = np.concatenate([x[0] for x in info])
            pfn = np.concatenate([x[1] for x in info])
            mc = np.concatenate([x[2] for x in info])
        else:
            state = pfn = mc = np.zeros(0, np.uint32)
        assert not (state == 0).any(), "a live buffer has an unmapped page"
        ksm = state == KSM
        frames = (state == NORMAL) | ksm
        assert s["pages_shared"] == len(np.unique(pfn[ksm])), \
            (s["pages_shared"], len(np.unique(pfn[ksm])))
        assert s["pages_shared"] + s["pages_sharing"] == int(np.count_nonzero(ksm))
        assert s["ksm_zero_pages"] == int(np.count_nonzero(state == ZERO))
        uniq, counts = np.unique(pfn[frames], return_counts=True)
        assert s["bytes_resident"] == len(uniq) * PAGE, (s["bytes_resident"], len(uniq))
        # each frame's mapcount is the number of ptes mapping it ...
        mc_of = dict(zip(pfn[frames].tolist(), mc[frames].tolist()))
        assert all(mc_of[f] == c for f, c in zip(uniq.tolist(), counts.tolist())), \
            "frame mapcount differs from the ptes mapping it"
        # ... a NORMAL page's frame is its own, and KSM frames hold <= max_page_sharing
        assert not np.isin(pfn[state == NORMAL], pfn[ksm]).any()
        assert (mc[state == NORMAL] == 1).all()
        assert (mc[ksm] <= self.max_sharing).all()
        # tracked pages: those of mergeable buffers, less their zero pages
        tracked = 0
        o = 0
        for e, (st_, _, _) in zip(es, info):
            if e.mergeable:
                tracked += e.npages
            elif e.unmerge_ok:
                assert (st_ == NORMAL).all(), "an unmerged buffer was merged again"
            o += e.npages
        assert s["pages_tracked"] == tracked - s["ksm_zero_pages"], (s["pages_tracked"], tracked)
        assert s["pages_unshared"] <= int(np.count_nonzero(state == NORMAL))
        assert s["bytes_resident"] <= (self._capacity_pages() + RESERVE_PAGES) * PAGE


def _run(machine_settings):
    run_state_machine_as_test(PoolModel, settings=machine_settings)


HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


def test_model_short():
    _run(settings(max_examples=int(os.environ.get("UKSM_MODEL_EXAMPLES", 70)),
                  stateful_step_count=60, deadline=None, suppress_health_check=HEALTH,
                  database=None, print_blob=True))


@pytest.mark.skipif(not LONG, reason="long profile: UKSM_LONG=1")
def test_model_long():
    before = dict(STEPS)
    try:
        _run(settings(max_examples=int(os.environ.get("UKSM_MODEL_EXAMPLES", 600)),
                      stateful_step_count=100, deadline=None, suppress_health_check=HEALTH,
                      database=None, print_blob=True))
    finally:
        # printed even when a step fails (the count then includes the
        # failing example's shrinking)
        print(f"\nuksm model test (long profile): {STEPS['steps'] - before['steps']} steps "
              f"in {STEPS['examples'] - before['examples']} examples, "
              f"{STEPS['pool_full'] - before['pool_full']} PoolFullErrors as predicted, "
              f"{STEPS['merge_checks'] - before['merge_checks']} merge checks")


# -- deterministic regressions for what the model found --------------------------------


def test_failed_unmerge_keeps_the_counters_consistent():
    """pool.unmerge() that runs out of capacity raises PoolFullError and
    leaves the rest merged (as documented), but it has already taken the
    buffer off the scanner: its merged pages are then counted in
    pages_shared/pages_sharing and not in pages_tracked, so the ksm
    invariant shared + sharing + unshared + volatile == tracked breaks
    (pages_volatile clamps at 0).  The kernel keeps VM_MERGEABLE when
    MADV_UNMERGEABLE fails (ksm_madvise returns before clearing it)."""
    with uksm.Pool("1MiB", pages_to_scan=1000, sleep_millisecs=0,
                   cow_reserve="1MiB") as pool:
        a = pool.full((200, PAGE), 7, dtype=np.uint8)      # 200 equal pages
        pool.scan(full_scans=2)
        s = pool.stats()
        assert s["pages_shared"] == 1 and s["pages_sharing"] == 199
        b = pool.asarray(np.random.default_rng(3).integers(
            0, 256, (100, PAGE), dtype=np.uint8))           # 100 unique pages
        pool.scan(full_scans=2)
        with pytest.raises(uksm.PoolFullError):
            pool.unmerge(a)                                 # 101 + 200 > 256 frames
        assert (a == 7).all()
        s = pool.stats()
        assert (s["pages_shared"] + s["pages_sharing"] + s["pages_unshared"]
                + s["pages_volatile"]) == s["pages_tracked"], {
            k: s[k] for k in ("pages_shared", "pages_sharing", "pages_unshared",
                              "pages_volatile", "pages_tracked")}
        del a, b


def test_leftover_page_finds_a_dup_with_room():
    """With max_page_sharing, one content has several KSM frames (a stable
    node chain).  Three new pages of that content, three dups with room for
    one more mapper each: ksmd walks the chain for each page and merges all
    three in the first scan.  uksm searches the stable tree for a whole batch
    at once and sends every page of one content to the same first dup with
    room; the ones refused as full (MERGE_FULL) do not try the next dup, so
    after two full scans a page is still unmerged next to a dup with room."""
    with uksm.Pool("4MiB", pages_to_scan=1000, sleep_millisecs=0,
                   max_page_sharing=2, smart_scan=False) as pool:
        x = np.random.default_rng(4).integers(1, 256, PAGE, dtype=np.uint8)
        old = [pool.asarray(x) for _ in range(6)]
        pool.scan(full_scans=2)
        frames = {int(pool.page_states(a)[1][0]) for a in old}
        assert len(frames) == 3 and all((pool.page_states(a)[0] == KSM).all() for a in old)
        for a in old[1::2]:
            a[0] ^= 0xFF                                    # each dup keeps one mapper
        new = [pool.asarray(x) for _ in range(3)]
        pool.scan(full_scans=2)
        st = [int(pool.page_states(a)[0][0]) for a in new]
        mc = {f: 0 for f in frames}
        for a in old[0::2] + new:
            s, p, m = pool.page_states(a)
            if s[0] == KSM:
                mc[int(p[0])] = int(m[0])
        assert st == [KSM, KSM, KSM], (f"new pages' states {st}; mappers of the "
                                       f"content's KSM frames {sorted(mc.values())} "
                                       f"(max_page_sharing 2)")
