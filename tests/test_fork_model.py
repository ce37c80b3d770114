"""Fork and the memory model (csrc/pool.c: fork epochs, heirs, uksm_detach).

fork copies nothing: every page state is a private mapping, shared copy on
write by the kernel.  What uksm must get right is the frame store and the
swap file, which the child maps too: a frame or slot the parent frees while
a child may still map it is deferred until the child exits or execs, and the
child's pool is an "heir" that reads the parent's store until its first
merge, compaction or swap-out, when it detaches (copies what it maps).

The model test drives random seeded sequences: the parent writes (shadowed),
forks children that do their own writes, frees, merges, swap-outs,
compactions, a nested fork and an exec, and verify their shadows before and
after everything the parent does meanwhile (frees, merges, compactions,
shrinks, swap-outs: reuse of a frame or slot a child still maps would show as
wrong bytes in the child).  When all children are gone, the deferred frames
and slots are back and the frame store holds what the parent's frames need.

Everything that forks runs in a child interpreter with a timeout (_isolated)
and every forked process is waited for with a deadline, so a hang or a
crash fails the test instead of CI.
"""

import errno
import gc
import multiprocessing
import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import psutil
import pytest

import uksm
from uksm.errors import PoolFullError, UksmError

from conftest import run_isolated

PAGE = uksm.PAGE_SIZE
MiB = 1 << 20
PRIVATE, KSM, ZERO, SWAPPED = (
    uksm.PageState.PRIVATE,
    uksm.PageState.KSM,
    uksm.PageState.ZERO,
    uksm.PageState.SWAPPED,
)
COWS = ["kernel", "signal"]
HERE = os.path.dirname(os.path.abspath(__file__))
DEADLINE = 60


def _isolated(fn: str, *args, timeout: float = 90) -> str:
    return run_isolated("test_fork_model", fn, *args, timeout=timeout)


def wait_child(pid: int, timeout: float = DEADLINE) -> int:
    """waitpid with a deadline: a hung child is killed and reported as such
    (exit code 124).  Returns the exit code, 128 + signal if killed by one."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return (
                os.waitstatus_to_exitcode(status)
                if os.WIFEXITED(status)
                else 128 + os.WTERMSIG(status)
            )
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 124
        time.sleep(0.002)


def wait_eof(fd: int, timeout: float = DEADLINE) -> bool:
    """Block until every write end of the pipe is closed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if r and not os.read(fd, 64):
            return True
    return False


