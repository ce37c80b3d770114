"""A stateful model of a pool: hypothesis drives random
sequences of allocate / free / write / read / kernel I/O / scan / unmerge /
merge / pin / compact / shrink against a real pool, once with each
copy-on-write mode (cow="kernel": the kernel's fault path copies a merged
page on write; cow="signal": uksm's SIGSEGV handler does), keeping a numpy
shadow of every live buffer and, for each page, whether the program has
written it since it last became private (committed: the kernel holds an
anonymous page for it).  After every step it checks

* contents: each live buffer equals its shadow, byte for byte;
* the counters: pages_sharing + pages_shared + pages_unshared +
  pages_volatile == pages_tracked; pages_tracked == pages of mergeable
  buffers less their zero pages; bytes_mapped == the live buffers' pages;
  frames_deferred == 0 and fork_detaches == 0 (no child was ever forked);
* the page tables (pool.page_states of every live buffer) against the
  counters: pages_shared == distinct KSM frames, pages_shared +
  pages_sharing == KSM ptes, ksm_zero_pages == ZERO ptes, each frame's
  mapcount == the ptes mapping it; private pages have no frame;
* memory, by the kernel's own accounting: the frame store's allocated
  blocks (st_blocks) == memfd_bytes == bytes_frames == pages_shared frames
  (a frame goes back when its last view is copied or freed: nothing else
  lives in the store); bytes_resident == bytes_private + bytes_frames; what
  the kernel holds for the live buffers, page by page as smaps and psutil
  count it (pagemap, /proc/kpageflags, /proc/kpagecount), is what the model
  predicts from its committed pages and the page tables: anonymous memory
  == the committed pages, RSS == those plus the KSM ptes (the contents
  check reads every view), USS == those plus the frames with one view, PSS
  == those plus the frames; stats()' bytes_private, rss_bytes, uss_bytes
  and pss_bytes say the same; and the direct map holds no frame;
* copy-on-write counters: cow_breaks grows by exactly the pages that went
  from KSM to private during the step (written, by the program or the
  kernel, or unmerged), zero_page_cows by the ZERO pages that did;
  cow_breaks_signal by those the program's own writes broke in "signal"
  mode, and never in "kernel" mode.

Why equality holds for the KSM frames (and not just >=): a buffer's frames
go back in its release callback (uksm_release in the cffi gc callback, or
pool.free), before the Python side reaps its record.  The model drops
buffers by reference count and runs gc.collect(), so when a step ends every
mapped pte belongs to a live buffer; bytes_mapped == the live buffers'
pages is asserted first, and it is what makes the frame counts exact.

Merging itself is checked after pool.scan(full_scans=2) on a pool without
smart_scan: among the committed pages of mergeable buffers, an all-zero
page is the zero page (use_zero_pages), and for every other content that
occurs twice or more at most one page is left unmerged, and (with
max_page_sharing 256, no chains) only when the content's KSM frame is full;
after any step, a page never written (the kernel's zero page) was not
merged.  (While a shrunk frame store is full, a merge that needs a new
frame waits: the completeness check is left out then.)  Errors are
predicted exactly: PoolFullError from allocate iff the live buffers' span
plus the new one would exceed capacity, VirtualSpaceError iff it fits but
first fit finds no free run of virtual pages, from shrink iff the live
frames would not fit below the new top of the store (capacity stays);
unmerge and pin never fail (only a kernel out of memory could make them).
After compact/shrink: frames_skipped == 0 and the live frames fill
[0, live) of a memfd cut right after them.

Kernel I/O: write(2) from any page works in both modes; read(2) into
merged or zero pages works in "kernel" mode (the kernel copies them), and
in "signal" mode fails with EFAULT (they are read-only there) unless the
buffer is pinned first.

The program around the pool misbehaves as real ones do: a 3 ms interval
timer's SIGALRM handler calls pool.stats() all through the run (inside
the model's own pool calls too: served nested, csrc/lock.c), and free
has two more ways: through a finalizer of a reference cycle, collected
either outside any pool call or inside one of this thread's own sections
(as when the collector strikes inside a pool call), where free() must
queue its bookkeeping instead of waiting for itself.  The counters hold
exactly either way once the step is over.

Core bugs the model found are pinned by strict-xfail tests at the end of
this file; core_bug() probes each once, and while one is there the model
steps around (or bounds) only the figures it touches, so that everything
else keeps being checked exactly.

A short profile runs by default (about a minute per mode); UKSM_LONG=1 runs a long
one (UKSM_MODEL_EXAMPLES overrides the example count of either) and prints
the number of steps run (STEPS, also kept when a step fails).
"""

import errno
import gc
import hashlib
import os
import signal
import sys
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import uksm

PAGE = uksm.PAGE_SIZE
PRIVATE, KSM, ZERO = uksm.PageState.PRIVATE, uksm.PageState.KSM, uksm.PageState.ZERO
LONG = os.environ.get("UKSM_LONG") == "1"
MAX_LIVE = 14
DTYPES = ["uint8", "int16", "float32", "float64", "complex128"]
PALETTE_SIZE = 5
KERNEL_IO_MAX = 3 * PAGE

# steps (rules) run, examples (pools) made; quoted in the README
STEPS = {
    "steps": 0,
    "examples": 0,
    "pool_full": 0,
    "merge_checks": 0,
    "cow_breaks": 0,
    "shrinks": 0,
}


# -- the kernel's view of a pool, and what the core gets wrong about it ----------------

KPF_ANON, KPF_ZERO_PAGE = 12, 24  # include/uapi/linux/kernel-page-flags.h
PFN_MASK = (1 << 55) - 1
KERNEL_PAGE_TABLES = all(os.access(p, os.R_OK) for p in ("/proc/kpageflags", "/proc/kpagecount"))


