"""Stateful model of a pool with a swap area: allocate (duplicates
included), free, write, read, scan, lock/unlock, pin, change max_resident,
compact, in either copy-on-write mode -- and after every step each live
array equals its shadow copy, the swap counters agree with the page tables
and the memory figures with the kernel's (pagemap, the frame store's
blocks); after a budget change the pool is within it unless only what may
not leave (locked pages and their frames) is left.

Short profile by default; UKSM_LONG=1 runs a long one and prints the steps.
"""

import gc
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import uksm

PAGE = uksm.PAGE_SIZE
PRIVATE, KSM, ZERO, SWAPPED = (
    uksm.PageState.PRIVATE,
    uksm.PageState.KSM,
    uksm.PageState.ZERO,
    uksm.PageState.SWAPPED,
)
BATCH = 32 * 1024
LONG = os.environ.get("UKSM_LONG") == "1"
STEPS = {"steps": 0, "examples": 0, "swap_outs": 0, "swap_ins": 0}


class SwapModel(RuleBasedStateMachine):
    @initialize(
        budget_pages=st.sampled_from([16, 48, 128]),
        checksum=st.sampled_from(["jhash2", "xxhash"]),
        cow=st.sampled_from(["kernel", "signal"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def make_pool(self, budget_pages, checksum, cow, seed):
        STEPS["examples"] += 1
        gc.collect()
        self.pool = uksm.Pool(
            "4MiB",
            max_resident=budget_pages * PAGE,
            swap_batch=BATCH,
            checksum=checksum,
            sleep_millisecs=0,
            pages_to_scan=1000,
            compact_threshold=0,
            cow=cow,
        )
        self.rng = np.random.default_rng(seed)
        self.palette = self.rng.integers(1, 256, (4, PAGE), dtype=np.uint8)
        self.arrs, self.shadows, self.locked = [], [], []

    def teardown(self):
        pool = getattr(self, "pool", None)
        if pool is None:
            return
        s0 = pool.stats()
        STEPS["swap_outs"] += s0["swap_outs"]
        STEPS["swap_ins"] += s0["swap_ins"]
        self.arrs = self.shadows = self.locked = []
        gc.collect()
        s = pool.stats()
        assert s["swap_slots_used"] == 0 and s["pages_swapped"] == 0, s
        assert s["bytes_private"] == 0 and s["memfd_bytes"] == 0, s
        # readahead may have cached free slots (holes): the next pass drops them
        pool._reclaim()
        assert pool.stats()["bytes_resident"] == 0, pool.stats()
        pool.close()

    def _step(self):
        STEPS["steps"] += 1

    @precondition(lambda self: len(self.arrs) < 10)
    @rule(pages=st.integers(1, 40), kind=st.sampled_from(["palette", "copy", "random", "zeros"]))
    def allocate(self, pages, kind):
        self._step()
        if kind == "palette":
            data = self.palette[self.rng.integers(0, 4, pages)].reshape(-1)
        elif kind == "copy" and self.shadows:
            src = self.shadows[int(self.rng.integers(len(self.shadows)))]
            data = np.resize(src, pages * PAGE)
        elif kind == "random":
            data = self.rng.integers(0, 256, pages * PAGE, dtype=np.uint8)
        else:
            data = np.zeros(pages * PAGE, np.uint8)
        try:
            a = self.pool.asarray(data)
        except uksm.PoolFullError:
            return
        self.arrs.append(a)
        self.shadows.append(np.array(data))
        self.locked.append(False)

    @precondition(lambda self: self.arrs)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self._step()
        i %= len(self.arrs)
        a = self.arrs.pop(i)
        self.shadows.pop(i)
        self.locked.pop(i)
        if i % 2:
            self.pool.free(a)
        del a
        gc.collect()

    @precondition(lambda self: self.arrs)
    @rule(
        i=st.integers(0, 100),
        pos=st.integers(0, 1 << 20),
        n=st.integers(1, 3 * PAGE),
        v=st.integers(0, 255),
    )
    def write(self, i, pos, n, v):
        self._step()
        i %= len(self.arrs)
        a, s = self.arrs[i], self.shadows[i]
        pos %= a.size
        a[pos : pos + n] = v
        s[pos : pos + n] = v

    @precondition(lambda self: self.arrs)
    @rule(i=st.integers(0, 100))
    def read(self, i):
        self._step()
        i %= len(self.arrs)
        assert np.array_equal(self.arrs[i], self.shadows[i])

    @rule(n=st.sampled_from([1, 2]))
    def scan(self, n):
        self._step()
        self.pool.scan(full_scans=n)

    @precondition(lambda self: self.arrs)
    @rule(i=st.integers(0, 100))
    def lock_or_unlock(self, i):
        self._step()
        i %= len(self.arrs)
        if self.locked[i]:
            self.pool.unlock(self.arrs[i])
            self.locked[i] = False
            return
        try:
            self.pool.lock(self.arrs[i])
        except uksm.PoolFullError:
            return
        self.locked[i] = True

    @precondition(lambda self: self.arrs)
    @rule(i=st.integers(0, 100), v=st.integers(0, 255))
    def pin_and_write(self, i, v):
        self._step()
        i %= len(self.arrs)
        try:
            with self.pool.pin(self.arrs[i]) as a:
                assert (self.pool.page_states(a)[0] == PRIVATE).all()
                a[::PAGE] = v
                self.shadows[i][::PAGE] = v
        except uksm.PoolFullError:
            pass

    @rule(pages=st.sampled_from([8, 16, 64, 256]))
    def budget(self, pages):
        self._step()
        pool = self.pool
        pool.max_resident = pages * PAGE
        st_ = pool.stats()
        # (less the zero pages, which may be counted though they cost nothing)
        if st_["bytes_resident"] - st_["ksm_zero_pages"] * PAGE <= pages * PAGE + BATCH:
            return
        # over budget: only what may not leave is left (every page here has
        # been written, so a private page is a resident one)
        infos = [pool.page_states(a) for a in self.arrs]
        held = {int(p) for (s, pfn, _), lk in zip(infos, self.locked) if lk for p in pfn[s == KSM]}
        for (s, pfn, _), lk in zip(infos, self.locked):
            if lk:
                continue
            assert not (s == PRIVATE).any(), ("an unlocked private page stayed", st_)
            assert set(pfn[s == KSM].tolist()) <= held, ("an unlocked frame stayed", st_)

    @rule()
    def compact(self):
        self._step()
        self.pool.compact()

    @invariant()
    def agrees(self):
        pool = getattr(self, "pool", None)
        if pool is None:
            return
        for a, s, locked in zip(self.arrs, self.shadows, self.locked):
            assert np.array_equal(a, s)
            if locked:
                assert not (pool.page_states(a)[0] == SWAPPED).any(), "a locked page swapped"
        st_ = pool.stats()
        states = [pool.page_states(a) for a in self.arrs]
        swapped = sum(int((x[0] == SWAPPED).sum()) for x in states)
        slots = {int(p) for x in states for p in x[1][x[0] == SWAPPED]}
        frames = {int(p) for x in states for p in x[1][x[0] == KSM]}
        private = sum(int((x[0] == PRIVATE).sum()) for x in states)
        assert st_["pages_swapped"] == swapped, (st_["pages_swapped"], swapped)
        assert st_["swap_slots_used"] == len(slots), (st_["swap_slots_used"], len(slots))
        assert st_["pages_shared"] == len(frames), (st_["pages_shared"], len(frames))
        # every page here has been written: a private page is a resident one;
        # zero pages read are counted too (a core bug: see test_swap.py's
        # test_pages_reading_as_the_zero_page_cost_nothing), hence the range
        zero = sum(int((x[0] == ZERO).sum()) for x in states)
        assert private * PAGE <= st_["bytes_private"] <= (private + zero) * PAGE, (
            st_["bytes_private"],
            private,
            zero,
        )
        assert st_["bytes_frames"] == os.fstat(pool.fd).st_blocks * 512 == len(frames) * PAGE, (
            st_["bytes_frames"],
            len(frames),
        )
        assert st_["bytes_resident"] == (
            st_["bytes_private"] + st_["bytes_frames"] + st_["bytes_swap_cached"]
        )
        assert (
            st_["pages_shared"]
            + st_["pages_sharing"]
            + st_["pages_unshared"]
            + st_["pages_volatile"]
        ) == st_["pages_tracked"]


def _run(n, steps, **kw):
    run_state_machine_as_test(
        SwapModel,
        settings=settings(
            max_examples=n,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            **kw,
        ),
    )


def test_swap_model_short():
    """The same examples every run (derandomized), and no shrinking: the
    short profile is a regression check that passes or fails the same way
    every time; the long profile explores new examples (and shrinks)."""
    _run(
        int(os.environ.get("UKSM_MODEL_EXAMPLES", 25)),
        40,
        derandomize=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )


@pytest.mark.skipif(not LONG, reason="long profile: UKSM_LONG=1")
def test_swap_model_long():
    before = dict(STEPS)
    try:
        _run(int(os.environ.get("UKSM_MODEL_EXAMPLES", 300)), 80)
    finally:
        print(
            f"\nuksm swap model (long profile): {STEPS['steps'] - before['steps']} steps in "
            f"{STEPS['examples'] - before['examples']} examples, "
            f"{STEPS['swap_outs'] - before['swap_outs']} swap-outs, "
            f"{STEPS['swap_ins'] - before['swap_ins']} swap-ins"
        )
