"""The core under abuse: foreign signal handlers, absurd sizes, a view that
outlives pool.free(), a frame store truncated by someone else, and a
process that has used up vm.max_map_count on its own.

Anything that can crash or hang runs in a fresh interpreter with a timeout;
the functions named child_* are what those interpreters run.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import uksm

from conftest import PAGE, run_isolated

HERE = os.path.dirname(os.path.abspath(__file__))
KSM, PRIVATE, SWAPPED = uksm.PageState.KSM, uksm.PageState.PRIVATE, uksm.PageState.SWAPPED


def run_child(fn: str, *args, timeout: float = 60):
    """Run this module's @fn(*args) in a fresh interpreter; a hang fails the
    test.  Returns (returncode, stdout, stderr): the caller judges the exit."""
    code = (
        f"import sys; sys.path.insert(0, {HERE!r}); import test_robust_core as m; m.{fn}(*{args!r})"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{fn}{args} hung for {timeout}s:\n{exc.stdout}\n{exc.stderr}")
    return r.returncode, r.stdout, r.stderr


def merged_pair(pool, npages=4, value=7):
    """An array of @npages equal pages, merged by the scanner."""
    a = pool.asarray(np.full((npages, PAGE), value, np.uint8))
    pool.scan(full_scans=2)
    assert (pool.page_states(a)[0] == KSM).all(), pool.page_states(a)[0]
    return a


# --- A: a SIGSEGV handler installed with signal.signal after uksm's ---------------


def child_python_handler_then_cow(foreign: str):
    import warnings

    warnings.simplefilter("always")
    pool = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0, cow="signal")
    a = merged_pair(pool)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        signal.signal(signal.SIGSEGV, lambda *_: None)
    assert any(
        issubclass(x.category, RuntimeWarning)
        and "uksm" in str(x.message)
        and "SIGSEGV" in str(x.message)
        for x in w
    ), [str(x.message) for x in w]
    # the Python handler is still what Python reports, but ours is on top
    assert signal.getsignal(signal.SIGSEGV) is not signal.SIG_DFL
    assert uksm._core.handler_installed()
    a[1, 0] = 9  # a COW by our handler: would spin for ever
    assert a[1, 0] == 9 and a[0, 0] == 7 and (a[1, 1:] == 7).all()
    assert pool.page_states(a)[0][1] == PRIVATE
    assert pool.stats()["cow_breaks_signal"] >= 1
    print("cow done", flush=True)
    if foreign == "null":
        import ctypes

        ctypes.string_at(0)  # not uksm's: must reach the chain and die
    elif foreign == "protnone":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        p = libc.mmap(None, PAGE, 0, 0x22, -1, 0)  # PROT_NONE, private anon
        assert p not in (None, ctypes.c_void_p(-1).value)
        ctypes.string_at(p, 1)
    print("survived a foreign fault", flush=True)


def test_signal_signal_after_uksm_keeps_cow_working():
    rc, out, err = run_child("child_python_handler_then_cow", "none")
    assert rc == 0, err
    assert "cow done" in out


@pytest.mark.parametrize("foreign", ["null", "protnone"])
def test_signal_signal_foreign_fault_still_reaches_the_chain(foreign):
    rc, out, err = run_child("child_python_handler_then_cow", foreign)
    assert "cow done" in out, err
    assert "survived" not in out
    assert rc == -signal.SIGSEGV, (rc, err)
    assert "uksm:" not in err, err  # not uksm's fault: nothing said for it


def child_signal_bus_handler():
    import warnings

    pool = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        signal.signal(signal.SIGBUS, lambda *_: None)
    assert any("SIGBUS" in str(x.message) for x in w)
    assert uksm._core.handler_installed()
    pool.close()


def test_signal_signal_sigbus_is_put_back_too():
    rc, out, err = run_child("child_signal_bus_handler")
    assert rc == 0, err


# --- C: a view that outlived pool.free() ------------------------------------------


def child_view_after_free(fh: str):
    import faulthandler

    if fh == "faulthandler":
        faulthandler.enable()
    pool = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0)
    lst = [pool.empty((4, PAGE), np.uint8)]
    lst[0][:] = 3
    view = lst[0][1:]
    addr = view.__array_interface__["data"][0]
    pool.free(lst.pop())  # passes the refcount heuristic: a known gap
    # the virtual range is not handed out again while the array object lives
    # (the view holds it): a new buffer must not land under the view
    b = pool.empty((4, PAGE), np.uint8)
    lo = b.__array_interface__["data"][0]
    assert not (lo <= addr < lo + 4 * PAGE), "freed range reused under a live view"
    print(f"addr {addr:#x}", flush=True)
    print(view[0, 0], flush=True)  # use after free
    print("survived", flush=True)


@pytest.mark.parametrize("fh", ["plain", "faulthandler"])
def test_view_after_free_dies_saying_why(fh):
    rc, out, err = run_child("child_view_after_free", fh)
    assert "survived" not in out
    assert rc == -signal.SIGSEGV, (rc, out, err)
    addr = out.split("addr ")[1].split()[0]
    lines = [ln for ln in err.splitlines() if ln.startswith("uksm: SIGSEGV")]
    assert len(lines) == 1, err
    assert (
        "a buffer released by pool.free() while a view of it was still alive, "
        "or memory outside any live buffer" in lines[0]
    )
    assert addr in lines[0], (addr, lines[0])
    if fh == "faulthandler":
        assert "Fatal Python error: Segmentation fault" in err


# --- D: the frame store truncated by someone else ---------------------------------


def child_truncated_store(how: str):
    pool = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0)
    a = merged_pair(pool)
    if how == "self":
        os.ftruncate(pool.fd, 0)
    else:
        # another process, through /proc/<pid>/fd: it needs no inherited fd
        path = f"/proc/{os.getpid()}/fd/{pool.fd}"
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import os; fd = os.open({path!r}, os.O_RDWR); os.ftruncate(fd, 0)",
            ],
            check=True,
        )
    assert os.fstat(pool.fd).st_size == 0
    print("truncated", flush=True)
    print(int(a[1, 0]), flush=True)
    print("survived", flush=True)


@pytest.mark.parametrize("how", ["self", "other"])
def test_truncated_frame_store_dies_saying_why(how):
    rc, out, err = run_child("child_truncated_store", how)
    assert "truncated" in out and "survived" not in out, (out, err)
    assert rc == -signal.SIGBUS, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("uksm: SIGBUS")]
    assert len(lines) == 1, err
    assert "frame store" in lines[0] and "truncated by someone else" in lines[0]


# --- B: absurd sizes and page numbers ---------------------------------------------

ABSURD = [2**62, 2**63 - 1, 2**64 - 1, 2**64 - 200]


def child_absurd_sizes(tmp):
    import errno

    pool = uksm.Pool(
        "64MiB", pages_to_scan=1000, sleep_millisecs=0, max_resident="32MiB", swap_path=tmp
    )
    a = merged_pair(pool)  # frames in use
    n = pool._native
    for x in ABSURD:
        for fn in (
            lambda x=x: pool.empty((x, PAGE), np.uint8),
            lambda: pool.empty((2**64 - 200, 4096), np.uint8),
            lambda x=x: pool.empty(x // PAGE, np.uint8) if x // PAGE < 2**63 else pool.empty(2**50),
            lambda x=x: n.alloc(x),
        ):
            with pytest.raises(MemoryError):
                fn()
        with pytest.raises(ValueError):
            n.buffer(x, PAGE, lambda _c: None)
        with pytest.raises((ValueError, OverflowError)):
            n.buffer(0, x, lambda _c: None)
        with pytest.raises((ValueError, OverflowError)):
            n.buffer(n.va_pages - 1, 2 * PAGE, lambda _c: None)
        # vpn or count such that vpn + count wraps past 2**64 to a small number
        for vpn, cnt in ((x, 4), (1, x), (x, 2**64 - x + 1), (4, 2**64 - 2)):
            if cnt >= 2**64:
                continue
            for call in (n.release, n.va_free, n.memory, n.reconcile, n.swap_in_range, n.unmerge):
                with pytest.raises(OSError) as ei:
                    call(vpn, cnt)
                assert ei.value.errno == errno.EINVAL, (call, vpn, cnt)
            for call in (
                lambda v, c: n.set_locked(v, c, True),
                lambda v, c: n.set_group(v, c, 0),
                lambda v, c: n.set_pinned(v, c, True),
            ):
                with pytest.raises(OSError) as ei:
                    call(vpn, cnt)
                assert ei.value.errno == errno.EINVAL
        if x < 2**63:
            for call in (
                lambda x=x: n.merge(
                    np.array([x], np.int64),
                    np.array([0], np.int64),
                    np.zeros(1, np.uint32),
                    np.zeros(1, np.uint32),
                    256,
                    100,
                ),
                lambda x=x: n.merge_zero(np.array([x], np.int64), 100),
                lambda x=x: n.checksum_range(
                    x, None, np.zeros(4, np.uint64), np.zeros(4, np.uint8), 0
                ),
            ):
                with pytest.raises(OSError) as ei:
                    call()
                assert ei.value.errno == errno.EINVAL
        with pytest.raises((ValueError, OSError, OverflowError)):
            uksm._core.NativePool(x, x, x, "kernel")
    # nothing was mapped, freed or counted by any of it
    assert (a == 7).all()
    assert (pool.page_states(a)[0] == KSM).all()
    b = pool.empty((8, PAGE), np.uint8)
    b[:] = 1
    assert (b == 1).all() and (a == 7).all()
    pool.free(b)
    pool.close()
    print("ok")


def test_absurd_sizes_fail_cleanly(tmp_path):
    assert "ok" in run_isolated("test_robust_core", "child_absurd_sizes", str(tmp_path))


# --- E: the process has used up vm.max_map_count on its own -----------------------


class MapFiller:
    """Use up vm.max_map_count with this process's own mappings: anonymous
    regions whose pages alternate PROT_READ and PROT_READ|PROT_WRITE, each
    page its own VMA, until the kernel says ENOMEM; then give @spare back.
    Counting reads /proc/self/maps into a buffer allocated up front: at the
    limit even Python's own large allocations fail."""

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.libc = libc
        self.buf = bytearray(16 << 20)
        self.split = []
        with open("/proc/sys/vm/max_map_count") as f:
            self.limit = int(f.read())

    def count(self) -> int:
        n = 0
        with open("/proc/self/maps", "rb", buffering=0) as f:
            while True:
                k = f.readinto(self.buf)
                if not k:
                    return n
                n += self.buf.count(b"\n", 0, k)

    def fill(self, spare: int) -> int:
        libc, failed = self.libc, self.ctypes.c_void_p(-1).value
        npg = 1 << 14
        self.split = [0] * (self.limit // 2 + 16)  # no allocation while full
        k = 0
        while True:
            base = libc.mmap(None, npg * PAGE, 1, 0x22, -1, 0)  # PROT_READ
            if base in (None, failed):
                break
            for i in range(1, npg - 1, 2):
                if libc.mprotect(base + i * PAGE, PAGE, 3):
                    break
                self.split[k] = base + i * PAGE
                k += 1
            else:
                continue
            break
        for _ in range(spare):  # each undo turns three VMAs into one
            k -= 1
            assert libc.mprotect(self.split[k], PAGE, 1) == 0
        del self.split[k:]
        return self.limit - self.count()

    def overfill(self) -> None:
        """A split needs map_count < limit, a new mapping only map_count <=
        limit: one more mapping still fits after fill(0).  Take it (and any
        other), so that from now on every mmap fails, merged or not."""
        libc, failed = self.libc, self.ctypes.c_void_p(-1).value
        for _ in range(64):
            p = libc.mmap(None, PAGE, 5, 0x22, -1, 0)  # PROT_READ|PROT_EXEC
            if p in (None, failed):
                return
        raise AssertionError("mmap keeps succeeding past vm.max_map_count")


# chunked_equal's comparisons land here, made at import: with no mapping to
# spare, even a 64 KiB temporary can fail (malloc may need a mapping to find
# room for it, depending on what the heap holds by then)
_EQUAL_SCRATCH = np.empty(16 * PAGE, dtype=bool)


def chunked_equal(a, b, rows=16) -> bool:
    """a == b with no temporary array (no mapping to spare): rows of pages
    at a time, compared into a scratch array made in advance."""
    assert rows * a.shape[-1] <= _EQUAL_SCRATCH.size
    for i in range(0, len(a), rows):
        x, y = a[i : i + rows], b[i : i + rows]
        out = _EQUAL_SCRATCH[: x.size].reshape(x.shape)
        np.equal(x, y, out=out)
        if not out.all():
            return False
    return True


def child_map_count_exhausted(path: str, cow: str, spare: int):
    import tempfile

    tmp = tempfile.mkdtemp()
    pool = uksm.Pool(
        "256MiB",
        pages_to_scan=1000,
        sleep_millisecs=0,
        cow=cow,
        max_resident="16MiB",
        swap_path=tmp,
    )
    ref = (
        np.arange(16 * PAGE, dtype=np.uint8).reshape(16, PAGE)
        ^ np.arange(16, dtype=np.uint8)[:, None]
    )
    rep = np.tile(ref[:8], (8, 1))  # 64 pages, 8 distinct contents
    a = pool.asarray(rep)
    pool.scan(full_scans=2)
    pool.lock(a)  # its views stay views, not swapped
    assert (pool.page_states(a)[0] == KSM).all()
    exp = np.random.default_rng(1).integers(0, 255, (8192, PAGE), dtype=np.uint8)
    big = pool.asarray(exp)  # 32 MiB over a 16 MiB budget
    pool._reclaim()
    assert (pool.page_states(big)[0] == SWAPPED).sum() > 2048
    more = np.random.default_rng(2).integers(0, 255, (2048, PAGE), dtype=np.uint8)
    rep2 = np.tile(ref[8:], (16, 1))
    expect_a = rep.copy()
    for i in range(0, 64, 3):
        expect_a[i, 0] = 255
    expect_big = exp.copy()
    expect_big[::5, 0] = 1
    target = np.empty_like(exp)  # np.copyto's destination, made now
    filler = MapFiller()
    left = filler.fill(spare)
    if not spare:
        filler.overfill()  # from here on no mmap can succeed at all
    print("maps left", left, flush=True)
    if path == "stats":
        pass  # only the figures, below
    elif path == "cow":
        for i in range(0, 64, 3):
            a[i, 0] = 255
        assert chunked_equal(a, expect_a)
        st = pool._native.stats()
        if cow == "signal":
            # the first write faults; with no VMA to split, the run of views
            # is made writable at once and counted, and the kernel COWs the rest
            assert st["cow_signal"] >= 1, st
            if spare == 0:
                assert st["cow_wide"] >= 1, st
    elif path == "swapin":
        assert chunked_equal(big[::7], exp[::7])
        big[::5, 0] = 1
        assert chunked_equal(big, expect_big)
    elif path == "copy":
        b = big.copy()  # numpy's own 32 MiB: one mapping
        assert chunked_equal(b, exp)
    elif path == "copyto":
        np.copyto(target, big)
        assert chunked_equal(target, exp)
        c = pool.empty((8192, PAGE), np.uint8)
        np.copyto(c, big)
        assert chunked_equal(c, exp)
    elif path == "evict":
        c = pool.asarray(more)
        pool._reclaim()
        assert chunked_equal(c, more) and chunked_equal(big, exp)
    elif path == "merge":
        merged = pool._native.stats()["pages_merged"]
        skipped = pool._scanner.merges_skipped_vma
        c = pool.asarray(rep2)
        pool.scan(full_scans=2)
        assert chunked_equal(c, rep2)
        # merged within what is left, or skipped and counted
        assert (
            pool._native.stats()["pages_merged"] > merged
            or pool._scanner.merges_skipped_vma > skipped
        )
        c[::3, 1] = 9
        rep2[::3, 1] = 9
        assert chunked_equal(c, rep2)
    assert chunked_equal(a, expect_a if path == "cow" else rep)
    # the figures need no new mapping either (they used to: ENOMEM)
    full = pool.stats()
    assert full["pages_sharing"] + full["pages_shared"] > 0, full
    st = pool._native.stats()
    print(
        "ok",
        path,
        cow,
        {
            k: st[k]
            for k in ("cow_signal", "cow_wide", "pages_swapped", "swap_errors", "pages_merged")
        },
        flush=True,
    )
    os._exit(0)  # no teardown at the limit: what is checked is above


MAP_PATHS = [
    ("cow", "kernel", 0),
    ("cow", "signal", 0),
    ("swapin", "kernel", 0),
    ("stats", "kernel", 0),
] + [
    (path, cow, 3)
    for path, cow in [
        ("cow", "kernel"),
        ("cow", "signal"),
        ("swapin", "kernel"),
        ("swapin", "signal"),
        ("copy", "kernel"),
        ("copyto", "kernel"),
        ("evict", "kernel"),
        ("merge", "kernel"),
        ("merge", "signal"),
    ]
]


# spare 0: not one mapping left (Python itself then fails to allocate large
# blocks, so only the paths that need no new memory of Python's run there)
@pytest.mark.parametrize("path,cow,spare", MAP_PATHS)
def test_map_count_exhausted(path, cow, spare):
    rc, out, err = run_child("child_map_count_exhausted", path, cow, spare, timeout=120)
    assert rc == 0 and "ok " + path in out, (rc, out[-2000:], err[-4000:])


# --- F: what a swap-in costs in mappings ------------------------------------------


def count_maps() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def child_swapped_copy_maps(tmp: str, into: str):
    import time

    pool = uksm.Pool(
        "256MiB", max_resident="16MiB", swap_path=tmp, pages_to_scan=1000, sleep_millisecs=20
    )
    exp = np.random.default_rng(1).integers(0, 255, (16384, PAGE), dtype=np.uint8)
    a = pool.asarray(exp)  # 64 MiB
    pool._native.reclaim(16384)  # every page of it to swap
    assert (pool.page_states(a)[0] == SWAPPED).all()
    dst = pool.empty(a.shape, a.dtype) if into == "pool" else None
    before = count_maps()
    if into == "pool":
        np.copyto(dst, a)
        b = dst
    else:
        b = a.copy()
    after = count_maps()
    # one swapped buffer read through: its views are read by the kernel's
    # own faults, so at most a small constant (numpy's own allocation)
    assert after - before <= 8, (before, after)
    assert np.array_equal(b, exp) and np.array_equal(a, exp)
    assert count_maps() - before <= 8
    # kswapd (the scanner thread) brings the pool back under its budget
    pool.start()
    deadline = time.monotonic() + 20
    while True:
        st = pool.stats()
        if st["bytes_resident"] <= 16 << 20:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert np.array_equal(b[::97], exp[::97])
    pool.stop()
    print("maps", before, after, "resident", st["bytes_resident"])


@pytest.mark.parametrize("into", ["numpy", "pool"])
def test_swapped_copy_costs_no_mappings(tmp_path, into):
    out = run_isolated("test_robust_core", "child_swapped_copy_maps", str(tmp_path), into)
    assert "maps" in out


# --- the scanner follows vm.max_map_count ------------------------------------------


def child_max_map_count_reread():
    opened = []

    def hook(event, args):
        if event == "open" and args and str(args[0]) == "/proc/sys/vm/max_map_count":
            opened.append(1)

    sys.addaudithook(hook)
    pool = uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0)
    a = pool.asarray(np.full((8, PAGE), 5, np.uint8))
    start = len(opened)
    pool.scan(full_scans=3)
    assert len(opened) - start >= 3, (start, len(opened))
    assert pool.stats()["max_map_count"] > 0
    del a
    pool.close()
    print("ok")


def test_scanner_rereads_max_map_count():
    assert "ok" in run_isolated("test_robust_core", "child_max_map_count_reread")
