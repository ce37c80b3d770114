"""The memory model seen from the kernel (csrc/uksm.h, "Overview").

Every page of a pool buffer is PRIVATE (anonymous memory), KSM (a
MAP_PRIVATE view of a frame of the memfd), ZERO (a fresh anonymous page) or
SWAPPED (a MAP_PRIVATE view of a swap slot).  These tests look at them with
the kernel's own eyes, never through uksm alone:

* /proc/self/pagemap, read here (bit 63 present, 62 swapped, 61 file page or
  shared anonymous, 56 exclusively mapped);
* /proc/self/smaps and smaps_rollup, /proc/meminfo, psutil;
* the memfd itself (pread of a frame, st_blocks);
* real kernel I/O into and out of every page state (readv, readinto,
  recv_into, write, np.save).

Things that could hang or crash the interpreter (threads writing while the
scanner merges, near-OOM allocations, absurd shapes) run in a child
interpreter with a timeout (_isolated), so a regression fails the test
instead of hanging or killing the run.
"""

import errno
import gc
import os
import socket
import threading
import time
import weakref

import numpy as np
import psutil
import pytest

import uksm

from conftest import run_isolated

PAGE = uksm.PAGE_SIZE
MiB = 1 << 20
HPAGE = 2 * MiB
PRIVATE, KSM, ZERO, SWAPPED = (
    uksm.PageState.PRIVATE,
    uksm.PageState.KSM,
    uksm.PageState.ZERO,
    uksm.PageState.SWAPPED,
)

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61
PM_EXCLUSIVE = 1 << 56

COWS = ["kernel", "signal"]
HERE = os.path.dirname(os.path.abspath(__file__))


# --- the kernel's view ------------------------------------------------------------


