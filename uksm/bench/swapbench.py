"""uksm.bench.swapbench - swap benchmarks: uksm's swap area, the raw I/O floor under
it, and the kernel's own swap, measured in the same run.

DOC: Overview

The swap benchmarks, as plain functions that bench/bench_swap.py (pytest)
and suite 5 of uksm.bench.harness (``python -m uksm bench``) both call:

  uksm_swap()   a pool holding N bytes of incompressible data, in three
                rounds: the budget is lowered (``pool.max_resident = B``)
                and timed until bytes_resident is within it (swap-out
                MiB/s: the pages written over that time, with and without
                the fdatasync of the swap file), then raised again; one
                element of each page of a sparse random sample of the
                swapped pages is read, each read timed (the fault latency
                of a swap-in: a swapped page is a private view of its slot,
                and reading it is the kernel's own file page fault, with
                its readahead), then one element of every other swapped
                page in address order (swap-in MiB/s).  A page read stays
                a view of its slot (only a write makes it private again),
                so each round ends by making every page private (pool.lock,
                untimed) for the next to swap out the same amount.  Round
                "cold" drops the fdatasync'ed swap file from the page cache
                first (POSIX_FADV_DONTNEED), so that the reads go to the
                disk as the kernel's swap-in does; round "warm" leaves it
                cached; round "unsynced" never writes it back (its slots
                are only in the page cache when they are read and freed).
                The contents are checked at the end.
  floor()       the same amount written and read with the raw syscalls
                uksm's swap path makes, on the same file system (a file in
                the same directory): pwritev of 256 pages a call
                (csrc/swap.c's IOV_BATCH) then fdatasync; pread of one page
                a call, in order and at the same sparse random pages, cold
                and warm.  A small C helper (csrc/bench/swaphelper.c, built
                with the package as uksm.bench._swaphelper) does it.
  KernelSwap    the kernel's swap, where root allows it: a swap file (dd,
                mkswap, swapon) and a memory cgroup for a child process
                (the same C helper) that touches N bytes; lowering the
                cgroup's memory limit to B is the swap-out (timed, bytes
                from the child's smaps_rollup Swap), raising it and reading
                the swapped pages in order the swap-in (with the kernel's
                swap readahead), single reads of sparse random swapped
                pages the fault latency.  Everything is put back on the
                way out, whatever the way out (an error, Ctrl-C, SIGTERM):
                the child is gone, the cgroup removed, the swap file
                swapoff'ed and deleted, and /proc/swaps and ``swapon
                --show`` are checked to read as before.

The cgroup is a cgroup v2 child of the root (memory.max lowered,
memory.swap.max unlimited, memory.zswap.max 0 so pages go to the swap file)
where /sys/fs/cgroup/cgroup.controllers lists memory.  On a cgroup v1
machine (the memory controller on /sys/fs/cgroup/memory), with
CGROUP_V1_FALLBACK set, it is a child of this process's own memory cgroup
(memory.limit_in_bytes, memsw unlimited): the same measurement through the
older interface, and the child stays inside this process's accounting.

Budgets and limits are the same for both sides: B = N / 4 by default.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Set, Tuple, TypedDict, Union

import numpy as np
from numpy.typing import ArrayLike

from .. import _core
from ..pool import Pool
from . import kernelksm

PAGE = _core.PAGE_SIZE
MiB = 1 << 20
IOV_BATCH = 256  # csrc/swap.c: pages per pwritev
DEFAULT_SAMPLES = 2000  # latency samples per measurement
SWAP_DIR = "/var/tmp"  # where the kernel's swap file goes
NAME = "uksm-swapbench"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
# Measure the kernel's swap through cgroup v1's memory controller when the
# machine has no cgroup v2 memory controller (see the module's docstring).
CGROUP_V1_FALLBACK = True
LOCK_PATH = os.path.join(
    "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir(), NAME + ".lock"
)

# -- helpers ----------------------------------------------------------------------------


def percentiles(seconds: ArrayLike, overhead: float = 0.0) -> Dict[str, Any]:
    """p50, p99, mean and max in microseconds of latencies given in seconds,
    less a per-sample @overhead (seconds, clamped at zero)."""
    a = np.asarray(seconds, dtype=float)
    if a.size == 0:
        return {"n": 0, "p50_us": None, "p99_us": None, "mean_us": None, "max_us": None}
    a = np.maximum(a - overhead, 0.0) * 1e6
    return {
        "n": int(a.size),
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
        "max_us": float(a.max()),
    }


def mib_s(nbytes: float, seconds: Optional[float]) -> Optional[float]:
    if seconds is None or seconds <= 0:
        return None
    return nbytes / MiB / seconds


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def swap_dir(directory: Optional[str] = None) -> str:
    """The directory uksm's swap file (and the floor's file) goes in: the
    pool's default, the temp directory, unless told."""
    return directory or tempfile.gettempdir()


