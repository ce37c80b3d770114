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
KSM, PRIVATE, SWAPPED = 2, 1, 4


def run_child(fn: str, *args, timeout: float = 60):
    """Run this module's @fn(*args) in a fresh interpreter; a hang fails the
    test.  Returns (returncode, stdout, stderr): the caller judges the exit."""
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import test_robust_core as m; "
            f"m.{fn}(*{args!r})")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout)
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
    seen = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        signal.signal(signal.SIGSEGV, lambda *_: seen.append(1))
    assert any(issubclass(x.category, RuntimeWarning) and "uksm" in str(x.message)
               and "SIGSEGV" in str(x.message) for x in w), [str(x.message) for x in w]
    # the Python handler is still what Python reports, but ours is on top
    assert signal.getsignal(signal.SIGSEGV) is not signal.SIG_DFL
    assert uksm._core.handler_installed()
    a[1, 0] = 9                     # a COW by our handler: would spin for ever
    assert a[1, 0] == 9 and a[0, 0] == 7 and (a[1, 1:] == 7).all()
    assert pool.page_states(a)[0][1] == PRIVATE
    assert pool.stats()["cow_breaks_signal"] >= 1
    print("cow done", flush=True)
    if foreign == "null":
        import ctypes
        ctypes.string_at(0)         # not uksm's: must reach the chain and die
    elif foreign == "protnone":
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
        p = libc.mmap(None, PAGE, 0, 0x22, -1, 0)       # PROT_NONE, private anon
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
    pool.free(lst.pop())            # passes the refcount heuristic: a known gap
    # the virtual range is not handed out again while the array object lives
    # (the view holds it): a new buffer must not land under the view
    b = pool.empty((4, PAGE), np.uint8)
    lo = b.__array_interface__["data"][0]
    assert not (lo <= addr < lo + 4 * PAGE), "freed range reused under a live view"
    print(f"addr {addr:#x}", flush=True)
    print(view[0, 0], flush=True)   # use after free
    print("survived", flush=True)


@pytest.mark.parametrize("fh", ["plain", "faulthandler"])
def test_view_after_free_dies_saying_why(fh):
    rc, out, err = run_child("child_view_after_free", fh)
    assert "survived" not in out
    assert rc == -signal.SIGSEGV, (rc, out, err)
    addr = out.split("addr ")[1].split()[0]
    lines = [ln for ln in err.splitlines() if ln.startswith("uksm: SIGSEGV")]
    assert len(lines) == 1, err
    assert "a buffer released by pool.free() while a view of it was still alive, " \
           "or memory outside any live buffer" in lines[0]
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
        subprocess.run([sys.executable, "-c",
                        f"import os; fd = os.open({path!r}, os.O_RDWR); os.ftruncate(fd, 0)"],
                       check=True)
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
    pool = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0,
                     max_resident="32MiB", swap_path=tmp)
    a = merged_pair(pool)           # frames in use
    n = pool._native
    for x in ABSURD:
        for fn in (lambda: pool.empty((x, PAGE), np.uint8),
                   lambda: pool.empty((2**64 - 200, 4096), np.uint8),
                   lambda: pool.empty(x // PAGE, np.uint8) if x // PAGE < 2**63 else
                   pool.empty(2**50),
                   lambda: n.alloc(x)):
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
            for call in (n.release, n.va_free, n.memory, n.reconcile, n.swap_in_range,
                         n.unmerge):
                with pytest.raises(OSError) as ei:
                    call(vpn, cnt)
                assert ei.value.errno == errno.EINVAL, (call, vpn, cnt)
            for call in (lambda v, c: n.set_locked(v, c, True),
                         lambda v, c: n.set_group(v, c, 0),
                         lambda v, c: n.set_pinned(v, c, True)):
                with pytest.raises(OSError) as ei:
                    call(vpn, cnt)
                assert ei.value.errno == errno.EINVAL
        if x < 2**63:
            for call in (lambda: n.merge(np.array([x], np.int64), np.array([0], np.int64),
                                         np.zeros(1, np.uint32), np.zeros(1, np.uint32),
                                         256, 100),
                         lambda: n.merge_zero(np.array([x], np.int64), 100),
                         lambda: n.checksum_range(x, None, np.zeros(4, np.uint64),
                                                  np.zeros(4, np.uint8), 0)):
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
