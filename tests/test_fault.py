"""Copy-on-write and the SIGSEGV handler (csrc/fault.c), with real faults.

A write into a merged (KSM or zero) page must give the writer its own copy
and leave every other sharer as it was, in both COW modes: cow="kernel",
where the kernel's fault path copies and uksm learns of it from pagemap,
and cow="signal", where merged pages are read-only and uksm's handler
forces the copy.  Faults from GIL-releasing numpy loops and from several
threads racing the background scanner must all be served; and faults that
are not the pool's (a wild pointer, a freed buffer, kill -SEGV) must still
kill the process with SIGSEGV, through faulthandler's traceback when it is
enabled.
"""

import faulthandler
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uksm

from conftest import KSM, PRIVATE, ZERO, kernel_private_bytes, memfd_bytes, page, states

PAGE = uksm.PAGE_SIZE
COW_MODES = ["kernel", "signal"]


def cow_counts(pool, before: dict, breaks: int) -> None:
    """@breaks more COW breaks than @before; taken by the handler in signal
    mode, by the kernel alone (no signal at all) in kernel mode."""
    s = pool.stats()
    assert s["cow_breaks"] == before["cow_breaks"] + breaks, (s, before)
    signalled = breaks if pool.cow == "signal" else 0
    assert s["cow_breaks_signal"] == before["cow_breaks_signal"] + signalled, (s, before)


def make_sharers(pool, nsharers: int, npages: int, seed: int):
    """@nsharers arrays with identical contents: page i random but the same in
    every array (and different from every other page), plus a numpy shadow."""
    rng = np.random.default_rng(seed)
    content = rng.integers(1, 256, npages * PAGE, dtype=np.uint8)
    arrs = [pool.asarray(content) for _ in range(nsharers)]
    shadows = [content.copy() for _ in range(nsharers)]
    return arrs, shadows


# --- single writes -----------------------------------------------------------------


def test_cow_write_gives_writer_private_copy(cow_pool):
    pool = cow_pool
    arrs, shadows = make_sharers(pool, 3, 8, seed=1)
    pool.scan(full_scans=2)
    for a in arrs:
        st_, pfn, mc = pool.page_states(a)
        assert (st_ == KSM).all(), st_
        assert (mc == 3).all(), mc
    pfn_before = pool.page_states(arrs[0])[1].copy()
    before = pool.stats()
    assert before["bytes_private"] == kernel_private_bytes(pool) == 0

    page(arrs[1], 3)[100] ^= 0xFF
    shadows[1][3 * PAGE + 100] ^= 0xFF

    for a, s in zip(arrs, shadows):
        assert np.array_equal(a, s)
    # the writer's page is private anonymous memory now: no frame, no mapcount
    st1, pfn1, mc1 = pool.page_states(arrs[1])
    assert st1[3] == PRIVATE and pfn1[3] == 0 and mc1[3] == 0
    assert (np.delete(st1, 3) == KSM).all()
    assert np.array_equal(np.delete(pfn1, 3), np.delete(pfn_before, 3))
    for other in (arrs[0], arrs[2]):
        st_, pfn, mc = pool.page_states(other)
        assert (st_ == KSM).all()
        assert np.array_equal(pfn, pfn_before), "other sharers were moved"
        assert mc[3] == 2 and (np.delete(mc, 3) == 3).all()
    cow_counts(pool, before, 1)
    # the copy is one anonymous page, by the kernel's count; the frame stays
    s = pool.stats()
    assert s["bytes_private"] == kernel_private_bytes(pool) == PAGE
    assert s["bytes_frames"] == memfd_bytes(pool) == before["bytes_frames"]