def kernel_view(entries) -> dict:
    """What the kernel holds for the pages of @entries, page by page, as
    /proc/self/smaps adds it up (and psutil with it): Rss (present pages
    other than the shared zero page), Anonymous, Uss (pages mapped once) and
    Pss (each page divided by its mappers), in bytes, from pagemap,
    /proc/kpageflags and /proc/kpagecount.  smaps itself cannot be summed
    for a range: the kernel merges the pool's first or last mapping with a
    neighbouring anonymous one (the heap's, numpy's), and its figures then
    count memory that is not the pool's.  Without root, None."""
    if not KERNEL_PAGE_TABLES:
        return None
    out = {"Rss": 0, "Anonymous": 0, "Uss": 0, "Pss": 0.0, "shared_frames": []}
    with (
        open("/proc/self/pagemap", "rb", buffering=0) as pm_f,
        open("/proc/kpageflags", "rb", buffering=0) as fl_f,
        open("/proc/kpagecount", "rb", buffering=0) as ct_f,
    ):
        for e in entries:
            pm = np.frombuffer(os.pread(pm_f.fileno(), 8 * e.npages, e.addr // PAGE * 8), np.uint64)
            for p in np.flatnonzero(pm >> np.uint64(63)).tolist():
                pfn = int(pm[p]) & PFN_MASK
                flags = int.from_bytes(os.pread(fl_f.fileno(), 8, pfn * 8), "little")
                if flags >> KPF_ZERO_PAGE & 1:
                    continue
                count = int.from_bytes(os.pread(ct_f.fileno(), 8, pfn * 8), "little")
                out["Rss"] += PAGE
                out["Anonymous"] += PAGE * (flags >> KPF_ANON & 1)
                out["Uss"] += PAGE * (count == 1)
                out["Pss"] += PAGE / max(count, 1)
    return out


def direct_map_rss(pool) -> int:
    """Bytes present in the pool's direct map (csrc/uksm.h: the read-write
    mapping of the whole frame store the core fills frames through, zapped
    after use): the shared mappings of the memfd outside the buffer range.
    A mapping is the memfd's by device and inode both: inode numbers of the
    kernel's internal shmem mount run in step with those of the root file
    system, and a library can carry the same number."""
    st = os.fstat(pool.fd)
    ino = str(st.st_ino)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    lo_va = pool._native.va
    hi_va = lo_va + pool._native.va_pages * PAGE
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header line
                lo = int(parts[0].split("-")[0], 16)
                inside = (
                    len(parts) > 4
                    and parts[4] == ino
                    and parts[3] == dev
                    and not lo_va <= lo < hi_va
                )
            elif inside and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    return total


def _direct_map_kept() -> bool:
    """Whether a merge leaves a frame mapped in the direct map; see
    test_direct_map_is_zapped_after_merging."""
    pal = np.random.default_rng(0).integers(1, 256, (4, PAGE), dtype=np.uint8)
    with uksm.Pool("1MiB", pages_to_scan=1000, sleep_millisecs=0) as pool:
        a = pool.asarray(pal[[1, 2, 2, 3, 1, 3, 1]])
        pool.scan(full_scans=2)
        kept = direct_map_rss(pool) > 0
        del a
    return kept


_PROBES = {}


def core_bug(name: str) -> bool:
    """A known core bug, probed once (each has a strict-xfail test below that
    pins it down): the model avoids or bounds only what that bug touches."""
    if name not in _PROBES:
        _PROBES[name] = {"direct_map_kept": _direct_map_kept}[name]()
    return _PROBES[name]


class _Freer:
    """A wrapper in a reference cycle whose finalizer frees its buffer."""

    def __init__(self, pool, arr):
        self.pool, self.arr, self.me = pool, arr, self

    def __del__(self):
        arr, self.arr = self.arr, None
        self.pool.free(arr)


class Entry:
    """One live buffer: the array the pool returned (or None once dropped
    while a view keeps the buffer alive), an optional view, the shadow of
    all its pages (tail bytes past nbytes included: they stay zero), which
    pages the program has committed, and the page states at the last
    check."""

    __slots__ = (
        "arr",
        "view",
        "shadow",
        "nbytes",
        "npages",
        "dtype",
        "mergeable",
        "unmerge_ok",
        "addr",
        "committed",
        "state",
    )

    def __init__(self, arr, shadow):
        self.arr = arr
        self.view = None
        self.nbytes = arr.nbytes
        self.npages = max(1, -(-arr.nbytes // PAGE))
        self.dtype = arr.dtype
        self.shadow = shadow
        self.mergeable = True
        self.unmerge_ok = False  # last unmerge() made every page private
        self.addr = arr.__array_interface__["data"][0]
        self.committed = np.zeros(self.npages, bool)
        self.state = None

    def obj(self):
        return self.arr if self.arr is not None else self.view

    def touch(self, lo: int, hi: int) -> None:
        """Bytes [lo, hi) were written: their pages are committed."""
        if hi > lo:
            self.committed[lo // PAGE : (hi - 1) // PAGE + 1] = True


def flat_bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


class PoolModel(RuleBasedStateMachine):
    COW = "kernel"

    def __init__(self):
        super().__init__()
        self.pool = None
        self.entries = []
        self.rng = None
        self.iofd = -1

    # -- set-up and tear-down ----------------------------------------------------

    @initialize(
        cap_kib=st.sampled_from([384, 768, 1024, 2048, 4096]),
        checksum=st.sampled_from(["jhash2", "xxhash"]),
        max_page_sharing=st.sampled_from([2, 3, 256]),
        use_zero_pages=st.booleans(),
        smart_scan=st.sampled_from([False, False, True]),
        cow_reserve=st.sampled_from([None, "1MiB"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def make_pool(
        self, cap_kib, checksum, max_page_sharing, use_zero_pages, smart_scan, cow_reserve, seed
    ):
        STEPS["examples"] += 1
        # a failing example's traceback keeps its arrays, hence its pool,
        # alive until collected; pools are a limited resource
        gc.collect()
        # cow_reserve is accepted and unused: a COW takes nothing from the pool
        self.pool = uksm.Pool(
            cap_kib << 10,
            pages_to_scan=1000,
            sleep_millisecs=0,
            checksum=checksum,
            max_page_sharing=max_page_sharing,
            use_zero_pages=use_zero_pages,
            smart_scan=smart_scan,
            cow=self.COW,
            cow_reserve=cow_reserve,
            compact_threshold=0,
        )
        assert self.pool.cow == self.COW
        self.cap_pages = self.pool.capacity // PAGE
        self.frames_online = self.cap_pages  # the frame store: a frame per page
        self.iofd = os.memfd_create("uksm-model-io", os.MFD_CLOEXEC)
        self.rng = np.random.default_rng(seed)
        self.palette = self.rng.integers(1, 256, (PALETTE_SIZE, PAGE), dtype=np.uint8)
        self.palette[0] = 0  # the zero page is a palette entry too
        self.max_sharing = max_page_sharing
        self.zero_pages = use_zero_pages
        self.smart = smart_scan
        self.populated = False  # this step unmerged or pinned
        self.cow_seen = self.zero_cow_seen = self.signal_seen = 0
        signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.003, 0.003)
        # start with a few buffers, some of them copies, so that every rule
        # has something to work on from the first step
        for k in range(int(self.rng.integers(2, 6))):
            self._allocate(
                kind=("palette", "copy", "random", "full")[k % 4],
                dtype="float64",
                pages=int(self.rng.integers(1, 40)),
                extra=0,
                two_d=False,
                value=k,
            )

    def _alarm(self, signum, frame):
        pool = self.pool
        if pool is not None and not pool.closed:
            pool.stats()
            STEPS["alarm_stats"] = STEPS.get("alarm_stats", 0) + 1

    def teardown(self):
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        pool, self.pool = self.pool, None
        self.entries = []
        if self.iofd >= 0:
            os.close(self.iofd)
            self.iofd = -1
        # teardown runs in hypothesis's `finally`: a failing step's exception
        # is in flight, and its traceback's frames hold the step's arrays,
        # which keep the pool alive while hypothesis keeps the exception to
        # report it.  Free those locals; the report keeps the traceback itself.
        failing = exc = sys.exc_info()[1]
        while exc is not None:
            traceback.clear_frames(exc.__traceback__)
            exc = exc.__context__
        gc.collect()
        if pool is None:
            return
        try:
            # after a failed step, report that failure, not this one
            if not pool.closed and failing is None:
                s = pool.stats()
                STEPS["cow_breaks"] += s["cow_breaks"]
                assert s["bytes_mapped"] == 0 and s["bytes_resident"] == 0, s
                assert s["bytes_private"] == 0 and s["bytes_frames"] == 0, s
                assert os.fstat(pool.fd).st_blocks == 0
        finally:
            pool.close()

    # -- helpers ----------------------------------------------------------------

    def _step(self):
        STEPS["steps"] += 1
        self.populated = False

    def _pick(self, i):
        return self.entries[i % len(self.entries)]

    def _mapped_pages(self):
        return sum(e.npages for e in self.entries)

    def _va_fits(self, need):
        """First fit: is there a run of @need free virtual pages?  (Freed
        buffers' ranges are reaped before an allocation looks.)"""
        va = self.pool._native.va
        runs = sorted(((e.addr - va) // PAGE, e.npages) for e in self.entries)
        at = 0
        for start, n in runs:
            if start - at >= need:
                return True
            at = max(at, start + n)
        return self.pool._native.va_pages - at >= need

    def _content(self, kind, nbytes, value):
        """Host bytes (nbytes long) for a new buffer of the given kind."""
        npages = max(1, -(-nbytes // PAGE))
        if kind == "palette":
            idx = self.rng.integers(0, PALETTE_SIZE, npages)
            return self.palette[idx].reshape(-1)[:nbytes].copy()
        if kind == "random":
            return self.rng.integers(0, 256, nbytes, dtype=np.uint8)
        if kind == "copy" and self.entries:
            src = self._pick(value).shadow  # what the array holds (checked)
            out = np.zeros(nbytes, np.uint8)
            n = min(nbytes, src.size)
            out[:n] = src[:n]
            return out
        return np.full(nbytes, value % 4, np.uint8)

    # -- rules --------------------------------------------------------------------

    @precondition(lambda self: len(self.entries) < MAX_LIVE)
    @rule(
        kind=st.sampled_from(
            ["zeros", "empty", "full", "palette", "copy", "copy", "asarray_self", "random"]
        ),
        dtype=st.sampled_from(DTYPES),
        pages=st.one_of(st.integers(0, 4), st.integers(0, 120)),
        extra=st.sampled_from([0, 0, 8, 1000, PAGE - 16]),
        two_d=st.booleans(),
        value=st.integers(0, 1000),
    )
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
        # capacity is the span of the live buffers, not memory: untouched
        # pages cost nothing, and nothing else counts
        mapped = self._mapped_pages()
        full = mapped + need > self.cap_pages
        no_va = not full and not self._va_fits(need)
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
            assert full, (
                f"PoolFullError with room: {mapped} + {need} pages mapped, "
                f"capacity {self.cap_pages}"
            )
            assert pool.stats()["bytes_mapped"] == mapped * PAGE
            return
        except uksm.VirtualSpaceError:
            assert no_va, f"VirtualSpaceError with a free run of {need} virtual pages"
            return
        assert not full, f"allocation beyond capacity succeeded: {mapped} + {need} pages"
        assert not no_va, f"first fit found {need} free virtual pages the model did not"
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
        if kind not in ("zeros", "empty"):
            e.touch(0, nbytes)  # filled or copied: every byte written
        if not np.array_equal(flat_bytes(arr), shadow[:nbytes]):
            raise AssertionError(
                f"new {kind} buffer does not hold what was put in"
                + (" (old contents?)" if kind in ("zeros", "empty") else "")
            )
        assert arr.__array_interface__["data"][0] % PAGE == 0
        self.entries.append(e)

    @precondition(lambda self: self.entries)
    @rule(
        i=st.integers(0, 1000),
        how=st.sampled_from(["free", "drop", "drop_nogc", "finalizer", "finalizer_nested"]),
    )
    def free(self, i, how):
        self._step()
        e = self._pick(i)
        if how.startswith("finalizer"):
            if e.arr is None or e.view is not None:
                return
            before = self.pool.stats()["bytes_mapped"]
            _Freer(self.pool, e.arr)
            e.arr = None
            self.entries.remove(e)
            core = self.pool._c
            nested = how == "finalizer_nested" and not core.enter()
            try:
                gc.collect()  # the finalizer runs here
                if nested:
                    # the pages went back at once; the bookkeeping waits
                    # for the lock's holder: this very section
                    assert (
                        self.pool._native.stats()["pages_mapped"] * PAGE == before - e.npages * PAGE
                    )
                    assert core.pending
            finally:
                if nested:
                    core.leave()
            assert before - self.pool.stats()["bytes_mapped"] == e.npages * PAGE
            return
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
            e.touch(k, k + 1)
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
            e.touch(lo * dt.itemsize, hi * dt.itemsize)
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
                data = src.shadow[q * PAGE : (q + 1) * PAGE].copy()
            b[p * PAGE : (p + 1) * PAGE] = data
            e.shadow[p * PAGE : (p + 1) * PAGE] = data
            e.touch(p * PAGE, (p + 1) * PAGE)
        elif kind == "page_u64":
            # a whole page written word by word, through a typed view
            if n < PAGE:
                return
            p = pos % (n // PAGE)
            w = b[p * PAGE : (p + 1) * PAGE].view(np.uint64)
            w[:] = value
            e.shadow[p * PAGE : (p + 1) * PAGE].view(np.uint64)[:] = value
            e.touch(p * PAGE, (p + 1) * PAGE)

    WRITE_KINDS = ["byte", "slice", "page_palette", "page_copy", "page_zero", "page_u64"]

    @precondition(lambda self: self.entries)
    @rule(
        i=st.integers(0, 1000),
        kind=st.sampled_from(WRITE_KINDS),
        pos=st.integers(0, 1 << 30),
        length=st.integers(0, 1 << 20),
        value=st.integers(0, 1 << 16),
        src_i=st.integers(0, 1000),
        times=st.integers(1, 4),
    )
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

    @precondition(lambda self: self.entries)
    @rule(
        i=st.integers(0, 1000),
        pos=st.integers(0, 1 << 30),
        length=st.integers(0, KERNEL_IO_MAX),
        value=st.integers(0, 1 << 16),
        into=st.booleans(),
        pinned=st.booleans(),
    )
    def kernel_io(self, i, pos, length, value, into, pinned):
        """The kernel reading or writing a buffer: write(2) from it works
        from any page in both modes; read(2) into it works everywhere in
        "kernel" mode, and in "signal" mode on private pages, or anywhere
        inside pin(): a merged or zero page is read-only there, and the
        kernel's write into it fails with EFAULT, writing nothing."""
        self._step()
        e = self._pick(i)
        n = e.nbytes
        if not n:
            return
        lo = pos % n
        hi = min(n, lo + 1 + length)
        b = flat_bytes(e.obj())
        fd = self.iofd
        if not into:
            assert os.pwrite(fd, memoryview(b[lo:hi]), 0) == hi - lo
            assert os.pread(fd, hi - lo, 0) == e.shadow[lo:hi].tobytes()
            return
        if value % 3:
            data = np.tile(self.palette[value % PALETTE_SIZE], -(-(hi - lo) // PAGE) + 1)
            data = data[lo % PAGE : lo % PAGE + hi - lo]  # page-aligned palette content
        else:
            data = self.rng.integers(0, 256, hi - lo, dtype=np.uint8)
        os.ftruncate(fd, 0)
        assert os.pwrite(fd, data.tobytes(), 0) == hi - lo
        if pinned:
            self.populated = True
            e.committed |= self.pool.page_states(e.obj())[0] != PRIVATE
            with self.pool.pin(e.obj()) as a:
                got = os.preadv(fd, [memoryview(flat_bytes(a)[lo:hi])], 0)
                del a
            assert got == hi - lo
        else:
            state = self.pool.page_states(e.obj())[0]
            p0, p1 = lo // PAGE, (hi - 1) // PAGE + 1
            readonly = np.flatnonzero(state[p0:p1] != PRIVATE)
            if self.COW == "signal" and len(readonly):
                first = p0 + int(readonly[0])
                if first > p0:
                    hi = first * PAGE  # the private pages before it
                else:
                    try:
                        os.preadv(fd, [memoryview(b[lo:hi])], 0)
                    except OSError as exc:
                        assert exc.errno == errno.EFAULT, exc
                        return
                    raise AssertionError("read(2) into a read-only merged page succeeded")
            got = os.preadv(fd, [memoryview(b[lo:hi])], 0)
            assert got == hi - lo, (got, hi - lo)
        e.shadow[lo:hi] = data[: hi - lo]
        e.touch(lo, hi)

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
        """MADV_UNMERGEABLE: every merged and zero page is made private (and
        committed) at once; only a kernel out of memory could refuse it."""
        self._step()
        self.populated = True
        e = self._pick(i)
        state = self.pool.page_states(e.obj())[0]
        need = int(np.count_nonzero((state == KSM) | (state == ZERO)))
        done = self.pool.unmerge(e.obj())
        e.mergeable = False
        assert done == need, (done, need)
        e.unmerge_ok = True
        after = self.pool.page_states(e.obj())[0]
        assert (after == PRIVATE).all()
        e.committed |= state != PRIVATE

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
    @rule(
        i=st.integers(0, 1000),
        kind=st.sampled_from(WRITE_KINDS),
        pos=st.integers(0, 1 << 30),
        length=st.integers(0, 1 << 20),
        value=st.integers(0, 1 << 16),
        src_i=st.integers(0, 1000),
        scan=st.booleans(),
        compact=st.booleans(),
    )
    def pin(self, i, kind, pos, length, value, src_i, scan, compact):
        """Inside one pin() block: all pages private, a scan merges none of
        them, compaction moves none of them, writes and reads work."""
        self._step()
        self.populated = True
        e = self._pick(i)
        state = self.pool.page_states(e.obj())[0]
        with self.pool.pin(e.obj()) as a:
            assert a is e.obj()
            st_, pfn, mc = self.pool.page_states(a)
            assert (st_ == PRIVATE).all(), st_
            assert not pfn.any() and not mc.any(), "a private page with a frame"
            e.committed |= state != PRIVATE
            if scan:
                self.pool.scan(full_scans=2)
                assert (self.pool.page_states(a)[0] == PRIVATE).all()
            if compact:
                self.pool.compact()
                assert (self.pool.page_states(a)[0] == PRIVATE).all()
            self._write(e, kind, pos, length, value, src_i)
            assert np.array_equal(flat_bytes(a), e.shadow[: e.nbytes])
            del a
        if not e.mergeable:
            e.unmerge_ok = True

    @rule(
        i=st.integers(0, 1000),
        pos=st.integers(0, 1 << 30),
        value=st.integers(0, 255),
        write_after=st.booleans(),
    )
    def compact(self, i, pos, value, write_after):
        self._step()
        r = self.pool.compact()
        s = self.pool.stats()
        assert r["frames_skipped"] == 0, r
        assert r["memfd_bytes_after"] == s["bytes_frames"] == s["memfd_bytes"]
        assert r["memfd_size_after"] == s["memfd_size"]
        self._check_compacted()
        if write_after and self.entries:
            # a write into a moved page (a COW break if it is merged)
            self._write(self._pick(i), "byte", pos, 0, value, 0)

    @rule(pages=st.integers(1, 96))
    def shrink(self, pages):
        """Memory hot-remove: the top of the frame store goes for good, the
        live frames there moved below it first.  capacity, the span of live
        buffers, stays: private pages are not frames.  Refused
        (PoolFullError, nothing changed) iff the live frames would not fit
        in what remains."""
        self._step()
        online = self.frames_online
        if online - pages < 64:
            return  # keep frames to merge into
        live = self.pool.stats()["pages_shared"]
        fits = live <= online - pages
        try:
            self.pool.shrink(pages * PAGE)
        except uksm.PoolFullError:
            STEPS["pool_full"] += 1
            assert not fits, f"shrink by {pages} refused: {live} of {online} frames live"
            assert self.pool.capacity // PAGE == self.cap_pages
            return
        assert fits, f"shrink by {pages} succeeded with {live} of {online} frames live"
        self.frames_online = online - pages
        STEPS["shrinks"] += 1
        assert self.pool.capacity // PAGE == self.cap_pages
        self._check_compacted()

    # -- checks -------------------------------------------------------------------

    def _tables(self):
        """Every live buffer's page table, in address order."""
        es = sorted(self.entries, key=lambda e: e.addr)
        info = [self.pool.page_states(e.obj()) for e in es]
        return es, info

    def _check_compacted(self):
        """After compaction (nothing pinned), the live frames fill [0, live)
        of the memfd, and it is cut right after them."""
        s = self.pool.stats()
        live = s["pages_shared"]
        assert s["memfd_size"] == live * PAGE, (s["memfd_size"] // PAGE, live)
        assert s["bytes_frames"] == live * PAGE
        es, info = self._tables()
        if not es:
            return
        state = np.concatenate([x[0] for x in info])
        pfn = np.concatenate([x[1] for x in info])
        frames = pfn[state == KSM]
        if len(frames):
            assert int(frames.max()) < live, (
                f"a frame at {int(frames.max())} after compaction, {live} live"
            )

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
                # a page never written is the kernel's zero page already and
                # is not scanned (_check_cow: never merged)
                if not e.mergeable or (state[p] == PRIVATE and not e.committed[p]):
                    continue
                data = e.shadow[p * PAGE : (p + 1) * PAGE]
                key = hashlib.blake2b(data.tobytes(), digest_size=16).digest()
                g = groups.setdefault(key, [not data.any(), [], set()])
                g[1].append(int(state[p]))
                if state[p] == KSM:
                    g[2].add(int(pfn[p]))
        # a merge that needs a new frame waits while the store (shrunk) is full
        store_full = self.pool.stats()["pages_shared"] >= self.frames_online
        for zero, states_, frames in groups.values():
            if zero and self.zero_pages:
                assert all(s == ZERO for s in states_), (
                    f"zero pages left unmerged after 2 full scans: {states_}"
                )
                continue
            if len(states_) < 2 or store_full:
                continue
            private = states_.count(PRIVATE)
            assert private <= 1, (
                f"{private} pages of one content left unmerged after 2 full scans: {states_}"
            )
            if private == 1 and self.max_sharing >= 256:
                # (with a small max_page_sharing a content has several KSM
                # frames, and a page can be left over for one more scan:
                # see test_leftover_page_finds_a_dup_with_room)
                assert all(frame_mc[f] >= self.max_sharing for f in frames), (
                    f"a page left unmerged while a KSM frame of its content has room: "
                    f"{[frame_mc[f] for f in frames]} < {self.max_sharing}"
                )

    @invariant()
    def contents_and_counters(self):
        if self.pool is None:
            return
        pool = self.pool
        for e in self.entries:
            b = flat_bytes(e.obj())
            assert b.size == e.nbytes
            if not np.array_equal(b, e.shadow[: e.nbytes]):
                bad = np.flatnonzero(b != e.shadow[: e.nbytes])
                raise AssertionError(
                    f"buffer at {e.addr:#x} differs from its shadow at {len(bad)} bytes, "
                    f"pages {sorted(set((bad // PAGE).tolist()))[:10]}; states "
                    f"{pool.page_states(e.obj())[0][:20]}"
                )
        s = pool.stats()
        assert (
            s["pages_shared"] + s["pages_sharing"] + s["pages_unshared"] + s["pages_volatile"]
        ) == s["pages_tracked"], s
        mapped_pages = sum(e.npages for e in self.entries)
        assert s["bytes_mapped"] == mapped_pages * PAGE, (s["bytes_mapped"], mapped_pages)
        assert s["buffers"] == len(self.entries)
        assert s["capacity"] == self.cap_pages * PAGE
        assert s["bytes_mapped"] <= s["capacity"]
        assert s["frames_deferred"] == 0 and s["fork_detaches"] == 0, s
        assert s["pages_shared"] <= self.frames_online
        assert s["memfd_size"] <= self.frames_online * PAGE, (
            s["memfd_size"] // PAGE,
            self.frames_online,
        )
        es, info = self._tables()
        if es:
            state = np.concatenate([x[0] for x in info])
            pfn = np.concatenate([x[1] for x in info])
            mc = np.concatenate([x[2] for x in info])
        else:
            state = pfn = mc = np.zeros(0, np.uint32)
        assert not (state == uksm.PageState.NONE).any(), "a live buffer has an unmapped page"
        assert not np.isin(state, (PRIVATE, KSM, ZERO), invert=True).any(), state
        ksm = state == KSM
        assert s["pages_shared"] == len(np.unique(pfn[ksm])), (
            s["pages_shared"],
            len(np.unique(pfn[ksm])),
        )
        assert s["pages_shared"] + s["pages_sharing"] == int(np.count_nonzero(ksm))
        assert s["ksm_zero_pages"] == int(np.count_nonzero(state == ZERO))
        # each frame's mapcount is the number of ptes mapping it, at most
        # max_page_sharing; private and zero pages have no frame
        uniq, counts = np.unique(pfn[ksm], return_counts=True)
        mc_of = dict(zip(pfn[ksm].tolist(), mc[ksm].tolist()))
        assert all(mc_of[f] == c for f, c in zip(uniq.tolist(), counts.tolist())), (
            "frame mapcount differs from the ptes mapping it"
        )
        assert (mc[ksm] <= self.max_sharing).all()
        assert not pfn[~ksm].any() and not mc[~ksm].any(), "a private or zero page with a frame"
        # tracked pages: those of mergeable buffers, less their zero pages
        tracked = 0
        for e, (st_, _, _) in zip(es, info):
            if e.mergeable:
                tracked += e.npages
            elif e.unmerge_ok:
                assert (st_ == PRIVATE).all(), "an unmerged buffer was merged again"
        assert s["pages_tracked"] == tracked - s["ksm_zero_pages"], (s["pages_tracked"], tracked)
        assert s["pages_unshared"] <= int(np.count_nonzero(state == PRIVATE))
        self._check_cow(es, info, s)
        self._check_memory(es, info, s)

    def _check_cow(self, es, info, s):
        """The copy-on-write counters grew by the pages the model saw go from
        KSM (or ZERO) to private during this step.  Within one step a page
        changes state at most once that way: no rule both writes and merges
        outside a pin (where nothing merges)."""
        broke = zero_broke = 0
        for e, (st_, _, _) in zip(es, info):
            if e.state is not None:
                broke += int(np.count_nonzero((e.state == KSM) & (st_ == PRIVATE)))
                zero_broke += int(np.count_nonzero((e.state == ZERO) & (st_ == PRIVATE)))
                # a page never written is the zero page already: never merged
                merged = np.flatnonzero((e.state == PRIVATE) & ~e.committed & (st_ != PRIVATE))
                assert not len(merged), f"pages never written were merged: {merged[:10]}"
            e.state = st_.copy()
            e.committed &= st_ == PRIVATE  # merged away, or given back as zero
        assert s["cow_breaks"] - self.cow_seen == broke, (s["cow_breaks"], self.cow_seen, broke)
        assert s["zero_page_cows"] - self.zero_cow_seen == zero_broke, (
            s["zero_page_cows"],
            self.zero_cow_seen,
            zero_broke,
        )
        signal = s["cow_breaks_signal"] - self.signal_seen
        if self.COW == "kernel":
            assert s["cow_breaks_signal"] == 0
        else:
            # unmerge and pin make pages private themselves, not by a fault
            assert signal == (0 if self.populated else broke), (signal, broke, self.populated)
        self.cow_seen, self.zero_cow_seen = s["cow_breaks"], s["zero_page_cows"]
        self.signal_seen = s["cow_breaks_signal"]

    def _check_memory(self, es, info, s):
        """Memory, by the kernel's own accounting (the module doc)."""
        pool = self.pool
        blocks = os.fstat(pool.fd).st_blocks * 512
        assert s["bytes_frames"] == blocks == s["memfd_bytes"], (s["bytes_frames"], blocks)
        assert s["bytes_frames"] == s["pages_shared"] * PAGE, (
            s["bytes_frames"] // PAGE,
            s["pages_shared"],
        )
        assert s["bytes_swap_cached"] == 0
        assert s["bytes_resident"] == s["bytes_private"] + s["bytes_frames"], s
        # the model's committed pages are what the kernel holds as anonymous
        # memory; every view was read by the contents check, so each KSM pte
        # is in RSS, each frame is in PSS once, and a frame with one view is
        # in USS (nothing else maps a frame: the direct map is zapped)
        committed = sum(int(np.count_nonzero(e.committed)) for e in es)
        n_ksm = s["pages_shared"] + s["pages_sharing"]
        single = sum(int(np.count_nonzero((st_ == KSM) & (mc == 1))) for st_, _, mc in info)
        rss = (committed + n_ksm) * PAGE
        uss = (committed + single) * PAGE
        pss = (committed + s["pages_shared"]) * PAGE
        assert s["uss_bytes"] == uss, (s["uss_bytes"] // PAGE, committed, single)
        k = kernel_view(es)
        if k is not None:
            assert k["Anonymous"] == committed * PAGE, (k["Anonymous"] // PAGE, committed)
            assert k["Rss"] == rss, (k["Rss"] // PAGE, committed, n_ksm)
            direct = direct_map_rss(pool)
            if not core_bug("direct_map_kept"):
                assert direct == 0, f"{direct // PAGE} frames left in the direct map"
            if direct == 0:
                assert k["Uss"] == uss, (k["Uss"] // PAGE, committed, single)
                assert abs(k["Pss"] - pss) < 1e-6 * PAGE, (k["Pss"] / PAGE, pss // PAGE)
            else:
                # a frame the direct map still maps has one more mapper
                # (test_direct_map_is_zapped_after_merging)
                assert uss - direct <= k["Uss"] <= uss
                assert pss - direct / 2 - 1e-6 * PAGE <= k["Pss"] <= pss + 1e-6 * PAGE
        assert s["bytes_private"] == committed * PAGE, (s["bytes_private"] // PAGE, committed)
        assert s["rss_bytes"] == rss, (s["rss_bytes"] // PAGE, rss // PAGE)
        assert s["pss_bytes"] == pss, (s["pss_bytes"] // PAGE, pss // PAGE)


class SignalPoolModel(PoolModel):
    COW = "signal"


MODELS = {"kernel": PoolModel, "signal": SignalPoolModel}


def _run(cow, machine_settings):
    run_state_machine_as_test(MODELS[cow], settings=machine_settings)


HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_model_short(cow):
    before = STEPS.get("alarm_stats", 0)
    _run(
        cow,
        settings(
            max_examples=int(os.environ.get("UKSM_MODEL_EXAMPLES", 70)),
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=HEALTH,
            database=None,
            print_blob=True,
        ),
    )
    assert STEPS.get("alarm_stats", 0) > before, "the SIGALRM handler never called the pool"


@pytest.mark.skipif(not LONG, reason="long profile: UKSM_LONG=1")
@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_model_long(cow):
    before = dict(STEPS)
    try:
        _run(
            cow,
            settings(
                max_examples=int(os.environ.get("UKSM_MODEL_EXAMPLES", 600)),
                stateful_step_count=100,
                deadline=None,
                suppress_health_check=HEALTH,
                database=None,
                print_blob=True,
            ),
        )
    finally:
        # printed even when a step fails (the count then includes the
        # failing example's shrinking)
        print(
            f"\nuksm model test (long profile, cow={cow}): "
            f"{STEPS['steps'] - before['steps']} steps "
            f"in {STEPS['examples'] - before['examples']} examples, "
            f"{STEPS['pool_full'] - before['pool_full']} PoolFullErrors as predicted, "
            f"{STEPS['merge_checks'] - before['merge_checks']} merge checks, "
            f"{STEPS['shrinks'] - before['shrinks']} shrinks, "
            f"{STEPS['cow_breaks'] - before['cow_breaks']} COW breaks, "
            f"{STEPS.get('alarm_stats', 0) - before.get('alarm_stats', 0)} stats() "
            f"from the SIGALRM handler"
        )


# -- deterministic regressions for what the model found --------------------------------


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_unmerge_at_capacity_keeps_the_counters_consistent(cow):
    """A pool whose buffers span all of its capacity, merged: unmerging a
    buffer needs no capacity (the kernel commits the copies, as for any
    write) and leaves shared + sharing + unshared + volatile == tracked with
    the buffer off the scanner."""
    with uksm.Pool("1MiB", pages_to_scan=1000, sleep_millisecs=0, cow=cow) as pool:
        a = pool.full((200, PAGE), 7, dtype=np.uint8)  # 200 equal pages
        b = pool.asarray(
            np.random.default_rng(3).integers(0, 256, (56, PAGE), dtype=np.uint8)
        )  # 56 unique: 256 mapped
        with pytest.raises(uksm.PoolFullError):
            pool.zeros(PAGE, np.uint8)
        pool.scan(full_scans=2)
        s = pool.stats()
        assert s["pages_shared"] == 1 and s["pages_sharing"] == 199
        assert pool.unmerge(a) == 200
        assert (a == 7).all() and (pool.page_states(a)[0] == PRIVATE).all()
        s = pool.stats()
        assert s["pages_shared"] == 0 and s["pages_sharing"] == 0 and s["bytes_frames"] == 0
        assert s["cow_breaks"] == 200 and s["cow_breaks_signal"] == 0
        assert (
            (s["pages_shared"] + s["pages_sharing"] + s["pages_unshared"] + s["pages_volatile"])
            == s["pages_tracked"]
            == 56
        ), {
            k: s[k]
            for k in (
                "pages_shared",
                "pages_sharing",
                "pages_unshared",
                "pages_volatile",
                "pages_tracked",
            )
        }
        del a, b


def test_leftover_page_finds_a_dup_with_room():
    """With max_page_sharing, one content has several KSM frames (a stable
    node chain).  Three new pages of that content, three dups with room for
    one more mapper each: ksmd walks the chain for each page and merges all
    three in the first scan.  uksm searches the stable tree for a whole batch
    at once and sends every page of one content to the same first dup with
    room; the ones refused as full (MERGE_FULL) do not try the next dup, so
    after two full scans a page is still unmerged next to a dup with room."""
    with uksm.Pool(
        "4MiB", pages_to_scan=1000, sleep_millisecs=0, max_page_sharing=2, smart_scan=False
    ) as pool:
        x = np.random.default_rng(4).integers(1, 256, PAGE, dtype=np.uint8)
        old = [pool.asarray(x) for _ in range(6)]
        pool.scan(full_scans=2)
        frames = {int(pool.page_states(a)[1][0]) for a in old}
        assert len(frames) == 3 and all((pool.page_states(a)[0] == KSM).all() for a in old)
        for a in old[1::2]:
            a[0] ^= 0xFF  # each dup keeps one mapper
        new = [pool.asarray(x) for _ in range(3)]
        pool.scan(full_scans=2)
        st = [int(pool.page_states(a)[0][0]) for a in new]
        mc = {f: 0 for f in frames}
        for a in old[0::2] + new:
            s, p, m = pool.page_states(a)
            if s[0] == KSM:
                mc[int(p[0])] = int(m[0])
        assert st == [KSM, KSM, KSM], (
            f"new pages' states {st}; mappers of the "
            f"content's KSM frames {sorted(mc.values())} "
            f"(max_page_sharing 2)"
        )


@pytest.mark.parametrize(
    "pages, how", [(16, "fresh"), (16, "given_back"), (4096, "fresh"), (4096, "given_back")]
)
def test_reading_untouched_pages_costs_nothing(pages, how):
    """Reading a page never written maps the kernel's shared zero page (a
    huge one where the buffer is big enough), a fresh buffer's or one the
    scanner gave back as zeroes: the kernel counts no anonymous memory and
    no RSS for it, and stats() must not either."""
    with uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0) as pool:
        a = pool.zeros(pages * PAGE, np.uint8)
        if how == "given_back":
            a.fill(1)
            a.fill(0)
            pool.scan(full_scans=2)
            assert (pool.page_states(a)[0] == ZERO).all()
        assert int(a.sum()) == 0
        s = pool.stats()
        k = kernel_view([Entry(a, None)])
        if k is not None:
            assert k["Anonymous"] == 0 and k["Rss"] == 0, k
        assert (s["bytes_private"], s["bytes_resident"], s["rss_bytes"], s["pss_bytes"]) == (
            0,
            0,
            0,
            0,
        ), {key: s[key] for key in ("bytes_private", "bytes_resident", "rss_bytes", "pss_bytes")}
        del a


@pytest.mark.parametrize("pages", [16, 1024])
def test_untouched_pages_are_not_merged(pages):
    """A private page never written is not scanned or merged, read or not:
    it is the kernel's zero page already.  Merging it (use_zero_pages off)
    allocates a frame for nothing and counts pages_sharing never saved."""
    with uksm.Pool("4MiB", pages_to_scan=1000, sleep_millisecs=0, use_zero_pages=False) as pool:
        a = pool.zeros(pages * PAGE, np.uint8)
        assert int(a.sum()) == 0
        s = pool.scan(full_scans=2)
        assert (pool.page_states(a)[0] == PRIVATE).all(), pool.page_states(a)[0]
        assert s["pages_sharing"] == 0 and s["bytes_frames"] == 0
        del a


# -- what the model found in the core (core_bug: the model steps around these) --------


def test_shrink_takes_frames_and_leaves_capacity():
    """shrink() takes frames off the top of the store (the live ones move
    below first) and is refused iff they would not fit in what remains;
    capacity, the span of live buffers, is unchanged, and a merge that
    would need a frame beyond the new top waits, its pages left private,
    until frames are given back."""
    with uksm.Pool(
        "1MiB", pages_to_scan=1000, sleep_millisecs=0, smart_scan=False
    ) as pool:  # 256 pages, 256 frames
        rng = np.random.default_rng(5)
        a = pool.asarray(rng.integers(0, 256, (100, PAGE), dtype=np.uint8))
        b = pool.asarray(a)
        pool.scan(full_scans=2)
        assert pool.stats()["pages_shared"] == 100
        with pytest.raises(uksm.PoolFullError):
            pool.shrink(157 * PAGE)  # 100 frames > 99 left
        r = pool.shrink(156 * PAGE)  # 100 frames, 100 left
        s = pool.stats()
        assert pool.capacity == 256 * PAGE and s["capacity"] == 256 * PAGE
        assert s["pages_shared"] == 100 and s["memfd_size"] == 100 * PAGE, (r, s)
        assert np.array_equal(a, b)
        c = pool.asarray(rng.integers(0, 256, (28, PAGE), dtype=np.uint8))
        d = pool.asarray(c)  # 256 pages mapped
        with pytest.raises(uksm.PoolFullError):
            pool.zeros(PAGE, np.uint8)
        s = pool.scan(full_scans=2)
        assert s["pages_shared"] == 100 and s["bytes_frames"] == 100 * PAGE
        assert (pool.page_states(c)[0] == PRIVATE).all()  # no frame to merge into
        del a, b
        s = pool.scan(full_scans=2)
        assert s["pages_shared"] == 28 and s["bytes_frames"] == 28 * PAGE
        assert (pool.page_states(c)[0] == KSM).all() and np.array_equal(c, d)
        del c, d


def test_direct_map_is_zapped_after_merging():
    """csrc/uksm.h: the direct map is zapped after use, so that RSS counts
    each frame once per view.  Contents A B B C A C A: after two full scans
    three frames, each mapped only by its views."""
    pal = np.random.default_rng(0).integers(1, 256, (4, PAGE), dtype=np.uint8)
    with uksm.Pool("1MiB", pages_to_scan=1000, sleep_millisecs=0) as pool:
        a = pool.asarray(pal[[1, 2, 2, 3, 1, 3, 1]])
        s = pool.scan(full_scans=2)
        assert s["pages_shared"] == 3 and s["pages_sharing"] == 4
        assert direct_map_rss(pool) == 0, f"{direct_map_rss(pool) // PAGE} pages"
        del a