def fork_run(body, *close_in_child) -> int:
    """Fork; the child runs body() and exits 0, or 1 with its traceback on
    stderr (never returning into the caller's stack)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in close_in_child:
                os.close(fd)
            body()
            code = 0
        except BaseException:  # noqa: B902
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def addr_of(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def page(a: np.ndarray, i: int) -> np.ndarray:
    return a.view(np.uint8).reshape(-1)[i * PAGE : (i + 1) * PAGE]


def states(pool, a) -> np.ndarray:
    return pool.page_states(a)[0]


# --- the model -----------------------------------------------------------------------


class Model:
    """A pool and a shadow (plain numpy) of every live buffer."""

    NPAT = 12

    def __init__(self, seed: int, cow: str, swap: bool) -> None:
        self.rng = random.Random(seed)
        g = np.random.default_rng(seed)
        self.patterns = g.integers(1, 256, (self.NPAT, PAGE), dtype=np.uint8)
        self.patterns[0] = 0  # zero pages (use_zero_pages)
        self.swap = swap
        self.pool = uksm.Pool(
            "64MiB",
            cow=cow,
            pages_to_scan=4096,
            sleep_millisecs=0,
            use_zero_pages=True,
            compact_threshold=0,
            max_resident="48MiB" if swap else None,
        )
        self.live: dict = {}
        self.next_name = 0
        self.max_deferred = 0
        self.shrunk = 0
        self.log: list = []

    # operations ----------------------------------------------------------------
    def alloc(self) -> None:
        npages = self.rng.choice([1, 2, 3, 5, 8, 16, 33, 64])
        arr = self.pool.empty(npages * PAGE, np.uint8)
        shadow = np.zeros(npages * PAGE, np.uint8)
        for p in range(npages):
            r = self.rng.random()
            if r < 0.1:
                continue  # never written: untouched
            if r < 0.5:
                v = self.patterns[self.rng.randrange(self.NPAT)]
            else:
                v = np.frombuffer(self.rng.randbytes(PAGE), np.uint8)
            page(arr, p)[:] = v
            shadow[p * PAGE : (p + 1) * PAGE] = v
        self.live[self.next_name] = (arr, shadow)
        self.log.append(("alloc", self.next_name, npages))
        self.next_name += 1

    def clone(self) -> None:
        """A copy of a live buffer (or of its first pages): it merges page by
        page with the original, so frees and writes of either free frames."""
        if not self.live:
            return self.alloc()
        name = self.rng.choice(sorted(self.live))
        src = self.live[name][1]
        n = self.rng.randrange(1, src.size // PAGE + 1) * PAGE
        arr = self.pool.asarray(src[:n])
        self.live[self.next_name] = (arr, src[:n].copy())
        self.log.append(("clone", self.next_name, name, n // PAGE))
        self.next_name += 1

    def write(self) -> None:
        if not self.live:
            return self.alloc()
        name = self.rng.choice(sorted(self.live))
        arr, shadow = self.live[name]
        kind = self.rng.randrange(3)
        if kind == 0:  # a whole page, to a pattern
            p = self.rng.randrange(arr.size // PAGE)
            v = self.patterns[self.rng.randrange(self.NPAT)]
            page(arr, p)[:] = v
            shadow[p * PAGE : (p + 1) * PAGE] = v
        elif kind == 1:  # one byte
            i = self.rng.randrange(arr.size)
            v = self.rng.randrange(256)
            arr[i] = v
            shadow[i] = v
        else:  # a span across pages
            i = self.rng.randrange(arr.size)
            n = min(self.rng.randrange(1, 3 * PAGE), arr.size - i)
            v = np.frombuffer(self.rng.randbytes(n), np.uint8)
            arr[i : i + n] = v
            shadow[i : i + n] = v
        self.log.append(("write", name, kind))

    def free(self) -> None:
        if not self.live:
            return
        name = self.rng.choice(sorted(self.live))
        arr, _ = self.live.pop(name)
        self.pool.free(arr)
        self.log.append(("free", name))
        self.max_deferred = max(self.max_deferred, self.pool.stats()["frames_deferred"])

    def scan(self) -> None:
        self.pool.scan(full_scans=self.rng.choice([1, 2]))
        self.log.append(("scan",))

    def compact(self) -> None:
        self.pool.compact()
        self.log.append(("compact",))

    def shrink(self) -> None:
        if self.shrunk >= 8 * MiB:
            return
        try:
            self.pool.shrink("1MiB")
            self.shrunk += MiB
            self.log.append(("shrink", "ok"))
        except (UksmError, PoolFullError) as exc:  # refused: deferred frames up there
            self.log.append(("shrink", type(exc).__name__))

    def swapout(self) -> None:
        if not self.swap:
            return
        self.pool.max_resident = self.rng.choice([16, 64, 256]) * PAGE
        self.pool.max_resident = "48MiB"
        self.log.append(("swapout",))

    # checks ----------------------------------------------------------------------
    def verify(self, where: str) -> None:
        for name, (arr, shadow) in self.live.items():
            if not np.array_equal(arr, shadow):
                bad = np.nonzero(arr != shadow)[0]
                st = states(self.pool, arr)
                raise AssertionError(
                    f"{where} (pid {os.getpid()}): buffer {name} differs from its shadow at "
                    f"{len(bad)} bytes, first {bad[0]} (page {bad[0] // PAGE}, state "
                    f"{st[bad[0] // PAGE]}); last ops {self.log[-12:]}"
                )

    def check_tables(self) -> dict:
        """The page table of the live buffers against the counters.  The
        table is read before and after stats(), until both reads agree:
        khugepaged may collapse a huge-page-advised buffer at any moment,
        turning its untouched (zero) pages into present ones, which the next
        reconcile counts; the counters must match a table that held still."""

        def tables():
            return [self.pool.page_states(arr)[:2] for arr, _ in self.live.values()]

        for _ in range(5):
            before = tables()
            st = self.pool.stats()
            after = tables()
            if all(
                np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                for a, b in zip(before, after)
            ):
                break
        pfns, slots = set(), set()
        ksm = zero = swapped = 0
        for s, pfn in after:
            ksm += int(np.count_nonzero(s == KSM))
            zero += int(np.count_nonzero(s == ZERO))
            swapped += int(np.count_nonzero(s == SWAPPED))
            pfns.update(pfn[s == KSM].tolist())
            slots.update(pfn[s == SWAPPED].tolist())
        assert st["bytes_mapped"] == sum(a.size for a, _ in self.live.values())
        assert st["pages_shared"] == len(pfns), (st["pages_shared"], len(pfns))
        assert st["pages_shared"] + st["pages_sharing"] == ksm
        assert st["ksm_zero_pages"] == zero
        assert st["pages_swapped"] == swapped, (st["pages_swapped"], swapped, self.log[-15:])
        self.max_deferred = max(self.max_deferred, st["frames_deferred"])
        return dict(st=st, slots=len(slots), frames=len(pfns))


# --- the child's side of the model ---------------------------------------------------------

CHILD_OPS = ["write"] * 5 + [
    "alloc",
    "clone",
    "free",
    "scan",
    "scan",
    "swapout",
    "compact",
    "grandchild",
    "exec",
]


def child_life(m: Model, release_r: int, depth: int, parent_ino: int) -> None:
    """A forked process of the model: check what it inherited, do its own
    random work, wait while the parent does its own, check again."""
    pool = m.pool
    m.verify("child at fork")
    start = pool.stats()
    detach0 = start["fork_detaches"]
    assert start["pages_shared"] >= 0
    heir_ino = os.fstat(pool.fd).st_ino
    if depth == 1:
        assert heir_ino == parent_ino, "a fresh child has a store of its own already"
    needs_store = False
    kids = []
    for _ in range(m.rng.randrange(4, 12)):
        op = m.rng.choice(CHILD_OPS)
        if op == "grandchild" and depth < 2:
            sub = Model.__new__(Model)
            sub.__dict__.update(m.__dict__)
            sub.rng = random.Random(m.rng.random())
            sub.log = list(m.log)
            ino = os.fstat(pool.fd).st_ino
            kids.append(
                fork_run(lambda sub=sub, ino=ino: child_life(sub, release_r, depth + 1, ino))
            )
            m.log.append(("grandchild",))
        elif op == "exec":
            pid = os.fork()
            if pid == 0:
                try:
                    os.execv("/bin/true", ["true"])
                finally:
                    os._exit(127)
            assert wait_child(pid) == 0
            assert subprocess.run(["true"]).returncode == 0
            m.log.append(("exec",))
        elif op in ("swapout", "compact"):
            if op == "swapout" and not m.swap:
                continue
            getattr(m, op)()
            needs_store = True
        elif op != "grandchild":
            getattr(m, op)()
        m.verify(f"child depth {depth} after {op}")
    st = pool.stats()
    detached = st["fork_detaches"] - detach0
    assert detached in (0, 1), f"detached {detached} times"
    if needs_store:
        assert detached == 1, "a compaction or swap-out in the child did not detach it"
    if detached:
        assert os.fstat(pool.fd).st_ino != heir_ino
    else:
        assert os.fstat(pool.fd).st_ino == heir_ino
    # now the parent frees, merges, compacts, shrinks, swaps: none of it shows here
    assert wait_eof(release_r), "the parent never released the child"
    m.verify(f"child depth {depth} after the parent's changes")
    m.check_tables()
    for pid in kids:
        code = wait_child(pid)
        assert code == 0, f"grandchild {pid} exited with {code}"
    m.verify(f"child depth {depth} at exit")


# --- the parent's side ----------------------------------------------------------------

PARENT_OPS = ["write"] * 6 + [
    "alloc",
    "clone",
    "clone",
    "free",
    "free",
    "scan",
    "scan",
    "compact",
    "shrink",
    "swapout",
    "fork",
    "fork",
    "release",
]


def run_model(seed: int, cow: str, swap: bool, steps: int = 60) -> None:
    """(isolated) One random sequence; see the module docstring."""
    m = Model(seed, cow, swap)
    pool = m.pool
    for _ in range(6):
        m.alloc()
    m.scan()
    m.scan()
    children = []  # (pid, release write end)
    forks = 0
    for step in range(steps):
        op = m.rng.choice(PARENT_OPS)
        if op == "fork":
            if len(children) >= 3:
                continue
            ino = os.fstat(pool.fd).st_ino
            r, w = os.pipe()
            others = [cw for _, cw in children]
            child_model = m
            pid = fork_run(lambda m=child_model, r=r, ino=ino: child_life(m, r, 1, ino), w, *others)
            os.close(r)
            children.append((pid, w))
            forks += 1
            m.log.append(("fork", pid))
        elif op == "release":
            if not children:
                continue
            pid, w = children.pop(m.rng.randrange(len(children)))
            os.close(w)
            code = wait_child(pid)
            assert code == 0, f"seed {seed}: child {pid} exited with {code}"
            m.log.append(("release", pid))
        else:
            getattr(m, op)()
        m.verify(f"parent step {step} ({op})")
        if step % 3 == 0:
            m.check_tables()
    for pid, w in children:
        os.close(w)
        code = wait_child(pid)
        assert code == 0, f"seed {seed}: child {pid} exited with {code}"
    m.verify("parent at the end")
    t = m.check_tables()  # a pool call: the epochs are closed, deferred frames back
    st = t["st"]
    assert st["frames_deferred"] == 0, st["frames_deferred"]
    assert st["fork_detaches"] == 0  # the parent never detaches
    frames_need = st["pages_shared"] * PAGE
    blocks = os.fstat(pool.fd).st_blocks * 512
    assert st["bytes_frames"] == blocks
    assert frames_need <= st["bytes_frames"] <= frames_need + 16 * PAGE, (
        frames_need,
        st["bytes_frames"],
    )
    if swap:
        assert st["swap_slots_used"] == t["slots"], (st["swap_slots_used"], t["slots"])
    print(
        f"seed {seed} cow {cow} swap {swap}: {forks} forks, {len(m.log)} ops, "
        f"frames deferred at most {m.max_deferred}, frames {st['pages_shared']}, "
        f"store {st['bytes_frames']}, slots {t['slots']}"
    )
    assert m.max_deferred > 0, "the sequence never freed a frame under a live child"


@pytest.mark.parametrize("seed,swap", [(9, False), (2, True), (4, True)])
@pytest.mark.parametrize("cow", COWS)
def test_fork_model(cow, seed, swap):
    out = _isolated("run_model", seed, cow, swap, timeout=120)
    assert f"seed {seed}" in out


# --- fork costs O(mappings) -------------------------------------------------------------


def fork_time(_keep_alive) -> float:
    """The parent's time in os.fork(), best of 5 (the child exits at once)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        best = min(best, time.perf_counter() - t0)
        assert wait_child(pid) == 0
    return best


