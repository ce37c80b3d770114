"""uksm.Pool: numpy arrays whose identical pages share memory.

A pool hands out ordinary, writeable, C-contiguous numpy arrays.  Their
pages are private anonymous memory, like numpy's own, until the scanner
(the userspace ksmd, uksm.scanner) finds pages of equal content: those
become private views of one frame in the pool's frame store, and a write
into one is copied by the kernel itself, as KSM pages are.  Nothing else
about the arrays changes: kernel I/O into them works, fork shares them
copy-on-write, and untouched memory costs nothing (csrc/uksm.h tells how).

Fork.  A forked child shares everything copy-on-write at the kernel's
cost; the frames and swap slots it may still map are kept for it until it
exits or execs (fork epochs, csrc/pool.c).  The child's pool has no
scanner thread running.
"""

from __future__ import annotations

import contextlib
import errno
import math
import operator
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, cast

import numpy as np
import numpy.typing as npt

from . import _core, _handler

# imported for what they do at import: the fork hooks registered, the
# fault handler kept first in line (faulthandler and signal.signal wrapped)
from . import forking as forking
from . import signals as signals
from .errors import (
    BufferInUseError,
    ForeignArrayError,
    PoolClosedError,
    PoolFullError,
    UksmError,
    UksmSwapWarning,
)
from .knobs import (
    Knobs,
    _bool_knob,
    _compact_threshold_knob,
    _cpu_knob,
    _int_knob,
    _map_count_reserve_knob,
    _max_sharing_knob,
    _scan_time_knob,
    _uint_knob,
)
from .knobs import parse_size as parse_size  # uksm.pool.parse_size, as before
from .policy import _Buffer, _Core
from .policy import live_pools as _live_pools
from .scanner import Scanner, _count_maps
from .swap import Group, open_swap_file

PAGE_SIZE = _core.PAGE_SIZE


# ksmd runs at nice 5 (set_user_nice() in ksm_scan_thread()): merging is
# background work, and a busy CPU should go to the program first.  This
# thread's nice goes KSMD_NICE steps below its program's own, which needs no
# privilege.  Not SCHED_IDLE: the scanner holds the pool's lock for a batch,
# and on a busy machine an idle-class holder could wait for a CPU forever
# while the program waits for the lock (or for the GIL) behind it.
KSMD_NICE = 5


def _ksmd_nice() -> None:
    try:
        tid = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(nice + KSMD_NICE, 19))
    except (AttributeError, OSError):
        pass  # not Linux's per-thread nice: the scanner runs as it is


def _ksmd(ref: "weakref.ref[Pool]", stop: threading.Event) -> None:
    """The background scanner (ksmd): batches while the pool lives and runs.
    It keeps the asynchronous signals blocked (csrc/lock.c): they go to the
    program's own threads, whose handlers then never run inside a section
    because of this thread."""
    _core.lib.uksm_block_async_signals()
    _ksmd_nice()
    rested = False  # the first batch follows no pause
    while not stop.is_set():
        pool = ref()
        if pool is None:
            return
        try:
            pause = pool._ksmd_batch(rested)
        except PoolClosedError:
            return
        finally:
            del pool  # the last reference may go here: the pool closes
        if pause is None:
            return
        if pause:
            stop.wait(pause)
        else:
            time.sleep(0)  # let the other threads have the GIL
        rested = True


