"""Metadata bytes per tracked page (stats()["metadata_bytes_per_page"]): the
scanner's arrays, the stable and unstable trees and the C tables, over the
pages tracked.  The kernel spends 64 bytes (struct ksm_rmap_item) per page
plus its tree nodes; uksm must stay within 64.

Two workloads: 2 x 64 MiB of duplicate pairs after merging (stable tree
full), and 128 MiB of pages all different after two full scans (unstable
tree full).
"""

import pytest

from uksm.bench import measure, micro
from uksm.bench.micro import report, rounds

MiB = measure.MiB
PAGE = measure.PAGE
LIMIT = 64


@pytest.mark.benchmark(group="metadata")
def test_meta_duplicates(benchmark):
    n = (4 if benchmark.disabled else 64) * MiB // PAGE
    results = []

    def target():
        r = micro.meta_duplicates(n)
        results.append(r)
        return r

    benchmark.pedantic(target, rounds=rounds(benchmark, 1))
    r = results[-1]
    report(
        benchmark,
        f"metadata, 2 x {n * PAGE // MiB} MiB duplicate pairs merged: "
        f"{r['metadata_bytes_per_page']:.1f} bytes/page (limit {LIMIT}); "
        f"{r['metadata_bytes'] / MiB:.2f} MiB for {r['pages']} pages",
        pages=r["pages"],
        metadata_bytes_per_page=r["metadata_bytes_per_page"],
        metadata_bytes=r["metadata_bytes"],
    )
    assert r["pages_sharing"] >= n - 1
    assert r["metadata_bytes_per_page"] <= LIMIT


@pytest.mark.benchmark(group="metadata")
def test_meta_unique(benchmark):
    n = (8 if benchmark.disabled else 128) * MiB // PAGE
    results = []

    def target():
        r = micro.meta_unique(n)
        results.append(r)
        return r

    benchmark.pedantic(target, rounds=rounds(benchmark, 1))
    r = results[-1]
    report(
        benchmark,
        f"metadata, {n * PAGE // MiB} MiB unique pages after 2 scans: "
        f"{r['metadata_bytes_per_page']:.1f} bytes/page (limit {LIMIT}); "
        f"pages_unshared {r['pages_unshared']}",
        pages=r["pages"],
        metadata_bytes_per_page=r["metadata_bytes_per_page"],
        metadata_bytes=r["metadata_bytes"],
        pages_unshared=r["pages_unshared"],
    )
    assert r["pages_sharing"] == 0
    assert r["metadata_bytes_per_page"] <= LIMIT
