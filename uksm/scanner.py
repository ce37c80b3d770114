"""uksm.scanner - the userspace ksmd: which pages to merge, and when.

DOC: Overview

This is mm/ksm.c's scanning policy, rewritten for one process and for
numpy.  The C core (csrc/) owns the mechanism: frames, page tables, write
protection, remapping, the COW fault.  This module owns the decisions, and
keeps every per-page fact in numpy arrays indexed by virtual page number
(vpn), never in a Python object per page: the arrays *are* the rmap items.

rmap items.  For each virtual page of a mergeable buffer: ``oldchecksum``
(its checksum at the previous visit), ``tag`` (nonzero while it sits in an
unstable tree: which full scan put it there), ``age`` and ``skips`` (smart
scan).  Together with the C tables that is well under the 64 bytes of the
kernel's struct ksm_rmap_item; ``stats()["metadata_bytes_per_page"]`` gives
the measured figure.

The scan.  ksmd visits ``pages_to_scan`` pages per wake-up, in address
order, buffer after buffer; a pass over all of them is a full scan.  For a
batch of pages, as cmp_and_merge_page() does for one:

 1. the C core first learns from pagemap which merged pages the kernel
    has copied on write since (they are private again), then hashes each
    private page where it is mapped (KSM, ZERO and swapped pages are
    merged or out already: nothing to do; a private page never written is
    the zero page already, and is not even read; smart_scan's skipped
    pages are not hashed);
 2. stable tree search: a page equal to an existing KSM frame is merged into
    it (the merge, write-protected, confirms equality with memcmp);
 3. the checksum gate: a page whose checksum changed since the previous
    visit is volatile and goes no further this time;
 4. use_zero_pages: a stable page of zeroes is given back (fresh anonymous
    memory over it reads as the kernel's zero page);
 5. unstable tree search/insert: a stable page equal to one already seen in
    this full scan is merged with it: the tree page is copied into a fresh
    frame once, both become views of it, and a stable node is made for it;
    otherwise the page joins the unstable tree.

Everything is done for the whole batch at once: numpy sorts and searches,
and the merges go down to C in one call, sorted by vpn, so that runs of
adjacent pages merge with one mprotect and one mmap per run.

The stable tree.  A stable node is (checksum, pfn, key) in flat arrays,
with a sorted index on the checksum.  It holds no reference on its frame:
lookups peep through the keyhole (the frame table's key and KSM flag) and
a node whose frame has gone, been COW-broken by its last mapper or reused,
is pruned on the spot (patches 4 and 8).  With max_page_sharing, a KSM
frame takes at most that many mappers; a page finding every node of its
content full goes on to the unstable tree and, merged there, becomes a new
"dup" of the same content: nodes sharing a checksum form a chain
(stable_node_chains, stable_node_dups).

The unstable tree.  Pages stable for one scan, not write-protected, so its
order "can rot": a sorted (checksum, vpn) index rebuilt every full scan and
trusted only as far as the C core's compare under write-protect.  An entry
is live while its page's tag is the current scan's and its oldchecksum is
still the entry's.

Smart scan (Linux 6.7): a page that keeps failing to merge is skipped for
1, 2, 4, then 8 visits.  The advisor ("scan-time", Linux 6.8) retunes
pages_to_scan after each full scan so a full scan takes about
advisor_target_scan_time seconds, within advisor_max_cpu.

VMA budget.  Every protection change or remap of part of a mapping can
split it; the process's next mmap fails at vm.max_map_count.  Merges draw
on a budget of max_map_count less map_count_reserve (left to the program's
own mappings) less the maps already there.  The maps are counted from
/proc/self/maps rarely: at the first merge of each full scan, and when the
budget runs low at most once a second; in between, every merge reports the
mappings it really kept (the C core counts the mapping boundaries around
each run before and after it), so the count stays exact for our own
changes, and one count serves every pool of the process.  A merged page
costs two mappings when it cuts a mapping in the middle, none when its view
extends the view of the frame before it.  When the budget cannot cover a
batch, runs go before single pages and stable frames before new ones
(pages saved per mapping), and what is left is skipped and counted
(merges_skipped_vma; pages_unmerged_map_limit: the pages a full scan left
private for lack of mappings), never forced.  The kernel's own COW never
splits a mapping; with cow="signal" the fault handler is told the count and,
within half the reserve of the limit (or if mprotect says ENOMEM), makes
the whole run of merged pages around a fault writable, which needs no
split.

Locking: the caller holds the pool's Python lock around every method here;
the C core takes its own lock inside each call.
"""

from __future__ import annotations

import bisect
import math
import mmap
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, Type, TypeVar, cast

import numpy as np
import numpy.ma  # noqa: F401  (see below)
import numpy.typing as npt

from . import _core

if TYPE_CHECKING:
    from .knobs import Knobs

# The rmap items' and the trees' arrays, by dtype.  The C core's page states
# and merge results are compared as its plain ints (_core.PTE_*, MERGE_*)
# against whole uint8 arrays, a batch at a time.
_U64 = npt.NDArray[np.uint64]
_U32 = npt.NDArray[np.uint32]
_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]
_I32 = npt.NDArray[np.int32]
_IntP = npt.NDArray[np.intp]
_Bool = npt.NDArray[np.bool_]
# node indices: a tree's own int32 index, or a search's intp positions
_Nodes = npt.NDArray[np.signedinteger[Any]]

_S = TypeVar("_S", bound=np.generic)
_F = TypeVar("_F", bound=Callable[..., Any])

# The scanner runs under the pool's policy lock, and a served call (stats(),
# an allocation) made by a finalizer in another thread waits for that lock
# -- possibly while its thread holds the interpreter's import lock, since
# the collector runs at any allocation, imports included.  An import inside
# a batch would then wait for that thread in turn.  numpy imports some of
# its submodules on first use (np.unique imports numpy.ma): everything a
# batch calls is imported, and run once, here.
np.unique(np.zeros(2, np.uint64), return_index=True)
np.unique(np.zeros(2, np.uint64), return_counts=True)
np.unique(np.zeros(2, np.uint64))
np.isin(np.zeros(2, np.int64), np.zeros(1, np.int64))
np.lexsort((np.zeros(2), np.zeros(2)))

