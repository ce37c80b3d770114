"""A pool inside a real program: garbage-collector finalizers, signal
handlers and other threads call it at any moment, including from inside
one of its own calls in the same thread.  None of that may deadlock, hang
or lose a buffer.

The policy lock (csrc/lock.c) knows its owner: a call made from a finalizer
or a Python signal handler that interrupted this very thread inside the
pool is "nested".  free() never waits for the lock at all; allocation,
stats() and close() are served nested; the other calls raise
ReentrantCallError there.  Every scenario that could hang runs in a fresh
interpreter under a timeout (conftest.run_isolated), so a regression fails
instead of stalling the suite.
"""

import gc
import os
import signal
import threading
import time
import weakref

import numpy as np
import pytest

import uksm

from conftest import run_isolated

PAGE = uksm.PAGE_SIZE


class _Holder:
    """An object in a reference cycle (so only the collector frees it) whose
    finalizer gives its pool buffer back, as a program's wrapper class would."""

    def __init__(self, pool, arr, log):
        self.pool, self.arr, self.log = pool, arr, log
        self.me = self

    def __del__(self):
        self.log.append(self.pool._c.owned())
        arr, self.arr = self.arr, None
        self.pool.free(arr)


def finalizers_free_inside_pool_calls(seconds: float) -> None:
    """The collector runs every 50 allocations (whichever code makes them): inside
    the scanner thread's batches, inside the main thread's own pool calls,
    and between them; each collected holder frees its buffer from __del__."""
    gc.set_threshold(50, 5, 5)
    rng = np.random.default_rng(1)
    pal = rng.integers(0, 256, (8, PAGE), dtype=np.uint8)
    log = []
    with uksm.Pool("64MiB", pages_to_scan=64, sleep_millisecs=0) as pool:
        pool.start()
        keep = []
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            a = pool.asarray(pal[rng.integers(0, 8, 4)])
            _Holder(pool, a, log)  # garbage at once: a cycle
            del a
            b = pool.asarray(pal[rng.integers(0, 8, 2)])
            keep.append((b, b.copy()))
            if len(keep) > 40:
                keep.pop(0)
            if n % 16 == 0:
                pool.scan(full_scans=1)  # batches in this thread too
                pool.stats()
            n += 1
        pool.stop()
        gc.set_threshold(700, 10, 10)
        gc.collect()
        for b, copy in keep:
            assert np.array_equal(b, copy)
        s = pool.stats()
        assert s["buffers"] == len(keep), (s["buffers"], len(keep))
        assert s["bytes_mapped"] == sum(b.nbytes for b, _ in keep)
    assert log, "no finalizer ran"
    assert any(log), "no finalizer ran inside a pool section of its own thread"
    assert not all(log), "no finalizer ran outside one"
    print(f"frees {len(log)} nested {sum(log)}")


def test_finalizers_free_inside_pool_calls():
    """GC finalizers that free pool buffers, collected inside the scanner
    thread's section and inside the main thread's own pool calls: no
    deadlock (before the owner-aware lock this hung every time), every freed
    buffer goes back, the kept ones keep their contents."""
    out = run_isolated("test_reentry", "finalizers_free_inside_pool_calls", 3.0, timeout=120)
    assert "nested" in out