def fork_time_child() -> None:
    """(isolated) Fork with a 256 MiB pool fully written (private, then half
    of it merged) against fork with a 256 MiB numpy array."""
    size = 256 * MiB
    plain = np.empty(size, np.uint8)
    plain.view(np.uint64)[:] = np.arange(size // 8, dtype=np.uint64)
    t_numpy = fork_time(plain)
    del plain
    gc.collect()
    pool = uksm.Pool("512MiB", pages_to_scan=20000, sleep_millisecs=0)
    a = pool.empty(size // 2, np.uint8)
    a.view(np.uint64)[:] = np.arange(a.size // 8, dtype=np.uint64)
    b = pool.empty(size // 2, np.uint8)
    b.view(np.uint64)[:] = ~np.arange(b.size // 8, dtype=np.uint64)
    t_private = fork_time(a)
    b[:] = a  # b's pages merge with a's, in runs
    pool.scan(full_scans=2)
    assert (states(pool, b) == KSM).all()
    t_merged = fork_time(a)
    print(
        f"fork: numpy {t_numpy * 1e3:.2f} ms, pool private {t_private * 1e3:.2f} ms, "
        f"pool merged {t_merged * 1e3:.2f} ms"
    )
    floor = max(t_numpy, 0.002)  # a fork is never free
    assert t_private < 10 * floor, (t_private, t_numpy)
    assert t_merged < 10 * floor, (t_merged, t_numpy)
    assert np.array_equal(a, b)


def test_fork_time_is_o_mappings():
    out = _isolated("fork_time_child", timeout=120)
    assert "fork:" in out


# --- exec costs nothing ----------------------------------------------------------------------


def merged_pool(cow: str = "kernel", n: int = 64, seed: int = 0):
    pool = uksm.Pool("64MiB", cow=cow, pages_to_scan=4096, sleep_millisecs=0)
    src = np.random.default_rng(seed).integers(0, 256, n * PAGE, dtype=np.uint8)
    a = pool.asarray(src)
    b = pool.asarray(src)
    pool.scan(full_scans=2)
    assert (states(pool, a) == KSM).all()
    return pool, src, a, b


def exec_child() -> None:
    """(isolated) subprocess.run() with a live pool (and its scanner running): no frame
    deferred, no store copied, no memory taken; and a forked child that
    execs (preexec_fn forces a real fork) ends its epoch by exec itself,
    while it still runs."""
    pool, src, a, b = merged_pool()
    try:
        pool.start()
        st0 = pool.stats()
        rss0 = psutil.Process().memory_info().rss
        for _ in range(5):
            assert subprocess.run(["true"]).returncode == 0
        st1 = pool.stats()
        assert st1["fork_detaches"] == 0 and st1["frames_deferred"] == 0
        assert st1["bytes_frames"] == st0["bytes_frames"]
        assert psutil.Process().memory_info().rss - rss0 < 4 * MiB
        # a real fork, then exec: the exec'd program lives on, the epoch is over
        proc = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: None)
        try:
            time.sleep(0.2)
            assert proc.poll() is None
            pool.stop()
            a[:] = 1  # every frame loses a view ...
            b[:] = 2  # ... and then its last one
            st2 = pool.stats()
            assert st2["pages_shared"] == 0
            assert st2["frames_deferred"] == 0, "an exec'd child keeps frames deferred"
            assert st2["bytes_frames"] == 0
        finally:
            proc.kill()
            proc.wait()
    finally:
        pool.close()
    print("exec ok")


def test_exec_child_costs_nothing():
    assert "exec ok" in _isolated("exec_child", timeout=90)


# --- a child that merges detaches -------------------------------------------------------------


def merge_detach_child(cow: str) -> None:
    """(isolated) A child merging new contents detaches once (compaction
    after that does not again) and its own store leaves the parent's
    untouched; the parent's frames freed meanwhile wait for it."""
    pool, src, a, b = merged_pool(cow)
    try:
        ino = os.fstat(pool.fd).st_ino
        frames0 = pool.stats()["bytes_frames"]
        done_r, done_w = os.pipe()
        go_r, go_w = os.pipe()

        def child():
            os.close(done_r)
            os.close(go_w)
            assert pool.stats()["fork_detaches"] == 0
            assert os.fstat(pool.fd).st_ino == ino  # an heir: the parent's store
            c = pool.full(16 * PAGE, 0x3C, np.uint8)  # new content, twice
            d = pool.full(16 * PAGE, 0x3C, np.uint8)
            a[5 * PAGE : 7 * PAGE] = 0x11  # the child's own writes
            st = pool.scan(full_scans=2)
            assert (states(pool, c) == KSM).all() and (states(pool, d) == KSM).all()
            assert st["fork_detaches"] == 1, st["fork_detaches"]
            assert os.fstat(pool.fd).st_ino != ino
            pool.scan(full_scans=1)
            pool.compact()
            assert pool.stats()["fork_detaches"] == 1  # once only
            exp = src.copy()
            exp[5 * PAGE : 7 * PAGE] = 0x11
            assert np.array_equal(a, exp) and np.array_equal(b, src)
            os.write(done_w, b"m")
            assert wait_eof(go_r)  # the parent writes now
            assert np.array_equal(a, exp) and np.array_equal(b, src)
            assert (c == 0x3C).all() and (d == 0x3C).all()

        pid = fork_run(child)
        os.close(done_w)
        os.close(go_r)
        try:
            assert os.read(done_r, 1) == b"m"
            # the child has merged and compacted in its own store: ours is as it was
            assert np.array_equal(a, src) and np.array_equal(b, src)
            st = pool.stats()
            assert st["bytes_frames"] == frames0 and st["fork_detaches"] == 0
            assert (states(pool, a) == KSM).all()
            b[:] = 0x77  # COW every view of b ...
            a[:PAGE] = 0x78  # ... and one of a: its frame
            st = pool.stats()  #     is freed, the child
            assert st["frames_deferred"] == 1  #     may still map it
            assert st["bytes_frames"] == frames0  # deferred: not punched
        finally:
            os.close(go_w)
            code = wait_child(pid)
            os.close(done_r)
        assert code == 0
        st = pool.stats()
        assert st["frames_deferred"] == 0 and st["bytes_frames"] == frames0 - PAGE
        assert (b == 0x77).all() and (a[:PAGE] == 0x78).all()
        assert np.array_equal(a[PAGE:], src[PAGE:])
    finally:
        pool.close()
    print("detach ok")


@pytest.mark.parametrize("cow", COWS)
def test_child_merge_detaches_and_never_changes_the_parent(cow):
    assert "detach ok" in _isolated("merge_detach_child", cow, timeout=90)


def first_merge_child() -> None:
    """(isolated) The child's first merge maps pages onto frames it inherited."""
    pool, src, a, b = merged_pool()
    try:
        ino = os.fstat(pool.fd).st_ino

        def child():
            c = pool.asarray(src[: 4 * PAGE])  # equal to frames the parent has
            st = pool.scan(full_scans=2)
            assert (states(pool, c) == KSM).all()
            assert st["fork_detaches"] == 1, "merged, but still an heir"
            assert os.fstat(pool.fd).st_ino != ino

        pid = fork_run(child)
        assert wait_child(pid) == 0
    finally:
        pool.close()
    print("first merge ok")


def test_child_first_merge_into_an_inherited_frame_detaches():
    assert "first merge ok" in _isolated("first_merge_child", timeout=90)


def refused_call_child(swap_dir: str) -> None:
    """(isolated) A call the core refuses, or a reclaim sitting out a failed
    swap write's backoff, does nothing in a forked child: it must not cost
    the child a copy of the store and of the swap file (a detach), which
    only a merge, a compaction or an eviction that will write needs."""
    pool = uksm.Pool(
        "64MiB", pages_to_scan=4096, sleep_millisecs=0, max_resident="32MiB", swap_path=swap_dir
    )
    try:
        src = np.random.default_rng(5).integers(0, 256, 16 * PAGE, dtype=np.uint8)
        a = pool.asarray(src)
        b = pool.asarray(src)
        pool.scan(full_scans=2)
        assert (states(pool, a) == KSM).all()
        nat = pool._native
        # a swap write fails just before the fork: the child inherits the
        # backoff (uksm_swap_reclaim() waits 200 ms after a failed write)
        uksm._core.inject("pwrite", 0, -1, errno.ENOSPC)
        try:
            with pytest.raises(OSError):
                nat.reclaim(4)
        finally:
            uksm._core.inject("pwrite", 0, 0, errno.ENOSPC)
        failed_at = time.monotonic()

        def child():
            in_backoff = nat.reclaim(0) == 0 and time.monotonic() - failed_at < 0.15
            with pytest.raises(OSError) as exc:
                nat.reclaim(0, 1 << 20)  # no such group
            assert exc.value.errno == errno.EINVAL
            with pytest.raises(OSError) as exc:  # sources out of order
                nat.merge([5, 3], [-1, -1], [0, 0], [0, 0], 64, 1000)
            assert exc.value.errno == errno.EINVAL
            assert pool.stats()["fork_detaches"] == 0, "a refused call detached"
            if in_backoff:
                print("backoff checked")
            # an eviction that writes detaches, and loses nothing
            time.sleep(0.25)
            assert nat.reclaim(4) > 0
            assert pool.stats()["fork_detaches"] == 1
            assert np.array_equal(a, src) and np.array_equal(b, src)

        pid = fork_run(child)
        assert wait_child(pid) == 0
        assert np.array_equal(a, src) and np.array_equal(b, src)
        assert pool.stats()["fork_detaches"] == 0
    finally:
        pool.close()
    print("refused ok")


def test_child_refused_call_does_not_detach(tmp_path):
    assert "refused ok" in _isolated("refused_call_child", str(tmp_path), timeout=90)


# --- writes on both sides, in every state --------------------------------------------------------


def every_state_pool(cow: str):
    """A pool with a buffer in each state: private, KSM (and its twin), zero,
    swapped.  Returns the pool and {name: (array, contents)}."""
    pool = uksm.Pool(
        "64MiB",
        cow=cow,
        pages_to_scan=4096,
        sleep_millisecs=0,
        use_zero_pages=True,
        max_resident="32MiB",
    )
    g = np.random.default_rng(4)
    n = 8
    sw = g.integers(0, 256, n * PAGE, dtype=np.uint8)
    s = pool.asarray(sw)  # first: the clock takes it first
    ballast = pool.asarray(g.integers(0, 256, n * PAGE, dtype=np.uint8))
    pool.max_resident = PAGE  # all of s goes, most of the ballast
    pool.max_resident = "32MiB"
    del ballast
    pr = g.integers(0, 256, n * PAGE, dtype=np.uint8)
    km = g.integers(0, 256, n * PAGE, dtype=np.uint8)
    bufs = {
        "private": (pool.asarray(pr), pr.copy()),
        "ksm": (pool.asarray(km), km.copy()),
        "twin": (pool.asarray(km), km.copy()),
        "swapped": (s, sw.copy()),
    }
    z = pool.empty(n * PAGE, np.uint8)
    z.fill(1)
    z.fill(0)
    bufs["zero"] = (z, np.zeros(n * PAGE, np.uint8))
    pool.scan(full_scans=2)
    want = {"private": PRIVATE, "ksm": KSM, "twin": KSM, "zero": ZERO, "swapped": SWAPPED}
    for name, (arr, _) in bufs.items():
        assert (states(pool, arr) == want[name]).all(), (name, states(pool, arr))
    return pool, bufs


def scribble(bufs: dict, value: int, pages=(1,)) -> dict:
    """Write @value into @pages (whole) and one byte of page 3 of every
    buffer but the twin; returns the expected contents."""
    out = {}
    for name, (arr, exp) in bufs.items():
        exp = exp.copy()
        if name != "twin":
            for p in pages:
                page(arr, p)[:] = value
                exp[p * PAGE : (p + 1) * PAGE] = value
            arr[3 * PAGE + 9] = value
            exp[3 * PAGE + 9] = value
        out[name] = exp
    return out


def both_sides_child(cow: str) -> None:
    """(isolated) Both sides write into merged, zero, swapped and private
    pages after the fork; each sees exactly its own writes.  The parent also
    writes pages 5 and 6, which the child leaves alone, and frees the twin:
    their frames and slots lose their last views in the parent while the
    child still maps them; then it merges new contents and swaps new pages
    out (fresh frames and slots: were one of those reused, the child would
    read the new contents in its pages 5 and 6)."""
    pool, bufs = every_state_pool(cow)
    try:
        at_fork = {k: e.copy() for k, (_, e) in bufs.items()}
        c_ready_r, c_ready_w = os.pipe()
        p_done_r, p_done_w = os.pipe()

        def child():
            os.close(c_ready_r)
            os.close(p_done_w)
            for k, (arr, _) in bufs.items():
                assert np.array_equal(arr, at_fork[k]), f"child: {k} at fork"
            mine = scribble(bufs, 0xC1)
            os.write(c_ready_w, b"w")
            assert wait_eof(p_done_r)
            for k, (arr, _) in bufs.items():
                assert np.array_equal(arr, mine[k]), f"child sees the parent's write: {k}"
            st = pool.page_states(bufs["swapped"][0])[0]
            assert st[1] == PRIVATE and st[3] == PRIVATE and st[0] == SWAPPED

        pid = fork_run(child)
        os.close(c_ready_w)
        os.close(p_done_r)
        try:
            assert os.read(c_ready_r, 1) == b"w"
            for k, (arr, _) in bufs.items():
                assert np.array_equal(arr, at_fork[k]), f"parent sees the child's write: {k}"
            ours = scribble(bufs, 0x9A, pages=(1, 5, 6))
            # fresh frames and slots while the child lives
            twin = bufs.pop("twin")[0]
            ours.pop("twin")
            pool.free(twin)
            del twin
            g = np.random.default_rng(5)
            fresh = g.integers(0, 256, 8 * PAGE, dtype=np.uint8)
            n1, n2 = pool.asarray(fresh), pool.asarray(fresh)
            pool.scan(full_scans=2)
            assert (states(pool, n1) == KSM).all()
            st = pool.stats()
            assert st["frames_deferred"] > 0
            pool.max_resident = 16 * PAGE  # swaps out fresh pages (new slots)
            pool.max_resident = "32MiB"
            assert pool.stats()["pages_swapped"] > 0
            assert np.array_equal(n1, fresh) and np.array_equal(n2, fresh)
            for k, (arr, _) in bufs.items():
                assert np.array_equal(arr, ours[k]), f"parent: {k}"
        finally:
            os.close(p_done_w)
            code = wait_child(pid)
            os.close(c_ready_r)
        assert code == 0
        st = pool.stats()
        assert st["frames_deferred"] == 0
        for k, (arr, _) in bufs.items():
            assert np.array_equal(arr, ours[k]), f"parent after the child: {k}"
    finally:
        pool.close()
    print("both sides ok")


@pytest.mark.parametrize("cow", COWS)
def test_child_and_parent_never_see_each_others_writes(cow):
    assert "both sides ok" in _isolated("both_sides_child", cow, timeout=90)


# --- multiprocessing with the fork start method -------------------------------------------

_MP = {}


def _mp_work(i: int):
    a, b, src = _MP["a"], _MP["b"], _MP["src"]
    ok = np.array_equal(a, src) and np.array_equal(b, src)
    a[i * PAGE : (i + 1) * PAGE] = i  # the worker's own COW
    ok = ok and bool((a[i * PAGE : (i + 1) * PAGE] == i).all()) and np.array_equal(b, src)
    total = int(a.sum(dtype=np.int64))
    a[i * PAGE : (i + 1) * PAGE] = src[i * PAGE : (i + 1) * PAGE]  # a worker runs many tasks
    return i, ok, total


def mp_child(cow: str) -> None:
    """(isolated) multiprocessing.Pool(2).map with the fork start method, a
    live pool and its scanner thread running."""
    pool, src, a, b = merged_pool(cow, n=32)
    _MP.update(a=a, b=b, src=src)
    pool.start()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as workers:
        res = workers.map(_mp_work, range(16))
        for _ in range(3):  # the parent merges and writes meanwhile
            a[31 * PAGE] ^= 1
            a[31 * PAGE] ^= 1
            time.sleep(0.01)
    assert all(ok for _, ok, _ in res), res
    for i, _, total in res:
        exp = src.copy()
        exp[i * PAGE : (i + 1) * PAGE] = i
        assert total == int(exp.sum(dtype=np.int64))
    assert np.array_equal(a, src) and np.array_equal(b, src)
    assert pool.running
    pool.stop()
    b[:] = 0
    a[:] = 0
    st = pool.stats()
    assert st["frames_deferred"] == 0 and st["bytes_frames"] == 0, st["frames_deferred"]
    print("multiprocessing ok")
    pool.close()


@pytest.mark.parametrize("cow", COWS)
def test_multiprocessing_fork_pool_with_scanner_running(cow):
    out = _isolated("mp_child", cow, timeout=90)
    assert "multiprocessing ok" in out
