"""Checksum cost per page: jhash2 (the seed's calc_checksum) and xxhash (XXH3)
over a batch of pages, through the C core's checksum_range (the path the
scanner takes: one call, GIL released, pages read through the direct map),
with memcmp of two equal runs of pages as the reference.
"""

import numpy as np
import pytest

from uksm import _core
from uksm.bench import measure, micro
from uksm.bench.micro import report

PAGE = measure.PAGE


def npages(benchmark) -> int:
    """64 MiB of pages, or 1 MiB in the smoke run."""
    return 256 if benchmark.disabled else 16384


@pytest.fixture
def pages(benchmark):
    w = micro.ChecksumPages(npages(benchmark))
    yield w
    w.close()


@pytest.mark.parametrize("algo", ["jhash2", "xxhash"])
@pytest.mark.benchmark(group="checksum-per-page")
def test_checksum(benchmark, pages, algo):
    pages.batch(algo)  # fault the direct map in first
    times = []

    def run():
        times.append(pages.batch(algo))

    benchmark(run)
    us = min(times) / pages.n * 1e6
    med = measure.median(times) / pages.n * 1e6
    # the batch path agrees with the one-page path
    flat = pages.arr.reshape(-1, PAGE)
    for i in (0, pages.n // 2, pages.n - 1):
        assert int(pages.sums[i]) == _core.calc_checksum(flat[i].tobytes(), algo)
    report(
        benchmark,
        f"checksum {algo}: {us:.3f} us/page best, {med:.3f} median ({pages.n} pages per call)",
        algo=algo,
        pages=pages.n,
        us_per_page=us,
        us_per_page_median=med,
    )


@pytest.mark.benchmark(group="checksum-per-page")
def test_memcmp_reference(benchmark):
    n = npages(benchmark)
    a = np.random.default_rng(1).integers(0, 256, n * PAGE, dtype=np.uint8)
    b = a.copy()
    micro.memcmp_seconds(a, b)
    times = []

    def run():
        times.append(micro.memcmp_seconds(a, b))

    benchmark(run)
    us = min(times) / n * 1e6
    report(
        benchmark,
        f"memcmp of two equal pages: {us:.3f} us/page best (one call over {n} pages)",
        pages=n,
        us_per_page=us,
        us_per_page_median=measure.median(times) / n * 1e6,
    )
