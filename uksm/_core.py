"""The only module that touches the compiled core, uksm._native.

It validates what goes in, calls, and turns the core's -errno returns into
OSError or uksm exceptions; the pool and the scanner deal in numpy arrays
and never see ffi or lib.  cffi releases the GIL around every call into the
core, which is what lets the SIGSEGV handler (which may run in a thread that
holds the GIL) wait on pool->lock without deadlock: a thread inside the core
never needs the GIL to finish.
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, cast

# The core is loaded before numpy on purpose: its fork handlers register at
# load time and must come before OpenBLAS's (see uksm_init in csrc/pool.c).
# (re-exported: the policy lock and the fork hooks call lib directly)
try:
    from ._native import ffi as ffi
    from ._native import lib as lib
except ImportError as exc:  # pragma: no cover - exercised by the smoke test
    raise ImportError(
        "uksm's C core (uksm._native) is not built: install the package with "
        "`pip install -e .` (needs a C compiler)"
    ) from exc

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from cffi import FFI  # noqa: E402

# check and error re-exported: the rest of the package maps the core's
# -errno returns through them too
from .errors import PoolFullError, TooManyPoolsError, VirtualSpaceError  # noqa: E402
from .errors import check as check  # noqa: E402
from .errors import error as error  # noqa: E402

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

PAGE_SIZE: int = lib.UKSM_PAGE_SIZE
RUN_MAX: int = lib.UKSM_RUN_MAX


class PageState(enum.IntEnum):
    """A pool page's state, as pool.page_states() reports it (csrc/uksm.h)."""

    NONE = lib.UKSM_PTE_NONE
    PRIVATE = lib.UKSM_PTE_PRIVATE  # anonymous memory
    KSM = lib.UKSM_PTE_KSM  # a private view of a stable frame
    ZERO = lib.UKSM_PTE_ZERO  # given back as zeroes
    SWAPPED = lib.UKSM_PTE_SWAPPED  # a private view of a swap slot


# The same states as plain ints, for the scanner's batch compares: numpy
# compares an array with an IntEnum member several times slower than with
# an int (it cannot take the member as a weak Python scalar).
PTE_NONE: int = PageState.NONE.value
PTE_PRIVATE: int = PageState.PRIVATE.value
PTE_KSM: int = PageState.KSM.value
PTE_ZERO: int = PageState.ZERO.value
PTE_SWAPPED: int = PageState.SWAPPED.value
SCAN_UNTOUCHED: int = lib.UKSM_SCAN_UNTOUCHED


COW_MODES = {"kernel": lib.UKSM_COW_KERNEL, "signal": lib.UKSM_COW_SIGNAL}
MAX_GROUPS: int = lib.UKSM_MAX_GROUPS
MAX_POOLS: int = lib.UKSM_MAX_POOLS
# The core numbers frames and virtual pages in 32 bits, UINT32_MAX being
# "none" (uksm_pool_create refuses more): the largest range one pool maps.
MAX_POOL_PAGES: int = (1 << 32) - 2

MERGE_OK: int = lib.UKSM_MERGE_OK
MERGE_STALE: int = lib.UKSM_MERGE_STALE
MERGE_DIFFER: int = lib.UKSM_MERGE_DIFFER
MERGE_BUSY: int = lib.UKSM_MERGE_BUSY
MERGE_FULL: int = lib.UKSM_MERGE_FULL
MERGE_NOVMA: int = lib.UKSM_MERGE_NOVMA
MERGE_SELF: int = lib.UKSM_MERGE_SELF
MERGE_NOFRAME: int = lib.UKSM_MERGE_NOFRAME

FRAME_KSM: int = lib.UKSM_FRAME_KSM

EV_ALLOC: int = lib.UKSM_EV_ALLOC
EV_FREE: int = lib.UKSM_EV_FREE
EV_TRIM: int = lib.UKSM_EV_TRIM

CHECKSUMS = {"jhash2": lib.UKSM_CSUM_JHASH2, "xxhash": lib.UKSM_CSUM_XXHASH}