def signal_handlers_call_the_pool(seconds: float, cow: str) -> None:
    """A 1 ms interval timer whose handler allocates, checks, frees and asks
    for stats while the main thread is inside the pool (scan, allocation,
    free, stats) and, with the fast timer, while the handler itself is."""
    rng = np.random.default_rng(2)
    pal = rng.integers(0, 256, (4, PAGE), dtype=np.uint8)
    counts = {"calls": 0, "nested": 0, "refused": 0, "in_use": 0}
    mine = []
    # the lock's holder blocks the asynchronous signals; a thread of the
    # program's own takes them then, and Python runs the handler in the
    # main thread, inside the section
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()

    with uksm.Pool("64MiB", pages_to_scan=256, sleep_millisecs=0, cow=cow) as pool:

        def handler(signum, frame):
            counts["calls"] += 1
            if pool._c.owned():
                counts["nested"] += 1
            a = pool.asarray(pal[[0, 1, 0, 1]])
            mine.append(a)
            pool.stats()
            if len(mine) > 8:
                victim = mine.pop(0)
                assert np.array_equal(victim, pal[[0, 1, 0, 1]])
                try:
                    pool.free(victim)
                except uksm.BufferInUseError:
                    # the handler this one interrupted is still reading it
                    counts["in_use"] += 1
            try:
                pool.merge(a)
            except uksm.ReentrantCallError:
                counts["refused"] += 1

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        try:
            keep = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                b = pool.asarray(pal[rng.integers(0, 4, 8)])
                keep.append((b, b.copy()))
                if len(keep) > 30:
                    victim, _ = keep.pop(0)
                    pool.free(victim)
                    del victim
                pool.scan(full_scans=1)
                pool.stats()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            stop.set()
        for b, copy in keep:
            assert np.array_equal(b, copy)
        for a in mine:
            assert np.array_equal(a, pal[[0, 1, 0, 1]])
        gc.collect()
        s = pool.scan(full_scans=2)
        assert s["buffers"] == len(keep) + len(mine)
        # the buffers allocated nested were handed to the scanner later:
        # they merge like any other
        assert s["pages_shared"] + s["pages_sharing"] >= 2 * len(mine)
    assert counts["calls"] > 50, counts
    assert counts["nested"] > 0, counts
    assert counts["refused"] == counts["nested"], counts
    print(counts)


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_signal_handlers_call_the_pool(cow):
    """A SIGALRM handler calling the pool while the main thread is inside
    it: allocation, free and stats are served, merge() raises
    ReentrantCallError nested (and only nested), nothing hangs."""
    run_isolated("test_reentry", "signal_handlers_call_the_pool", 3.0, cow, timeout=120)


def test_nested_calls_that_would_wait_raise():
    """Inside a section of its own (as a handler or finalizer finds it), a
    call that must drain the scanner's work raises ReentrantCallError naming
    itself; those that need not wait are served."""
    with uksm.Pool("4MiB") as pool:
        a = pool.zeros(PAGE, np.uint8)
        b = pool.zeros(PAGE, np.uint8)
        core = pool._c
        assert core.enter() is False
        try:
            for call, name in [
                (lambda: pool.scan(), "pool.scan()"),
                (lambda: pool.compact(), "pool.compact()"),
                (lambda: pool.unmerge(a), "pool.unmerge()"),
                (lambda: pool.merge(a), "pool.merge()"),
            ]:
                with pytest.raises(
                    uksm.ReentrantCallError, match=name.replace("(", r"\(").replace(")", r"\)")
                ):
                    call()
            c = pool.asarray(np.arange(PAGE, dtype=np.uint8))
            assert pool.stats()["buffers"] == 3
            pool.free(b)
            del b
            assert pool.stats()["bytes_mapped"] == 2 * PAGE
        finally:
            core.leave()
        # the nested allocation reached the scanner at the next reap
        assert pool.stats()["pages_tracked"] >= 1
        assert np.array_equal(c, np.arange(PAGE, dtype=np.uint8))


def test_free_never_waits_for_another_threads_section():
    """free() gives the pages back at once even while another thread holds
    the pool's lock; the bookkeeping follows when that thread leaves."""
    with uksm.Pool("4MiB") as pool:
        a = pool.asarray(np.ones(4 * PAGE, np.uint8))
        inside, done = threading.Event(), threading.Event()

        def hold():
            pool._c.enter()
            inside.set()
            done.wait(30)
            pool._c.leave()

        t = threading.Thread(target=hold)
        t.start()
        inside.wait(10)
        t0 = time.monotonic()
        pool.free(a)
        waited = time.monotonic() - t0
        assert pool._native.stats()["pages_mapped"] == 0  # the pages went back
        done.set()
        t.join()
        assert waited < 5, waited
        del a
        gc.collect()
        assert pool.stats()["buffers"] == 0