def addr_of(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def pagemap(addr: int, npages: int) -> np.ndarray:
    """The pagemap entries (uint64) of @npages pages from @addr."""
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        data = os.pread(f.fileno(), 8 * npages, addr // PAGE * 8)
    assert len(data) == 8 * npages
    return np.frombuffer(data, np.uint64)


def pm_of(a: np.ndarray) -> np.ndarray:
    return pagemap(addr_of(a), -(-a.nbytes // PAGE))


def bit(entries: np.ndarray, b: int) -> np.ndarray:
    return (entries & np.uint64(b)) != 0


def smaps_range(lo: int, hi: int) -> dict:
    """Sum of every smaps field (bytes) over the VMAs overlapping [lo, hi)."""
    tot: dict = {}
    cur = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            head = fields[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                cur = start < hi and end > lo
            elif cur and len(fields) == 3 and fields[2] == "kB":
                key = head.rstrip(":")
                tot[key] = tot.get(key, 0) + int(fields[1]) * 1024
    return tot


def smaps_of(a: np.ndarray) -> dict:
    return smaps_range(addr_of(a), addr_of(a) + a.nbytes)


def pool_span(pool) -> tuple:
    """The pool's reserved virtual range (every buffer lies in it)."""
    lo = pool._native.va
    return lo, lo + pool._native.va_pages * PAGE


def rollup() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 3 and fields[2] == "kB":
                out[fields[0].rstrip(":")] = int(fields[1]) * 1024
    return out


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    return text[text.index("[") + 1 : text.index("]")]


def states(pool, a) -> np.ndarray:
    return pool.page_states(a)[0]


def page(a: np.ndarray, i: int) -> np.ndarray:
    return a.view(np.uint8).reshape(-1)[i * PAGE : (i + 1) * PAGE]


def _isolated(fn: str, *args, timeout: float = 60) -> str:
    return run_isolated("test_memory_model", fn, *args, timeout=timeout)


# --- building pages in a given state ---------------------------------------------


def rand_bytes(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def make_state(pool, state: int, npages: int = 4, seed: int = 0):
    """An array of @npages pages all in @state, its expected contents, and
    (KSM) the twin that shares its frames.  A swapping pool must have been
    made with max_resident."""
    twin = None
    if state == PRIVATE:
        shadow = rand_bytes(seed, npages * PAGE)
        arr = pool.asarray(shadow)
    elif state == KSM:
        shadow = rand_bytes(seed, npages * PAGE)
        arr = pool.asarray(shadow)
        twin = pool.asarray(shadow)
        pool.scan(full_scans=2)
    elif state == ZERO:
        arr = pool.empty(npages * PAGE, np.uint8)
        arr.fill(1)
        arr.fill(0)  # written, then all zeroes: zero-page merged
        shadow = np.zeros(npages * PAGE, np.uint8)
        pool.scan(full_scans=2)
    elif state == SWAPPED:
        shadow = rand_bytes(seed, npages * PAGE)
        arr = pool.asarray(shadow)
        ballast = pool.asarray(rand_bytes(seed + 1, npages * PAGE))
        budget = pool.max_resident
        pool.max_resident = PAGE  # the clock starts at arr: all of it goes
        pool.max_resident = budget  # and nothing more is evicted afterwards
        del ballast
    else:
        raise ValueError(state)
    st = states(pool, arr)
    assert (st == state).all(), f"could not build pages in state {state}: {st}"
    return arr, shadow, twin


STATE_NAMES = {PRIVATE: "private", KSM: "ksm", ZERO: "zero", SWAPPED: "swapped"}


def state_pool(cow: str):
    return uksm.Pool(
        "64MiB",
        cow=cow,
        pages_to_scan=4096,
        sleep_millisecs=0,
        use_zero_pages=True,
        max_resident="32MiB",
    )


# --- 1. the three states, seen from pagemap ------------------------------------------


@pytest.mark.parametrize("cow", COWS)
def test_page_states_as_pagemap_shows_them(cow):
    """Merged pages are file pages (bit 61) once read, private pages anonymous
    and exclusive; a write makes exactly the written page anonymous and
    exclusive, PRIVATE in page_states, counted once in cow_breaks; the frame
    itself (read back from the memfd) and the other sharers keep the old
    bytes.  Same for ZERO (zero_page_cows) and SWAPPED (swap_ins) pages."""
    with state_pool(cow) as pool:
        n = 8
        src = rand_bytes(1, n * PAGE)
        a = pool.asarray(src)
        b = pool.asarray(src)
        u = pool.asarray(rand_bytes(2, n * PAGE))
        z = pool.empty(n * PAGE, np.uint8)
        z.fill(1)
        z.fill(0)
        pool.scan(full_scans=2)
        assert (states(pool, a) == KSM).all() and (states(pool, b) == KSM).all()
        assert (states(pool, u) == PRIVATE).all()
        assert (states(pool, z) == ZERO).all()
        _, pfn_a, mc = pool.page_states(a)
        _, pfn_b, _ = pool.page_states(b)
        assert (pfn_a == pfn_b).all() and (mc == 2).all()

        # merged pages are not present until touched, then file pages
        assert not bit(pm_of(a), PM_PRESENT).any()
        assert int(a.sum()) == int(src.sum(dtype=np.int64))
        pm = pm_of(a)
        assert bit(pm, PM_PRESENT).all() and bit(pm, PM_FILE).all(), [hex(e) for e in pm]
        assert bit(pm, PM_EXCLUSIVE).all()  # b's views not mapped in yet
        assert int(b.sum()) == int(src.sum(dtype=np.int64))
        pm = pm_of(a)
        assert bit(pm, PM_FILE).all() and not bit(pm, PM_EXCLUSIVE).any()  # two views now
        pm = pm_of(u)
        assert bit(pm, PM_PRESENT).all() and not bit(pm, PM_FILE).any()
        assert bit(pm, PM_EXCLUSIVE).all()
        # zero pages read as the kernel's zero page: present, neither a file
        # page nor exclusive
        assert int(z.sum()) == 0
        pm = pm_of(z)
        assert not bit(pm, PM_FILE).any() and not bit(pm, PM_EXCLUSIVE).any()

        before = pool.stats()
        frames_before = [os.pread(pool.fd, PAGE, int(p) * PAGE) for p in pfn_a]
        written = [1, 4, 5]
        page(a, 1)[:] = 0xAB  # a whole page
        page(a, 4)[7] ^= 0xFF  # one byte
        page(a, 5)[100:3000] = 3  # part of a page
        expect = src.copy()
        expect[PAGE : 2 * PAGE] = 0xAB
        expect[4 * PAGE + 7] ^= 0xFF
        expect[5 * PAGE + 100 : 5 * PAGE + 3000] = 3
        if cow == "signal":  # our handler counts at once
            c = pool._native.stats()
            assert c["cow_signal"] - before["cow_breaks_signal"] == len(written)
        after = pool.stats()
        assert after["cow_breaks"] - before["cow_breaks"] == len(written)
        assert after["cow_breaks_signal"] - before["cow_breaks_signal"] == (
            len(written) if cow == "signal" else 0
        )
        assert after["pages_sharing"] + after["pages_shared"] == before["pages_sharing"] + before[
            "pages_shared"
        ] - len(written)
        st = states(pool, a)
        assert (st[written] == PRIVATE).all()
        assert (np.delete(st, written) == KSM).all()
        pm = pm_of(a)
        for i in range(n):
            anon_excl = (
                bool(pm[i] & np.uint64(PM_PRESENT))
                and not (pm[i] & np.uint64(PM_FILE))
                and bool(pm[i] & np.uint64(PM_EXCLUSIVE))
            )
            assert anon_excl == (i in written), (i, hex(int(pm[i])))
        # the frames are untouched: the twin and the memfd hold the old bytes
        assert np.array_equal(a, expect)
        assert np.array_equal(b, src)
        for p, old in zip(pfn_a, frames_before):
            assert os.pread(pool.fd, PAGE, int(p) * PAGE) == old
        # the twin's views of the frames the writes left: still KSM
        assert (states(pool, b) == KSM).all()

        # ZERO: a write makes the page private; zero_page_cows counts it
        page(z, 2)[0] = 9
        st = pool.stats()
        assert st["zero_page_cows"] - after["zero_page_cows"] == 1
        zs = states(pool, z)
        assert zs[2] == PRIVATE and (np.delete(zs, 2) == ZERO).all()
        pm = pm_of(z)
        assert bit(pm[2:3], PM_EXCLUSIVE).all() and not bit(pm[2:3], PM_FILE).any()
        assert int(z.sum()) == 9

        # SWAPPED: a view of the swap file; read = file page, write = private
        s, s_shadow, _ = make_state(pool, SWAPPED, n, seed=5)
        assert np.array_equal(s, s_shadow)  # read back by the kernel
        pm = pm_of(s)
        assert bit(pm, PM_PRESENT).all() and bit(pm, PM_FILE).all()
        ins = pool.stats()["swap_ins"]
        page(s, 3)[1] ^= 0x55
        s_shadow[3 * PAGE + 1] ^= 0x55
        assert pool.stats()["swap_ins"] - ins == 1
        ss = states(pool, s)
        assert ss[3] == PRIVATE and (np.delete(ss, 3) == SWAPPED).all()
        pm = pm_of(s)
        assert not bit(pm[3:4], PM_FILE).any() and bit(pm[3:4], PM_EXCLUSIVE).all()
        assert np.array_equal(s, s_shadow)


# --- 2. kernel I/O into and out of every page state -------------------------------------


def _io_into(kind: str, mv: memoryview, data: bytes, tmp_path) -> int:
    if kind == "readv":
        r, w = os.pipe()
        try:
            os.write(w, data)
            return os.readv(r, [mv])
        finally:
            os.close(r)
            os.close(w)
    if kind == "readinto":
        path = tmp_path / f"in-{os.urandom(4).hex()}.bin"
        path.write_bytes(data)
        with open(path, "rb", buffering=0) as f:
            return f.readinto(mv)
    if kind == "recv_into":
        s1, s2 = socket.socketpair()
        try:
            s1.sendall(data)
            return s2.recv_into(mv, len(data), socket.MSG_WAITALL)
        finally:
            s1.close()
            s2.close()
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["readv", "readinto", "recv_into"])
@pytest.mark.parametrize("state", [PRIVATE, KSM, ZERO, SWAPPED], ids=STATE_NAMES.get)
@pytest.mark.parametrize("cow", COWS)
def test_kernel_io_into_every_state(cow, state, kind, tmp_path):
    """The kernel writes into a page in each state, across a page boundary
    and covering neither page whole: with cow="kernel" it copies the page
    itself and the bytes are right (the rest of each page kept, the sharers
    untouched); with cow="signal" a non-private page is read-only to it:
    EFAULT, nothing changed, and inside pool.pin() it works."""
    with state_pool(cow) as pool:
        n = 4
        arr, shadow, twin = make_state(pool, state, n, seed=11)
        twin_copy = None if twin is None else twin.copy()
        lo, hi = PAGE + 100, 3 * PAGE - 50  # pages 1 and 2, partly
        data = rand_bytes(99, hi - lo).tobytes()
        before = pool.stats()
        mv = memoryview(arr).cast("B")[lo:hi]
        if cow == "signal" and state != PRIVATE:
            with pytest.raises(OSError) as exc:
                _io_into(kind, mv, data, tmp_path)
            assert exc.value.errno == errno.EFAULT
            assert np.array_equal(arr, shadow)
            assert (states(pool, arr) == state).all()
            with pool.pin(arr):
                assert (states(pool, arr) == PRIVATE).all()
                got = _io_into(kind, mv, data, tmp_path)
        else:
            got = _io_into(kind, mv, data, tmp_path)
        assert got == hi - lo
        shadow[lo:hi] = np.frombuffer(data, np.uint8)
        assert np.array_equal(arr, shadow)
        if twin is not None:
            assert np.array_equal(twin, twin_copy)  # the frame is not written
        st = states(pool, arr)
        after = pool.stats()
        if cow == "kernel":
            assert (st[1:3] == PRIVATE).all()
            assert (st[[0, 3]] == state).all()  # the others stay as they were
            counter = {KSM: "cow_breaks", ZERO: "zero_page_cows", SWAPPED: "swap_ins"}
            if state in counter:
                assert after[counter[state]] - before[counter[state]] == 2
        if twin is not None:
            assert np.array_equal(twin, twin_copy)
            if cow == "kernel":
                assert (states(pool, twin) == KSM).all()


@pytest.mark.parametrize("cow", COWS)
def test_write_and_np_save_from_every_state(cow, tmp_path):
    """write(2) and np.save FROM pages in every state: the file holds the
    shadow's bytes, and reading the pages for the kernel changed no state."""
    with state_pool(cow) as pool:
        for state in (PRIVATE, KSM, ZERO, SWAPPED):
            arr, shadow, _ = make_state(pool, state, 6, seed=20 + state)
            path = tmp_path / f"out-{state}.bin"
            with open(path, "wb", buffering=0) as f:
                assert f.write(memoryview(arr).cast("B")) == arr.nbytes
            fd = os.open(tmp_path / f"out-{state}.raw", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                assert (
                    os.writev(fd, [memoryview(arr)[: PAGE + 5], memoryview(arr)[PAGE + 5 :]])
                    == arr.nbytes
                )
            finally:
                os.close(fd)
            np.save(tmp_path / f"out-{state}.npy", arr)
            assert path.read_bytes() == shadow.tobytes(), STATE_NAMES[state]
            assert (tmp_path / f"out-{state}.raw").read_bytes() == shadow.tobytes()
            assert np.array_equal(np.load(tmp_path / f"out-{state}.npy"), shadow)
            assert (states(pool, arr) == state).all(), (
                f"{STATE_NAMES[state]}: reading for write(2) changed the state"
            )


# --- 3. lazy commit ---------------------------------------------------------------------


def lazy_commit_child() -> None:
    """(isolated) A pool of 4 x MemTotal; an array of 2 x MemTotal is either
    refused at once (MemoryError, overcommit) or given at once; a byte written
    every 64 MiB costs a page each (a huge page each where THP backs the
    buffer), and stats() agrees with pagemap."""
    mem_total = meminfo("MemTotal")
    pool = uksm.Pool((4 * mem_total) // PAGE * PAGE)
    proc = psutil.Process()
    want = (2 * mem_total) // PAGE * PAGE
    t0 = time.monotonic()
    try:
        big = pool.empty(want, np.uint8)
        outcome = "ok"
    except MemoryError:
        big = None
        outcome = "MemoryError"
    took = time.monotonic() - t0
    print("2 x MemTotal:", outcome, f"{took:.3f}s")
    assert took < 2.0, f"allocating 2 x MemTotal took {took:.1f}s: something was committed"
    if big is None:
        want = (mem_total // 2) // PAGE * PAGE  # the kernel's heuristic takes this
        t0 = time.monotonic()
        big = pool.empty(want, np.uint8)
        assert time.monotonic() - t0 < 2.0
    st = pool.stats()
    assert st["bytes_private"] == 0 and st["bytes_frames"] == 0
    assert st["bytes_mapped"] == want
    lo = addr_of(big)
    rss0 = proc.memory_info().rss
    huge0 = smaps_range(lo, lo + want).get("AnonHugePages", 0)
    stride = 64 * MiB
    big[::stride] = 1
    touches = -(-want // stride)
    rss1 = proc.memory_info().rss
    sm = smaps_range(lo, lo + want)
    huge = sm.get("AnonHugePages", 0) - huge0
    st = pool.stats()
    # pagemap, read here, of the whole range: the pages really present
    present = 0
    chunk = 1 << 18
    for off in range(0, want // PAGE, chunk):
        k = min(chunk, want // PAGE - off)
        present += int(np.count_nonzero(bit(pagemap(lo + off * PAGE, k), PM_PRESENT)))
    print(
        f"touches={touches} rss+={(rss1 - rss0) / MiB:.1f}MiB huge+={huge / MiB:.1f}MiB "
        f"present={present} bytes_private={st['bytes_private']}"
    )
    assert present >= touches
    assert st["bytes_private"] == present * PAGE
    # each byte costs its page, or its huge page where THP backs the buffer
    assert present * PAGE <= touches * HPAGE
    assert present * PAGE - huge <= touches * PAGE
    # the process grew by those pages and no more: nothing else was committed
    assert rss1 - rss0 - huge < 64 * MiB, (rss1 - rss0, huge)
    assert abs((rss1 - rss0) - present * PAGE) < 16 * MiB
    assert (big[::stride] == 1).all() and int(big[stride // 2]) == 0


def test_lazy_commit_of_a_huge_array():
    out = _isolated("lazy_commit_child", timeout=120)
    assert "2 x MemTotal:" in out


def overflow_child(shape, dtype: str) -> None:
    """(isolated) A shape whose byte size overflows is refused cleanly, and
    the pool works on."""
    pool = uksm.Pool("64MiB")
    try:
        pool.empty(shape, np.dtype(dtype))
    except (MemoryError, ValueError) as exc:
        print("refused", shape, type(exc).__name__)
    else:
        raise AssertionError(f"{shape} of {dtype} was given out")
    a = pool.empty(PAGE, np.uint8)
    a[:] = 1
    assert int(a.sum()) == PAGE
    assert pool.stats()["bytes_mapped"] == PAGE


def test_overflowing_shape_is_refused_not_a_crash():
    out = _isolated("overflow_child", (2**62, 16), "float64", timeout=60)
    assert "refused" in out


@pytest.mark.parametrize("shape", [(2**32, 2**32, 2**32), (2**70, 2**10)])
def test_overflowing_shape_beyond_size_t_is_refused(shape):
    out = _isolated("overflow_child", shape, "uint8", timeout=60)
    assert "refused" in out


def test_zeros_costs_nothing():
    """pool.zeros(256 MiB) maps and commits nothing: no RSS (the pool's range
    in smaps, and the process), no Shmem (nothing lands in the memfd)."""
    with uksm.Pool("1GiB") as pool:
        warm = pool.zeros(256 * MiB, np.uint8)  # the metadata's first touch
        pool.free(warm)
        del warm
        gc.collect()
        proc = psutil.Process()
        rss0, shm0 = proc.memory_info().rss, meminfo("Shmem")
        z = pool.zeros(256 * MiB, np.uint8)
        rss1, shm1 = proc.memory_info().rss, meminfo("Shmem")
        assert smaps_of(z)["Rss"] == 0
        assert not bit(pm_of(z), PM_PRESENT).any()
        assert rss1 - rss0 < 2 * MiB, (rss1 - rss0) / MiB
        assert shm1 - shm0 < 2 * MiB, (shm1 - shm0) / MiB  # system-wide: some slack
        st = pool.stats()
        assert st["bytes_private"] == 0 and st["bytes_frames"] == 0
        assert st["rss_bytes"] == 0 and st["bytes_resident"] == 0
        assert os.fstat(pool.fd).st_blocks == 0


def _untouched_read_costs_nothing(nbytes: int) -> None:
    with uksm.Pool("1GiB", max_resident="1GiB") as pool:
        z = pool.zeros(nbytes, np.uint8)
        assert int(z[::PAGE].sum()) == 0  # reads: the kernel's zero page
        assert smaps_of(z)["Rss"] == 0
        st = pool.stats()
        assert st["rss_bytes"] == 0, st["rss_bytes"]
        assert st["bytes_private"] == 0, st["bytes_private"]
        assert st["bytes_resident"] == 0
        pool.max_resident = 64 * PAGE  # nothing resident: nothing to evict
        st = pool.stats()
        assert st["swap_outs"] == 0, st["swap_outs"]


def test_reading_untouched_pages_costs_nothing():
    """Pages only ever read map the kernel's zero page: no memory, nothing
    for stats() to count and nothing for the reclaim to swap out."""
    _untouched_read_costs_nothing(64 * PAGE)  # below a huge page: 4 KiB pages


@pytest.mark.skipif(thp_mode() == "never", reason="no transparent huge pages")
def test_reading_untouched_huge_pages_costs_nothing():
    _untouched_read_costs_nothing(256 * MiB)


# --- 4. psutil, smaps_rollup and smaps agree with stats() --------------------------------

N_COPIES = 4


def _fill_copies(pool, nbytes: int):
    """N_COPIES arrays of identical contents, each page different from the
    others of its array: merging keeps one frame per page index."""
    arrs = []
    for _ in range(N_COPIES):
        a = pool.empty(nbytes, np.uint8)
        w = a.view(np.uint64)
        w[:] = 0x0123456789ABCDEF
        w[:: PAGE // 8] = np.arange(w.size // (PAGE // 8), dtype=np.uint64)
        arrs.append(a)
    return arrs


def _read_all(arrs) -> None:
    for a in arrs:
        assert int(a[::PAGE].sum()) >= 0  # one read per page: views mapped in


def _cow_tenth(arrs) -> int:
    for a in arrs:
        a[:: 10 * PAGE] ^= 1
    return sum(len(range(0, a.size, 10 * PAGE)) for a in arrs)


def _close(kernel: int, ours: int, what: str, slack: int = 2 * MiB) -> None:
    tol = 0.05 * max(abs(kernel), abs(ours), 0) + slack
    assert abs(kernel - ours) <= tol, (
        f"{what}: kernel {kernel / MiB:.2f} MiB, stats() {ours / MiB:.2f} MiB "
        f"(tolerance {tol / MiB:.2f} MiB)"
    )


def _smaps_agree(pool, st, tag: str) -> None:
    """The pool's range in /proc/self/smaps: no interpreter noise at all, so
    the agreement is to the page (smaps rounds each VMA's Pss to the kB)."""
    sm = smaps_range(*pool_span(pool))
    uss = sm.get("Private_Clean", 0) + sm.get("Private_Dirty", 0)
    assert sm["Rss"] == st["rss_bytes"], (tag, "Rss", sm["Rss"], st["rss_bytes"])
    assert uss == st["uss_bytes"], (tag, "USS", uss, st["uss_bytes"])
    assert abs(sm["Pss"] - st["pss_bytes"]) <= 64 * 1024 + 0.001 * st["pss_bytes"], (
        tag,
        "Pss",
        sm["Pss"],
        st["pss_bytes"],
    )


# Each pool's sentinel pair, alive as long as the pool (a Pool has
# __slots__: no attribute of the test's own can hang on it).
_SENTINELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sentinel(pool) -> list:
    """Two merged pages at the very start of the pool's range, never read.
    Anonymous memory mapped just below the range (the next mmap of the
    process often lands there) would merge into one VMA with the first
    buffer, and its pages would count in the smaps of the range; a view there
    is file-backed and merges with nothing.  Adds one frame to the counts,
    nothing to rss/uss/pss."""
    pair = [pool.full(PAGE, 0x5A, np.uint8) for _ in range(2)]
    pool.scan(full_scans=2)
    assert all((states(pool, a) == KSM).all() for a in pair)
    lo, _ = pool_span(pool)
    assert addr_of(pair[0]) == lo
    return pair


def _warm_baseline(pool, size: int) -> "_Baseline":
    """One round of everything in @pool first, so that the scanner's Python
    memory and the pool's tables are already there at the baseline and the
    slack is interpreter noise only; then the baseline."""
    _SENTINELS[pool] = _sentinel(pool)
    arrs = _fill_copies(pool, size)
    pool.scan(full_scans=2)
    _read_all(arrs)
    _cow_tenth(arrs)
    pool.stats()
    del arrs
    gc.collect()
    assert pool.stats()["bytes_mapped"] == 2 * PAGE  # the sentinel alone
    return _Baseline(pool)


def _file_backed(pool) -> dict:
    """Rss, USS and Pss of the process's file mappings (libraries, the
    interpreter) outside the pool's range (whose views of the memfd and the
    swap file are the pool's own): they change when another process mapping
    the same files starts or exits (a page shared with it becomes private,
    and back), which is noise here, not the pool's."""
    lo, hi = pool_span(pool)
    out = {"Rss": 0, "USS": 0, "Pss": 0}
    cur = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                path = fields[5] if len(fields) > 5 else ""
                cur = (
                    path.startswith("/")
                    and not path.startswith("/memfd:")
                    and not (start < hi and end > lo)
                )
            elif cur and len(fields) == 3 and fields[2] == "kB":
                key, val = fields[0].rstrip(":"), int(fields[1]) * 1024
                if key in ("Rss", "Pss"):
                    out[key] += val
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["USS"] += val
    return out


class _Baseline:
    def __init__(self, pool) -> None:
        gc.collect()
        self.full = psutil.Process().memory_full_info()
        self.roll = rollup()
        self.files = _file_backed(pool)

    def check(self, pool, tag: str) -> dict:
        st = pool.stats()
        full = psutil.Process().memory_full_info()
        roll = rollup()
        files = _file_backed(pool)
        noise = {k: files[k] - self.files[k] for k in files}
        _close(full.rss - self.full.rss - noise["Rss"], st["rss_bytes"], f"{tag}: psutil rss")
        _close(full.uss - self.full.uss - noise["USS"], st["uss_bytes"], f"{tag}: psutil uss")
        _close(full.pss - self.full.pss - noise["Pss"], st["pss_bytes"], f"{tag}: psutil pss")
        _close(roll["Rss"] - self.roll["Rss"] - noise["Rss"], st["rss_bytes"], f"{tag}: rollup Rss")
        _close(roll["Pss"] - self.roll["Pss"] - noise["Pss"], st["pss_bytes"], f"{tag}: rollup Pss")
        _smaps_agree(pool, st, tag)
        return st


def psutil_child(cow: str) -> None:
    """(isolated: a fresh interpreter holds no garbage of earlier tests, such
    as a traceback keeping an old pool's arrays alive, to be freed during the
    measurement)  psutil.memory_full_info() and smaps_rollup deltas against
    stats()[rss_bytes/uss_bytes/pss_bytes]: 4 copies of 64 MiB written,
    merged, read (views mapped in), 10% copied on write.  A warm-up round in
    the same pool first, so that the scanner's own Python memory is already
    there at the baseline and the slack is interpreter noise only."""
    size = 64 * MiB
    with uksm.Pool("1GiB", cow=cow, pages_to_scan=20000, sleep_millisecs=0) as pool:
        base = _warm_baseline(pool, size)
        arrs = _fill_copies(pool, size)
        total = N_COPIES * size
        st = base.check(pool, "written")
        assert st["rss_bytes"] == st["uss_bytes"] == st["pss_bytes"] == total
        assert st["bytes_private"] == total

        pool.scan(full_scans=2)
        st = base.check(pool, "merged")
        pages = size // PAGE
        # (+ 1: the sentinel's frame)
        assert st["pages_shared"] == pages + 1
        assert st["pages_sharing"] == (N_COPIES - 1) * pages + 1
        assert st["rss_bytes"] == 0 and st["bytes_frames"] == size + PAGE

        _read_all(arrs)
        st = base.check(pool, "read")
        assert st["rss_bytes"] == total and st["pss_bytes"] == size and st["uss_bytes"] == 0

        breaks = st["cow_breaks"]
        cowed = _cow_tenth(arrs)
        st = base.check(pool, "cow 10%")
        assert st["cow_breaks"] - breaks == cowed
        frames = pages - cowed // N_COPIES  # every copy wrote the same pages
        assert st["pages_shared"] == frames + 1
        assert st["uss_bytes"] == cowed * PAGE
        assert st["pss_bytes"] == (cowed + frames) * PAGE
    print("psutil agrees")


@pytest.mark.parametrize("cow", COWS)
def test_psutil_agrees_with_stats(cow):
    assert "psutil agrees" in _isolated("psutil_child", cow, timeout=120)


def psutil_swapped_child(cow: str) -> None:
    """(isolated) The same after swapping most of it out, and after reading
    it back (the swap views mapped in, through the page cache)."""
    size = 16 * MiB
    with uksm.Pool(
        "256MiB", cow=cow, pages_to_scan=20000, sleep_millisecs=0, max_resident="256MiB"
    ) as pool:
        base = _warm_baseline(pool, size)
        arrs = _fill_copies(pool, size)
        pool.scan(full_scans=2)
        _read_all(arrs)
        _cow_tenth(arrs)
        base.check(pool, "before swapping")
        pool.max_resident = 8 * MiB
        st = base.check(pool, "swapped out")
        assert st["pages_swapped"] > 0 and st["bytes_resident"] <= 8 * MiB
        _read_all(arrs)  # read back through the page cache
        st = pool.stats()
        assert st["pages_swapped"] > 0
        base.check(pool, "swapped, read back")
    print("psutil agrees")


@pytest.mark.parametrize("cow", COWS)
def test_psutil_agrees_with_stats_when_swapped(cow):
    assert "psutil agrees" in _isolated("psutil_swapped_child", cow, timeout=120)


def psutil_fork_child(cow: str) -> None:
    """(isolated) The parent's figures while a forked child sleeps: RSS as
    psutil sees it; USS and PSS of the pool's range (the interpreter's own
    pages become shared with the child too, so process-wide deltas say
    nothing here)."""
    size = 16 * MiB
    with uksm.Pool("256MiB", cow=cow, pages_to_scan=20000, sleep_millisecs=0) as pool:
        base = _warm_baseline(pool, size)
        arrs = _fill_copies(pool, size)
        pool.scan(full_scans=2)
        _read_all(arrs)
        _cow_tenth(arrs)
        st0 = base.check(pool, "before fork")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child only sleeps
            try:
                os.close(w)
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        try:
            time.sleep(0.1)
            st = pool.stats()
            full = psutil.Process().memory_full_info()
            noise = _file_backed(pool)["Rss"] - base.files["Rss"]
            _close(full.rss - base.full.rss - noise, st["rss_bytes"], "forked: psutil rss")
            assert st["rss_bytes"] == st0["rss_bytes"]
            _smaps_agree(pool, st, "forked")
        finally:
            os.close(w)
            os.waitpid(pid, 0)
        base.check(pool, "child gone")
    print("psutil agrees")


@pytest.mark.parametrize(
    "cow",
    [
        pytest.param(
            "kernel",
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "core bug: after fork, stats()['pss_bytes'] counts each frame with a "
                    "view present as a whole page of this process (frames_present), but a "
                    "child's copied page tables map it too (fork copies the PTEs of a "
                    "writable view VMA once it has an anon_vma) and the kernel's Pss "
                    "splits it: with 4 x 16 MiB merged, read and 10% written, the parent's "
                    "pss_bytes is 17.6 MiB where its smaps say 10.4 MiB"
                ),
            ),
        ),
        "signal",
    ],
)
def test_psutil_agrees_with_stats_after_fork(cow):
    assert "psutil agrees" in _isolated("psutil_fork_child", cow, timeout=120)


# --- 5. transparent huge pages --------------------------------------------------------


@pytest.mark.parametrize("cow", COWS)
def test_thp_only_the_merged_pages_huge_page_splits(cow):
    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent_hugepage is [{thp_mode()}]")
    with uksm.Pool("256MiB", cow=cow, pages_to_scan=20000, sleep_millisecs=0) as pool:
        a = pool.empty(64 * MiB, np.uint8)
        src = rand_bytes(3, a.size)
        a[:] = src
        assert addr_of(a) % HPAGE == 0
        huge0 = smaps_of(a)["AnonHugePages"]
        assert huge0 > 0, "a written 64 MiB pool buffer got no huge page"
        picks = [8192 + 17, 3 * 512 + 5, 16383]  # three different huge pages
        b = pool.empty(len(picks) * PAGE, np.uint8)
        for j, k in enumerate(picks):
            page(b, j)[:] = src[k * PAGE : (k + 1) * PAGE]
        pool.scan(full_scans=3)
        st = states(pool, a)
        assert (st[picks] == KSM).all(), st[picks]
        assert (np.delete(st, picks) == PRIVATE).all()
        huge1 = smaps_of(a)["AnonHugePages"]
        hpages = len({k * PAGE // HPAGE for k in picks})
        assert huge1 >= huge0 - hpages * HPAGE, (huge0 / MiB, huge1 / MiB)
        assert huge1 > 0
        assert np.array_equal(a, src)


# --- 6. threads writing while the scanner merges --------------------------------------------


def random_writers_child(cow: str, seed: int, seconds: float) -> None:
    """(isolated) Two threads write at random into merged arrays (each its
    own arrays and shadows) while pool.start() merges them and the main
    thread compacts; every byte is checked at the end, and now and then
    along the way."""
    rng0 = np.random.default_rng(seed)
    patterns = rng0.integers(0, 256, (6, PAGE), dtype=np.uint8)
    patterns[0] = 0
    # the default compact_threshold: the scanner compacts after full scans
    # (the store grows 16 MiB at a time, so it is "fragmented" at once)
    pool = uksm.Pool("128MiB", cow=cow, pages_to_scan=400, sleep_millisecs=0, use_zero_pages=True)
    npages = 192
    arrays, shadows = [], []
    for _ in range(4):
        shadow = patterns[rng0.integers(0, len(patterns), npages)].reshape(-1).copy()
        arrays.append(pool.asarray(shadow))
        shadows.append(shadow)
    pool.scan(full_scans=2)
    st0 = pool.stats()
    assert st0["pages_sharing"] > 0 and st0["ksm_zero_pages"] > 0
    errors = []

    def writer(t: int) -> None:
        rng = np.random.default_rng(seed * 10 + t)
        mine = [2 * t, 2 * t + 1]
        end = time.monotonic() + seconds
        n = 0
        try:
            while time.monotonic() < end:
                k = mine[int(rng.integers(2))]
                a, s = arrays[k], shadows[k]
                op = int(rng.integers(4))
                if op == 0:  # one byte
                    i = int(rng.integers(a.size))
                    v = int(rng.integers(256))
                    a[i] = v
                    s[i] = v
                elif op == 1:  # a whole page to a pattern: merges again
                    p = int(rng.integers(npages))
                    q = patterns[int(rng.integers(len(patterns)))]
                    page(a, p)[:] = q
                    s[p * PAGE : (p + 1) * PAGE] = q
                elif op == 2:  # a span across pages
                    i = int(rng.integers(a.size - 3 * PAGE))
                    ln = int(rng.integers(1, 3 * PAGE))
                    v = rng.integers(0, 256, ln, dtype=np.uint8)
                    a[i : i + ln] = v
                    s[i : i + ln] = v
                else:  # read-your-writes
                    p = int(rng.integers(npages))
                    if not np.array_equal(page(a, p), s[p * PAGE : (p + 1) * PAGE]):
                        errors.append(f"thread {t}: array {k} page {p} differs mid-run")
                        return
                n += 1
                if n % 64 == 0:
                    time.sleep(0.001)  # give the scanner its turn
        except BaseException as exc:  # noqa: B902
            errors.append(f"thread {t}: {exc!r}")

    pool.start()
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):  # and compactions meanwhile
        pool.compact()
        time.sleep(0.1)
    for th in threads:
        th.join()
    pool.stop()
    assert not errors, errors
    st = pool.stats()
    for k, (a, s) in enumerate(zip(arrays, shadows)):
        assert np.array_equal(a, s), f"array {k} differs from its shadow"
    merged_during = st["pages_merged_total"] - st0["pages_merged_total"]
    print(
        f"cow={cow} merged during the run: {merged_during}, cow_breaks {st['cow_breaks']}, "
        f"signal {st['cow_breaks_signal']}, zero cows {st['zero_page_cows']}, "
        f"compactions {st['compactions']}"
    )
    assert st["compactions"] > 0
    assert merged_during > 0, "the scanner merged nothing while the writers ran"
    assert st["cow_breaks"] > 0
    if cow == "signal":
        assert st["cow_breaks_signal"] == st["cow_breaks"]
    else:
        assert st["cow_breaks_signal"] == 0
    # and the page table agrees with the counters
    ksm = zero = 0
    for a in arrays:
        s_, _, _ = pool.page_states(a)
        ksm += int(np.count_nonzero(s_ == KSM))
        zero += int(np.count_nonzero(s_ == ZERO))
    assert ksm == st["pages_shared"] + st["pages_sharing"]
    assert zero == st["ksm_zero_pages"]
    pool.close()


@pytest.mark.parametrize("cow", COWS)
def test_random_writes_from_two_threads_while_scanning(cow):
    out = _isolated("random_writers_child", cow, 5, 3.0, timeout=90)
    assert "merged during the run" in out


def compaction_race_child(cow: str, iterations: int) -> None:
    """(isolated) A thread fills an array over and over (numpy releases the
    GIL for it) while pool.compact() evacuates its pages: they were copied on
    write out of views of frames that are all free now, so the memfd is cut
    and the copies must get anonymous memory of their own first.  Every page
    must end with the last value written."""
    pool = uksm.Pool("64MiB", cow=cow, compact_threshold=0)
    n = 512
    src = np.repeat(np.arange(1, n + 1, dtype=np.uint32), PAGE // 4).view(np.uint8)
    for it in range(iterations):
        a = pool.asarray(src)
        b = pool.asarray(src)
        pool.scan(full_scans=2)  # a, b: views of n consecutive frames
        assert (states(pool, a) == KSM).all()
        a[::PAGE] = 0  # every page copied on write:
        b[::PAGE] = 0  # the frames are free, the copies
        assert pool.stats()["pages_shared"] == 0  # still in the views' VMAs
        stop = threading.Event()
        last = [0]

        def writer(stop: threading.Event, a: np.ndarray, last: list) -> None:
            v = 0
            while not stop.is_set():
                v = v % 250 + 1
                a.fill(v)
                last[0] = v

        t = threading.Thread(target=writer, args=(stop, a, last))
        t.start()
        time.sleep(0.001)  # the writer is filling by now
        try:
            res = pool.compact()
        finally:
            stop.set()
            t.join()
        assert res["memfd_size_after"] < res["memfd_size_before"]  # it did cut
        lost = np.nonzero((a.reshape(n, PAGE) != last[0]).any(axis=1))[0]
        assert len(lost) == 0, (
            f"iteration {it}: {len(lost)} pages lost writes made "
            f"during compact() (first: page {lost[0]})"
        )
        assert np.array_equal(b.reshape(n, PAGE)[:, 1:], src.reshape(n, PAGE)[:, 1:])
        del a, b
    print("no write lost in", iterations, "compactions")


@pytest.mark.parametrize("cow", COWS)
def test_compaction_keeps_concurrent_writes(cow):
    """Regression: the .so built before the evacuate_run fix (a fresh
    read-write mapping filled after it was mapped) lost writes made during
    the copy back, in 10-40% of these iterations, in both modes."""
    _isolated("compaction_race_child", cow, 40, timeout=120)