# Bytes of C table per tracked page: a uksm_pte per virtual page and a
# uksm_frame per frame; counted in the metadata figure.
PTE_BYTES: int = ffi.sizeof("struct uksm_pte")
FRAME_BYTES: int = ffi.sizeof("struct uksm_frame")


_U8 = npt.NDArray[np.uint8]
_U32 = npt.NDArray[np.uint32]


def _fields(struct: FFI.CData, ctype: str) -> Dict[str, int]:
    """A struct of counters as a dict, by its C field names."""
    return {name: int(getattr(struct, name)) for name, _ in ffi.typeof(ctype).fields}


def format_bytes(n: int) -> str:
    """@n bytes for a message: exact, and in the largest binary unit."""
    for unit, shift in (
        ("EiB", 60),
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit} ({n} bytes)"
    return f"{n} bytes"


def _ptr(ctype: str, arr: npt.NDArray[np.generic]) -> FFI.CData:
    # numpy's stubs give ndarray the buffer protocol only from Python 3.12
    return ffi.from_buffer(ctype, cast("ReadableBuffer", arr), require_writable=False)


OPS = {
    "mmap": lib.UKSM_OP_MMAP,
    "mprotect": lib.UKSM_OP_MPROTECT,
    "fallocate": lib.UKSM_OP_FALLOCATE,
    "pwrite": lib.UKSM_OP_PWRITE,
}


def inject(op: str, skip: int, fail: int, err: int) -> None:
    """Tests only: after @skip good calls of @op, fail @fail of them (< 0:
    all) with errno @err; fail=0 disarms."""
    check(lib.uksm_inject(OPS[op], skip, fail, err), "inject")


def inject_hits(op: str) -> int:
    return int(lib.uksm_inject_hits(OPS[op]))


def native_path() -> str:
    """The core's shared object (csrc/pyglue.c is called through ctypes)."""
    import importlib.util

    spec = importlib.util.find_spec("uksm._native")
    if spec is None or spec.origin is None:
        raise ImportError("uksm's C core (uksm._native) has no file to load")
    return spec.origin


def install_handler() -> bool:
    """Make ours the SIGSEGV handler again if someone replaced it."""
    return check(lib.uksm_install_handler(), "sigaction") == 1


def handler_installed() -> bool:
    return bool(lib.uksm_handler_installed())


def handler_pop_prev() -> None:
    lib.uksm_handler_pop_prev()


def calc_checksum(page: bytes, algo: str) -> int:
    """Checksum of one page of bytes (tests and benchmarks)."""
    if len(page) != PAGE_SIZE:
        raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
    return int(lib.uksm_calc_checksum(ffi.from_buffer(page), CHECKSUMS[algo]))


def jhash2(words: bytes, initval: int) -> int:
    """include/linux/jhash.h jhash2 over a whole number of 32-bit words."""
    if len(words) % 4:
        raise ValueError("jhash2 hashes 32-bit words: length must be a multiple of 4")
    return int(
        lib.uksm_jhash2(
            ffi.cast("uint32_t *", ffi.from_buffer(words)), len(words) // 4, initval & 0xFFFFFFFF
        )
    )


def fork_poll() -> int:
    """Close the fork epochs whose children are gone, give back what they
    held; returns the epochs still open."""
    return int(lib.uksm_fork_poll())


