"""fork and the MAP_SHARED memfd trap.

The pool's pages map one memfd MAP_SHARED, so without care a forked child
and its parent would see each other's writes (multiprocessing's default
start method on Linux is fork).  These tests fork for real, with merged and
unmerged arrays, order the writes with multiprocessing events, and check
that neither side ever sees the other's writes, that the child can use the
pool it inherited, and that the parent's pool keeps working.
"""

import multiprocessing as mp
import os
import select
import signal
import time
import traceback

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE
NORMAL, KSM, ZERO = uksm.PageState.PRIVATE, uksm.PageState.KSM, uksm.PageState.ZERO
NP = 8
TIMEOUT = 60


def page(a: np.ndarray, i: int) -> np.ndarray:
    return a.view(np.uint8).reshape(-1)[i * PAGE : (i + 1) * PAGE]


def contents(seed: int):
    rng = np.random.default_rng(seed)
    merged = rng.integers(1, 256, NP * PAGE, dtype=np.uint8)
    unique = rng.integers(1, 256, NP * PAGE, dtype=np.uint8)
    return merged, unique


def child_writes(a: np.ndarray, c: np.ndarray) -> None:
    """What every child writes: a whole merged page, one byte of another,
    and all of the unmerged array."""
    page(a, 0)[:] = 0xEE
    page(a, 2)[5] ^= 0xFF
    c[:] = 0x11


def exercise_pool(pool) -> str:
    """Allocate, merge and COW-break in @pool; 'ok' or a description."""
    x = pool.full(4 * PAGE, 9, dtype=np.uint8)
    y = pool.full(4 * PAGE, 9, dtype=np.uint8)
    pool.scan(full_scans=2)
    if not (pool.page_states(x)[0] == KSM).all():
        return f"no merge in child: {pool.page_states(x)}"
    x[0] = 1
    if not (x[0] == 1 and (x[1:] == 9).all() and (y == 9).all()):
        return "COW in child pool wrong"
    return "ok"


def _mp_child(arrays, inherited_pool, ready, go, report):
    """Child of every start method.  With fork @arrays are the parent's pool
    arrays themselves; with spawn/forkserver they arrive pickled."""
    try:
        a, c = arrays
        ready.put(os.getpid())
        if not go.wait(TIMEOUT):
            report.put({"error": "parent never said go"})
            return
        seen = {"a": a.copy(), "c": c.copy()}
        child_writes(a, c)
        seen["a_after"] = a.copy()
        seen["c_after"] = c.copy()
        if inherited_pool is not None:
            try:
                seen["pool"] = exercise_pool(inherited_pool)
            except uksm.UksmError as e:  # a clear error is acceptable
                seen["pool"] = f"error: {type(e).__name__}: {e}"
            seen["states_a"] = inherited_pool.page_states(a)[0]
        else:
            with uksm.Pool("16MiB") as own:
                seen["pool"] = exercise_pool(own)
        report.put(seen)
    except BaseException:
        report.put({"error": traceback.format_exc()})


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_multiprocessing_child_and_parent_never_share_writes(method):
    ctx = mp.get_context(method)
    merged, unique = contents(seed=7)
    with uksm.Pool("32MiB", pages_to_scan=1000) as pool:
        a = pool.asarray(merged)
        b = pool.asarray(merged)
        c = pool.asarray(unique)
        pool.scan(full_scans=2)
        assert (pool.page_states(a)[0] == KSM).all()
        assert (pool.page_states(c)[0] == NORMAL).all()

        ready, report, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        proc = ctx.Process(
            target=_mp_child, args=((a, c), pool if method == "fork" else None, ready, go, report)
        )
        proc.start()
        try:
            assert ready.get(timeout=TIMEOUT) == proc.pid
            # the child exists now: the parent writes, merged and unmerged
            page(a, 1)[0] ^= 0xFF
            page(a, 3)[:] = 0x33
            page(c, 2)[7] ^= 0xFF
            parent_a = merged.copy()
            parent_a[PAGE] ^= 0xFF
            parent_a[3 * PAGE : 4 * PAGE] = 0x33
            parent_c = unique.copy()
            parent_c[2 * PAGE + 7] ^= 0xFF
            go.set()
            rep = report.get(timeout=TIMEOUT)
            proc.join(TIMEOUT)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert "error" not in rep, rep["error"]
        assert proc.exitcode == 0

        # the child saw the arrays as they were at the fork, not the parent's writes
        assert np.array_equal(rep["a"], merged), "child saw the parent's writes (merged)"
        assert np.array_equal(rep["c"], unique), "child saw the parent's writes (unmerged)"
        # the child's own writes landed, in the child
        child_a, child_c = merged.copy(), unique.copy()
        child_writes(child_a, child_c)
        assert np.array_equal(rep["a_after"], child_a)
        assert np.array_equal(rep["c_after"], child_c)
        if method == "fork":
            # the inherited pool works, or says clearly why not
            assert rep["pool"] == "ok" or rep["pool"].startswith("error: "), rep["pool"]
            # in the child, pages it wrote are private, the rest still merged
            sa = rep["states_a"]
            assert sa[0] == NORMAL and sa[2] == NORMAL and sa[1] == KSM, sa
        else:
            assert rep["pool"] == "ok", rep["pool"]

        # the parent never sees the child's writes
        assert np.array_equal(a, parent_a), "child's write reached the parent (merged)"
        assert np.array_equal(b, merged), "child's write reached a sharer in the parent"
        assert np.array_equal(c, parent_c), "child's write reached the parent (unmerged)"

        # and the parent's pool still works after the child exited
        d = pool.asarray(merged)
        pool.scan(full_scans=2)
        assert (pool.page_states(d)[0] == KSM).all()
        page(d, 4)[0] ^= 1
        assert np.array_equal(b, merged)
        assert np.array_equal(a, parent_a) and np.array_equal(c, parent_c)
        assert exercise_pool(pool) == "ok"


