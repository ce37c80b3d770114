"""Compaction: MiB/s moved, the memfd and VMAs before and after on a
scattered merge workload, and the pause a writer thread sees while frames
move.

    python -m pytest bench/bench_migrate.py -s -p no:cacheprovider
"""

import gc
import threading
import time

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE


def maps_count() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def scattered_workload(pool, pages: int, seed: int = 0):
    """@pages distinct pages and a copy of them, merged: a frame per pair,
    in order.  Then both copies of a random half of the pairs are written:
    a page copied on write is private memory, and a frame goes back when
    its last view does, so the live frames are left scattered over a memfd
    twice their size (its high-water mark).  Returns both copies."""
    rng = np.random.default_rng(seed)
    a = pool.empty(pages * PAGE // 8)
    a.reshape(pages, -1)[:] = rng.standard_normal((pages, PAGE // 8))
    b = pool.asarray(a)
    pool.scan(full_scans=2)
    for i in rng.permutation(pages)[: pages // 2]:
        a.reshape(pages, -1)[i, 1] = float(-i)
        b.reshape(pages, -1)[i, 1] = float(-i)
    gc.collect()
    return a, b


def measure_compaction(pages: int) -> dict:
    with uksm.Pool(max(64 << 20, 4 * pages * PAGE), checksum="xxhash", compact_threshold=0) as pool:
        a, b = scattered_workload(pool, pages)
        shadow = np.array(a)
        shadow_b = np.array(b)
        live = pool.stats()["pages_shared"]
        pauses = []
        stop = threading.Event()

        def writer():
            # a write per 100 us; a long gap between two is a pause we caused
            flat = a.reshape(-1)
            rng = np.random.default_rng(1)
            last = time.perf_counter()
            while not stop.is_set():
                i = int(rng.integers(flat.size)) & ~7
                flat[i + 7] = flat[i + 7]  # rewrite the same value
                now = time.perf_counter()
                pauses.append(now - last)
                last = now
                time.sleep(0.0001)

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.05)
        result = pool.compact()
        stop.set()
        t.join()
        assert np.array_equal(a, shadow) and np.array_equal(b, shadow_b)
        result["live_frames_before"] = live
        result["writer_p99_gap_s"] = float(np.percentile(pauses, 99)) if pauses else 0.0
        result["writer_max_gap_s"] = float(max(pauses)) if pauses else 0.0
        result["mib_per_s"] = result["bytes_moved"] / (1 << 20) / max(result["seconds"], 1e-9)
        return result


@pytest.mark.benchmark(group="compaction")
def test_compaction(benchmark):
    pages = 2048 if benchmark.disabled else 16384
    results = []

    def run():
        results.append(measure_compaction(pages))

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1)
    r = sorted(results, key=lambda x: x["mib_per_s"])[len(results) // 2]
    benchmark.extra_info.update(r)
    print(
        f"\n  compaction of {pages} scattered pages: {r['mib_per_s']:.0f} MiB/s moved "
        f"({r['bytes_moved'] >> 20} MiB in {r['seconds'] * 1e3:.1f} ms), "
        f"VMAs {r['vmas_before']} -> {r['vmas_after']}, memfd "
        f"{r['memfd_size_before'] >> 20} -> {r['memfd_size_after'] >> 20} MiB; "
        f"longest lock hold {r['max_pause_seconds'] * 1e3:.2f} ms, writer gap "
        f"p99 {r['writer_p99_gap_s'] * 1e3:.2f} ms max {r['writer_max_gap_s'] * 1e3:.2f} ms"
    )
    # the live frames now fill the bottom of the memfd (the writer may have
    # freed some meanwhile), and the file is cut after them
    assert r["frames_moved"] > 0
    assert r["memfd_size_after"] <= r["live_frames_before"] * PAGE < r["memfd_size_before"]
