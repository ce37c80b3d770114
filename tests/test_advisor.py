"""The scan-time advisor with the background scanner, as a program runs it:
advisor_mode="scan-time", a target, pool.start(), pages_to_scan never
touched.  The full scans are timed from outside (stats()["full_scans"]
over wall time), on a pool of mixed content (unique pages and duplicates).
"""

import threading
import time
from typing import Iterator, List, Tuple

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE
MIB = 128
TARGET = 1.0


@pytest.fixture
def mixed_pool(request: pytest.FixtureRequest) -> Iterator[Tuple[uksm.Pool, np.ndarray]]:
    """A scan-time pool holding 128 MiB: 64 MiB unique, 32 MiB and a copy;
    smart_scan as the test's parameter says (default on)."""
    pool = uksm.Pool(
        f"{2 * MIB}MiB",
        advisor_mode="scan-time",
        advisor_target_scan_time=TARGET,
        smart_scan=getattr(request, "param", True),
    )
    rng = np.random.default_rng(5)
    half = (MIB << 20) // 2
    unique = pool.asarray(rng.integers(0, 256, half, dtype=np.uint8))
    src = rng.integers(0, 256, half // 2, dtype=np.uint8)
    dups = [pool.asarray(src), pool.asarray(src)]
    try:
        yield pool, unique
    finally:
        del dups
        pool.close()


def full_scan_times(pool: uksm.Pool, scans: int, timeout: float) -> List[float]:
    """Wall seconds of each of the next @scans full scans, timed from here."""
    times: List[float] = []
    seen = pool.stats()["full_scans"]
    last = time.monotonic()
    deadline = last + timeout
    while len(times) < scans and time.monotonic() < deadline:
        time.sleep(0.01)
        n = pool.stats()["full_scans"]
        if n != seen:
            now = time.monotonic()
            # two full scans between two looks: each took half the time
            times.extend([(now - last) / (n - seen)] * (n - seen))
            seen, last = n, now
    return times[:scans]


@pytest.mark.parametrize("mixed_pool", [False], indirect=True, ids=["no_smart_scan"])
def test_advisor_reaches_the_target_scan_time(mixed_pool: Tuple[uksm.Pool, np.ndarray]) -> None:
    pool, unique = mixed_pool
    stop = threading.Event()

    def writer() -> None:
        # a page of the unique data changes every 10 ms: every full scan
        # finds something new, so the idle backoff stays out of it (with
        # smart_scan, pages added together age together, and most full
        # scans skip every unique page: they find nothing new and back off)
        rng = np.random.default_rng(9)
        while not stop.wait(0.01):
            unique[int(rng.integers(0, len(unique) // PAGE)) * PAGE] ^= 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    pool.start()
    try:
        times = full_scan_times(pool, 8, timeout=60.0)
    finally:
        stop.set()
        t.join()
    assert len(times) == 8, times
    # the first full scans merge (more work than later ones) and the
    # advisor learns from each; after four, it holds the target
    settled = sorted(times[4:])
    median = (settled[1] + settled[2]) / 2
    assert abs(median - TARGET) <= 0.3 * TARGET, times
    assert all(abs(s - TARGET) <= 0.6 * TARGET for s in settled), times
    assert pool.pages_to_scan != 1000
    assert pool.stats()["pages_sharing"] >= (MIB << 20) // 4 // PAGE - 16


def test_advisor_keeps_its_target_at_rest(
    mixed_pool: Tuple[uksm.Pool, np.ndarray],
) -> None:
    """Nothing changes: the idle backoff would stretch the full scans, but
    the advisor's target is how stale a page may get, at rest too; its full
    scans keep to the target, and pages_to_scan stays near where the
    target put it."""
    pool, unique = mixed_pool
    pool.start()
    # two full scans merge, the third finds nothing new: the fourth would
    # back off under the fixed knobs
    times = full_scan_times(pool, 3, timeout=60.0)
    assert len(times) == 3, times
    tuned = pool.pages_to_scan
    later = full_scan_times(pool, 2, timeout=60.0)
    assert len(later) == 2, later
    assert pool._scanner.idle_scans >= 1  # the pool is at rest
    assert pool._scanner.sleep_factor() == 1
    assert max(later) < 2.0 * TARGET, (times, later)
    assert pool.pages_to_scan <= 1.5 * tuned, (tuned, pool.pages_to_scan)
    assert unique.any()