def test_freed_range_is_not_reused_while_a_view_lives():
    """free(lst.pop()) passes the reference count check with a view alive;
    the range then stays out of use until the view goes, so new buffers never
    land under it (the view's own access is a use-after-free that uksm names
    when it crashes)."""
    with uksm.Pool("4MiB", virtual_size="4MiB") as pool:
        lst = [pool.zeros(64 * PAGE, np.uint8)]
        view = lst[0][PAGE:]
        lo = view.__array_interface__["data"][0]
        pool.free(lst.pop())
        new = [pool.zeros(64 * PAGE, np.uint8) for _ in range(10)]
        for b in new:
            start = b.__array_interface__["data"][0]
            assert not (start <= lo < start + b.nbytes), "a new buffer under a live view"
        del view
        gc.collect()
        pool.stats()
        again = pool.zeros(64 * PAGE, np.uint8)
        assert again.nbytes == 64 * PAGE


def dropped_running_pool_is_collected() -> None:
    import psutil

    def memfds():
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
            except FileNotFoundError:  # listdir's own descriptor
                pass
        return n

    base_fds, base_threads = memfds(), threading.active_count()
    base_os_threads = psutil.Process().num_threads()
    for _ in range(3):
        p = uksm.Pool("16MiB", sleep_millisecs=1)
        a = p.asarray(np.ones(8 * PAGE, np.uint8))
        p.start()
        time.sleep(0.05)
        r = weakref.ref(p)
        del p, a
        deadline = time.monotonic() + 10
        while r() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert r() is None, "a started, dropped pool was never collected"
    deadline = time.monotonic() + 10
    while threading.active_count() > base_threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == base_threads, threading.enumerate()
    assert memfds() == base_fds, "the frame stores leaked"
    # an ended Python thread leaves the kernel's thread list a moment later
    while psutil.Process().num_threads() > base_os_threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert psutil.Process().num_threads() == base_os_threads, psutil.Process().threads()


def test_dropped_running_pool_is_collected():
    """A pool started (its scanner thread running) and then dropped is
    collected and closed like any other object: its thread ends and its
    memfd goes (before, the thread held the pool for ever)."""
    run_isolated("test_reentry", "dropped_running_pool_is_collected", timeout=60)


def test_close_from_a_finalizer_inside_a_section():
    """close() reached nested (a finalizer holding the last reference to the
    pool, collected inside one of its sections) takes no new work at once
    and finishes when the section is left."""
    pool = uksm.Pool("4MiB")
    a = pool.zeros(PAGE, np.uint8)
    core = pool._c
    core.enter()
    try:
        pool.close()
        assert pool.closed
        with pytest.raises(uksm.PoolClosedError):
            pool.zeros(PAGE)
    finally:
        core.leave()
    assert core.closed
    del a
    gc.collect()
    assert pool._native.closed


class _Boom(Exception):
    pass