def test_last_sharer_keeps_its_view_until_it_writes(cow_pool):
    """The last sharer of a frame does not get it back writable: its page
    stays a view of the frame (mapcount 1) until written, and that write
    copies it like any other; the frame then has no view and goes back to
    the kernel (its hole punched: it reads as zeroes)."""
    pool = cow_pool
    arrs, shadows = make_sharers(pool, 2, 2, seed=2)
    pool.scan(full_scans=2)
    shared_pfn = pool.page_states(arrs[0])[1][0]
    frames_before = memfd_bytes(pool)
    assert frames_before == 2 * PAGE
    page(arrs[0], 0)[0] = 0
    shadows[0][0] = 0
    # (the writer's range first: page_states() reconciles only the range
    # it is asked about, and until then the kernel's copy is not known)
    assert pool.page_states(arrs[0])[0][0] == PRIVATE
    st_, pfn, mc = pool.page_states(arrs[1])
    assert st_[0] == KSM and pfn[0] == shared_pfn and mc[0] == 1
    assert memfd_bytes(pool) == frames_before
    s = pool.stats()
    assert (s["pages_shared"], s["pages_sharing"]) == (2, 1)
    before = s
    page(arrs[1], 0)[1] = 0
    shadows[1][1] = 0
    st_, pfn, mc = pool.page_states(arrs[1])
    assert st_[0] == PRIVATE and mc[0] == 0
    cow_counts(pool, before, 1)
    s = pool.stats()
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 1)
    assert memfd_bytes(pool) == s["bytes_frames"] == frames_before - PAGE
    assert os.pread(pool.fd, PAGE, int(shared_pfn) * PAGE).count(0) == PAGE
    for a, s in zip(arrs, shadows):
        assert np.array_equal(a, s)


# --- the property: COW isolation against numpy shadows ------------------------------

NSHARERS = 4
NPAGES = 6


@pytest.fixture(scope="module", params=COW_MODES)
def prop_pool(request):
    p = uksm.Pool(
        "16MiB", pages_to_scan=1000, sleep_millisecs=0, use_zero_pages=False, cow=request.param
    )
    yield p
    p.close()