class Pool:
    """A pool of page-deduplicated numpy buffers.

    capacity: the most the pool's live buffers may span, in bytes or as a
    size string (a heap's size: address space, not memory; untouched pages
    cost nothing); allocation beyond it raises PoolFullError, and one the
    kernel will not commit raises MemoryError.

    Sizes (capacity, virtual_size, max_resident, swap_batch) are ints or
    strings such as "512MiB", "1.5G" or "2 TB", case-insensitive; every
    unit is 1024-based, as systemd and docker read them, so "1GB", "1G"
    and "1GiB" are all 2**30 bytes (see parse_size).  Every knob and size
    is checked when it is given: a wrong type is a TypeError, a value out
    of range (negative, NaN, infinite) a ValueError naming it.

    The knobs keep the names and meanings of /sys/kernel/mm/ksm:

    pages_to_scan     how many pages to scan before the scanner sleeps
                      (default 1000: ten times ksmd's, a page costing a
                      quarter of what it costs ksmd)
    sleep_millisecs   how many milliseconds the scanner sleeps between batches
                      (4x, 16x, then 32x longer after full scans that found
                      nothing new, until something changes: idle backoff)
    max_page_sharing  maximum sharing allowed for each KSM page
    use_zero_pages    merge empty pages with the kernel zero page (no frame)
    smart_scan        skip pages that repeatedly fail to merge
    checksum          "xxhash" (XXH3, the default) or "jhash2" (the seed's
                      calc_checksum)
    advisor_mode      "none" or "scan-time": retune pages_to_scan so a full
                      scan takes advisor_target_scan_time seconds

    cow               "kernel" (default): merged pages are writable private
                      views and the kernel copies them on write, for user
                      and kernel accesses alike; "signal": they are
                      read-only and uksm's SIGSEGV handler forces the copy,
                      so COW counters are exact at once (kernel writes into
                      a merged page then fail with EFAULT)
    virtual_size      address space reserved for buffers (default 2 x
                      capacity: room for fragmentation)
    cow_reserve       accepted for compatibility and unused: a COW needs no
                      frame from the pool any more
    compact_threshold the background scanner compacts (pool.compact())
                      after a full scan when the memfd is this many times
                      larger than the live frames (and 16 MiB or more
                      larger); 0 turns it off
    max_resident      the resident budget (None: no swap): what the pool
                      holds beyond it goes to a swap file of its own, at
                      most capacity; asarray() and full() return within
                      one swap_batch of it
    swap_path         the directory the swap file is made in (default the
                      temp directory), or a new name in an existing
                      directory (that directory; the file never has a
                      name); needs max_resident
    swap_batch        how much one swap write takes at most
    map_count_reserve mappings (vm.max_map_count) merging leaves to the
                      program's own; None: a 32nd of the limit, at least
                      1024.  Merged pages cost mappings; past the limit
                      less this, merges are skipped and counted
                      (pages_unmerged_map_limit)
    """

    # A typo such as pool.pages_to_scn = 5 must fail, not make an attribute
    # the pool never reads.  '__weakref__': pools are kept in a WeakSet.
    __slots__ = (
        "_closed",
        "capacity",
        "page_size",
        "_cow",
        "_native",
        "_max_resident",
        "_groups",
        "_swap_errors_seen",
        "_knobs",
        "_scanner",
        "_c",
        "_buffers",
        "_stop_event",
        "_thread",
        "_compactions",
        "_compact_gave_nothing_at",
        "_frames_migrated",
        "_pid",
        "_settle_bytes",
        "_unsettled",
        "_saved_peak",
        "__weakref__",
    )

    def __init__(
        self,
        capacity: Any = "1GiB",
        *,
        pages_to_scan: int = 1000,
        sleep_millisecs: int = 20,
        max_page_sharing: int = 256,
        use_zero_pages: bool = True,
        smart_scan: bool = True,
        checksum: str = "xxhash",
        advisor_mode: str = "none",
        advisor_target_scan_time: float = 200.0,
        advisor_min_pages_to_scan: int = 500,
        advisor_max_pages_to_scan: int = 30000,
        advisor_max_cpu: int = 70,
        cow: str = "kernel",
        virtual_size: Any = None,
        cow_reserve: Any = None,
        compact_threshold: float = 2.0,
        max_resident: Any = None,
        swap_path: Optional[str] = None,
        swap_batch: Any = "2MiB",
        map_count_reserve: Optional[int] = None,
    ) -> None:
        self._closed = True  # until fully built, for __del__/close
        cap = parse_size(capacity, "capacity")
        if cap % PAGE_SIZE:
            raise ValueError(
                f"capacity must be a multiple of the page size ({PAGE_SIZE}), got {cap}"
            )
        if not isinstance(checksum, str):
            raise TypeError(f"checksum must be a str, not {type(checksum).__name__}")
        if checksum not in _core.CHECKSUMS:
            raise ValueError(
                f"unknown checksum {checksum!r}: choose one of {sorted(_core.CHECKSUMS)}"
            )
        if advisor_mode not in ("none", "scan-time"):
            raise ValueError(f"unknown advisor_mode {advisor_mode!r}: 'none' or 'scan-time'")
        knobs: Knobs = {
            "pages_to_scan": _uint_knob("pages_to_scan", pages_to_scan, 1),
            "sleep_millisecs": _uint_knob("sleep_millisecs", sleep_millisecs, 0),
            "max_page_sharing": _max_sharing_knob("max_page_sharing", max_page_sharing),
            "use_zero_pages": _bool_knob("use_zero_pages", use_zero_pages),
            "smart_scan": _bool_knob("smart_scan", smart_scan),
            "checksum": checksum,
            "advisor_mode": advisor_mode,
            "advisor_target_scan_time": _scan_time_knob(
                "advisor_target_scan_time", advisor_target_scan_time
            ),
            "advisor_min_pages_to_scan": _uint_knob(
                "advisor_min_pages_to_scan", advisor_min_pages_to_scan, 1
            ),
            "advisor_max_pages_to_scan": _uint_knob(
                "advisor_max_pages_to_scan", advisor_max_pages_to_scan, 1
            ),
            "advisor_max_cpu": _cpu_knob("advisor_max_cpu", advisor_max_cpu),
            "compact_threshold": _compact_threshold_knob("compact_threshold", compact_threshold),
            "map_count_reserve": _map_count_reserve_knob("map_count_reserve", map_count_reserve),
        }
        if not isinstance(cow, str) or cow not in _core.COW_MODES:
            raise ValueError(f"unknown cow mode {cow!r}: 'kernel' or 'signal'")
        frames = cap // PAGE_SIZE
        va = parse_size(virtual_size, "virtual_size") if virtual_size is not None else 2 * cap
        va_pages = -(-va // PAGE_SIZE)
        if va_pages < frames:
            raise ValueError(
                f"virtual_size must be at least capacity ({cap} bytes), got {virtual_size!r}"
            )
        if cow_reserve is not None:
            parse_size(cow_reserve, "cow_reserve")

        # checked whether or not there is swap: a bad value is a mistake
        # even where it would have no effect
        batch = max(1, parse_size(swap_batch, "swap_batch") // PAGE_SIZE)
        resident = None
        if max_resident is not None:
            resident = self._resident_frames(max_resident, cap)
        elif swap_path is not None:
            # the pool would swap nothing and the path would be ignored
            raise ValueError(
                f"swap_path={swap_path!r} needs max_resident=: without a "
                f"resident budget the pool has no swap file"
            )
        self.capacity = cap
        self.page_size = PAGE_SIZE
        self._cow = cow
        # the frame store never holds more frames than there are pages
        self._native = _core.NativePool(frames, frames, va_pages, cow)
        if resident is not None:
            try:
                swap_fd, dir_fd = open_swap_file(swap_path)
            except BaseException:
                self._native.destroy()
                raise
            self._native.swap_enable(swap_fd, dir_fd, resident, batch)
        self._max_resident = resident
        # one reclaim pass per swap batch written (see _settle); the core
        # writes at most EVICT_MAX (csrc/swap.c) pages at a time
        self._settle_bytes = min(batch, 4096) * PAGE_SIZE
        self._unsettled = 0
        self._groups: Dict[str, Group] = {}
        self._swap_errors_seen = 0
        self._knobs = knobs
        saved = _handler._set(_handler.DEFAULT) if _handler.active else None
        try:
            # its arrays: see _Core._held; it reads the knobs as they change
            self._scanner = Scanner(self._native, knobs)
        finally:
            if saved is not None:
                _handler._set(saved)
        self._c = _Core(self._native, self._scanner)
        self._buffers = self._c.buffers
        self._stop_event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._compactions = 0
        self._saved_peak = 0
        self._compact_gave_nothing_at = -1
        self._frames_migrated = 0
        self._closed = False
        self._pid = os.getpid()
        _live_pools.add(self)
        _core.install_handler()

    # -- knobs, as attributes (the sysfs files) ---------------------------------

    def _knob_property(name: str, check: Callable[[str, Any], Any]) -> Any:  # type: ignore[misc]
        # (a TypedDict is indexed by literal keys only: these go by name)
        def get(self: Pool) -> Any:
            return cast(Dict[str, Any], self._knobs)[name]

        def set_(self: Pool, value: Any) -> None:
            cast(Dict[str, Any], self._knobs)[name] = check(name, value)

        return property(get, set_, doc=f"The {name} knob (as in /sys/kernel/mm/ksm).")

    pages_to_scan = _knob_property("pages_to_scan", lambda n, v: _uint_knob(n, v, 1))
    sleep_millisecs = _knob_property("sleep_millisecs", lambda n, v: _uint_knob(n, v, 0))
    max_page_sharing = _knob_property("max_page_sharing", _max_sharing_knob)
    use_zero_pages = _knob_property("use_zero_pages", _bool_knob)
    smart_scan = _knob_property("smart_scan", _bool_knob)
    advisor_max_cpu = _knob_property("advisor_max_cpu", _cpu_knob)
    map_count_reserve = _knob_property("map_count_reserve", _map_count_reserve_knob)
    del _knob_property

    @staticmethod
    def _resident_frames(value: Any, capacity: int) -> int:
        """max_resident in frames, within (0, capacity]."""
        nbytes = parse_size(value, "max_resident")
        if nbytes > capacity:
            # more than the pool can ever hold would never swap anything
            raise ValueError(
                f"max_resident must be between 1 byte and capacity "
                f"({capacity} bytes), got {value!r} ({nbytes} bytes)"
            )
        return -(-nbytes // PAGE_SIZE)

    @property
    def max_resident(self) -> Optional[int]:
        """The resident budget in bytes (None: no swap).  Lowering it swaps
        out at once."""
        return None if self._max_resident is None else self._max_resident * PAGE_SIZE

    @max_resident.setter
    def max_resident(self, value: Any) -> None:
        if self._max_resident is None:
            raise UksmError("this pool has no swap area: create it with max_resident=")
        frames = self._resident_frames(value, self.capacity)
        self._native.set_max_resident(frames)
        self._max_resident = frames
        self._reclaim()

    def _reclaim(self, group: int = -1) -> None:
        """Swap out down to the budget (the pool's, or @group's)."""
        if self._max_resident is None:
            return
        # reference hints cost VMAs and the C side only estimates them: a
        # real count now and then keeps the estimate (and eviction) honest
        sc = self._scanner
        sc.maybe_recount_maps()
        if group < 0:
            self._unsettled = 0
        try:
            self._native.reclaim(0, group)
            if group < 0:
                # kswapd's pass: every group back under its own limit too
                for g in self._groups.values():
                    if g.max_resident is not None:
                        self._native.reclaim(0, g.gid)
        except OSError as exc:
            warnings.warn(UksmSwapWarning(str(exc)), stacklevel=3)
        self._note_swap_errors()

    def _note_swap_errors(self) -> None:
        n = self._native.stats()["swap_errors"]
        if n > self._swap_errors_seen:
            self._swap_errors_seen = n
            warnings.warn(
                UksmSwapWarning(
                    f"uksm: swap writes failed ({n} so far; errno "
                    f"{self._native.stats()['last_swap_errno']}): eviction stopped, "
                    f"pages stay resident, nothing lost"
                ),
                stacklevel=3,
            )

    def group(self, name: str, max_resident: Any = None) -> Group:
        """A group of buffers with its own resident limit (memcg): it has
        the allocation methods of the pool, and per-group stats()."""
        self._check_open()
        if not isinstance(name, str):
            raise TypeError("a group's name must be a str")
        if name in self._groups:
            raise ValueError(f"group {name!r} exists already")
        if max_resident is not None and self._max_resident is None:
            raise UksmError("a group limit needs swap: create the pool with max_resident=")
        gid = len(self._groups) + 1
        if gid >= _core.MAX_GROUPS:
            raise UksmError(f"at most {_core.MAX_GROUPS - 1} groups per pool")
        g = Group(self, name, gid, max_resident)
        self._groups[name] = g
        return g

    def lock(self, arr: npt.NDArray[Any]) -> None:
        """mlock: keep @arr's pages in memory (swapped in now, never swapped
        out).  Merging still happens; a shared frame stays resident while
        any of its mappers is locked."""
        self._check_open()
        rec = self._record(arr)
        self._native.set_locked(rec.vpn, rec.npages, True)

    def unlock(self, arr: npt.NDArray[Any]) -> None:
        """munlock: @arr's pages may be swapped out again."""
        self._check_open()
        rec = self._record(arr)
        self._native.set_locked(rec.vpn, rec.npages, False)

    @property
    def checksum(self) -> str:
        return self._knobs["checksum"]

    @property
    def cow(self) -> str:
        """The copy-on-write mode: "kernel" or "signal"."""
        return self._cow

    @property
    def advisor_mode(self) -> str:
        return self._knobs["advisor_mode"]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        """The backing memfd (for fstat: the kernel's view of our memory)."""
        self._check_open()
        return self._native.fd

    # -- lifetime ---------------------------------------------------------------

    def __enter__(self) -> "Pool":
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the scanner and take no more work.  Arrays still alive keep
        working (reads, writes, COW); the memory goes back to the system when
        the last of them is collected."""
        if self._closed:
            return
        core = self._c
        if core.owned():
            # called by a finalizer or handler inside one of this thread's
            # own sections (a fork hook, a pool call that allocated): the
            # pool takes no new work from now, and closes once it is left
            self._closed = True
            core.on_exit = self._close
            return
        self._close()

    def _close(self) -> None:
        self.stop()
        core = self._c
        with core.served() as nested:
            self._closed = True
            core.closed = True
            if nested:
                core.on_exit = self._close  # finished when the section is left
            else:
                if self._native.events_enabled and not self._native.closed:
                    self._native.events_close()  # the handler's requests go elsewhere
                core.reap()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError("uksm pool is closed")
        if not _core.handler_installed():
            _core.install_handler()

    # -- allocation ---------------------------------------------------------------

    def _new_array(self, shape: Any, dtype: npt.DTypeLike, group: int = 0) -> npt.NDArray[Any]:
        self._check_open()
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise TypeError("uksm pools hold plain data: object dtypes are not allowed")
        if isinstance(shape, (str, bytes)):
            raise TypeError(f"shape must be an int or a tuple of ints, not {shape!r}")
        try:
            shape = (operator.index(shape),)
        except TypeError:
            try:
                shape = tuple(operator.index(d) for d in shape)
            except TypeError:
                raise TypeError(f"shape must be an int or a tuple of ints, not {shape!r}") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimensions are not allowed: {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > sys.maxsize:
            raise MemoryError(
                f"uksm: an array of shape {shape} and dtype {dtype} would "
                f"take {nbytes} bytes, more than any address space holds"
            )
        npages = max(1, -(-nbytes // PAGE_SIZE))
        core = self._c
        # Served nested too (a finalizer or handler allocating inside this
        # thread's own section): the C core has its own lock, and the
        # scanner learns of the buffer at the next reap().
        with core.served() as nested:
            if self._closed:  # again: close() may have won the race
                raise PoolClosedError("uksm pool is closed")
            if not nested:
                self._reap()
            vpn = self._native.alloc(npages)
            if group:
                self._native.set_group(vpn, npages, group)
            rec = _Buffer(vpn, npages, nbytes)
            self._buffers[vpn] = rec
            if nested:
                core.adds.append(rec)
            else:
                self._scanner.add_range(vpn, npages)

            def release(_cdata: object, rec: _Buffer = rec) -> None:
                core.on_release(rec, True)

            buf = self._native.buffer(vpn, max(nbytes, 1), release)
        if self._max_resident is not None:
            if group:
                self._reclaim(group)
            self._note_swap_errors()  # the allocation's own reclaim may have failed
        # (numpy's stubs list no cffi buffer, though it exports the buffer protocol)
        arr: npt.NDArray[Any] = np.ndarray(shape, dtype=dtype, buffer=cast(Any, buf))
        return arr

    def _reap(self) -> None:
        self._c.reap()
        _core.fork_poll()  # frames a child held go back once it is gone

    def empty(self, shape: Any, dtype: npt.DTypeLike = float) -> npt.NDArray[Any]:
        """A new array from the pool.  Its pages are fresh anonymous memory,
        so unlike numpy.empty it reads as zeroes: no old contents ever show
        through; nothing is committed until written."""
        return self._new_array(shape, dtype)

    def zeros(self, shape: Any, dtype: npt.DTypeLike = float) -> npt.NDArray[Any]:
        """A new array of zeroes (fresh pages are zero: nothing is written)."""
        return self._new_array(shape, dtype)

    def full(
        self, shape: Any, fill_value: Any, dtype: Optional[npt.DTypeLike] = None
    ) -> npt.NDArray[Any]:
        if dtype is None:
            dtype = np.array(fill_value).dtype
        arr = self._new_array(shape, dtype)
        arr.fill(fill_value)
        self._settle(arr.nbytes)
        return arr

    def asarray(self, obj: Any, dtype: Optional[npt.DTypeLike] = None) -> npt.NDArray[Any]:
        """A copy of @obj in the pool (always a copy, even of a pool array)."""
        src = np.asarray(obj, dtype=dtype)
        arr = self._new_array(src.shape, src.dtype)
        np.copyto(arr, src, casting="no")
        self._settle(arr.nbytes)
        return arr

    def _settle(self, nbytes: int) -> None:
        """Back under the resident budgets (the pool's and every group's)
        after a new buffer of @nbytes was written whole.  The reclaim at
        allocation found nothing to evict, since a page is memory only once
        written, and nothing else would run until the scanner or another
        budget change: a pool of 16 MiB budget would hold all of a 64 MiB
        array.  A pass counts the whole range (~1 ms for a 1 GiB pool), so
        it runs once a swap batch has been written since the last one:
        small arrays cost a pass per batch, and what they hold beyond the
        budget in between is less than the one batch a pass may leave."""
        if self._max_resident is None:
            return
        self._unsettled += nbytes
        if self._unsettled >= self._settle_bytes:
            self._reclaim()

    def _record(self, arr: Any) -> _Buffer:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"expected a numpy.ndarray from this pool, not {type(arr).__name__}")
        va = self._native.va
        # A view of an array numpy made under the handler stands for its
        # base, whose data pointer is the buffer's start (numpy has no other
        # name for it); a view of a pool array does not: free() would take
        # the whole buffer from under whoever holds the array itself.
        base = arr
        while isinstance(base.base, np.ndarray):
            base = base.base
        if base is not arr:
            addr = base.__array_interface__["data"][0]
            vpn = (addr - va) // PAGE_SIZE
            rec = self._buffers.get(vpn) if va <= addr else None
            if (
                rec is not None
                and rec.handler
                and not rec.released
                and addr == va + vpn * PAGE_SIZE
            ):
                return rec
        addr = arr.__array_interface__["data"][0]
        if not (va <= addr < va + self._native.va_pages * PAGE_SIZE):
            raise ForeignArrayError("array does not belong to this uksm pool")
        vpn = (addr - va) // PAGE_SIZE
        rec = self._buffers.get(vpn)
        if rec is None or rec.released or addr != va + vpn * PAGE_SIZE:
            raise ForeignArrayError(
                "array is not a live buffer of this pool "
                "(pass the array the pool returned, not a view "
                "into the middle of it)"
            )
        return rec

    def free(self, arr: npt.NDArray[Any]) -> None:
        """Give @arr's memory back now.  @arr must be the array the pool
        returned and no view of it may be alive; afterwards touching @arr
        is a use-after-free: its pages are PROT_NONE, and the process dies
        with a message from uksm naming the address.  The address range is
        not reused while any array can still reach it, so a use-after-free
        never reads or writes another buffer.

        Safe from finalizers and signal handlers: it never waits for the
        pool's lock (the frames go back through the C core's own lock; what
        the scanner must forget is queued for the lock's next holder)."""
        self._check_open()
        rec = self._record(arr)
        if rec.handler:
            raise ForeignArrayError(
                "this array was made by numpy under the pool's "
                "handler (install()/allocating()): numpy frees it "
                "when its last reference goes"
            )
        # A view of arr (slice, reshape, memoryview, frombuffer) holds a
        # reference to arr itself.  Expected references: the caller's, this
        # frame's argument, getrefcount's own; more may be a view, and
        # freeing under a live view would crash it later, so refuse.  (A
        # caller holding no name of its own, as in free(lst.pop()), leaves
        # room for one view unseen: that use-after-free is the message above.)
        base = arr.base
        extra = max(sys.getrefcount(arr) - 3, sys.getrefcount(base) - 3)
        del base
        if extra > 0:
            del arr  # the traceback must not hold one more reference
            raise BufferInUseError(
                f"cannot free: {extra} other reference(s) to this "
                "buffer (views of it, or other names) are alive"
            )
        core = self._c
        core.on_release(rec, collected=False)
        core.reap_if_free()

    # -- merging control ------------------------------------------------------------

    def unmerge(self, arr: npt.NDArray[Any]) -> int:
        """MADV_UNMERGEABLE: make every merged, zero or swapped page of @arr
        private again (one MADV_POPULATE_WRITE per run) and stop scanning
        it.  Returns the pages unmerged; MemoryError if the kernel runs out
        of memory part way (the rest stay merged, nothing is lost)."""
        self._check_open()
        with self._c.section("pool.unmerge()"):
            self._reap()
            rec = self._record(arr)
            # as MADV_UNMERGEABLE: a failed unmerge leaves the buffer
            # mergeable (and counted), the pages it did unmerge unmerged
            n = self._native.unmerge(rec.vpn, rec.npages)
            if rec.mergeable and not rec.pins:
                self._scanner.remove_range(rec.vpn, rec.npages)
            rec.mergeable = False
        return n

    def merge(self, arr: npt.NDArray[Any]) -> None:
        """MADV_MERGEABLE: scan @arr again (the default for new arrays).
        Inside a pin() block this takes effect when the last pin ends."""
        self._check_open()
        with self._c.section("pool.merge()"):
            self._reap()
            rec = self._record(arr)
            if not rec.mergeable and not rec.pins:
                self._scanner.add_range(rec.vpn, rec.npages)
            rec.mergeable = True

    @contextlib.contextmanager
    def pin(self, arr: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
        """Keep @arr private, writable and unmerged for the block: its merged
        and swapped pages become private on entry and the scanner and
        reclaim leave it alone until the block ends (blocks nest).  Plain
        read(2), readinto() and recv_into() into a merged or swapped page
        work without a pin (the kernel copies it for its own writes), but a
        kernel write that hits a page in the microseconds it is
        write-protected in transit (being merged, moved or swapped out by
        the scanner) fails with EFAULT, where a user write would wait: pin()
        buffers the scanner may be working on around kernel I/O into them.
        I/O that pins pages for longer (O_DIRECT, io_uring, AIO, RDMA, GPU
        pinned memory) always needs it, since its writes would land in a page
        the scanner had merged away meanwhile.  With cow="signal" a merged
        page is read-only to the kernel too."""
        self._check_open()
        with self._c.section("pool.pin()"):
            self._reap()
            rec = self._record(arr)
            if rec.pins == 0 and rec.mergeable:
                self._scanner.remove_range(rec.vpn, rec.npages)
            rec.pins += 1
        try:
            self._native.set_pinned(rec.vpn, rec.npages, True)
            self._native.swap_in_range(rec.vpn, rec.npages)
            self._native.unmerge(rec.vpn, rec.npages)
            yield arr
        finally:
            # a block's end may come nested (an abandoned block is closed
            # by the garbage collector): the scanner then takes the range
            # back at the next reap()
            core = self._c
            with core.served() as nested:
                rec.pins -= 1
                if rec.pins == 0 and not rec.released and not self._native.closed:
                    self._native.set_pinned(rec.vpn, rec.npages, False)
                    if rec.mergeable and not self._closed:
                        if nested:
                            core.adds.append(rec)
                        else:
                            self._scanner.add_range(rec.vpn, rec.npages)

    # -- migration --------------------------------------------------------------------

    def _compact_locked(self, shrink_frames: int = 0) -> Tuple[Dict[str, Any], int]:
        # caller holds the policy lock: the scanner is paused, so no new mapper of
        # any frame can appear behind the C core's plan
        self._reap()
        maps_before = _count_maps()
        blocks_before = os.fstat(self._native.fd).st_blocks * 512
        t0 = time.perf_counter()
        st, err, log_from, log_to = self._native.compact(shrink_frames)
        seconds = time.perf_counter() - t0
        self._scanner.frames_moved(log_from, log_to)
        self._scanner.prune_stable()
        self._scanner.recount_maps()
        fst = os.fstat(self._native.fd)
        result: Dict[str, Any] = {
            "frames_moved": st["frames_moved"],
            "bytes_moved": st["frames_moved"] * PAGE_SIZE,
            "moves": st["runs_moved"],
            "frames_skipped": st["frames_skipped"],
            "memfd_size_before": st["file_frames_before"] * PAGE_SIZE,
            "memfd_size_after": fst.st_size,
            # memory the kernel no longer holds for the memfd (its blocks) ...
            "bytes_released": max(blocks_before - fst.st_blocks * 512, 0),
            # ... and the file size given back (what can grow again)
            "size_released": max(st["file_frames_before"] * PAGE_SIZE - fst.st_size, 0),
            "memfd_bytes_before": blocks_before,
            "memfd_bytes_after": fst.st_blocks * 512,
            "vmas_before": maps_before,
            "vmas_after": _count_maps(),
            "seconds": seconds,
            "max_pause_seconds": st["max_hold_ns"] / 1e9,
        }
        self._compactions += 1
        self._frames_migrated += st["frames_moved"]
        return result, err

    def _fragmented(self) -> bool:
        ratio = self._knobs["compact_threshold"]
        if not ratio:
            return False
        c = self._native.stats()
        if c["frames_used"] == self._compact_gave_nothing_at:
            return False  # the last try could not cut the store: nothing new
        slack = c["frames_file"] - c["frames_used"]
        return c["frames_file"] > ratio * max(c["frames_used"], 1) and slack * PAGE_SIZE >= (
            16 << 20
        )

    def compact(self) -> Dict[str, Any]:
        """Move frames so the memfd shrinks to the live data and each buffer's
        pages lie on consecutive frames again (fewer mappings, further from
        vm.max_map_count).  Writers may keep writing meanwhile: a page being
        moved is write-protected for the copy, and a write waits for it.
        Returns what was done: frames_moved, bytes_released, memfd size and
        VMAs before and after, the longest pause a writer could have seen."""
        self._check_open()
        with self._c.section("pool.compact()"):
            self._check_open()
            result, err = self._compact_locked()
        _core.check(err, "compact")
        return result

    def shrink(self, nbytes: Any) -> Dict[str, Any]:
        """Give back the top @nbytes of the pool's frame store for good (the
        memory hot-remove analogue): stable frames living there are migrated
        below it first, with every view that maps them, and later merges
        stay below.  capacity (the span of live buffers) is unchanged:
        private pages are not frames.  PoolFullError if the live frames
        would not fit below; UksmError if a frame there cannot move (a
        forked child may still map it, or a remap failed)."""
        self._check_open()
        n = parse_size(nbytes, "shrink size")
        if n % PAGE_SIZE:
            raise ValueError(
                f"shrink size must be a multiple of the page size ({PAGE_SIZE}), got {n}"
            )
        with self._c.section("pool.shrink()"):
            self._check_open()
            result, err = self._compact_locked(n // PAGE_SIZE)
            _core.check(
                err,
                "shrink",
                {
                    errno.ENOSPC: PoolFullError(
                        f"uksm: cannot shrink by {n} bytes: the live data "
                        f"would not fit in what remains"
                    ),
                    errno.EBUSY: UksmError(
                        "uksm: cannot shrink: a frame in the range cannot move "
                        "(a forked child may still map it, or a remap failed: "
                        "vm.max_map_count?); nothing was removed"
                    ),
                },
            )
        return result

    # -- the scanner ------------------------------------------------------------------

    def scan(self, full_scans: int = 1) -> Dict[str, Any]:
        """Run the scanner in the caller's thread until @full_scans more full
        scans have completed; returns stats()."""
        _int_knob("full_scans", full_scans, 0)
        self._check_open()
        target = self._scanner.full_scans + full_scans
        batch = max(self._knobs["pages_to_scan"], 16384)
        while self._scanner.full_scans < target:
            with self._c.section("pool.scan()"):
                self._check_open()
                self._reap()
                self._scanner.scan_batch(batch)
                self._note_saved()
        return self.stats()

    def start(self) -> None:
        """Start the background scanner thread (ksmd's run=1)."""
        self._check_open()
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_event = threading.Event()
        # The thread holds the pool weakly, and strongly only for a batch:
        # a started pool that its program drops is collected (and closed)
        # like any other, instead of living on with its thread and memfd.
        self._thread = threading.Thread(
            target=_ksmd, args=(weakref.ref(self), self._stop_event), name="uksm-ksmd", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the background scanner (run=0) and wait for it (unless
        called from the scanner thread itself, or nested inside this
        thread's own pool section, where the scanner would be waiting for
        us: then it stops after its current batch)."""
        thread = self._thread
        if thread is None:
            return
        self._stop_event.set()
        if thread is not threading.current_thread() and not self._c.owned():
            thread.join()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _ksmd_batch(self, rested: bool = False) -> Optional[float]:
        """One batch of the background scanner, @rested if it paused since
        the last one (not before the first); the seconds to sleep after it,
        or None once the pool is closed."""
        with self._c.section("the scanner"):
            if self._closed:
                return None
            if rested:
                self._scanner.note_rest()
            self._reap()
            scans = self._scanner.full_scans
            self._scanner.scan_batch(self._knobs["pages_to_scan"])
            self._note_saved()
            if self._scanner.full_scans != scans and self._fragmented():
                result, _ = self._compact_locked()
                # a store the cut cannot reach (pages the kernel copied
                # live above it) is not tried again until frames change
                self._compact_gave_nothing_at = (
                    -1 if result["size_released"] else self._native.stats()["frames_used"]
                )
        if self._max_resident is not None:
            self._reclaim()  # kswapd: back under the budget
            self._native.swap_trim(256)
        if not _core.handler_installed():
            _core.install_handler()
        # idle backoff (uksm.scanner): a pool at rest is looked at less often
        return self._knobs["sleep_millisecs"] * self._scanner.sleep_factor() / 1000.0

    # -- accounting ---------------------------------------------------------------------

    def _note_saved(self, c: Optional[Dict[str, int]] = None) -> int:
        """Bytes merging saves now (pages_sharing plus zero pages), and the
        peak of it kept: sampled after every scan batch, where it grows."""
        if c is None:
            c = self._native.stats()
        saved = (c["ksm_mappings"] - c["ksm_frames"] + c["zero_pages"]) * PAGE_SIZE
        if saved > self._saved_peak:
            self._saved_peak = saved
        return saved

    # -- the NEP 49 handler (csrc/handler.c, uksm/_handler.py) ---------------------------

    def _handler(self, threshold: Any = None) -> object:
        """A new handler capsule on this pool: arrays of at least @threshold
        bytes from the pool, smaller ones from the handler current now."""
        self._check_open()
        t = _handler.DEFAULT_THRESHOLD if threshold is None else parse_size(threshold, "threshold")
        # under the lock, open: a close() racing in could otherwise find the
        # pool idle and destroy it under the new capsule
        with self._c.served():
            if self._closed or self._native.closed:
                raise PoolClosedError("uksm pool is closed")
            if not self._native.events_enabled:
                self._native.events_enable()
            _handler.active = True
            # the new handler falls back to the caller's, not to the
            # default the section runs with (_Core._held)
            caller = self._c.saved_handler
            if caller is None:
                return _handler._new(self._native.address, t, self._handler_gone)
            _handler._set(caller)
            try:
                return _handler._new(self._native.address, t, self._handler_gone)
            finally:
                _handler._set(_handler.DEFAULT)

    def _handler_gone(self) -> None:
        # the capsule's last array is gone (any thread, the GIL held, maybe
        # inside one of this thread's sections): never wait for the lock
        core = self._c
        core.recheck = True
        core.reap_if_free()

    @contextlib.contextmanager
    def allocating(self, threshold: Any = None) -> Iterator[Pool]:
        """Every numpy array of at least @threshold bytes (default 4 pages)
        made in the block comes from this pool; smaller ones from the handler
        in place before.  numpy keeps its handler in a context variable: the
        block covers this thread (or asyncio task) and what copies its
        context.  Arrays made in the block outlive it, and keep the pool
        alive while they do."""
        cap = self._handler(threshold)
        old = _handler._set(cap)
        del cap
        try:
            yield self
        finally:
            _handler._set(old)

    def _live_ranges(self) -> np.ndarray:
        """(vpn, npages) of every buffer not yet released, one row each."""
        rows = [(r.vpn, r.npages) for r in list(self._buffers.values()) if not r.released]
        return np.array(rows or [(0, 0)], np.uint64)

    def stats(self) -> Dict[str, Any]:
        """Counters with the names and meanings of /sys/kernel/mm/ksm, plus
        uksm's own memory figures.  pages_shared: KSM frames in use;
        pages_sharing: how many more pages map them (the saving);
        pages_unshared: pages in the unstable tree; pages_volatile: tracked
        pages in neither tree (changing too fast, or not yet stable);
        general_profit: (pages_sharing + ksm_zero_pages) * page size less the
        scanner's metadata."""
        with self._c.served() as nested:
            if self._native.closed:
                raise PoolClosedError("uksm pool is closed and its memory released")
            if not nested:
                self._reap()
            sc = self._scanner
            # pagemap first: it also reconciles, so the counters below are fresh
            # over the live buffers only: the cost of stats() follows the
            # pages in use, not the address space reserved
            mem = self._native.memory_ranges(self._live_ranges())
            c = self._native.stats()
            chains, dups = sc.stable.chains()
            meta = sc.metadata_bytes()
            tracked = max(sc.rmap_items - c["zero_pages"], 0)
            mapped = c["pages_mapped"]
            st = os.fstat(self._native.fd)
            meta_total = (
                meta
                + mapped * _core.PTE_BYTES
                + c["frames_used"] * _core.FRAME_BYTES
                + c["frames_used"] * sc.node1_of_pfn.itemsize
            )
            pages_shared = c["ksm_frames"]
            pages_sharing = c["ksm_mappings"] - c["ksm_frames"]
            unshared = sc.pages_unshared
            private = mem["private_present"]
            frames = st.st_blocks * 512 // PAGE_SIZE
            out = {
                "pages_shared": pages_shared,
                "pages_sharing": pages_sharing,
                "pages_unshared": unshared,
                "pages_volatile": max(tracked - pages_shared - pages_sharing - unshared, 0),
                "pages_scanned": sc.pages_scanned,
                "pages_skipped": sc.pages_skipped,
                "full_scans": sc.full_scans,
                "stable_node_chains": chains,
                "stable_node_dups": dups,
                "ksm_zero_pages": c["zero_pages"],
                "general_profit": (pages_sharing + c["zero_pages"]) * PAGE_SIZE - meta_total,
                # what the kernel holds for the pool, by its own accounting:
                # private pages present (pagemap), the frame store's blocks
                # (st_blocks) and the swap file's cached pages (mincore)
                "bytes_resident": (private + frames + mem["swap_cached"]) * PAGE_SIZE,
                "bytes_private": private * PAGE_SIZE,
                "bytes_frames": frames * PAGE_SIZE,
                "bytes_swap_cached": mem["swap_cached"] * PAGE_SIZE,
                # the pool's part of psutil's memory_full_info() figures
                "rss_bytes": (private + mem["views_present"] + mem["swap_views_present"])
                * PAGE_SIZE,
                "uss_bytes": (
                    private - mem["private_shared"] + mem["frames_single"] + mem["slots_single"]
                )
                * PAGE_SIZE,
                "pss_bytes": (
                    private
                    - mem["private_shared"] // 2
                    + mem["frames_present"]
                    + mem["slots_present"]
                )
                * PAGE_SIZE,
                "bytes_mapped": mapped * PAGE_SIZE,
                "memfd_bytes": st.st_blocks * 512,
                "memfd_size": st.st_size,
                "pages_tracked": tracked,
                "pages_to_scan": self._knobs["pages_to_scan"],
                "sleep_millisecs": self._knobs["sleep_millisecs"],
                "max_page_sharing": self._knobs["max_page_sharing"],
                "use_zero_pages": int(self._knobs["use_zero_pages"]),
                "smart_scan": int(self._knobs["smart_scan"]),
                "cow": self._cow,
                "cow_breaks": c["cow_breaks"],
                "cow_breaks_signal": c["cow_signal"],
                "zero_page_cows": c["zero_cow"],
                "pages_merged_total": c["pages_merged"],
                "merge_runs": c["merge_runs"],
                "merges_skipped_vma": sc.merges_skipped_vma,
                "fault_lock_waits": c["fault_waits"],
                "transit_faults": c["transit_faults"],
                "frames_deferred": c["frames_deferred"],
                "fork_detaches": c["detaches"],
                "pages_swapped": c["pages_swapped"],
                "swap_outs": c["swap_outs"],
                "swap_ins": c["swap_ins"],
                "swap_slots_used": c["slots_used"],
                "swap_file_bytes": c["swap_file_slots"] * PAGE_SIZE,
                "swap_errors": c["swap_errors"],
                "last_swap_errno": c["last_swap_errno"],
                "reclaim_batches": c["reclaim_runs"],
                "max_resident": self.max_resident,
                "groups": {name: g.stats() for name, g in self._groups.items()},
                "compactions": self._compactions,
                "frames_migrated": self._frames_migrated,
                "buffers": len(self._buffers),
                "capacity": self.capacity,
                "metadata_bytes": meta_total,
                "metadata_bytes_per_page": (meta_total / sc.rmap_items) if sc.rmap_items else 0.0,
                "last_full_scan_seconds": sc.last_full_scan_seconds,
                "max_map_count": sc.max_map_count,
                # the mappings merging works within: the process's (counted
                # now and then, our merges' own since), the limit, the
                # part left to the program, and the pages a full scan left
                # private because the rest was spent
                "map_count": sc.map_count(),
                "map_count_max": sc.map_count_max(),
                "map_count_reserve": sc.map_count_reserve(),
                "pages_unmerged_map_limit": sc.unmerged_map_limit(),
                "bytes_saved": self._note_saved(c),
                "bytes_saved_peak": self._saved_peak,
                "handler": (self._native.events_stats() if self._native.events_enabled else None),
            }
        return out

    def buffer_stats(self, arr: npt.NDArray[Any]) -> Dict[str, Any]:
        """For one buffer: its pages, how many are merged (KSM or zero page)
        and the bytes that saves (a frame shared by n pages saves 1 - 1/n of
        a page for each of them, as PSS counts it)."""
        self._check_open()
        with self._c.served() as nested:
            if not nested:
                self._c.drain_events()  # the handler's newest buffers
            rec = self._record(arr)
            self._native.reconcile(rec.vpn, rec.npages)
            state, _, mapcount = self._native.pages_info(rec.vpn, rec.npages)
        ksm = state == _core.PageState.KSM
        zero = state == _core.PageState.ZERO
        saved = float(np.sum(1.0 - 1.0 / mapcount[ksm])) * PAGE_SIZE if ksm.any() else 0.0
        saved += int(np.count_nonzero(zero)) * PAGE_SIZE
        return {
            "pages": rec.npages,
            "pages_merged": int(np.count_nonzero(ksm | zero)),
            "pages_ksm": int(np.count_nonzero(ksm)),
            "pages_zero": int(np.count_nonzero(zero)),
            "bytes_saved": int(saved),
            "mergeable": rec.mergeable,
            "handler": rec.handler,
        }

    def page_states(
        self, arr: npt.NDArray[Any]
    ) -> Tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
        """(state, pfn, mapcount) arrays for each page of @arr: the page table,
        for tests and tools.  States (uksm.PageState): 1 private, 2 KSM (pfn:
        its frame), 3 zero page, 4 swapped (pfn: its slot).  The kernel's
        copies on write are reconciled first."""
        self._check_open()
        with self._c.served() as nested:
            if not nested:
                self._c.drain_events()
            rec = self._record(arr)
            self._native.reconcile(rec.vpn, rec.npages)
            return self._native.pages_info(rec.vpn, rec.npages)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "idle")
        return f"<uksm.Pool capacity={self.capacity} buffers={len(self._buffers)} {state}>"