def settle() -> None:
    """sync(2) before a measurement: what the one before left dirty (or
    freed: the file system discards freed blocks at commit) is not written
    on this one's time."""
    os.sync()


# -- the floor ---------------------------------------------------------------------------


def _lib() -> Any:
    """The C half (csrc/bench/swaphelper.c), built with the package."""
    from ._swaphelper import ffi, lib

    return ffi, lib


def floor(
    nbytes: int, directory: Optional[str] = None, samples: int = DEFAULT_SAMPLES, seed: int = 1
) -> Dict[str, Any]:
    """The raw I/O floor of uksm's swap path for @nbytes on @directory's file
    system, in this run: a nameless file of @nbytes written with pwritev
    (256 pages a call), fsync'ed, dropped from the page cache with
    POSIX_FADV_DONTNEED, then read back with plain pread, 1 MiB a call, in
    order (the disk's sequential read: MiB/s); random 4 KiB preads over the
    whole file, cold (dropped again first) and warm (us/page); the punch of
    one written-back slot.  All timed in C."""
    ffi, lib = _lib()
    directory = swap_dir(directory)
    pages = max(nbytes // PAGE, 1)
    m = min(samples, pages)
    out = np.zeros(lib.SWAPBENCH_NOUT)
    cold, warm, punch = np.zeros(m), np.zeros(m), np.zeros(m)
    got = ffi.new("size_t *")
    what = ffi.new("const char **")
    rc = lib.swapbench_floor(
        directory.encode(),
        pages,
        m,
        seed,
        ffi.from_buffer("double[]", out),
        ffi.from_buffer("double[]", cold),
        ffi.from_buffer("double[]", warm),
        ffi.from_buffer("double[]", punch),
        got,
        what,
    )
    if rc:
        name = ffi.string(what[0]).decode()
        raise OSError(-rc, f"swap floor: {name} in {directory}: {os.strerror(-rc)}")
    k = int(got[0])
    size = pages * PAGE
    write_s, sync_s = float(out[lib.SWAPBENCH_WRITE_S]), float(out[lib.SWAPBENCH_SYNC_S])
    pc, pw, pp = percentiles(cold[:k]), percentiles(warm[:k]), percentiles(punch[:k])
    return {
        "bytes": size,
        "pages": pages,
        "directory": directory,
        "tool": "C (csrc/bench/swaphelper.c): pwritev 256 pages a call, fsync, "
        "POSIX_FADV_DONTNEED, pread 1 MiB a call; pread 4 KiB at random pages",
        "write_s": write_s,
        "sync_s": sync_s,
        "write_cached_mib_s": mib_s(size, write_s),
        "write_mib_s": mib_s(size, write_s + sync_s),
        "read_seq_cold_mib_s": mib_s(size, float(out[lib.SWAPBENCH_READ_SEQ_COLD_S])),
        "read_seq_warm_mib_s": mib_s(size, float(out[lib.SWAPBENCH_READ_SEQ_WARM_S])),
        "rand_cold_us": per_page_us(float(out[lib.SWAPBENCH_RAND_COLD_S]), k),
        "rand_warm_us": per_page_us(float(out[lib.SWAPBENCH_RAND_WARM_S]), k),
        "pread_cold_p50_us": pc["p50_us"],
        "pread_cold_p99_us": pc["p99_us"],
        "pread_warm_p50_us": pw["p50_us"],
        "punch_p50_us": pp["p50_us"],
        "punch_p99_us": pp["p99_us"],
        "latency_samples": k,
    }


def per_page_us(seconds: float, pages: int) -> Optional[float]:
    return seconds / pages * 1e6 if pages else None


def read_seq(arr: np.ndarray) -> float:
    """Seconds to read every word of @arr in address order, in C."""
    ffi, lib = _lib()
    secs = ffi.new("double *")
    lib.swapbench_read_seq(ffi.cast("void *", arr.ctypes.data), arr.nbytes, secs)
    return float(secs[0])


def read_pages(arr: np.ndarray, pages: np.ndarray) -> float:
    """Seconds to read one word of each page of @arr listed in @pages, in
    that order, in C."""
    ffi, lib = _lib()
    secs = ffi.new("double *")
    idx = np.ascontiguousarray(pages, dtype=np.int64)
    lib.swapbench_read_pages(
        ffi.cast("void *", arr.ctypes.data), ffi.from_buffer("int64_t[]", idx), idx.size, secs
    )
    return float(secs[0])


# -- uksm -------------------------------------------------------------------------------


def _new_fds(before: Set[int]) -> List[int]:
    try:
        now_fds = {int(x) for x in os.listdir("/proc/self/fd")}
    except OSError:
        return []
    return sorted(now_fds - before)


def _find_swap_fd(before: Set[int], directory: str) -> Optional[int]:
    """The pool's swap file among the descriptors it opened: a regular file
    with no name left (O_TMPFILE or unlinked) on @directory's file system.
    (The memfd is on another file system; the directory's fd is O_PATH.)"""
    dev = os.stat(directory).st_dev
    for fd in _new_fds(before):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == dev and st.st_nlink == 0 and (st.st_mode & 0o170000) == 0o100000:
            return fd
    return None


def _swapped(pool: Pool, arr: np.ndarray) -> np.ndarray:
    state, _, _ = pool.page_states(arr)
    return np.flatnonzero(state == _core.PTE_SWAPPED)


def _lower(pool: Pool, budget: int, swap_fd: Optional[int], timeout: float) -> Dict[str, Any]:
    """Lower the budget to @budget bytes and time it until bytes_resident
    (private pages, frames and the swap file's cached pages, as the kernel
    counts them) is within it and pages_swapped is what that asks for; then
    fdatasync the swap file (timed: the swap-out is done when it is on the
    disk, as the kernel's is when its writeback completes).  Every page is
    private when this starts: all but the budget's worth are written out."""
    st = pool.stats()
    before_swapped = st["pages_swapped"]
    private = st["bytes_private"] // PAGE
    budget_pages = -(-budget // PAGE)
    expected = before_swapped + max(private - budget_pages, 0)
    outs0 = st["swap_outs"]
    t0 = time.perf_counter()
    pool.max_resident = budget

    def done(st: Dict[str, Any]) -> bool:
        return bool(st["bytes_resident"] <= budget and st["pages_swapped"] >= expected)

    st = pool.stats()
    while not done(st) and time.perf_counter() - t0 < timeout:
        time.sleep(0.0005)
        st = pool.stats()
    t_reached = time.perf_counter() - t0 if done(st) else None
    t_sync = None
    if swap_fd is not None:
        t1 = time.perf_counter()
        os.fdatasync(swap_fd)
        t_sync = time.perf_counter() - t1
    return {
        "expected": expected - before_swapped,
        "pages_swapped": st["pages_swapped"] - before_swapped,
        "pages_written": st["swap_outs"] - outs0,
        "reached_s": t_reached,
        "sync_s": t_sync,
        "reached": t_reached is not None,
        "bytes_resident_after": st["bytes_resident"],
        "swap_errors": st["swap_errors"],
    }


def _drop_cache(swap_fd: Optional[int]) -> bool:
    """Written back: drop the swap file from the page cache (what is still
    mapped stays, and bytes_swap_cached says how much)."""
    if swap_fd is None:
        return False
    os.posix_fadvise(swap_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def uksm_swap(
    nbytes: int,
    budget: Optional[int] = None,
    directory: Optional[str] = None,
    swap_batch: str = "2MiB",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 1,
    timeout: float = 120.0,
) -> Dict[str, Any]:
    """uksm's swap on an array of @nbytes of incompressible data, through
    the public API only: Pool(max_resident=, swap_path=), the budget
    lowered to @budget (default nbytes / 8) and raised again, the array read.

    Two rounds, each from every page private: lower the budget (swap-out,
    timed with the swap file's fdatasync), raise it, drop the swap file from
    the page cache, then read.  Round "seq" reads every word of the whole
    array in order (MiB/s over the array); round "rand" reads one word of
    each of @samples random swapped pages (us/page).  Both reads are C
    loops (read_seq, read_pages), as the floor's and the kernel side's are.
    Between rounds every page is made private again (pool.lock and unlock,
    untimed): a page read stays a view of its slot, and the next round must
    write the same pages.  The same sequential read of the resident array
    is the memory's own speed, for reference."""
    directory = swap_dir(directory)
    pages = max(nbytes // PAGE, 8)
    size = pages * PAGE
    if budget is None:
        budget = size // 8
    budget = max(PAGE, budget - budget % PAGE)
    capacity = size + 16 * MiB
    fds_before = {int(x) for x in os.listdir("/proc/self/fd")}
    pool = Pool(
        capacity,
        max_resident=capacity,
        swap_path=directory,
        swap_batch=swap_batch,
        compact_threshold=0,
    )
    arr: Optional[np.ndarray] = None
    try:
        swap_fd = _find_swap_fd(fds_before, directory)
        arr = pool.empty(size, np.uint8)
        shadow = np.frombuffer(np.random.default_rng(seed).bytes(size), dtype=np.uint8)
        arr[:] = shadow
        rng = np.random.default_rng(seed + 1)
        rounds: Dict[str, Dict[str, Any]] = {}
        for name in ("seq", "rand"):
            out = _lower(pool, budget, swap_fd, timeout)
            if not out["reached"]:
                raise RuntimeError(
                    f"uksm: pages_swapped did not reach {out['expected']} within "
                    f"{timeout} s after max_resident = {budget}: {out}"
                )
            pool.max_resident = capacity  # no eviction while reading
            dropped = _drop_cache(swap_fd)
            idx = _swapped(pool, arr)
            cached = pool.stats()["bytes_swap_cached"]
            if name == "seq":
                secs = read_seq(arr)
                res = {"read_s": secs, "read_mib_s": mib_s(size, secs)}
            else:
                pick = idx.copy()
                rng.shuffle(pick)
                pick = pick[:samples]
                secs = read_pages(arr, pick)
                res = {
                    "read_s": secs,
                    "read_pages": int(pick.size),
                    "us_per_page": per_page_us(secs, int(pick.size)),
                }
            pool.lock(arr)
            pool.unlock(arr)
            _drop_cache(swap_fd)  # the freed slots' cached pages
            rounds[name] = dict(
                out,
                **res,
                dropped=dropped,
                swapped=int(idx.size),
                swap_cached_before_read=cached,
                still_swapped=int(_swapped(pool, arr).size),
            )
        resident_s = min(read_seq(arr) for _ in range(3))
        contents_ok = bool(np.array_equal(arr, shadow))
        st = pool.stats()
    finally:
        arr = None  # the pool's buffers go before the pool
        pool.close()
    outs = [
        mib_s(r["pages_swapped"] * PAGE, r["reached_s"] + (r["sync_s"] or 0.0))
        for r in rounds.values()
    ]
    outs_ok = [v for v in outs if v is not None]
    return {
        "bytes": size,
        "budget": budget,
        "directory": directory,
        "swap_batch": swap_batch,
        "swap_fd_found": swap_fd is not None,
        "rounds": rounds,
        "swap_out_mib_s": float(np.median(outs_ok)) if outs_ok else None,
        "seq_read_mib_s": rounds["seq"]["read_mib_s"],
        "rand_read_us": rounds["rand"]["us_per_page"],
        "resident_read_mib_s": mib_s(size, resident_s),
        "swapped_fraction": rounds["seq"]["swapped"] / pages,
        "contents_ok": contents_ok,
        "swap_errors": st["swap_errors"],
        "swap_file_bytes": st["swap_file_bytes"],
    }


# -- the kernel's swap ---------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _tool(name: str) -> Optional[str]:
    return shutil.which(name) or next(
        (p for p in (f"/sbin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def cgroup_mode() -> Optional[str]:
    """ "v2" with a cgroup v2 memory controller at /sys/fs/cgroup, "v1" with
    cgroup v1's memory controller (and CGROUP_V1_FALLBACK), else None."""
    controllers = _read(os.path.join(CGROUP_ROOT, "cgroup.controllers"))
    if controllers is not None and "memory" in controllers.split():
        return "v2"
    if CGROUP_V1_FALLBACK and _v1_parent() is not None:
        return "v1"
    return None


def _v1_parent() -> Optional[str]:
    """This process's own cgroup v1 memory cgroup directory, if writable."""
    text = _read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            path = os.path.join(CGROUP_V1_MEMORY, parts[2].lstrip("/"))
            if os.path.isfile(os.path.join(path, "memory.limit_in_bytes")) and os.access(
                path, os.W_OK
            ):
                return path.rstrip("/")
    return None


def kernel_unavailable_reason(directory: str = SWAP_DIR) -> Optional[str]:
    """Why the kernel's swap cannot be measured here, or None."""
    if os.geteuid() != 0:
        return "the kernel's swap needs root (swapon and a memory cgroup)"
    if _read("/proc/swaps") is None:
        return "this kernel has no swap (no /proc/swaps)"
    for tool in ("dd", "mkswap", "swapon", "swapoff"):
        if _tool(tool) is None:
            return f"{tool} not found"
    if cgroup_mode() is None:
        return "no memory cgroup: /sys/fs/cgroup/cgroup.controllers lists no memory controller" + (
            "" if CGROUP_V1_FALLBACK else " (cgroup v1 not used)"
        )
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return f"{directory} is not a writable directory"
    return None


def swap_state() -> Dict[str, str]:
    """/proc/swaps and ``swapon --show``, to compare before and after."""
    show = subprocess.run([_tool("swapon") or "swapon", "--show"], capture_output=True, text=True)
    return {"proc_swaps": _read("/proc/swaps") or "", "swapon_show": show.stdout}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(directory: str = SWAP_DIR) -> List[str]:
    """Undo what a run killed before it could restore left behind (its pid
    is in the names): swap files still on, swap files, cgroups."""
    done = []
    pat = re.compile(re.escape(NAME) + r"-(\d+)(\.swap)?$")
    for line in (_read("/proc/swaps") or "").splitlines()[1:]:
        path = line.split()[0] if line.split() else ""
        m = pat.search(os.path.basename(path))
        if m and not _alive(int(m.group(1))):
            if (
                subprocess.run(
                    [_tool("swapoff") or "swapoff", path], capture_output=True
                ).returncode
                == 0
            ):
                done.append(f"swapoff {path}")
    parents = [directory, CGROUP_ROOT]
    v1 = _v1_parent()
    if v1:
        parents.append(v1)
    for parent in parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            m = pat.match(name)
            if not m or _alive(int(m.group(1))):
                continue
            path = os.path.join(parent, name)
            try:
                if os.path.isdir(path):
                    os.rmdir(path)
                elif os.path.isfile(path) and path.endswith(".swap"):
                    if path not in (_read("/proc/swaps") or ""):
                        os.unlink(path)
                    else:
                        continue
                else:
                    continue
                done.append(f"removed {path}")
            except OSError:
                pass
    return done


class _Child:
    """The kernel side's workload: a forked child running swapbench_child()
    (csrc/bench/swaphelper.c), driven over two pipes.  Forked, not exec'd:
    the pages it touches are its own mapping's, charged to the cgroup it is
    moved into, and no interpreter of its own runs in that cgroup."""

    def __init__(self, pages: int, seed: int, timeout: float) -> None:
        _, lib = _lib()
        self.timeout = timeout
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: C only, never back into Python's loop
            code = 2
            try:
                os.close(self._w)
                os.close(self._r)
                code = lib.swapbench_child(to_child, from_child, pages, seed)
            finally:
                os._exit(code)
        os.close(to_child)
        os.close(from_child)
        self.pid = pid
        self._buf = b""
        try:
            line = self._line()
            if not line.startswith("ready"):
                raise RuntimeError(f"swap child did not start: {line!r}")
        except BaseException:
            self.close()
            raise

    def _line(self) -> str:
        while b"\n" not in self._buf:
            r, _, _ = select.select([self._r], [], [], self.timeout)
            if not r:
                raise TimeoutError(f"swap child silent for {self.timeout} s")
            chunk = os.read(self._r, 4096)
            if not chunk:
                raise RuntimeError("swap child exited (killed by the OOM killer?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().strip()

    def cmd(self, text: str) -> List[str]:
        os.write(self._w, (text + "\n").encode())
        line = self._line()
        if not line.startswith("ok"):
            raise RuntimeError(f"swap child: {text!r} -> {line!r}")
        return line.split()[1:]

    def swap_bytes(self) -> int:
        """Bytes of this process in swap (smaps_rollup: exact, page walk)."""
        for line in (_read(f"/proc/{self.pid}/smaps_rollup") or "").splitlines():
            if line.startswith("Swap:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no Swap: line in smaps_rollup")

    def close(self) -> None:
        if self.pid:
            try:
                os.write(self._w, b"quit\n")
            except OSError:
                pass
            deadline = time.monotonic() + 10
            while True:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if not done:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self.pid = 0
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass


class KernelSwap:
    """The kernel's own swap for the length of a with-block:

        with KernelSwap(nbytes) as ks:
            figures = ks.measure(nbytes)

    On entry: an exclusive lock (LOCK_PATH; one such run at a time), a swap
    file of @swapfile_bytes (default max(64 MiB, 2 x nbytes)) in @directory
    made with dd and mkswap and swapon'ed at the highest priority, and a
    memory cgroup (see cgroup_mode()).  On exit, however it comes (an error,
    KeyboardInterrupt, SIGTERM turned into SystemExit): the child killed,
    the cgroup removed, swapoff, the swap file deleted, the root cgroup's
    subtree_control put back if it was changed, and /proc/swaps and
    ``swapon --show`` compared with what they were (``self.restored``)."""

    def __init__(
        self,
        nbytes: int,
        directory: str = SWAP_DIR,
        swapfile_bytes: Optional[int] = None,
        timeout: float = 300.0,
    ) -> None:
        self.directory = directory
        want = max(64 * MiB, 2 * nbytes)
        self.swapfile_bytes = -(-(swapfile_bytes or want) // MiB) * MiB
        self.timeout = timeout
        self.mode = cgroup_mode()
        self.swapfile = os.path.join(directory, f"{NAME}-{os.getpid()}.swap")
        self.cgroup: Optional[str] = None
        self.before: Dict[str, str] = {}
        self.after: Dict[str, str] = {}
        self.restored: Dict[str, Any] = {}
        self.stale_cleaned: List[str] = []
        self.setup_s = 0.0
        self._lock_fd: Optional[int] = None
        self._subtree_added = False
        self._swapon = False
        self._old_sigterm: kernelksm.SigHandler = None
        self._child: Optional[_Child] = None

    # -- setup and restore ---------------------------------------------------------

    def __enter__(self) -> "KernelSwap":
        reason = kernel_unavailable_reason(self.directory)
        if reason:
            raise RuntimeError(f"the kernel's swap cannot be measured here: {reason}")
        self._catch_sigterm()
        try:
            self._lock()
            self.stale_cleaned = cleanup_stale(self.directory)
            self.before = swap_state()
            t = time.perf_counter()
            self._make_swapfile()
            self._make_cgroup()
            self.setup_s = time.perf_counter() - t
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _catch_sigterm(self) -> None:
        self._old_sigterm = kernelksm.catch_sigterm()

    def _lock(self) -> None:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another process holds {LOCK_PATH}") from None
                time.sleep(0.1)
        self._lock_fd = fd

    def _make_swapfile(self) -> None:
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        if free < self.swapfile_bytes + 256 * MiB:
            raise RuntimeError(
                f"{self.directory}: {free // MiB} MiB free, the swap file "
                f"needs {self.swapfile_bytes // MiB} MiB and a margin"
            )
        # created 0600 before a byte is written: swap holds other memory
        fd = os.open(self.swapfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        subprocess.run(
            [
                _tool("dd") or "dd",
                "if=/dev/zero",
                f"of={self.swapfile}",
                "bs=1M",
                f"count={self.swapfile_bytes // MiB}",
                "conv=notrunc,fsync",
                "status=none",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [_tool("mkswap") or "mkswap", self.swapfile], check=True, capture_output=True
        )
        proc = subprocess.run(
            [_tool("swapon") or "swapon", "-p", "32767", self.swapfile],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(f"swapon {self.swapfile} failed: {proc.stderr.strip()}")
        self._swapon = True

    def _make_cgroup(self) -> None:
        name = f"{NAME}-{os.getpid()}"
        if self.mode == "v2":
            sub = os.path.join(CGROUP_ROOT, "cgroup.subtree_control")
            if "memory" not in (_read(sub) or "").split():
                _write(sub, "+memory")
                self._subtree_added = True
            self.cgroup = cgroup = os.path.join(CGROUP_ROOT, name)
            os.mkdir(cgroup)
            self._limit("max")
            _write(os.path.join(cgroup, "memory.swap.max"), "max")
            if os.path.exists(os.path.join(cgroup, "memory.zswap.max")):
                _write(os.path.join(cgroup, "memory.zswap.max"), "0")
        else:
            parent = _v1_parent()
            if parent is None:
                raise RuntimeError("no writable cgroup v1 memory cgroup of this process")
            self.cgroup = cgroup = os.path.join(parent, name)
            os.mkdir(cgroup)
            self._limit("max")
            if (_read(os.path.join(cgroup, "memory.swappiness")) or "").strip() == "0":
                _write(os.path.join(cgroup, "memory.swappiness"), "60")

    def _cgroup_file(self, name: str) -> str:
        if self.cgroup is None:
            raise RuntimeError("KernelSwap: no memory cgroup outside its with-block")
        return os.path.join(self.cgroup, name)

    def _limit(self, value: Union[int, str]) -> None:
        """memory.max (v2) or memory.limit_in_bytes (v1): bytes, or "max"."""
        if self.mode == "v2":
            _write(self._cgroup_file("memory.max"), value)
        else:
            _write(self._cgroup_file("memory.limit_in_bytes"), -1 if value == "max" else value)

    def _usage(self) -> int:
        f = "memory.current" if self.mode == "v2" else "memory.usage_in_bytes"
        return int(_read(self._cgroup_file(f)) or 0)

    def _restore(self) -> None:
        from .kernelksm import _HoldSignals

        errors = []
        with _HoldSignals() as held:
            if self._child is not None:
                self._child.close()
                self._child = None
            if self.cgroup and os.path.isdir(self.cgroup):
                for _ in range(100):
                    try:
                        os.rmdir(self.cgroup)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EBUSY, errno.EAGAIN):
                            errors.append(f"rmdir {self.cgroup}: {e}")
                            break
                        time.sleep(0.05)
                else:
                    errors.append(f"rmdir {self.cgroup}: still busy")
            if self._subtree_added:
                try:
                    _write(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "-memory")
                    self._subtree_added = False
                except OSError as e:
                    errors.append(f"cgroup.subtree_control -memory: {e}")
            if self._swapon or self.swapfile in (_read("/proc/swaps") or ""):
                proc = subprocess.run(
                    [_tool("swapoff") or "swapoff", self.swapfile], capture_output=True, text=True
                )
                if proc.returncode:
                    errors.append(f"swapoff {self.swapfile}: {proc.stderr.strip()}")
                else:
                    self._swapon = False
            if os.path.exists(self.swapfile) and not self._swapon:
                try:
                    os.unlink(self.swapfile)
                except OSError as e:
                    errors.append(f"rm {self.swapfile}: {e}")
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
            kernelksm.release_sigterm(self._old_sigterm)
            self._old_sigterm = None
            self.after = swap_state() if self.before else {}
            self.restored = {
                "proc_swaps_as_before": self.after.get("proc_swaps")
                == self.before.get("proc_swaps"),
                "swapon_show_as_before": self.after.get("swapon_show")
                == self.before.get("swapon_show"),
                "swapfile_removed": not os.path.exists(self.swapfile),
                "cgroup_removed": not (self.cgroup and os.path.isdir(self.cgroup)),
                "errors": errors,
            }
            self.restored["ok"] = not errors and all(
                v for k, v in self.restored.items() if k not in ("errors",)
            )
        held.replay()

    # -- the measurement ----------------------------------------------------------------

    def _lower(self, child: _Child, limit: int) -> Dict[str, Any]:
        """Lower the limit to @limit, timed until the write returns (the
        kernel reclaims synchronously); v1 answers EBUSY when a reclaim pass
        makes no progress: retried until the usage is under the limit."""
        s0 = child.swap_bytes()
        t0 = time.perf_counter()
        busy = 0
        while True:
            try:
                self._limit(limit)
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.perf_counter() - t0 > self.timeout:
                    raise
                busy += 1
        dt = time.perf_counter() - t0
        s1 = child.swap_bytes()
        return {
            "seconds": dt,
            "bytes": s1 - s0,
            "ebusy_retries": busy,
            "usage_after": self._usage(),
            "mib_s": mib_s(s1 - s0, dt),
        }

    def measure(
        self,
        nbytes: int,
        budget: Optional[int] = None,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 1,
    ) -> Dict[str, Any]:
        """uksm_swap()'s measurement for a child touching @nbytes under a
        limit of @budget (default nbytes / 8), in this block's swap file
        and cgroup: two rounds, each lowering the limit (swap-out, timed
        until the write returns: the kernel reclaims synchronously) and
        raising it again; round "seq" then reads every word of the area in
        order (the kernel's swap readahead at work), round "rand" one word
        of each of @samples random swapped pages; each round ends with
        every page dirtied, so the next must write it again."""
        if self.cgroup is None:
            raise RuntimeError("KernelSwap.measure() outside its with-block")
        pages = max(nbytes // PAGE, 8)
        size = pages * PAGE
        if budget is None:
            budget = size // 8
        self._child = child = _Child(pages, seed, self.timeout)
        rounds: Dict[str, Dict[str, Any]] = {}
        try:
            _write(os.path.join(self.cgroup, "cgroup.procs"), child.pid)
            self._limit("max")
            fill_s = float(child.cmd("fill")[0])
            for name in ("seq", "rand"):
                out = self._lower(child, budget)
                self._limit("max")
                if name == "seq":
                    secs, k, majflt = child.cmd("read")
                    res = {"read_s": float(secs), "read_mib_s": mib_s(size, float(secs))}
                else:
                    secs, k, majflt = child.cmd(f"rand {samples}")
                    res = {
                        "read_s": float(secs),
                        "read_pages": int(k),
                        "us_per_page": per_page_us(float(secs), int(k)),
                    }
                child.cmd("dirty")
                rounds[name] = dict(
                    out,
                    **res,
                    swapped=out["bytes"] // PAGE,
                    not_resident=int(k),
                    major_faults=int(majflt),
                )
        finally:
            child.close()
            self._child = None
            try:
                self._limit("max")
            except OSError:
                pass
        outs = [r["mib_s"] for r in rounds.values() if r["mib_s"] is not None]
        return {
            "bytes": size,
            "budget": budget,
            "cgroup": self.mode,
            "fill_s": fill_s,
            "swapfile_bytes": self.swapfile_bytes,
            "rounds": rounds,
            "swap_out_mib_s": float(np.median(outs)) if outs else None,
            "seq_read_mib_s": rounds["seq"]["read_mib_s"],
            "rand_read_us": rounds["rand"]["us_per_page"],
        }


# -- the figures side by side -----------------------------------------------------------------

# (key, label, uksm key, floor key, kernel key, unit, better)
ROWS: List[Tuple[str, str, str, str, Optional[str], str, str]] = [
    (
        "swap_out",
        "swap-out to the budget, + fdatasync",
        "swap_out_mib_s",
        "write_mib_s",
        "swap_out_mib_s",
        "MiB/s",
        "higher",
    ),
    (
        "seq_read",
        "sequential read of the swapped array, cold",
        "seq_read_mib_s",
        "read_seq_cold_mib_s",
        "seq_read_mib_s",
        "MiB/s",
        "higher",
    ),
    (
        "rand_read",
        "random 4 KiB reads of the swapped array, cold",
        "rand_read_us",
        "rand_cold_us",
        "rand_read_us",
        "us/page",
        "lower",
    ),
]

# The floor's own figures: (key, label, floor key, unit)
FLOOR_ROWS: List[Tuple[str, str, str, str]] = [
    ("write", "floor: pwritev 256 x 4 KiB a call, + fsync", "write_mib_s", "MiB/s"),
    (
        "read_seq_cold",
        "floor: pread 1 MiB a call, sequential, cold",
        "read_seq_cold_mib_s",
        "MiB/s",
    ),
    ("rand_cold", "floor: pread 4 KiB at random pages, cold", "rand_cold_us", "us/page"),
    ("rand_warm", "floor: pread 4 KiB at random pages, cached", "rand_warm_us", "us/page"),
    ("punch_p50", "floor: punch one written-back 4 KiB slot, p50", "punch_p50_us", "us"),
]


class CompareRow(TypedDict):
    """One metric of compare(): the three figures side by side and their
    ratios (None where either figure is missing)."""

    key: str
    label: str
    unit: str
    better: str
    uksm: Optional[float]
    floor: Optional[float]
    kernel: Optional[float]
    uksm_floor: Optional[float]
    uksm_kernel: Optional[float]
    kernel_floor: Optional[float]


def compare(
    uksm: Optional[Dict[str, Any]],
    floor_: Optional[Dict[str, Any]],
    kernel: Optional[Dict[str, Any]],
) -> List[CompareRow]:
    """One dict a row: the three figures and the ratios uksm/floor,
    uksm/kernel (and kernel/floor)."""
    out: List[CompareRow] = []
    for key, label, uk, fk, kk, unit, better in ROWS:
        u = uksm.get(uk) if uksm else None
        f = floor_.get(fk) if floor_ else None
        k = kernel.get(kk) if (kernel and kk) else None
        out.append(
            {
                "key": key,
                "label": label,
                "unit": unit,
                "better": better,
                "uksm": u,
                "floor": f,
                "kernel": k,
                "uksm_floor": ratio(u, f),
                "uksm_kernel": ratio(u, k),
                "kernel_floor": ratio(k, f),
            }
        )
    return out


def _num(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table(rows: List[CompareRow]) -> str:
    """The rows of compare() as aligned text."""
    head = [
        "metric",
        "unit",
        "uksm",
        "floor",
        "kernel",
        "uksm/floor",
        "uksm/kernel",
        "kernel/floor",
    ]
    body = [
        [
            r["label"],
            r["unit"],
            _num(r["uksm"]),
            _num(r["floor"]),
            _num(r["kernel"]),
            _num(r["uksm_floor"]),
            _num(r["uksm_kernel"]),
            _num(r["kernel_floor"]),
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = []
    for j, x in enumerate([head] + body):
        lines.append(
            "  ".join(
                c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(x)
            ).rstrip()
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
