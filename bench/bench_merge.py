"""Merging a run of duplicate pages (one of the harness's microbenchmarks): the
second full scan of 2 x N pages where page i equals page N+i, which merges
every pair with one write-protect, one mmap and one punch per run of up to
512 pages, against the same pairs laid out so that no two merges are
adjacent (one set of syscalls per page).

    python -m pytest bench/bench_merge.py -s -p no:cacheprovider
"""

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE


def merge_cost(pages: int, scattered: bool) -> dict:
    with uksm.Pool(
        max(64 << 20, 4 * pages * PAGE),
        checksum="xxhash",
        pages_to_scan=10000,
        sleep_millisecs=0,
        compact_threshold=0,
    ) as pool:
        rng = np.random.default_rng(0)
        a = pool.asarray(rng.integers(0, 256, (pages, PAGE), dtype=np.uint8))
        b = pool.asarray(a)
        if scattered:
            b[1::2] = rng.integers(0, 256, (len(b[1::2]), PAGE), dtype=np.uint8)
        pool.scan(full_scans=1)
        import time

        t = time.perf_counter()
        s = pool.scan(full_scans=1)
        dt = time.perf_counter() - t
        merged = s["pages_sharing"]
        return {
            "seconds": dt,
            "merged": merged,
            "runs": s["merge_runs"],
            "us_per_merged_page": dt / max(merged, 1) * 1e6,
        }


@pytest.mark.benchmark(group="merge")
@pytest.mark.parametrize("layout", ["runs", "scattered"])
def test_merge_of_a_run(benchmark, layout):
    pages = 1024 if benchmark.disabled else 16384
    out = []
    benchmark.pedantic(
        lambda: out.append(merge_cost(pages, layout == "scattered")),
        rounds=1 if benchmark.disabled else 3,
        iterations=1,
    )
    r = sorted(out, key=lambda x: x["us_per_merged_page"])[len(out) // 2]
    benchmark.extra_info.update(r)
    print(
        f"\n  merge, {layout}: {r['merged']} pages merged with {r['runs']} remaps, "
        f"{r['us_per_merged_page']:.2f} us per merged page (the merging scan, hashing included)"
    )
    # scattered merges cost a VMA or two each: the VMA budget may defer some
    assert r["merged"] >= (pages // 4 if layout == "scattered" else pages - 1)