class NativePool:
    """One struct uksm_pool: the tables, the frame store, the virtual range."""

    # Pools created and not yet destroyed in this process (a forked child
    # inherits the count with the core's registry): tells a full registry
    # from a process out of file descriptors, both EMFILE from the core.
    open_count = 0

    def __init__(self, capacity_pages: int, nr_frames: int, va_pages: int, cow: str):
        if max(va_pages, nr_frames) > MAX_POOL_PAGES:
            # ValueError, not MemoryError: this is a fixed limit of the core,
            # not a shortage that freeing memory or raising a limit would
            # cure; the same capacity fails the same way on every machine.
            raise ValueError(
                f"uksm: a pool of capacity {format_bytes(capacity_pages * PAGE_SIZE)} asks "
                f"for {format_bytes(va_pages * PAGE_SIZE)} of address space (virtual_size, "
                f"default 2 x capacity), which exceeds what one pool can map in this "
                f"process: at most {MAX_POOL_PAGES * PAGE_SIZE} bytes (2**32 - 2 pages, "
                f"just under 16 TiB); choose a smaller capacity or virtual_size"
            )
        out = ffi.new("struct uksm_pool **")
        ret = lib.uksm_pool_create(capacity_pages, nr_frames, va_pages, COW_MODES[cow], out)
        if ret < 0:
            raise error(
                ret,
                "pool_create",
                {
                    # the reservation is MAP_NORESERVE: only RLIMIT_AS, a strict
                    # overcommit policy or a full address space refuse it
                    errno.ENOMEM: MemoryError(
                        f"uksm: reserving {format_bytes(va_pages * PAGE_SIZE)} of address space "
                        f"for a pool of capacity {format_bytes(capacity_pages * PAGE_SIZE)} "
                        f"failed: it exceeds what the process can map (RLIMIT_AS, "
                        f"vm.overcommit_memory=2, or the address space is full); choose a "
                        f"smaller capacity or virtual_size"
                    ),
                    errno.EMFILE: TooManyPoolsError(
                        errno.EMFILE,
                        f"uksm: at most {MAX_POOLS} pools may be open at once in one process "
                        f"and {NativePool.open_count} are; closing a pool (and dropping its "
                        f"arrays, which keep it alive) frees its slot",
                    )
                    if NativePool.open_count >= MAX_POOLS
                    else OSError(
                        errno.EMFILE,
                        "uksm: pool_create: the process is out of file "
                        "descriptors (each pool holds two; RLIMIT_NOFILE)",
                    ),
                },
            )
        NativePool.open_count += 1
        self._pool = out[0]
        self.va = int(ffi.cast("uintptr_t", lib.uksm_pool_va(self._pool)))
        self.va_pages = va_pages
        self.capacity_pages = capacity_pages
        self.nr_frames = nr_frames
        self._stats = ffi.new("struct uksm_stats *")
        self.closed = False

    def __getattribute__(self, name: str) -> Any:
        # Every call into a destroyed pool would touch unmapped memory: make
        # each public method refuse instead.
        if (
            name[0] != "_"
            and name not in ("closed", "destroy")
            and object.__getattribute__(self, "closed")
        ):
            from .errors import PoolClosedError

            raise PoolClosedError("uksm pool is closed and its memory released")
        return object.__getattribute__(self, name)

    @property
    def fd(self) -> int:
        return lib.uksm_pool_fd(self._pool)

    def destroy(self) -> None:
        if not self.closed:
            self.closed = True
            NativePool.open_count -= 1
            lib.uksm_pool_destroy(self._pool)

    def alloc(self, npages: int) -> int:
        vpn = ffi.new("size_t *")
        stage_p = ffi.new("int *")
        ret = lib.uksm_alloc(self._pool, npages, vpn, stage_p)
        if ret >= 0:
            return int(vpn[0])
        stage = int(stage_p[0])
        if stage == lib.UKSM_ALLOC_CAPACITY:
            raise PoolFullError(
                f"uksm pool full: {npages} pages wanted, capacity is {self.capacity_pages} pages"
            )
        if stage == lib.UKSM_ALLOC_VA:
            raise VirtualSpaceError(
                f"uksm pool's virtual range ({self.va_pages} pages) has no free "
                f"run of {npages} pages"
            )
        raise error(
            ret,
            f"mapping {npages} pages (mmap)",
            {
                errno.ENOMEM: MemoryError(
                    f"uksm: the kernel refused {npages} pages ({npages * PAGE_SIZE} bytes) "
                    f"of private memory: commit limit (vm.overcommit) or "
                    f"vm.max_map_count reached"
                )
            },
        )

    def buffer(
        self, vpn: int, nbytes: int, on_release: Callable[[FFI.CData], object]
    ) -> FFI.buffer:
        """A cffi buffer over the pages from @vpn; on_release runs at GC."""
        # a cffi buffer is a raw pointer and a length: one outside the
        # pool's range would read and write whatever lies there
        if vpn < 0 or nbytes < 0 or vpn + -(-nbytes // PAGE_SIZE) > self.va_pages:
            raise ValueError(
                f"uksm: buffer of {nbytes} bytes at page {vpn} is outside "
                f"the pool's virtual range ({self.va_pages} pages)"
            )
        p = ffi.cast("char *", self.va + vpn * PAGE_SIZE)
        p = ffi.gc(p, on_release)
        return ffi.buffer(p, nbytes)

    def release(self, vpn: int, npages: int) -> None:
        check(lib.uksm_release(self._pool, vpn, npages), "release")

    def va_free(self, vpn: int, npages: int) -> None:
        check(lib.uksm_va_free(self._pool, vpn, npages), "va_free")

    def checksum_range(
        self,
        vpn: int,
        skip: Optional[npt.NDArray[np.uint8]],
        sums: npt.NDArray[np.uint64],
        states: npt.NDArray[np.uint8],
        algo: int,
    ) -> None:
        skip_p = ffi.NULL if skip is None else _ptr("uint8_t[]", skip)
        check(
            lib.uksm_checksum_range(
                self._pool,
                vpn,
                len(sums),
                algo,
                skip_p,
                _ptr("uint64_t[]", sums),
                _ptr("uint8_t[]", states),
            ),
            "checksum_range",
        )

    def merge(
        self,
        src: npt.ArrayLike,
        dst_vpn: npt.ArrayLike,
        dst_pfn: npt.ArrayLike,
        dst_key: npt.ArrayLike,
        max_sharing: int,
        vma_budget: int,
    ) -> Tuple[_U8, _U32, _U32, int]:
        src_a = np.ascontiguousarray(src, np.int64)
        n = len(src_a)
        out_pfn = np.zeros(n, np.uint32)
        out_key = np.zeros(n, np.uint32)
        result = np.zeros(n, np.uint8)
        budget = ffi.new("int64_t *", vma_budget)
        dst_vpn_a = np.ascontiguousarray(dst_vpn, np.int64)
        dst_pfn_a = np.ascontiguousarray(dst_pfn, np.uint32)
        dst_key_a = np.ascontiguousarray(dst_key, np.uint32)
        check(
            lib.uksm_merge(
                self._pool,
                n,
                _ptr("int64_t[]", src_a),
                _ptr("int64_t[]", dst_vpn_a),
                _ptr("uint32_t[]", dst_pfn_a),
                _ptr("uint32_t[]", dst_key_a),
                max_sharing,
                budget,
                _ptr("uint32_t[]", out_pfn),
                _ptr("uint32_t[]", out_key),
                _ptr("uint8_t[]", result),
            ),
            "merge",
        )
        return result, out_pfn, out_key, int(budget[0])

    def merge_zero(self, vpns: npt.ArrayLike, vma_budget: int) -> Tuple[_U8, int]:
        vpns_a = np.ascontiguousarray(vpns, np.int64)
        result = np.zeros(len(vpns_a), np.uint8)
        budget = ffi.new("int64_t *", vma_budget)
        check(
            lib.uksm_merge_zero(
                self._pool,
                len(vpns_a),
                _ptr("int64_t[]", vpns_a),
                budget,
                _ptr("uint8_t[]", result),
            ),
            "merge_zero",
        )
        return result, int(budget[0])

    def unmerge(self, vpn: int, npages: int) -> int:
        done = ffi.new("size_t *")
        ret = lib.uksm_unmerge(self._pool, vpn, npages, done)
        if ret < 0:
            kept = f"{int(done[0])} pages were unmerged, the rest stay merged"
            raise error(
                ret,
                "unmerge: making the pages private",
                {
                    errno.ENOMEM: MemoryError(
                        f"uksm: unmerge: the kernel has no memory for the private copies; {kept}"
                    )
                },
                detail=kept,
            )
        return int(done[0])

    def reconcile(self, vpn: int, npages: int) -> int:
        """Learn from pagemap which views the kernel copied on write."""
        return check(lib.uksm_reconcile(self._pool, vpn, npages), "reconcile")

    def memory(self, vpn: int, npages: int) -> Dict[str, int]:
        out = ffi.new("struct uksm_memory *")
        check(lib.uksm_memory(self._pool, vpn, npages, out), "memory")
        return _fields(out, "struct uksm_memory")

    def memory_ranges(self, ranges: npt.ArrayLike) -> Dict[str, int]:
        """memory() over the (vpn, npages) rows of @ranges, in one call."""
        out = ffi.new("struct uksm_memory *")
        r = np.ascontiguousarray(ranges, np.uint64).reshape(-1, 2)
        check(lib.uksm_memory_ranges(self._pool, _ptr("uint64_t[]", r), len(r), out), "memory")
        return _fields(out, "struct uksm_memory")

    # -- swap (csrc/swap.c) --------------------------------------------------

    def swap_enable(self, swap_fd: int, dir_fd: int, max_resident: int, batch: int) -> None:
        """Hand the swap file (and its directory) to the core, which owns
        and closes them from now on."""
        check(lib.uksm_swap_enable(self._pool, swap_fd, dir_fd, max_resident, batch), "swap_enable")

    def swap_trim(self, min_slots: int = 0) -> int:
        """Give freed swap slots' disk blocks back (in runs)."""
        return int(lib.uksm_swap_trim(self._pool, min_slots))

    def set_max_resident(self, frames: int) -> None:
        check(lib.uksm_set_max_resident(self._pool, frames), "set_max_resident")

    def reclaim(self, nr: int = 0, group: int = -1) -> int:
        """Evict @nr frames (0: down to the budget); -errno of a failed
        swap write comes back as OSError."""
        return check(
            lib.uksm_reclaim(self._pool, nr, group),
            "writing to the swap file",
            detail="eviction stopped, nothing lost",
        )

    def swap_in_range(self, vpn: int, npages: int) -> None:
        ret = lib.uksm_swap_in_range(self._pool, vpn, npages)
        if ret < 0:
            raise error(
                ret, "swap in", {errno.ENOMEM: MemoryError("uksm: no memory to swap the pages in")}
            )

    def set_locked(self, vpn: int, npages: int, on: bool) -> None:
        ret = lib.uksm_set_locked(self._pool, vpn, npages, int(on))
        if ret < 0:
            raise error(
                ret, "lock", {errno.ENOMEM: MemoryError("uksm: no memory to swap a locked page in")}
            )

    def set_group(self, vpn: int, npages: int, group: int) -> None:
        check(lib.uksm_set_group(self._pool, vpn, npages, group), "set_group")

    def group_limit(self, group: int, frames: int) -> None:
        check(lib.uksm_group_limit(self._pool, group, frames), "group_limit")

    def group_stats(self, group: int) -> Dict[str, int]:
        out = ffi.new("uint64_t[4]")
        check(lib.uksm_group_stats(self._pool, group, out), "group_stats")
        return {
            "pages": int(out[0]),
            "pages_swapped": int(out[1]),
            "swap_ins": int(out[2]),
            "max_frames": int(out[3]),
        }

    def set_pinned(self, vpn: int, npages: int, on: bool) -> None:
        check(lib.uksm_set_pinned(self._pool, vpn, npages, int(on)), "set_pinned")

    def compact(self, shrink_frames: int = 0) -> Tuple[Dict[str, int], int, _U32, _U32]:
        """uksm_compact(): returns (stats dict, err, log_from, log_to), the
        log being the KSM frames moved, in order."""
        cap = 2 * self.nr_frames
        log_from = np.zeros(cap, np.uint32)
        log_to = np.zeros(cap, np.uint32)
        n = ffi.new("size_t *")
        out = ffi.new("struct uksm_compact_stats *")
        ret = lib.uksm_compact(
            self._pool,
            shrink_frames,
            _ptr("uint32_t[]", log_from),
            _ptr("uint32_t[]", log_to),
            cap,
            n,
            out,
        )
        st = _fields(out, "struct uksm_compact_stats")
        return st, ret, log_from[: n[0]], log_to[: n[0]]

    def vma_estimate(self) -> int:
        return int(lib.uksm_vma_estimate(self._pool))

    def set_vma_state(self, maps: int, soft_limit: int) -> None:
        lib.uksm_set_vma_state(self._pool, maps, soft_limit)

    def pages_info(self, vpn: int, npages: int) -> Tuple[_U8, _U32, _U32]:
        state = np.zeros(npages, np.uint8)
        pfn = np.zeros(npages, np.uint32)
        mapcount = np.zeros(npages, np.uint32)
        check(
            lib.uksm_pages_info(
                self._pool,
                vpn,
                npages,
                _ptr("uint8_t[]", state),
                _ptr("uint32_t[]", pfn),
                _ptr("uint32_t[]", mapcount),
            ),
            "pages_info",
        )
        return state, pfn, mapcount

    def frames_info(self, pfns: npt.ArrayLike) -> Tuple[_U32, _U32, _U32]:
        pfns_a = np.ascontiguousarray(pfns, np.uint32)
        n = len(pfns_a)
        mapcount = np.zeros(n, np.uint32)
        key = np.zeros(n, np.uint32)
        flags = np.zeros(n, np.uint32)
        lib.uksm_frames_info(
            self._pool,
            _ptr("uint32_t[]", pfns_a),
            n,
            _ptr("uint32_t[]", mapcount),
            _ptr("uint32_t[]", key),
            _ptr("uint32_t[]", flags),
        )
        return mapcount, key, flags

    # -- the NEP 49 handler's event queue (csrc/handler.c) ------------------

    EVENT_BATCH = 4096
    # the drain buffers, made by events_enable()
    _ev_vpn: FFI.CData
    _ev_npages: FFI.CData
    _ev_type: FFI.CData
    _ev_released: FFI.CData

    def events_enable(self, cap: int = 1 << 16) -> None:
        check(lib.uksm_events_enable(self._pool, cap), "events_enable")
        if not hasattr(self, "_ev_vpn"):
            # cffi memory, not numpy's: numpy's may come from this very pool
            n = self.EVENT_BATCH
            self._ev_vpn = ffi.new("uint64_t[]", n)
            self._ev_npages = ffi.new("uint32_t[]", n)
            self._ev_type = ffi.new("uint8_t[]", n)
            self._ev_released = ffi.new("uint8_t[]", n)

    @property
    def events_enabled(self) -> bool:
        return hasattr(self, "_ev_vpn")

    def drain_events(self) -> List[Tuple[int, int, int, int]]:
        """Up to EVENT_BATCH events, oldest first: a list of (type, vpn,
        npages, released)."""
        n = lib.uksm_events_drain(
            self._pool,
            self._ev_vpn,
            self._ev_npages,
            self._ev_type,
            self._ev_released,
            self.EVENT_BATCH,
        )
        return [
            (self._ev_type[i], self._ev_vpn[i], self._ev_npages[i], self._ev_released[i])
            for i in range(n)
        ]

    def events_stats(self) -> Dict[str, int]:
        out = ffi.new("uint64_t[]", lib.UKSM_HST_NR)
        lib.uksm_events_stats(self._pool, out)
        return {
            "allocs": int(out[lib.UKSM_HST_ALLOCS]),
            "frees": int(out[lib.UKSM_HST_FREES]),
            "fallbacks": int(out[lib.UKSM_HST_FALLBACKS]),
            "cancelled": int(out[lib.UKSM_HST_CANCELLED]),
            "reallocs": int(out[lib.UKSM_HST_REALLOCS]),
            "moved": int(out[lib.UKSM_HST_MOVED]),
            "live": int(out[lib.UKSM_HST_LIVE]),
            "queued": int(out[lib.UKSM_HST_QUEUED]),
            "handlers": int(out[lib.UKSM_HST_HANDLERS]),
            "cap": int(out[lib.UKSM_HST_CAP]),
            "quick": int(out[lib.UKSM_HST_QUICK]),
            "quick_pages": int(out[lib.UKSM_HST_QUICK_PAGES]),
        }

    def events_close(self) -> None:
        lib.uksm_events_close(self._pool)

    def events_flush(self) -> None:
        lib.uksm_events_flush(self._pool)

    def events_idle(self) -> bool:
        return bool(lib.uksm_events_idle(self._pool))

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self._pool))

    def stats(self) -> Dict[str, int]:
        lib.uksm_pool_stats(self._pool, self._stats)
        return _fields(self._stats, "struct uksm_stats")