# Idle backoff: after a full scan that found nothing new (no page changed,
# nothing merged, no buffer came), the background scanner sleeps four times
# as long per batch, and four times longer again after each further idle
# scan, up to IDLE_FACTOR_MAX times sleep_millisecs; the first change it
# meets, or a new buffer, puts it back to full speed at once.  ksmd's smart scan skips
# the pages that fail to merge; this skips the time a pool at rest would
# spend proving that it still is.
IDLE_FACTOR_MAX = 32
# The advisor's bounds on the scanner's share of a CPU (the kernel's
# KSM_ADVISOR_MIN_CPU is 10%: a uksm page costs a quarter of a ksmd page,
# and 10% would scan a GiB several times faster than a long target asks)
# and on how much one full scan's measurement may change pages_to_scan.
ADVISOR_MIN_CPU = 1
ADVISOR_MAX_STEP = 4.0
MAP_COUNT_RESERVE_MIN = 1024
MAP_COUNT_RESERVE_SHARE = 32  # default reserve: 1/32 of the limit, >= the above
RECOUNT_INTERVAL = 1.0  # seconds between two counts of a short budget


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _table(n: int, dtype: Type[_S]) -> npt.NDArray[_S]:
    """A zeroed table of @n slots, one per virtual page (or frame): address
    space reserved without commitment (MAP_NORESERVE, as the C core's own
    pte table), so a slot costs memory only once it is written.  np.zeros
    would be calloc, lazy too, but counted whole against the overcommit
    heuristic: a table for a pool of many terabytes would be refused."""
    dt = np.dtype(dtype)
    m = mmap.mmap(
        -1, max(n * dt.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    )
    return np.frombuffer(m, dt, count=n)


def _table_trim(table: npt.NDArray[np.generic], lo: int, hi: int, gap_lo: int, gap_hi: int) -> None:
    """Give back the pages of @table that hold only slots of the free gap
    [gap_lo, gap_hi) and some of [lo, hi): the slots read as zero again, as
    a fresh rmap item's do."""
    base = table.base
    base = base.obj if isinstance(base, memoryview) else base
    if not isinstance(base, mmap.mmap):
        return
    b = table.itemsize
    pg = mmap.PAGESIZE
    start = max(-(-gap_lo * b // pg) * pg, lo * b // pg * pg)
    end = min(gap_hi * b // pg * pg, -(-hi * b // pg) * pg)
    if end > start:
        base.madvise(mmap.MADV_DONTNEED, start, end - start)


def _count_maps() -> int:
    """Lines of /proc/self/maps: the VMAs the process has now."""
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def _read_max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except OSError:
        return 65530


def map_count_reserve(knob: Optional[int], max_map_count: int) -> int:
    """The mappings merging leaves to the program: the knob, or by default
    a 32nd of the limit and at least 1024 (a program that raises the limit
    usually needs many mappings of its own)."""
    if knob is not None:
        return knob
    return max(MAP_COUNT_RESERVE_MIN, max_map_count // MAP_COUNT_RESERVE_SHARE)


class _ProcessMaps:
    """The process's mappings, as every pool's scanner sees them.  The
    limit is per process, so the pools share one count: the lines of
    /proc/self/maps when last counted, plus what merges kept since (net,
    possibly negative), plus the budget handed to merges still running in
    other threads (taken whole before a merge and settled after it, so two
    scanners never spend the same mappings).

    The lock is reentrant: a signal handler (or a finalizer) that
    interrupts this thread in one pool's merge, right as it took the lock,
    and makes or compacts another pool comes back here on the same thread;
    a plain lock would wait for itself for ever.  Each update is made in
    one go, or with the count high in between (settle), so that the nested
    call reads a count that errs, if at all, on the safe side."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.counted = 0
        self.counted_at = -1e18
        self.kept = 0
        self.inflight = 0

    def recount(self) -> int:
        # what merges settle while the maps are read may be in the count
        # already or not: kept for the next count to drop, counted twice
        # at worst, never lost
        with self.lock:
            kept_before = self.kept
        maps = _count_maps()
        now = time.monotonic()
        with self.lock:
            self.counted, self.kept, self.counted_at = maps, self.kept - kept_before, now
        return maps

    def stale(self) -> bool:
        return time.monotonic() - self.counted_at >= RECOUNT_INTERVAL

    def estimate(self) -> int:
        return self.counted + self.kept + self.inflight

    def take(self, limit: int) -> int:
        # no call inside the section: CPython runs a signal handler after a
        # call returns, and one that took a budget between our reading
        # and our update would spend the same mappings twice
        with self.lock:
            budget = limit - self.counted - self.kept - self.inflight
            if budget < 0:
                budget = 0
            self.inflight += budget
        return budget

    def settle(self, taken: int, left: int) -> None:
        with self.lock:
            self.kept += taken - left
            self.inflight -= taken

    def inherited(self) -> "_ProcessMaps":
        """The child's count after fork: the kernel copied every mapping,
        so the parent's count holds (the budgets of merges in flight in
        threads that did not survive, counted as spent); stale, so that a
        short budget is counted again first."""
        child = _ProcessMaps()
        child.counted = self.counted + self.kept + max(self.inflight, 0)
        return child


_MAPS = _ProcessMaps()


def _maps_after_fork() -> None:
    global _MAPS
    # a fresh lock (another thread may have held this one), the same count
    _MAPS = _MAPS.inherited()


os.register_at_fork(after_in_child=_maps_after_fork)


def _mutating(method: _F) -> _F:
    """A method that updates the scanner's state in several steps: while it
    runs the state is marked torn, and stays so if an exception (a signal
    handler's) leaves it half way; the pool then calls recover()."""

    def wrapper(self: Scanner, *args: Any, **kwargs: Any) -> Any:
        self.dirty += 1  # a depth: these methods call one another
        result = method(self, *args, **kwargs)
        self.dirty -= 1
        return result

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return cast(_F, wrapper)


def _skip_age(age: _U8) -> _U8:
    """mm/ksm.c skip_age(): how many visits to skip at a given age."""
    out = np.full(age.shape, 8, np.uint8)
    out[age <= 8] = 4
    out[age <= 5] = 2
    out[age <= 3] = 1
    return out


class StableTree:
    """Stable nodes in flat arrays, indexed by checksum (a sorted index)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: _U64 = np.zeros(1024, np.uint64)
        self.pfn: _U32 = np.zeros(1024, np.uint32)
        self.key: _U32 = np.zeros(1024, np.uint32)
        self.alive: _Bool = np.zeros(1024, bool)
        self.idx_sum: _U64 = np.zeros(0, np.uint64)
        self.idx_node: _I32 = np.zeros(0, np.int32)
        self.nr_alive = 0

    def _grow(self, need: int) -> None:
        cap = len(self.sum)
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("sum", "pfn", "key", "alive"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def insert(self, sums: _U64, pfns: _U32, keys: _U32) -> None:
        k = len(sums)
        if not k:
            return
        self._grow(self.n + k)
        ids = np.arange(self.n, self.n + k, dtype=np.int32)
        self.sum[ids] = sums
        self.pfn[ids] = pfns
        self.key[ids] = keys
        self.alive[ids] = True
        self.n += k
        self.nr_alive += k
        order = np.argsort(sums, kind="stable")
        pos = np.searchsorted(self.idx_sum, sums[order], side="right")
        self.idx_sum = np.insert(self.idx_sum, pos, sums[order])
        self.idx_node = np.insert(self.idx_node, pos, ids[order])

    def prune(self, nodes: _Nodes) -> None:
        nodes = np.unique(nodes)
        nodes = nodes[self.alive[nodes]]
        self.alive[nodes] = False
        self.nr_alive -= len(nodes)

    def compact(self) -> None:
        """Drop pruned nodes once they are most of the arrays."""
        if self.n - self.nr_alive <= max(1024, self.n // 2):
            return
        keep = np.flatnonzero(self.alive[: self.n])
        k = len(keep)
        sums, pfns, keys = self.sum[keep], self.pfn[keep], self.key[keep]
        self.n = 0
        self.nr_alive = 0
        self.idx_sum = np.zeros(0, np.uint64)
        self.idx_node = np.zeros(0, np.int32)
        self.alive[:] = False
        self.insert(sums, pfns, keys)
        assert self.n == k

    def chains(self) -> Tuple[int, int]:
        """(stable_node_chains, stable_node_dups): contents with 2+ live dups."""
        live = self.sum[: self.n][self.alive[: self.n]]
        if not len(live):
            return 0, 0
        _, counts = np.unique(live, return_counts=True)
        multi = counts[counts > 1]
        return int(len(multi)), int(multi.sum())

    def nbytes(self) -> int:
        per_node = self.sum.itemsize + self.pfn.itemsize + self.key.itemsize + self.alive.itemsize
        return self.n * per_node + self.idx_sum.nbytes + self.idx_node.nbytes


class Scanner:
    """ksm_scan: the cursor, the trees, the rmap items, and the counters."""

    def __init__(self, native: _core.NativePool, knobs: Knobs) -> None:
        va_pages = native.va_pages
        self.native = native
        self.knobs = knobs
        # rmap items, one slot per virtual page, reserved and not committed
        # (_table): only the slots of pages in use take memory, and a freed
        # buffer's slots are given back (remove_range), so the tables cost
        # what the tracked pages cost, whatever the pool's capacity.
        self.oldchecksum = _table(va_pages, np.uint64)
        self.tag = _table(va_pages, np.uint16)
        self.age = _table(va_pages, np.uint8)
        self.skips = _table(va_pages, np.uint8)
        self.va_pages = va_pages
        # stable node + 1 of each frame, 0 for none: zero-filled, so (unlike
        # a table filled with -1) only the frames ever merged cost memory,
        # however large the frame store may grow
        self.node1_of_pfn = _table(native.nr_frames, np.int32)
        self.extents: List[List[int]] = []  # sorted [start, npages], mergeable
        self.starts: List[int] = []
        self.rmap_items = 0
        self.dirty = 0  # > 0: an update was torn half way (_mutating)
        self.cursor = 0
        self.cur_tag = 1
        self.u_sum: _U64 = np.zeros(0, np.uint64)
        self.u_vpn: _U32 = np.zeros(0, np.uint32)
        self.stable = StableTree()
        self.algo = _core.CHECKSUMS[knobs["checksum"]]
        self.zero_sum = np.uint64(_core.calc_checksum(bytes(_core.PAGE_SIZE), knobs["checksum"]))
        # counters, named as in /sys/kernel/mm/ksm
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.pages_unshared = 0
        self.full_scans = 0
        self.merges_skipped_vma = 0
        # idle backoff: what this full scan found new, and the full scans
        # in a row that found nothing
        self._news = 0
        self.idle_scans = 0
        # VMA budget
        self.max_map_count = _read_max_map_count()
        self.map_count_limit: Optional[int] = None  # tests: a limit below the sysctl's
        self._maps: Optional[int] = None
        self.recount_maps()
        self._maps = None  # and again at the first merge: buffers came since
        # pages left private for lack of mappings: in this full scan (a
        # flag per vpn, calloc'ed; the set ones listed to clear them), and
        # in the last one
        self._novma: _Bool = np.zeros(va_pages, bool)
        self._novma_list: List[_I64] = []
        self._novma_now = 0
        self.pages_unmerged_map_limit = 0
        # advisor: what this full scan cost, as a full scan at full speed
        # would take it (see _scan_time_advisor)
        self._scan_start = time.monotonic()
        self._adv_busy = 0.0  # wall seconds inside scan_batch()
        self._adv_cpu = 0.0  # thread CPU seconds inside scan_batch()
        self._adv_rest = 0.0  # seconds between batches
        self._adv_rests = 0  # ... over how many pauses
        self._adv_pages = 0  # pages visited
        self._batch_end = 0.0  # when the last batch ended
        self._rested = False  # note_rest(): the background scanner paused
        self.last_full_scan_seconds = 0.0

    # -- rmap items: buffers come and go ------------------------------------

    @_mutating
    def add_range(self, start: int, npages: int) -> None:
        """MADV_MERGEABLE: the pages become rmap items, with clean state
        (once: a range already tracked is left as it is)."""
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] == start:
            return
        sl = slice(start, start + npages)
        self.oldchecksum[sl] = 0
        self.tag[sl] = 0
        self.age[sl] = 0
        self.skips[sl] = 0
        self.starts.insert(i, start)
        self.extents.insert(i, [start, npages])
        self.rmap_items += npages
        self.idle_scans = 0  # new pages to look at: full speed

    @_mutating
    def remove_range(self, start: int, npages: int) -> bool:
        """Forget a buffer's rmap items; False if it was not mergeable."""
        i = bisect.bisect_left(self.starts, start)
        if i >= len(self.starts) or self.starts[i] != start:
            return False
        del self.starts[i]
        del self.extents[i]
        sl = slice(start, start + npages)
        self.pages_unshared -= int(np.count_nonzero(self.tag[sl]))
        self.tag[sl] = 0
        self.rmap_items -= npages
        # the slots no tracked buffer shares a page with go back
        gap_lo = self.extents[i - 1][0] + self.extents[i - 1][1] if i else 0
        gap_hi = self.extents[i][0] if i < len(self.extents) else self.va_pages
        for table in (self.oldchecksum, self.tag, self.age, self.skips):
            _table_trim(table, start, start + npages, gap_lo, gap_hi)
        return True

    # -- the scan -------------------------------------------------------------

    def _next_ranges(self, want: int) -> Tuple[List[Tuple[int, int]], bool]:
        """The next @want pages in address order; True if a full scan ended."""
        ranges: List[Tuple[int, int]] = []
        total = 0
        i = bisect.bisect_right(self.starts, self.cursor) - 1
        if i < 0 or self.cursor >= self.extents[i][0] + self.extents[i][1]:
            i += 1
        while total < want:
            if i >= len(self.extents):
                self.cursor = 0
                return ranges, True
            s, n = self.extents[i]
            off = max(self.cursor - s, 0)
            take = min(n - off, want - total)
            ranges.append((s + off, take))
            total += take
            self.cursor = s + off + take
            if off + take == n:
                i += 1
        return ranges, False

    @_mutating
    def scan_batch(self, want: int) -> int:
        """ksm_do_scan(): visit up to @want pages; returns pages visited."""
        t0, c0 = time.monotonic(), time.thread_time()
        if not self._adv_pages and not self._rested:
            # a full scan starts with its first batch, unless the background
            # scanner just rested after the last one: a scanner started long
            # after the pool was made, or stopped for a while, or driven by
            # pool.scan() now and then, was not scanning all that time
            self._scan_start = t0
        if self._rested:
            # the background scanner's rest since the last batch: all the
            # time between the two, lock and GIL waits included (the idle
            # backoff never stretches it: sleep_factor() is 1 under the
            # advisor, the only reader)
            self._adv_rest += max(t0 - self._batch_end, 0.0)
            self._adv_rests += 1
            self._rested = False
        self.maybe_recount_maps()
        ranges, wrapped = self._next_ranges(want)
        n = sum(r[1] for r in ranges)
        if n:
            vpns = np.concatenate([np.arange(s, s + k, dtype=np.int64) for s, k in ranges])
            skip = self._smart_skip(vpns) if self.knobs["smart_scan"] else None
            sums = np.empty(n, np.uint64)
            states = np.empty(n, np.uint8)
            o = 0
            for s, k in ranges:
                self.native.checksum_range(
                    s,
                    None if skip is None else skip[o : o + k],
                    sums[o : o + k],
                    states[o : o + k],
                    self.algo,
                )
                o += k
            self._cmp_and_merge(vpns, sums, states, skip)
        self._batch_end = time.monotonic()
        self._adv_busy += self._batch_end - t0
        self._adv_cpu += time.thread_time() - c0
        self._adv_pages += n
        if wrapped:
            self._end_full_scan()
        return n

    def note_rest(self) -> None:
        """The background scanner paused since its last batch: the next
        batch counts the pause as the advisor's rest, and continues the
        full scan rather than starting its clock afresh."""
        self._rested = True

    def sleep_factor(self) -> int:
        """How many sleep_millisecs the background scanner sleeps after a
        batch: 1, four times more with each idle full scan in a row.

        Not under the scan-time advisor: its target is a promise of how
        stale a page may get before the scanner looks at it again, and it
        holds whether or not the pool is at rest.  A pool at rest costs the
        advisor little anyway: smart scan skips the pages that keep failing
        to merge, so its full scans do less work, and the advisor lowers
        pages_to_scan to match."""
        if self.knobs["advisor_mode"] == "scan-time":
            return 1
        factor: int = 4 ** min(self.idle_scans, 3)
        return min(factor, IDLE_FACTOR_MAX)

    def _smart_skip(self, vpns: _I64) -> _U8:
        """should_skip_rmap_item() for a batch: 1 where the page is skipped."""
        age = self.age[vpns]
        self.age[vpns] = np.minimum(age.astype(np.uint16) + 1, 255).astype(np.uint8)
        eligible = age >= 3
        rem = self.skips[vpns]
        skip = eligible & (rem > 0)
        refill = eligible & (rem == 0)
        self.skips[vpns[refill]] = _skip_age(age[refill])
        self.skips[vpns[skip]] = rem[skip] - 1
        return skip.astype(np.uint8)

    # -- the VMA budget (see "VMA budget" above) -------------------------------

    def map_count_max(self) -> int:
        """The limit merging works under: vm.max_map_count as last read, or
        a lower one a test set."""
        if self.map_count_limit is not None:
            return min(self.map_count_limit, self.max_map_count)
        return self.max_map_count

    def map_count_reserve(self) -> int:
        return map_count_reserve(self.knobs.get("map_count_reserve"), self.map_count_max())

    def map_count(self) -> int:
        """The process's mappings: the last count and our changes since."""
        return _MAPS.estimate()

    def _map_budget_limit(self) -> int:
        return self.map_count_max() - self.map_count_reserve()

    def _vma_budget(self) -> int:
        """Take the mappings merging may add now (give back what is left
        with _vma_settle).  Counted again at the first merge of a full scan,
        and when short, at most once a RECOUNT_INTERVAL: the count costs a
        line of text per mapping, which at the limit is megabytes."""
        limit = self._map_budget_limit()
        if self._maps is None or (limit - _MAPS.estimate() < 4 * _core.RUN_MAX and _MAPS.stale()):
            self.recount_maps()
        return _MAPS.take(limit)

    def _vma_settle(self, taken: int, left: int) -> None:
        _MAPS.settle(taken, left)

    def recount_maps(self) -> None:
        """Count the process's VMAs and tell the fault handler, which
        switches to whole-run COW breaks within half the reserve of the
        limit.  The limit is read again too (as at every full scan): an
        administrator may raise or lower vm.max_map_count while we run, and
        this is when a stale limit would matter - a sysctl read, cheap
        beside the maps count itself."""
        self.max_map_count = _read_max_map_count()
        self._maps = _MAPS.recount()
        limit = self.map_count_max()
        self.native.set_vma_state(self._maps, limit - self.map_count_reserve() // 2)

    def maybe_recount_maps(self) -> None:
        """Count again if the fault handler's estimate (which adds the cuts
        it guesses to our merges) nears its limit, at most once a
        RECOUNT_INTERVAL."""
        soft = self.map_count_max() - self.map_count_reserve() // 2
        if self.native.vma_estimate() > soft - 2 * _core.RUN_MAX and _MAPS.stale():
            self.recount_maps()

    def _note_novma(self, src: _I64, res: _U8) -> None:
        """Pages a merge left private for want of mappings, for
        pages_unmerged_map_limit; those merged since are not."""
        self.merges_skipped_vma += int(np.count_nonzero(res == _core.MERGE_NOVMA))
        ok = src[res == _core.MERGE_OK]
        if len(ok):
            was = ok[self._novma[ok]]
            self._novma[was] = False
            self._novma_now -= len(was)
        nv = src[res == _core.MERGE_NOVMA]
        if len(nv):
            nv = np.unique(nv[~self._novma[nv]])
            self._novma[nv] = True
            self._novma_now += len(nv)
            self._novma_list.append(nv)

    def _map_limit_full_scan(self) -> None:
        """A full scan ended: its count of unmerged pages becomes the figure."""
        self.pages_unmerged_map_limit = self._novma_now
        for nv in self._novma_list:
            self._novma[nv] = False
        self._novma_list = []
        self._novma_now = 0

    def unmerged_map_limit(self) -> int:
        """pages_unmerged_map_limit: the last full scan's, or this one's if
        it already found more."""
        return max(self.pages_unmerged_map_limit, self._novma_now)

    def _merge_order(self, src: _I64, dst_vpn: _I64, dst_pfn: _U32) -> Tuple[_IntP, _IntP, _I64]:
        """Units of merging and their order by benefit, for a budget too short
        for all of them.  A unit is a run of sources onto consecutive frames
        (or consecutive tree pages): one remap.  It saves a page per source,
        and costs at most two mappings for its sources' cuts and, merging
        with the unstable tree, two for the tree pages' (paid once by all
        the units of a tree page: k equal pages save k - 1 for 2k
        mappings).  Returns (unit of each entry, units best first, each
        unit's worst-case cost)."""
        n = len(src)
        stable = dst_vpn < 0
        target = np.where(stable, dst_pfn.astype(np.int64), dst_vpn)
        brk = np.ones(n, bool)
        brk[1:] = (np.diff(src) != 1) | (np.diff(target) != 1) | (stable[1:] != stable[:-1])
        unit = np.cumsum(brk) - 1
        first = np.flatnonzero(brk)
        nu = len(first)
        gain = np.bincount(unit, minlength=nu).astype(np.float64)
        ucost = np.where(stable[first], 2, 4).astype(np.int64)
        # a tree page's units share its cost: one group per tree page
        key = np.where(stable[first], -1 - np.arange(nu, dtype=np.int64), dst_vpn[first])
        keys, grp = np.unique(key, return_inverse=True)
        ggain = np.bincount(grp, weights=gain)
        gcost = 2.0 * np.bincount(grp) + np.where(keys >= 0, 2.0, 0.0)
        ratio = (ggain / gcost)[grp]
        order = np.lexsort((np.arange(nu), -gain, -ratio))
        return unit, order, ucost

    def _merge(
        self, src: _I64, dst_vpn: _I64, dst_pfn: _U32, dst_key: _U32
    ) -> Tuple[_U8, _U32, _U32]:
        """uksm_merge() within the VMA budget.  When the budget cannot cover
        every unit at its worst, the units go in order of pages saved per
        mapping (_merge_order), as many at a time as the budget left covers
        at their worst; the C core gives back what each run did not keep,
        and the next units draw on that."""
        budget = self._vma_budget()
        taken = budget
        n = len(src)
        res = np.full(n, _core.MERGE_NOVMA, np.uint8)
        opfn = np.zeros(n, np.uint32)
        okey = np.zeros(n, np.uint32)
        try:
            unit, order, ucost = self._merge_order(src, dst_vpn, dst_pfn)
            if int(ucost.sum()) <= budget:
                batches = [np.arange(n)]
            else:
                batches = []
            sharing = self.knobs["max_page_sharing"]
            for sel in batches:
                r, p, k, budget = self.native.merge(
                    src[sel], dst_vpn[sel], dst_pfn[sel], dst_key[sel], sharing, budget
                )
                res[sel], opfn[sel], okey[sel] = r, p, k
            if not batches:
                start = np.searchsorted(unit, np.arange(len(ucost)))
                stop = np.append(start[1:], n)
                todo = order
                while len(todo) and budget >= int(ucost[todo].min()):
                    fits = np.cumsum(ucost[todo]) <= budget
                    take, todo = todo[fits], todo[~fits]
                    if not len(take):
                        break
                    sel = np.sort(
                        np.concatenate([np.arange(start[u], stop[u]) for u in take.tolist()])
                    )
                    r, p, k, budget = self.native.merge(
                        src[sel], dst_vpn[sel], dst_pfn[sel], dst_key[sel], sharing, budget
                    )
                    res[sel], opfn[sel], okey[sel] = r, p, k
        finally:
            self._vma_settle(taken, budget)
        self._note_novma(src, res)
        return res, opfn, okey

    def _merge_zero(self, vpns: _I64) -> _U8:
        """uksm_merge_zero() within the VMA budget."""
        budget = self._vma_budget()
        left = budget
        try:
            res, left = self.native.merge_zero(vpns, budget)
        finally:
            self._vma_settle(budget, left)
        self._note_novma(vpns, res)
        return res

    def _cmp_and_merge(self, vpns: _I64, sums: _U64, states: _U8, skip: Optional[_U8]) -> None:
        self.pages_scanned += len(vpns)
        # remove_rmap_item_from_tree(): a visited page leaves the old tree
        self.pages_unshared -= int(np.count_nonzero(self.tag[vpns]))
        self.tag[vpns] = 0
        merged = (states == _core.PTE_KSM) | (states == _core.PTE_ZERO)
        if merged.any():
            self.age[vpns[merged]] = 0
            self.skips[vpns[merged]] = 0
        normal = states == _core.PTE_PRIVATE
        if skip is not None:
            skipped = normal & (skip != 0)
            self.pages_skipped += int(np.count_nonzero(skipped))
            normal &= ~skipped
        v = vpns[normal]
        s = sums[normal]
        if not len(v):
            return
        done = np.zeros(len(v), bool)

        # 2: stable tree search
        node = self._stable_tree_search(s)
        hit = np.flatnonzero(node >= 0)
        if len(hit):
            nodes = node[hit]
            res, _, _ = self._merge(
                v[hit],
                np.full(len(hit), -1, np.int64),
                self.stable.pfn[nodes],
                self.stable.key[nodes],
            )
            done[hit[res == _core.MERGE_OK]] = True
            stale = res == _core.MERGE_STALE
            if stale.any():
                self.stable.prune(nodes[stale])

        # 3: the checksum gate
        rest = ~done
        changed = s != self.oldchecksum[v]
        news = int(np.count_nonzero(changed)) + int(np.count_nonzero(done))
        if news:
            self._news += news
            self.idle_scans = 0
        self.oldchecksum[v] = s
        gated = rest & ~changed

        # 4: use_zero_pages
        if self.knobs["use_zero_pages"]:
            z = np.flatnonzero(gated & (s == self.zero_sum))
            if len(z):
                res = self._merge_zero(v[z])
                ok = z[res == _core.MERGE_OK]
                done[ok] = True
                gated[ok] = False

        # 5: unstable tree search/insert
        u = np.flatnonzero(gated)
        if len(u):
            self._unstable_tree_search_insert(v[u], s[u])
        if done.any():
            self.age[v[done]] = 0
            self.skips[v[done]] = 0

    def _stable_tree_search(self, q: _U64) -> _I64:
        """A live stable node with room for each checksum, or -1.

        Walks the dups of each checksum in order, looking at every candidate's
        frame through the keyhole; stale nodes are pruned as they are met.
        """
        st = self.stable
        res = np.full(len(q), -1, np.int64)
        if not st.nr_alive:
            return res
        L = len(st.idx_sum)
        pos = np.searchsorted(st.idx_sum, q, side="left")
        pending = np.ones(len(q), bool)
        max_sharing = self.knobs["max_page_sharing"]
        k = 0
        while True:
            p = pos + k
            inr = pending & (p < L)
            idx = np.flatnonzero(inr)
            if not len(idx):
                break
            same = st.idx_sum[p[idx]] == q[idx]
            idx = idx[same]
            pending[np.flatnonzero(inr)[~same]] = False
            if not len(idx):
                break
            nodes = st.idx_node[p[idx]]
            alive = st.alive[nodes]
            mc, key, flags = self.native.frames_info(st.pfn[nodes])
            fits = alive & (key == st.key[nodes]) & ((flags & _core.FRAME_KSM) != 0) & (mc > 0)
            stale = alive & ~fits
            if stale.any():
                st.prune(nodes[stale])
            room = fits & (mc < max_sharing)
            # several pages of a batch may want the same dup: it takes only
            # as many as it has room for, the rest walk on down the chain
            cand = np.flatnonzero(room)
            if len(cand):
                order = cand[np.argsort(nodes[cand], kind="stable")]
                n_sorted = nodes[order]
                first = np.ones(len(order), bool)
                first[1:] = n_sorted[1:] != n_sorted[:-1]
                start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
                rank = np.arange(len(order)) - start
                take = order[rank < (max_sharing - mc[order].astype(np.int64))]
                res[idx[take]] = nodes[take]
                pending[idx[take]] = False
            k += 1
        return res

    def _unstable_search(self, q: _U64) -> _I64:
        """The vpn of a live unstable tree page for each checksum, or -1."""
        res = np.full(len(q), -1, np.int64)
        L = len(self.u_sum)
        if not L:
            return res
        pos = np.searchsorted(self.u_sum, q, side="left")
        pending = np.ones(len(q), bool)
        k = 0
        while True:
            p = pos + k
            idx = np.flatnonzero(pending & (p < L))
            if not len(idx):
                break
            same = self.u_sum[p[idx]] == q[idx]
            pending[idx[~same]] = False
            idx = idx[same]
            if not len(idx):
                break
            cand = self.u_vpn[p[idx]].astype(np.int64)
            live = (self.tag[cand] == self.cur_tag) & (self.oldchecksum[cand] == q[idx])
            res[idx[live]] = cand[live]
            pending[idx[live]] = False
            k += 1
        return res

    def _unstable_tree_search_insert(self, v: _I64, s: _U64) -> None:
        """unstable_tree_search_insert() and try_to_merge_two_pages() for a
        batch.  Pages of one checksum form a group; the group's anchor is the
        live tree page if there is one, else its first page.  A KSM frame
        takes at most max_page_sharing mappers, so a large group is cut into
        chunks of that size, each with an anchor of its own: every chunk
        becomes one dup of the same content, as a stable node chain."""
        order = np.lexsort((v, s))
        v, s = v[order], s[order]
        n = len(v)
        first = np.ones(n, bool)
        first[1:] = s[1:] != s[:-1]
        group = np.cumsum(first) - 1
        starts = np.flatnonzero(first)
        tree_page = self._unstable_search(s[first])
        has_tree = tree_page >= 0
        # rank of each page in its group; a tree page, if any, holds rank 0
        rank = np.arange(n) - starts[group] + has_tree[group]
        chunk = rank // self.knobs["max_page_sharing"]
        head = rank % self.knobs["max_page_sharing"] == 0  # a chunk's anchor
        # the anchor page of each page's chunk: the tree page for chunk 0 of
        # a group that has one, else the batch page holding the chunk's rank 0
        head_pos = np.flatnonzero(head)
        anchor = np.empty(n, np.int64)
        anchor[head_pos] = v[head_pos]
        last_head = np.maximum.accumulate(np.where(head, np.arange(n), -1))
        in_tree_chunk = (chunk == 0) & has_tree[group]
        anchor[last_head >= 0] = v[last_head[last_head >= 0]]
        anchor[in_tree_chunk] = tree_page[group[in_tree_chunk]]
        is_src = ~head
        anchor_merged = np.zeros(n, bool)
        if is_src.any():
            src, dst, ssum = v[is_src], anchor[is_src], s[is_src]
            o = np.argsort(src, kind="stable")
            src, dst, ssum = src[o], dst[o], ssum[o]
            res, opfn, okey = self._merge(
                src, dst, np.zeros(len(src), np.uint32), np.zeros(len(src), np.uint32)
            )
            ok = res == _core.MERGE_OK
            if ok.any():
                self._news += int(np.count_nonzero(ok))
                self.idle_scans = 0
                self.age[src[ok]] = 0
                self.skips[src[ok]] = 0
                # anchors upgraded in place leave the unstable tree ...
                merged_anchors = np.unique(dst[ok])
                self.pages_unshared -= int(np.count_nonzero(self.tag[merged_anchors]))
                self.tag[merged_anchors] = 0
                self.age[merged_anchors] = 0
                self.skips[merged_anchors] = 0
                anchor_merged = np.isin(v, merged_anchors)
                # ... and their frames become stable nodes, one per frame
                pfns, first_ok = np.unique(opfn[ok], return_index=True)
                keys = okey[ok][first_ok]
                known = self.node1_of_pfn[pfns] - 1
                has = known >= 0
                has[has] = self.stable.alive[known[has]] & (
                    self.stable.key[known[has]] == keys[has]
                )
                new = ~has
                if new.any():
                    base = self.stable.n
                    self.stable.insert(ssum[ok][first_ok][new], pfns[new], keys[new])
                    self.node1_of_pfn[pfns[new]] = np.arange(
                        base + 1, self.stable.n + 1, dtype=np.int32
                    )
        # chunk anchors from this batch that merged nothing join the tree
        ins = head & ~anchor_merged
        if ins.any():
            iv, isum = v[ins], s[ins]
            self.tag[iv] = self.cur_tag
            self.pages_unshared += len(iv)
            pos = np.searchsorted(self.u_sum, isum, side="right")
            self.u_sum = np.insert(self.u_sum, pos, isum)
            self.u_vpn = np.insert(self.u_vpn, pos, iv.astype(np.uint32))

    def _end_full_scan(self) -> None:
        """The cursor wrapped: the unstable tree is thrown away, stale stable
        nodes are swept out, and the advisor retunes pages_to_scan."""
        self.full_scans += 1
        self.idle_scans = 0 if self._news else self.idle_scans + 1
        self._news = 0
        self.cur_tag = self.cur_tag % 65535 + 1
        self.u_sum = np.zeros(0, np.uint64)
        self.u_vpn = np.zeros(0, np.uint32)
        self.prune_stable()
        self.max_map_count = _read_max_map_count()  # the sysctl may have moved
        self._maps = None
        self._map_limit_full_scan()
        now = time.monotonic()
        self.last_full_scan_seconds = max(now - self._scan_start, 1e-3)
        if self.knobs["advisor_mode"] == "scan-time" and self._adv_pages:
            self._scan_time_advisor()
        self._scan_start = now
        self._adv_busy = self._adv_cpu = self._adv_rest = 0.0
        self._adv_rests = self._adv_pages = 0

    @_mutating
    def frames_moved(self, log_from: _U32, log_to: _U32) -> None:
        """Migration moved KSM frames (in this order; a frame may move twice):
        their stable nodes follow them by pfn, keeping their keys."""
        st = self.stable
        for f, t in zip(log_from.tolist(), log_to.tolist()):
            node = int(self.node1_of_pfn[f]) - 1
            self.node1_of_pfn[f] = 0
            if node >= 0 and st.alive[node] and st.pfn[node] == f:
                st.pfn[node] = t
                self.node1_of_pfn[t] = node + 1

    def recover(self, ranges: List[Tuple[int, int]]) -> None:
        """Put the scanner's own state back together after an exception tore
        through a section half way (a Python signal handler may raise between
        any two bytecodes, in a program whose threads take the signals that
        the holder of the lock blocks).  Nothing here is the truth about
        memory, which the C core keeps and checks on every merge under its
        own lock: the unstable tree is thrown away (as at every full scan),
        the rmap items are rebuilt from @ranges (the mergeable buffers, as the
        pool's records say), and the stable tree's index from its nodes, each
        then checked through its keyhole.  What is lost is at most one scan's
        progress."""
        self.cur_tag = self.cur_tag % 65535 + 1
        self.u_sum = np.zeros(0, np.uint64)
        self.u_vpn = np.zeros(0, np.uint32)
        self.tag = _table(len(self.tag), np.uint16)  # commits nothing
        self.pages_unshared = 0
        ranges = sorted(ranges)
        self.starts = [start for start, _ in ranges]
        self.extents = [[start, npages] for start, npages in ranges]
        self.rmap_items = sum(npages for _, npages in ranges)
        st = self.stable
        # an interrupted _grow() may have left the arrays of two lengths
        cap = min(len(st.sum), len(st.pfn), len(st.key), len(st.alive))
        for name in ("sum", "pfn", "key", "alive"):
            setattr(st, name, getattr(st, name)[:cap].copy())
        st.n = min(st.n, cap)
        live = np.flatnonzero(st.alive[: st.n])
        st.alive[st.n :] = False
        st.nr_alive = len(live)
        order = np.argsort(st.sum[live], kind="stable")
        st.idx_sum = st.sum[live][order]
        st.idx_node = live[order].astype(np.int32)
        self.node1_of_pfn = _table(len(self.node1_of_pfn), np.int32)
        self.node1_of_pfn[st.pfn[live]] = live.astype(np.int32) + 1
        self.prune_stable()
        self.dirty = 0

    @_mutating
    def prune_stable(self) -> None:
        """Sweep every stable node through its keyhole, prune the stale."""
        st = self.stable
        nodes = np.flatnonzero(st.alive[: st.n])
        if len(nodes):
            mc, key, flags = self.native.frames_info(st.pfn[nodes])
            stale = (key != st.key[nodes]) | ((flags & _core.FRAME_KSM) == 0) | (mc == 0)
            if stale.any():
                st.prune(nodes[stale])
        if st.n - st.nr_alive > max(1024, st.n // 2):
            st.compact()
            self.node1_of_pfn = _table(len(self.node1_of_pfn), np.int32)
            self.node1_of_pfn[st.pfn[: st.n]] = np.arange(1, st.n + 1, dtype=np.int32)

    def _scan_time_advisor(self) -> None:
        """scan_time_advisor() of Linux 6.8: pages_to_scan for the next full
        scan to take advisor_target_scan_time seconds.

        A full scan of N pages in batches of p, resting r seconds after
        each, takes N*r/p + W, W being the work itself (hashing, merging),
        which p hardly changes.  So the pages that make the target T are
        N*r / (T - W), from what the last full scan measured: its work, and
        its rest per batch as slept (a loaded machine oversleeps), with the
        idle backoff never in it (sleep_factor).  Where the kernel scales
        pages_to_scan by the scan time's ratio to the target and to the last
        scan time, this solves for it: a scan of few pages whose time is
        mostly rest, and one whose work nearly fills the target, land on it
        in a step or two, where the kernel's ratios (its EWMA of scan time
        over last scan time among them) overshoot and swing.  The change
        is bounded (ADVISOR_MAX_STEP per full scan: the measurement is one
        scan's), and, as in the kernel, so is the background scanner's share
        of a CPU (advisor_max_cpu, ADVISOR_MIN_CPU), then the page bounds
        (advisor_min/max_pages_to_scan)."""
        k = self.knobs
        target = k["advisor_target_scan_time"]
        pages = k["pages_to_scan"]
        n = max(self.rmap_items, 1)
        # the work scales with the pages there are now
        scale = n / self._adv_pages
        work = self._adv_busy * scale
        cpu = self._adv_cpu * scale
        background = self._adv_rests > 0
        if background:
            rest = self._adv_rest / self._adv_rests
        else:  # pool.scan() only: the background's nominal rest
            rest = k["sleep_millisecs"] / 1000.0
        rest = max(rest, 1e-4)

        def pages_for(seconds: float) -> float:
            """pages_to_scan for a full scan of N*rest/pages + work seconds
            to take @seconds."""
            return n * rest / (seconds - work) if seconds > work else math.inf

        new = pages_for(target)
        if background:
            # the bounds on ksmd's share of a CPU: full scans that take it
            # @cpu seconds are no shorter than cpu / max share (none if the
            # work itself is below that share) and no longer than cpu / min
            # share (pool.scan()'s back-to-back scans tell nothing of it)
            new = min(new, pages_for(cpu * 100.0 / k["advisor_max_cpu"]))
            slowest = cpu * 100.0 / ADVISOR_MIN_CPU
            if slowest > work:
                new = max(new, pages_for(slowest))
        new = min(max(new, pages / ADVISOR_MAX_STEP), pages * ADVISOR_MAX_STEP)
        new = min(new, k["advisor_max_pages_to_scan"])
        new = max(new, k["advisor_min_pages_to_scan"])
        k["pages_to_scan"] = int(round(new))

    # -- accounting -----------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Bytes of scanner state in use (the arrays' used parts)."""
        per_page = (
            self.oldchecksum.itemsize + self.tag.itemsize + self.age.itemsize + self.skips.itemsize
        )
        return (
            self.rmap_items * per_page
            + self.u_sum.nbytes
            + self.u_vpn.nbytes
            + self.stable.nbytes()
        )