def handler_exceptions_tear_sections(seconds: float, background: bool) -> None:
    """A SIGALRM handler raising at random moments (as KeyboardInterrupt
    does) while the main thread calls the pool; a thread of the program's
    own (OpenBLAS starts such threads) takes the signals the lock's holder
    blocks, so handlers do run inside sections.  The lock is never left held,
    the scanner's state is rebuilt when torn, the data never changes."""
    import random

    rnd = random.Random(7)
    rng = np.random.default_rng(7)
    pal = rng.integers(0, 256, (32, PAGE), dtype=np.uint8)
    stop = threading.Event()
    bystander = threading.Thread(target=stop.wait, daemon=True)
    bystander.start()
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Boom()

    pool = uksm.Pool("128MiB", pages_to_scan=2000, sleep_millisecs=0)
    keep = []
    for _ in range(100):
        src = np.concatenate(
            [pal[rng.integers(0, 32, 4)], rng.integers(0, 256, (4, PAGE), dtype=np.uint8)]
        )
        keep.append((pool.asarray(src), src))
    if background:
        pool.start()
    signal.signal(signal.SIGALRM, on_alarm)
    hits = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            signal.setitimer(signal.ITIMER_REAL, rnd.uniform(1e-5, 2e-3))
            for _ in range(20):
                r = rnd.random()
                if r < 0.3 and not background:
                    pool.scan(full_scans=1)
                elif r < 0.5:
                    pool.stats()
                elif r < 0.8:
                    src = np.concatenate(
                        [
                            pal[rng.integers(0, 32, 4)],
                            rng.integers(0, 256, (2, PAGE), dtype=np.uint8),
                        ]
                    )
                    keep.append((pool.asarray(src), src))
                elif len(keep) > 40:
                    a, _ = keep.pop(rnd.randrange(len(keep)))
                    try:
                        pool.free(a)
                    except uksm.BufferInUseError:
                        pass
                    del a
        except _Boom:
            hits += 1
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            armed[0] = True
        assert not pool._c.owned(), "the pool's lock was left held"
    armed[0] = False
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    stop.set()
    pool.stop()
    gc.collect()
    s = pool.scan(full_scans=2)
    assert (
        s["pages_shared"] + s["pages_sharing"] + s["pages_unshared"] + s["pages_volatile"]
    ) == s["pages_tracked"], s
    sc = pool._scanner
    assert len(sc.starts) == len(sc.extents) and len(sc.u_sum) == len(sc.u_vpn)
    assert len(sc.stable.idx_sum) == len(sc.stable.idx_node)
    for a, src in keep:
        assert np.array_equal(a.reshape(src.shape), src)
    assert s["pages_sharing"] > 0
    assert hits > 50, hits
    pool.close()
    print("hits", hits)


@pytest.mark.parametrize("background", [False, True])
def test_handler_exceptions_tear_sections(background):
    """KeyboardInterrupt-like exceptions from a signal handler at any point
    of any pool call: no lock is leaked (before, every run leaked one and
    the next call hung or raised), the scanner's state is rebuilt, the data
    and the counters stay right."""
    run_isolated("test_reentry", "handler_exceptions_tear_sections", 4.0, background, timeout=120)


def handler_compacts_another_pool_inside_the_map_budget() -> None:
    """The mapping budget is one per process: a signal handler that runs in
    this thread while one pool's merge holds the budget's lock, and
    compacts (or makes) another pool, takes that lock again from the same
    thread.  The signal is raised from a line trace at the budget's first
    statement, where the lock is held: a handler would run there when the
    signal arrives during the call before it."""
    import inspect
    import sys

    from uksm import scanner

    p1, p2 = uksm.Pool("16MiB"), uksm.Pool("16MiB")
    ran = []
    signal.signal(signal.SIGUSR1, lambda s, f: ran.append(p2.compact()))
    src, first = inspect.getsourcelines(scanner._ProcessMaps.take)
    at = first + next(i for i, line in enumerate(src) if "budget = " in line)
    code = scanner._ProcessMaps.take.__code__

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == at and not ran:
            os.kill(os.getpid(), signal.SIGUSR1)
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
    try:
        with p1._c.section("test"):
            budget = p1._scanner._vma_budget()
            p1._scanner._vma_settle(budget, budget)
    finally:
        sys.settrace(None)
    assert len(ran) == 1
    assert 0 < p1._scanner.map_count() < p1._scanner.map_count_max()
    p1.close()
    p2.close()
    print("ok")


def test_handler_takes_the_map_budget_inside_it():
    assert "ok" in run_isolated(
        "test_reentry", "handler_compacts_another_pool_inside_the_map_budget", timeout=30
    )
