"""The NEP 49 handler (csrc/handler.c, uksm/handler.py, uksm/run.py): real
numpy arrays, made by numpy itself, from a pool."""

import gc
import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import uksm
from uksm import handler

from conftest import PAGE, memfd_bytes, run_isolated, uss_bytes

THRESHOLD = 4 * PAGE


def handler_name(arr=None):
    return handler.handler_name() if arr is None else _name_of(arr)


def _name_of(arr):
    try:
        from numpy._core.multiarray import get_handler_name
    except ImportError:
        from numpy.core.multiarray import get_handler_name
    return get_handler_name(arr)


def in_pool(pool, arr) -> bool:
    addr = arr.__array_interface__["data"][0]
    va = pool._native.va
    return va <= addr < va + pool._native.va_pages * PAGE


@pytest.fixture
def hpool():
    p = uksm.Pool("256MiB", pages_to_scan=1000, sleep_millisecs=0)
    yield p
    p.close()


def test_install_uninstall_nesting(hpool):
    other = uksm.Pool("64MiB", sleep_millisecs=0)
    assert handler_name() == "default_allocator"
    assert uksm.install(hpool) is hpool
    try:
        a = np.ones(THRESHOLD // 8)
        assert in_pool(hpool, a) and handler_name() == "uksm"
        uksm.install(other, threshold=2 * THRESHOLD)
        try:
            b = np.ones(THRESHOLD // 8)  # below other's threshold: hpool's handler
            c = np.ones(2 * THRESHOLD // 8)
            assert in_pool(hpool, b) and in_pool(other, c)
            with hpool.allocating(threshold=PAGE):
                d = np.ones(PAGE // 8)
                assert in_pool(hpool, d)
            e = np.ones(PAGE // 8)
            assert not in_pool(hpool, e) and not in_pool(other, e)
            assert handler.current_pool_address() == other._native.address
        finally:
            uksm.uninstall()
        assert handler.current_pool_address() == hpool._native.address
    finally:
        uksm.uninstall()
    assert handler_name() == "default_allocator"
    f = np.ones(THRESHOLD // 8)
    assert not in_pool(hpool, f)
    # made under the handler, valid after it: read, write, free
    for arr in (a, b, c, d):
        assert (arr == 1).all()
        arr += 1
    assert hpool.buffer_stats(a)["handler"] and hpool.buffer_stats(a[1:])["pages"] == 4
    assert other.buffer_stats(c)["handler"]
    del a, b, c, d
    with pytest.raises(RuntimeError):
        uksm.uninstall()
    other.close()


def test_threshold_boundary(hpool):
    with hpool.allocating(threshold=THRESHOLD):
        below = np.empty(THRESHOLD - 1, np.uint8)
        at = np.empty(THRESHOLD, np.uint8)
        above = np.empty(THRESHOLD + 1, np.uint8)
    assert not in_pool(hpool, below)
    assert in_pool(hpool, at) and in_pool(hpool, above)
    assert at.__array_interface__["data"][0] % PAGE == 0
    assert hpool.buffer_stats(above)["pages"] == 5
    with pytest.raises(uksm.ForeignArrayError):
        hpool.free(at)  # numpy owns it
    assert hpool.stats()["handler"]["live"] == 2


def test_calloc_reads_zero_after_reuse(hpool):
    with hpool.allocating():
        for _ in range(20):
            a = np.full(64 * PAGE // 8, 7.0)
            del a
            z = np.zeros(64 * PAGE // 8)
            assert in_pool(hpool, z) and not z.any()
            z[:] = 3.0
            del z
        hpool.scan()  # drained: the next ranges are reused ones
        for _ in range(5):
            z = np.zeros((64, PAGE // 8))
            assert not z.any()
            del z


def test_realloc_keeps_contents(hpool):
    with hpool.allocating(threshold=PAGE):
        a = np.arange(10 * PAGE // 8, dtype=np.float64)
        ref = a.copy()
        hpool.scan()  # the Python side knows it: a real TRIM/FREE later
        a.resize(40 * PAGE // 8, refcheck=False)  # grow: moved by mremap
        assert in_pool(hpool, a)
        assert (a[: len(ref)] == ref).all() and not a[len(ref) :].any()
        a[-1] = 5
        hpool.scan()
        a.resize(3 * PAGE // 8, refcheck=False)  # shrink in place
        assert (a == ref[: len(a)]).all()
        a.resize(16, refcheck=False)  # below the threshold: copied out
        assert not in_pool(hpool, a) and (a == ref[:16]).all()
        a.resize(20 * PAGE // 8, refcheck=False)  # and back into the pool
        assert in_pool(hpool, a) and (a[:16] == ref[:16]).all()
        b = np.resize(ref, 3 * len(ref))
        assert (b == np.tile(ref, 3)).all()
        # a merged page moved by memcpy
        c = np.ones(8 * PAGE // 8)
        d = np.ones(8 * PAGE // 8)
        hpool.scan(full_scans=2)
        assert hpool.buffer_stats(c)["pages_ksm"] > 0
        c.resize(30 * PAGE // 8, refcheck=False)
        assert (c[: 8 * PAGE // 8] == 1).all() and not c[8 * PAGE // 8 :].any()
        del d
    st = hpool.stats()["handler"]
    assert st["reallocs"] >= 2 and st["moved"] >= 1
    del a, b, c, ref
    gc.collect()
    hpool.scan()
    assert hpool.stats()["handler"]["live"] == 0
    assert hpool.stats()["buffers"] == 0


def test_duplicates_merge_kernel_accounting(hpool, tmp_path):
    n = 4 << 20  # 4 MiB each
    data = np.random.default_rng(1).integers(0, 255, n, dtype=np.uint8)
    path = tmp_path / "data.npy"
    np.save(path, data)
    with hpool.allocating():
        a = data.copy()
        b = np.tile(data, 1)
        c = np.load(path)
        d = a.copy()
    for x in (a, b, c, d):
        assert in_pool(hpool, x)
    hpool.scan()  # the records first, so the merge below is all the scanner's
    uss0, blocks0 = uss_bytes(), memfd_bytes(hpool)
    st = hpool.scan(full_scans=2)
    pages = n // PAGE
    assert st["pages_sharing"] >= 3 * pages - 8
    assert st["pages_shared"] <= pages + 8
    # the kernel's view: the private pages went, one copy is in the memfd
    assert memfd_bytes(hpool) - blocks0 <= n + 64 * PAGE
    assert uss0 - uss_bytes() >= 2 * n
    assert (a == data).all() and (c == data).all()
    c[0] ^= 1
    assert (a == data).all() and c[0] != data[0]


def _threads_and_gc():
    pool = uksm.Pool("512MiB", pages_to_scan=2000, sleep_millisecs=0)
    pool.start()
    uksm.install(pool, threshold=PAGE)
    stop = threading.Event()
    errors = []

    def churn(seed):
        rng = np.random.default_rng(seed)
        try:
            with pool.allocating(threshold=PAGE):  # threads start with a fresh context
                keep = []
                while not stop.is_set():
                    keep.append(np.full(int(rng.integers(1, 64)) * PAGE // 8, seed, float))
                    if len(keep) > 20:
                        # freed here, by another thread, or by the collector
                        keep.pop(int(rng.integers(0, len(keep))))
                    if rng.random() < 0.05:
                        keep.clear()
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    class Cycle:
        def __init__(self):
            self.me = self
            self.arr = np.ones(8 * PAGE // 8)

        def __del__(self):
            # inside whatever pool call the collector interrupted
            self.arr = None
            x = np.zeros(8 * PAGE // 8)  # a nested allocation: C only
            pool.stats()  # served nested
            del x

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    gc.set_threshold(5, 1, 1)
    for i in range(300):
        for _ in range(5):
            Cycle()
        pool.scan(full_scans=0) if i % 2 else pool.stats()
        if i % 50 == 0:
            pool.scan()
    stop.set()
    for t in threads:
        t.join()
    gc.collect()
    uksm.uninstall()
    assert not errors, errors
    pool.scan()
    st = pool.stats()["handler"]
    assert st["allocs"] > 100 and st["queued"] == 0, st
    print("ok", st)


def test_threads_and_gc_free_without_deadlock():
    out = run_isolated("test_handler", "_threads_and_gc", timeout=120)
    assert "ok" in out


def _fork_child():
    pool = uksm.Pool("256MiB", sleep_millisecs=0)
    uksm.install(pool)
    keep = [np.full(16 * PAGE // 8, 2.0) for _ in range(4)]
    pool.scan(full_scans=2)
    pid = os.fork()
    if pid == 0:
        try:
            mine = [np.full(32 * PAGE // 8, 3.0) for _ in range(8)]
            assert all((m == 3).all() for m in mine)
            assert all((k == 2).all() for k in keep)
            mine.pop().resize(64 * PAGE // 8, refcheck=False)
            del mine
            keep.clear()
            gc.collect()
            pool.scan()
            os._exit(0)
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all((k == 2).all() for k in keep)
    del keep
    pool.scan()
    assert pool.stats()["handler"]["live"] == 0
    print("ok")


def test_fork_under_handler():
    assert "ok" in run_isolated("test_handler", "_fork_child")


def test_pool_outlives_its_arrays():
    code = textwrap.dedent("""
        import gc, numpy as np, uksm
        pool = uksm.Pool("64MiB", sleep_millisecs=0)
        native = pool._native
        with pool.allocating():
            a = np.ones(1 << 16)
            b = a.copy()
            pool.scan(full_scans=2)     # the scanner's own arrays: numpy's handler
            assert pool.stats()["pages_sharing"] > 0
        del pool, b
        gc.collect()
        assert not native.closed    # a's capsule holds the pool
        a += 1
        assert (a == 2).all()
        del a
        gc.collect()
        assert native.closed, "the last array took the pool with it"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


PROG = """
import sys, threading, numpy as np
base = np.random.default_rng(0).standard_normal(1 << 19)    # 4 MiB
copies = [base.copy() for _ in range(3)]
from numpy._core.multiarray import get_handler_name
import uksm.handler
t = threading.Thread(target=lambda: print("thread pool", uksm.handler.current_pool_address()
                                          is not None))
t.start(); t.join()
print("argv", sys.argv[1:], __name__, get_handler_name(copies[0]))
if sys.argv[1] == "boom":
    raise ValueError("boom from the program")
sys.exit(int(sys.argv[1]))
"""


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "uksm", "run"] + args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_runner(tmp_path):
    (tmp_path / "prog.py").write_text(PROG)
    r = _run(
        [
            "--pages-to-scan",
            "5000",
            "--sleep-millisecs",
            "0",
            "--json",
            "out.json",
            "prog.py",
            "3",
            "--x",
        ],
        tmp_path,
    )
    assert r.returncode == 3, r.stderr
    assert "argv ['3', '--x'] __main__ uksm" in r.stdout
    assert "thread pool True" in r.stdout  # threads inherit the handler
    line = r.stderr.strip().splitlines()[-1]
    assert re.match(
        r"uksm: saved [0-9.]+ MiB at peak, [0-9.]+ MiB at exit; pages_shared \d+, "
        r"pages_sharing \d+; full_scans \d+",
        line,
    ), line
    st = json.loads((tmp_path / "out.json").read_text())
    assert st["exit_code"] == 3 and st["pages_to_scan"] == 5000
    assert st["handler"]["allocs"] >= 4

    r = _run(["--quiet", "--no-thread-inherit", "prog.py", "boom"], tmp_path)
    assert r.returncode == 1 and "thread pool False" in r.stdout
    assert "uksm: saved" not in r.stderr
    tb = r.stderr.strip().splitlines()
    assert tb[0] == "Traceback (most recent call last):"
    assert tb[-1].endswith("boom from the program")
    assert "runpy" not in r.stderr and "uksm" not in r.stderr

    env = dict(os.environ, UKSM_THRESHOLD=str(1 << 30))
    r = subprocess.run(
        [sys.executable, "-m", "uksm", "run", "--json", "o2.json", "prog.py", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr  # UKSM_THRESHOLD read: nothing that big
    st = json.loads((tmp_path / "o2.json").read_text())
    assert st["handler"]["allocs"] == 0 and st["threshold"] == str(1 << 30)
    mod = tmp_path / "pkgmod.py"
    mod.write_text(PROG)
    r = _run(["-m", "pkgmod", "0"], tmp_path)
    assert r.returncode == 0 and "argv ['0'] __main__ uksm" in r.stdout, r.stderr


NUMPY_SUBSET = [
    "--pyargs",
    "numpy._core.tests.test_multiarray",
    "-q",
    "-x",
    "-p",
    "no:cacheprovider",
    "-k",
    "resize or copy or concatenate or astype or tobytes or fromiter or zeros",
]


def test_numpy_suite_subset_under_handler(tmp_path):
    """numpy's own tests with the handler at one page: the same outcome as
    a plain run."""
    pytest.importorskip("numpy._core.tests.test_multiarray")

    def outcome(cmd):
        r = subprocess.run(
            cmd + NUMPY_SUBSET, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        tail = r.stdout.strip().splitlines()[-1]
        return r.returncode, re.sub(r" in [0-9.]+s.*", "", tail), r

    plain = outcome([sys.executable, "-m", "pytest"])
    under = outcome(
        [
            sys.executable,
            "-m",
            "uksm",
            "run",
            "--threshold",
            "4096",
            "--pages-to-scan",
            "1000",
            "-m",
            "pytest",
        ]
    )
    assert plain[:2] == under[:2], (
        plain[2].stdout[-3000:],
        under[2].stdout[-3000:],
        under[2].stderr[-3000:],
    )
    assert "handler buffers" in under[2].stderr


def test_closed_pool_goes_with_its_last_array():
    code = textwrap.dedent("""
        import gc, numpy as np, uksm
        pool = uksm.Pool("64MiB", sleep_millisecs=0)
        native = pool._native
        with pool.allocating():
            a = np.ones(1 << 16)
            b = a.copy()
            pool.scan(full_scans=2)
            pool.close()                # arrays live on; new ones go elsewhere
            c = np.ones(1 << 16)
            assert not (native.va <= c.ctypes.data < native.va + native.va_pages * 4096)
        a += 1
        b.resize(1 << 17, refcheck=False)
        assert (a == 2).all() and (b[:1 << 16] == 1).all() and not native.closed
        del a, b, c
        gc.collect()
        assert native.closed, "the closed pool must go with its last array"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_full_queue_and_full_pool_fall_back():
    pool = uksm.Pool("1MiB", sleep_millisecs=0)
    try:
        pool._native.events_enable(cap=16)  # room for 7 live buffers' events
        with pool.allocating():
            arrs = [np.full(THRESHOLD // 8, i, float) for i in range(12)]
            big = np.ones((2 << 20) // 8)  # beyond the pool's capacity
        inside = [in_pool(pool, a) for a in arrs]
        assert 0 < sum(inside) < 12 and not in_pool(pool, big)
        assert all((a == i).all() for i, a in enumerate(arrs)) and (big == 1).all()
        st = pool.stats()["handler"]
        assert st["fallbacks"] >= 12 - sum(inside) + 1 and st["queued"] == 0
        del arrs, big
        gc.collect()
        pool.scan()
        assert pool.stats()["handler"]["live"] == 0 and pool.stats()["buffers"] == 0
    finally:
        pool.close()


def test_context_rules(hpool):
    """What the README says: asyncio tasks inherit the handler, a new
    thread starts with numpy's default, copy_context().run carries it."""
    import asyncio
    import contextvars

    async def make():
        return np.ones(THRESHOLD // 8)

    seen = {}

    def in_thread(key):
        seen[key] = in_pool(hpool, np.ones(THRESHOLD // 8))

    with hpool.allocating():
        task_arr = asyncio.run(make())
        t = threading.Thread(target=in_thread, args=("plain",))
        t.start()
        t.join()
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(in_thread, "copied"))
        t.start()
        t.join()
    assert in_pool(hpool, task_arr)
    assert seen == {"plain": False, "copied": True}


def _extents_disjoint(pool):
    ext = sorted(tuple(e) for e in pool._scanner.extents)
    return all(s + n <= ext[i + 1][0] for i, (s, n) in enumerate(ext[:-1]))


def test_shrink_of_a_tracked_buffer_gives_the_tail_back(hpool):
    with hpool.allocating(threshold=PAGE):
        a = np.ones(64 * PAGE // 8)
        hpool.scan()  # tracked by the scanner
        a.resize(8 * PAGE // 8, refcheck=False)  # TRIM: the tail goes
        hpool.scan()
        assert hpool.buffer_stats(a)["pages"] == 8
        b = [np.full(8 * PAGE // 8, 2.0) for _ in range(8)]  # may take the tail
        hpool.scan(full_scans=2)
    assert _extents_disjoint(hpool)
    assert (a == 1).all() and all((x == 2).all() for x in b)


def _stress(seconds):
    pool = uksm.Pool("1GiB", pages_to_scan=5000, sleep_millisecs=1)
    pool.start()
    uksm.install(pool, threshold=2 * PAGE)
    handler.threads_inherit()
    stop = threading.Event()
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        live = []
        try:
            while not stop.is_set():
                op = rng.integers(0, 6)
                if op <= 1 or not live:
                    n = int(rng.integers(1, 40 * PAGE)) // 8 + 1
                    v = float(rng.integers(0, 4))
                    live.append((np.full(n, v) if op == 0 else np.zeros(n) + v, v, n))
                elif op == 2:
                    i = int(rng.integers(len(live)))
                    a, v, n = live[i]
                    m = int(rng.integers(1, 80 * PAGE)) // 8 + 1
                    a.resize(m, refcheck=False)
                    assert (a[: min(n, m)] == v).all() and not a[n:].any(), ("resize", n, m)
                    a[n:] = v
                    live[i] = (a, v, m)
                elif op == 3:
                    live.pop(int(rng.integers(len(live))))
                elif op == 4:
                    a, v, n = live[int(rng.integers(len(live)))]
                    assert (a == v).all(), ("check", n)
                    live.append((a.copy(), v, n))
                elif len(live) > 30:
                    del live[:15]
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        pool.stats()
        gc.collect()
        time.sleep(0.05)
    alive = pool.running
    stop.set()
    for t in threads:
        t.join()
    handler.threads_inherit(False)
    gc.collect()
    pool.scan()
    st = pool.stats()["handler"]
    assert not errors, errors[:3]
    assert alive, "the scanner thread died"
    assert _extents_disjoint(pool)
    assert st["live"] == 0 and st["queued"] == 0 and st["moved"] > 0, st
    print("ok", st)


def test_stress_threads_realloc_scanner():
    """Four threads allocating, resizing (mremap and copies, shrinks across
    the scanner's ranges), copying and dropping arrays while the background
    scanner tracks them: contents stay right, the scanner stays consistent."""
    assert "ok" in run_isolated("test_handler", "_stress", 8.0, timeout=120)


def test_pandas_smoke(hpool):
    """pandas, if installed: DataFrames built, copied and concatenated under
    the handler live in the pool, merge, and compute as plain ones do."""
    pd = pytest.importorskip("pandas", reason="pandas is not installed here")
    data = np.random.default_rng(3).random((1 << 15, 4))
    plain = pd.DataFrame(data, columns=list("abcd"))
    with hpool.allocating():
        df = pd.DataFrame(data.copy(), columns=list("abcd"))
        twin = df.copy()
        both = pd.concat([df, twin])
    assert in_pool(hpool, df["a"].to_numpy()) or in_pool(hpool, df.to_numpy())
    hpool.scan(full_scans=2)
    assert hpool.stats()["pages_sharing"] > 0
    pd.testing.assert_frame_equal(both.describe(), pd.concat([plain, plain]).describe())