def _wait_child(pid: int, timeout: float) -> int:
    """waitpid with a deadline; kills and fails on a hung child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} hung for {timeout}s (deadlock at fork?)")


@pytest.mark.parametrize("parent_does", ["write", "free", "cow"])
def test_parent_acts_immediately_after_fork(parent_does):
    """The parent does not wait for anything after fork: its very next write,
    free or COW break must not reach the child, whose copy of the pool is
    still being made (a big pool makes that copy take a while)."""
    with uksm.Pool("128MiB") as pool:
        big = pool.empty(48 << 20, np.uint8)  # 12288 NORMAL pages,
        big.view(np.uint32)[:] = np.arange(big.size // 4, dtype=np.uint32)  # all different
        last = big[-PAGE:].copy()
        x = pool.full(PAGE, 7, dtype=np.uint8)  # allocated last: copied last
        y = pool.full(PAGE, 7, dtype=np.uint8)
        if parent_does == "cow":
            pool.scan(full_scans=2)
            assert (pool.page_states(x)[0] == KSM).all()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(rfd)
                bad = (
                    int(np.count_nonzero(x != 7))
                    + int(np.count_nonzero(y != 7))
                    + int(np.count_nonzero(big[-PAGE:] != last))
                )
                os.write(wfd, str(bad).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        if parent_does == "write":
            big[-PAGE:] = 2
            x[:] = 3
        elif parent_does == "free":
            pool.free(x)
        else:
            x[0] = 3  # COW break: a copy for x ...
            y[0] = 3  # ... and y, sole mapper, reuses the frame
        status = _wait_child(pid, TIMEOUT)
        answer = os.read(rfd, 64)
        os.close(rfd)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert answer == b"0", (
            f"the child saw {answer.decode()} bytes of what the "
            f"parent did after the fork ({parent_does})"
        )


def test_os_fork_with_background_scanner_running():
    rng = np.random.default_rng(8)
    pats = rng.integers(1, 256, (5, PAGE), dtype=np.uint8)
    pool = uksm.Pool("32MiB", pages_to_scan=64, sleep_millisecs=0)
    try:
        arrs = []
        for k in range(4):
            a = pool.empty(256 * PAGE, np.uint8)
            a.reshape(256, PAGE)[:] = pats[(np.arange(256) + k) % 5]
            arrs.append(a)
        expect = [a.copy() for a in arrs]
        pool.start()
        for trial in range(6):
            time.sleep(0.05 + 0.03 * trial)
            # keep the scanner busy: dirty some pages so it has merges to do
            for a, e in zip(arrs, expect):
                i = int(rng.integers(256))
                page(a, i)[0] ^= 0x5A
                e[i * PAGE] ^= 0x5A
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    os.close(wfd)
                    ok = all(np.array_equal(a, e) for a, e in zip(arrs, expect))
                    code = 0 if ok else 2
                    page(arrs[0], 10)[:] = 0x77  # private to the child
                    if ok and not (page(arrs[0], 10) == 0x77).all():
                        code = 3
                    # wait for the parent's write, which must not show here
                    select.select([rfd], [], [], TIMEOUT)
                    if code == 0 and not np.array_equal(arrs[1], expect[1]):
                        code = 4
                    if code == 0 and pool.running:
                        code = 6  # a scanner thread in the child?
                    if code == 0 and exercise_pool(pool) != "ok":
                        code = 5
                finally:
                    os._exit(code)
            os.close(rfd)
            page(arrs[1], 20)[:] = 0x99  # after the fork
            expect[1][20 * PAGE : 21 * PAGE] = 0x99
            os.write(wfd, b"x")
            os.close(wfd)
            status = _wait_child(pid, TIMEOUT)
            assert os.WIFEXITED(status), f"child died: status {status:#x}"
            assert os.WEXITSTATUS(status) == 0, {
                2: "child's copy differs from the parent's arrays at fork",
                3: "child's write did not land",
                4: "child saw the parent's write after the fork",
                5: "child could not use the inherited pool",
                6: "the child's pool claims a running scanner thread",
            }.get(os.WEXITSTATUS(status), os.WEXITSTATUS(status))
            assert pool.running, "the parent's scanner thread stopped"
            for a, e in zip(arrs, expect):
                assert np.array_equal(a, e), "child's write reached the parent"
        pool.stop()
        st = pool.scan(full_scans=2)
        assert st["pages_sharing"] > 0
        for a, e in zip(arrs, expect):
            assert np.array_equal(a, e)
    finally:
        pool.close()