writes_st = st.lists(
    st.tuples(
        st.integers(0, NPAGES * PAGE - 1),  # byte offset in the array
        st.integers(0, 255),  # value
        st.integers(0, NSHARERS - 1),
    ),  # which sharer writes
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=writes_st, seed=st.integers(0, 2**32 - 1))
def test_cow_isolation_property(prop_pool, writes, seed):
    pool = prop_pool
    arrs, shadows = make_sharers(pool, NSHARERS, NPAGES, seed)
    pool.scan(full_scans=2)
    for a in arrs:
        assert (states(pool, a) == KSM).all()
    written = np.zeros((NSHARERS, NPAGES), bool)
    for off, value, who in writes:
        arrs[who].view(np.uint8).reshape(-1)[off] = value
        shadows[who][off] = value
        written[who, off // PAGE] = True
        for a, s in zip(arrs, shadows):
            assert np.array_equal(a, s)
    # the page table agrees: a writer has its own page, the others still
    # share one frame whose mapcount is the number of sharers left (once
    # every copy the kernel made is known: stats() reconciles them all)
    pool.stats()
    unwritten_per_page = NSHARERS - written.sum(axis=0)
    for who, a in enumerate(arrs):
        st_, _, mc = pool.page_states(a)
        assert (st_[written[who]] == PRIVATE).all()
        assert (mc[written[who]] == 0).all()
        assert (st_[~written[who]] == KSM).all()
        assert (mc[~written[who]] == unwritten_per_page[~written[who]]).all()
    del arrs


# --- zero pages ---------------------------------------------------------------------


@pytest.mark.parametrize("cow", COW_MODES)
def test_write_into_zero_pages(cow):
    with uksm.Pool("16MiB", use_zero_pages=True, cow=cow) as pool:
        z = pool.zeros(16 * PAGE, np.uint8)
        # written, then zero again: pages that cost memory (pages never
        # written are the kernel's zero page already, and are not scanned)
        z.fill(1)
        z.fill(0)
        before = kernel_private_bytes(pool)
        assert before == 16 * PAGE
        st_ = pool.scan(full_scans=2)
        assert (states(pool, z) == ZERO).all()
        assert st_["ksm_zero_pages"] == 16
        assert kernel_private_bytes(pool) == st_["bytes_resident"] == 0
        assert memfd_bytes(pool) == 0  # the zero page takes no frame

        page(z, 5)[17] = 42
        s = states(pool, z)
        assert s[5] == PRIVATE and (np.delete(s, 5) == ZERO).all()
        st_ = pool.stats()
        assert st_["zero_page_cows"] == 1 and st_["ksm_zero_pages"] == 15
        assert st_["bytes_private"] == kernel_private_bytes(pool) == PAGE
        expect = np.zeros(16 * PAGE, np.uint8)
        expect[5 * PAGE + 17] = 42
        assert np.array_equal(z, expect)

        # a numpy loop writing every zero page
        z[:] = np.arange(z.size, dtype=np.uint64).astype(np.uint8)
        assert (states(pool, z) == PRIVATE).all()
        assert np.array_equal(z, np.arange(z.size, dtype=np.uint64).astype(np.uint8))
        st_ = pool.stats()
        assert st_["ksm_zero_pages"] == 0 and st_["zero_page_cows"] == 16
        assert st_["bytes_private"] == kernel_private_bytes(pool) == 16 * PAGE


# --- numpy loops that release the GIL -------------------------------------------------


def test_numpy_fill_of_multi_mib_merged_array(cow_pool):
    pool = cow_pool
    # 4 MiB of float64, 1024 pages, each page different, a and b equal
    src = np.random.default_rng(5).random(4 * 1024 * 1024 // 8)
    a = pool.asarray(src)
    b = pool.asarray(src)
    pool.scan(full_scans=2)
    assert (states(pool, a) == KSM).all() and (states(pool, b) == KSM).all()
    before = pool.stats()
    a[:] = 7  # every page faults, GIL released
    assert (a == 7).all()
    np.testing.assert_array_equal(b, src)
    assert (states(pool, a) == PRIVATE).all()
    assert (states(pool, b) == KSM).all()
    cow_counts(pool, before, 1024)


def test_numpy_ufunc_out_into_merged_pages(cow_pool):
    pool = cow_pool
    rng = np.random.default_rng(3)
    src = rng.random(2 * 1024 * 1024 // 8)  # 2 MiB
    x = pool.asarray(src)
    y = pool.asarray(src)
    c = pool.asarray(src)
    pool.scan(full_scans=2)
    assert (states(pool, c) == KSM).all()
    np.add(x, 1.0, out=c)
    np.testing.assert_array_equal(c, src + 1.0)
    np.testing.assert_array_equal(x, src)
    np.testing.assert_array_equal(y, src)
    assert (states(pool, c) == PRIVATE).all()
    assert (states(pool, x) == KSM).all()
    np.multiply(y, 2.0, out=y)  # in place, on itself
    np.testing.assert_array_equal(y, src * 2.0)
    np.testing.assert_array_equal(x, src)
    assert (states(pool, y) == PRIVATE).all()
    # x is the last view of each frame now, and still a view
    assert (states(pool, x) == KSM).all()
    assert (pool.page_states(x)[2] == 1).all()


def test_two_threads_numpy_writes_into_merged_arrays(cow_pool):
    pool = cow_pool
    n = 2 * 1024 * 1024 // 8
    arrs = [pool.full(n, 1.5) for _ in range(3)]
    pool.scan(full_scans=2)
    assert all((states(pool, a) == KSM).all() for a in arrs)
    before = pool.stats()
    errors = []

    def work(a, v):
        try:
            np.copyto(a, v)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(arrs[i], float(i + 10))) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in ts), "writer thread hung"
    assert not errors
    assert (arrs[0] == 10.0).all() and (arrs[1] == 11.0).all()
    assert (arrs[2] == 1.5).all()
    cow_counts(pool, before, 2 * n * 8 // PAGE)


# --- writers racing the background scanner -------------------------------------------


@pytest.mark.parametrize("cow", COW_MODES)
def test_writer_threads_race_background_scanner(cow):
    NARR, NP, NTHREADS, RUN = 6, 64, 4, 2.0
    pool = uksm.Pool("32MiB", pages_to_scan=200, sleep_millisecs=0, cow=cow)
    try:
        rng = np.random.default_rng(4)
        patterns = rng.integers(1, 256, (3, PAGE), dtype=np.uint8)
        arrs = []
        for _ in range(NARR):
            a = pool.empty(NP * PAGE, np.uint8)
            a.reshape(NP, PAGE)[:] = patterns[np.arange(NP) % 3]
            arrs.append(a)
        pool.scan(full_scans=2)
        assert all((states(pool, a) == KSM).all() for a in arrs)
        merged0 = pool.stats()["pages_merged_total"]

        # thread t owns the pages (array k, page i) with (k * NP + i) % NTHREADS == t
        shadows = [[a.copy() for a in arrs] for _ in range(NTHREADS)]
        owned = [
            [(k, i) for k in range(NARR) for i in range(NP) if (k * NP + i) % NTHREADS == t]
            for t in range(NTHREADS)
        ]
        failures = []
        counts = [0] * NTHREADS
        deadline = time.monotonic() + RUN

        def writer(t):
            r = np.random.default_rng(100 + t)
            mine = owned[t]
            sh = shadows[t]
            try:
                while time.monotonic() < deadline:
                    k, i = mine[r.integers(len(mine))]
                    pg = page(arrs[k], i)
                    spg = sh[k][i * PAGE : (i + 1) * PAGE]
                    if r.random() < 0.5:
                        # back to a common pattern: the scanner will merge it again
                        pat = patterns[r.integers(3)]
                        pg[:] = pat
                        spg[:] = pat
                    else:
                        off, v = int(r.integers(PAGE)), int(r.integers(256))
                        pg[off] = v
                        spg[off] = v
                    if not np.array_equal(pg, spg):
                        failures.append((t, k, i))
                        return
                    counts[t] += 1
            except BaseException as e:  # pragma: no cover - reported below
                failures.append((t, repr(e)))

        pool.start()
        threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(NTHREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=max(deadline + 30 - time.monotonic(), 0.1))
        hung = [th for th in threads if th.is_alive()]
        stopper = threading.Thread(target=pool.stop, daemon=True)
        if not hung:
            stopper.start()
            stopper.join(timeout=30)
        if hung or stopper.is_alive():
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            pytest.fail(
                f"deadlock: {len(hung)} writer thread(s) or the scanner "
                "did not finish (stacks dumped to stderr)"
            )
        assert not failures, failures
        assert min(counts) > 50, counts

        for k, a in enumerate(arrs):
            expect = np.empty_like(a)
            for t in range(NTHREADS):
                for kk, i in owned[t]:
                    if kk == k:
                        expect[i * PAGE : (i + 1) * PAGE] = shadows[t][k][i * PAGE : (i + 1) * PAGE]
            assert np.array_equal(a, expect), f"array {k} lost writes"
        st_ = pool.stats()
        assert st_["cow_breaks"] > 0
        if cow == "signal":
            assert st_["cow_breaks_signal"] > 0
        else:
            assert st_["cow_breaks_signal"] == 0  # the kernel copied: no signal
        assert st_["pages_merged_total"] > merged0, "scanner merged nothing while racing"
        # and the pool is still consistent: a quiet scan keeps the data
        pool.scan(full_scans=2)
        for k, a in enumerate(arrs):
            for t in range(NTHREADS):
                for kk, i in owned[t]:
                    if kk == k:
                        assert np.array_equal(page(a, i), shadows[t][k][i * PAGE : (i + 1) * PAGE])
    finally:
        pool.close()


# --- faults that are not the pool's: they must still crash ------------------------------

PRELUDE = textwrap.dedent("""
    import ctypes, faulthandler, os, signal, sys, time
    import numpy as np
    import uksm

    def merged_pair(pool):
        a = pool.full(4 * 4096, 3, dtype=np.uint8)
        b = pool.full(4 * 4096, 3, dtype=np.uint8)
        pool.scan(full_scans=2)
        assert (pool.page_states(a)[0] == uksm.PageState.KSM).all(), pool.page_states(a)
        assert (pool.page_states(b)[0] == uksm.PageState.KSM).all(), pool.page_states(b)
        return a, b

    def cow_check(pool, a, b):
        a[5] = 9
        a[3 * 4096] = 11
        assert a[5] == 9 and a[3 * 4096] == 11
        assert (b == 3).all()
        assert pool.page_states(a)[0][0] == uksm.PageState.PRIVATE
        s = pool.stats()
        assert s["cow_breaks"] == 2, s
        # signal mode: both COWs went through uksm's handler
        assert s["cow_breaks_signal"] == (2 if COW == "signal" else 0), s
        sys.stderr.write("COW-OK\\n")
        sys.stderr.flush()
        print("COW-OK", flush=True)
""")


def run_child(body: str, *flags: str, cow: str, timeout: float = 60):
    """Run @body after PRELUDE in a fresh interpreter; COW names the pool's
    copy-on-write mode there."""
    code = f"COW = {cow!r}\n" + PRELUDE + textwrap.dedent(body)
    try:
        return subprocess.run(
            [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:  # pragma: no cover - the failure
        pytest.fail(f"child hung for {timeout}s; stderr so far: {e.stderr!r}")


def assert_died_by_sigsegv(proc):
    assert proc.returncode == -signal.SIGSEGV, (
        f"returncode {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def crash_report_after_cow(stderr: str) -> str:
    """The part of stderr after COW-OK; nothing fatal may come before it."""
    assert "COW-OK" in stderr, stderr
    before, after = stderr.split("COW-OK", 1)
    assert "Fatal Python error" not in before, before
    assert "uksm: fatal" not in before, before
    return after


@pytest.mark.parametrize("cow", COW_MODES)
def test_wild_pointer_crashes_with_faulthandler_traceback(cow):
    proc = run_child(
        """
        pool = uksm.Pool("16MiB", cow=COW)
        a, b = merged_pair(pool)
        cow_check(pool, a, b)
        ctypes.string_at(1)
        print("SURVIVED", flush=True)
    """,
        "-X",
        "faulthandler",
        cow=cow,
    )
    assert_died_by_sigsegv(proc)
    assert "COW-OK" in proc.stdout and "SURVIVED" not in proc.stdout
    after = crash_report_after_cow(proc.stderr)
    assert "Fatal Python error" in after or "Segmentation fault" in after, after
    assert "string_at" in after or 'File "<string>"' in after, after


@pytest.mark.parametrize("cow", COW_MODES)
def test_faulthandler_enabled_after_pool(cow):
    proc = run_child(
        """
        pool = uksm.Pool("16MiB", cow=COW)
        faulthandler.enable()
        faulthandler.disable()
        faulthandler.enable()          # as pytest does, around a run
        a, b = merged_pair(pool)
        cow_check(pool, a, b)
        c = pool.full(4096, 5, dtype=np.uint8)
        c[0] = 6                        # a write that is not a COW still works
        ctypes.string_at(1)
        print("SURVIVED", flush=True)
    """,
        cow=cow,
    )
    assert_died_by_sigsegv(proc)
    assert "COW-OK" in proc.stdout and "SURVIVED" not in proc.stdout
    after = crash_report_after_cow(proc.stderr)
    assert "Fatal Python error" in after, after
    assert after.count("Fatal Python error") == 1, after


@pytest.mark.parametrize("cow", COW_MODES)
def test_wild_pointer_crashes_without_faulthandler(cow):
    proc = run_child(
        """
        pool = uksm.Pool("16MiB", cow=COW)
        a, b = merged_pair(pool)
        cow_check(pool, a, b)
        ctypes.string_at(1)
        print("SURVIVED", flush=True)
    """,
        cow=cow,
    )
    assert_died_by_sigsegv(proc)
    assert "COW-OK" in proc.stdout and "SURVIVED" not in proc.stdout


@pytest.mark.parametrize("flags", [(), ("-X", "faulthandler")], ids=["plain", "faulthandler"])
@pytest.mark.parametrize("cow", COW_MODES)
def test_touching_freed_buffer_crashes(flags, cow):
    proc = run_child(
        """
        pool = uksm.Pool("16MiB", cow=COW)
        a, b = merged_pair(pool)
        cow_check(pool, a, b)
        # a's pages 1..3 still share b's frame: a freed view must not reach it
        c = pool.full(4 * 4096, 3, dtype=np.uint8)
        pool.free(a)
        print("FREED", flush=True)
        print("READ", int(a[4096]), flush=True)
        a[4096] = 1
        print("WROTE", flush=True)
    """,
        *flags,
        cow=cow,
    )
    assert_died_by_sigsegv(proc)
    assert "FREED" in proc.stdout
    assert "READ" not in proc.stdout and "WROTE" not in proc.stdout
    if flags:
        after = crash_report_after_cow(proc.stderr)
        assert "Fatal Python error" in after, after


@pytest.mark.parametrize("flags", [(), ("-X", "faulthandler")], ids=["plain", "faulthandler"])
@pytest.mark.parametrize("scanner", [False, True], ids=["idle", "ksmd-running"])
@pytest.mark.parametrize("cow", COW_MODES)
def test_kill_sigsegv_still_kills(flags, scanner, cow):
    proc = run_child(
        f"""
        pool = uksm.Pool("16MiB", sleep_millisecs=0, cow=COW)
        a, b = merged_pair(pool)
        cow_check(pool, a, b)
        if {scanner!r}:
            pool.start()
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)
        print("SURVIVED", flush=True)
    """,
        *flags,
        cow=cow,
        timeout=30,
    )
    assert_died_by_sigsegv(proc)
    assert "COW-OK" in proc.stdout and "SURVIVED" not in proc.stdout
    if flags:
        after = crash_report_after_cow(proc.stderr)
        assert "Fatal Python error" in after, after


def _maps_count():
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


@pytest.mark.parametrize("cow", COW_MODES)
def test_cow_under_vma_pressure_breaks_whole_runs(cow):
    """With cow="signal", sparse writes into a big merged run would add two
    VMAs per write (an mprotect of one page) and end at vm.max_map_count;
    past the soft limit the handler makes the whole run writable instead,
    so the map count stops growing and every write lands (the kernel COWs
    the rest of the run, and reconcile finds it).  With cow="kernel" a
    write changes no mapping at all.  The soft limit is lowered (a policy
    knob, not the machinery) so the test needs a few hundred writes, not
    tens of thousands."""
    with uksm.Pool("64MiB", sleep_millisecs=0, cow=cow) as pool:
        a = pool.zeros(16 << 20, np.uint8)  # 4096 pages
        a.fill(1)
        a.fill(0)  # used, and zero again
        pool.scan(full_scans=2)
        st, _, _ = pool.page_states(a)
        assert (st == ZERO).all()
        base = _maps_count()
        pool._native.set_vma_state(base, base + 200)
        shadow = np.zeros_like(np.asarray(a))
        peak = base
        for i in range(0, 4096, 2):  # every other page
            a[i * 4096 + 7] = i % 251 + 1
            shadow[i * 4096 + 7] = i % 251 + 1
            if i % 64 == 0:
                peak = max(peak, _maps_count())
        peak = max(peak, _maps_count())
        if cow == "signal":
            assert peak <= base + 200 + 8, (base, peak)
        else:
            assert peak <= base + 8, (base, peak)
        assert np.array_equal(np.asarray(a), shadow)
        # every written page is private, every other one still the zero page
        # (read, but that costs nothing)
        st, _, _ = pool.page_states(a)
        assert (st[0::2] == PRIVATE).all() and (st[1::2] == ZERO).all()
        s = pool.stats()
        assert s["zero_page_cows"] == 2048 and s["ksm_zero_pages"] == 2048
        assert s["bytes_private"] == kernel_private_bytes(pool) == 2048 * PAGE


@pytest.mark.parametrize("cow", COW_MODES)
def test_real_segfault_under_pytest_still_dies_with_a_traceback(tmp_path, cow):
    """pytest enables faulthandler for the run and disables it after; in
    between, COW faults must still be uksm's (with cow="signal" the handler
    takes them) and a wild pointer must still kill the process by SIGSEGV
    with faulthandler's traceback."""
    test = tmp_path / "test_crash.py"
    test.write_text(
        textwrap.dedent(f"""
        import ctypes
        import numpy as np
        import uksm

        def test_crash():
            pool = uksm.Pool("16MiB", cow={cow!r})
            a = pool.full(64 * 4096, 3, dtype=np.uint8)
            b = pool.full(64 * 4096, 3, dtype=np.uint8)
            pool.scan(full_scans=2)
            b[0] = 4                          # a COW, inside pytest
            assert a[0] == 3 and b[0] == 4
            s = pool.stats()
            assert s["cow_breaks"] == 1
            assert s["cow_breaks_signal"] == {int(cow == "signal")}
            print("COW-OK", flush=True)
            ctypes.string_at(1)
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(test)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert "COW-OK" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "test_crash" in proc.stderr  # the traceback names the test
