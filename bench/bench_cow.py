"""COW break latency on merged pages, against the bare floors of the same run.

A one-byte write into each page of a merged region (pages N..2N-1 of the
pairs workload, each sharing its frame with page i): us/page, once with
each copy-on-write mode.  With cow="kernel" (the default) a merged page is
a MAP_PRIVATE view of its frame and the kernel copies it in its own fault
path; its floor is that fault alone, on a memfd mapped MAP_PRIVATE
(micro.private_file_cow).  With cow="signal" uksm's SIGSEGV handler makes
the view writable and forces the copy; uksm/bench/floor.c, compiled here with
the system cc, gives the SIGSEGV round trip alone and a whole userspace COW
break (fault, copy through the linear alias, MAP_FIXED remap of a fresh
memfd frame).  Target: uksm <= 1.5 x the full userspace COW floor.  The
kernel KSM's own break, on merged private memory, for scale.
"""

import pytest

from uksm.bench import kernelksm, measure, micro
from uksm.bench.micro import need_kernel, report, rounds

MiB = measure.MiB
PAGE = measure.PAGE


def pairs(benchmark) -> int:
    """N: 2 x 64 MiB (16384 pairs), or 2 x 4 MiB in the smoke run."""
    return (4 if benchmark.disabled else 64) * MiB // PAGE


@pytest.mark.benchmark(group="cow-break")
def test_cow_floor(benchmark, shared):
    n = pairs(benchmark)
    exe = shared.get("floor_exe", lambda: micro.compile_floor(shared.tmpdir))
    if exe is None:
        pytest.skip("no C compiler (cc) for uksm/bench/floor.c")
    results = []

    def target():
        r = micro.run_floor(exe, n)
        results.append(r)
        return r

    benchmark.pedantic(target, rounds=rounds(benchmark))
    s = {
        k: measure.median([r[k] for r in results])
        for k in ("sigsegv_mprotect", "cow_scattered", "cow_run")
    }
    shared.cache[("floor", n)] = s
    report(
        benchmark,
        f"COW floor ({n} pages): SIGSEGV round trip + mprotect {s['sigsegv_mprotect']:.2f} "
        f"us/page; full COW break {s['cow_scattered']:.2f} us/page (one VMA per page, as "
        f"syscall_costs.c), {s['cow_run']:.2f} us/page (one merged run)",
        pages=n,
        sigsegv_mprotect_us=s["sigsegv_mprotect"],
        cow_break_us=s["cow_scattered"],
        cow_break_run_us=s["cow_run"],
    )


@pytest.mark.benchmark(group="cow-break")
def test_cow_private_file_floor(benchmark, shared):
    n = pairs(benchmark)
    results = []

    def target():
        r = micro.private_file_cow(n)
        results.append(r)
        return r

    benchmark.pedantic(target, rounds=rounds(benchmark))
    us = measure.median([r["private_file_cow"] for r in results])
    shared.cache[("private_file_cow", n)] = us
    report(
        benchmark,
        f"COW floor, kernel ({n} pages): a write into a MAP_PRIVATE memfd page {us:.2f} us/page",
        pages=n,
        private_file_cow_us=us,
    )


@pytest.mark.parametrize("cow", ["kernel", "signal"])
@pytest.mark.parametrize("checksum", ["jhash2"])
@pytest.mark.benchmark(group="cow-break")
def test_cow_uksm(benchmark, shared, checksum, cow):
    n = pairs(benchmark)
    results = []
    workloads = []

    def setup():
        w = measure.UksmPairs(n, checksum, pages_to_scan=10000, sleep_millisecs=0, cow=cow)
        workloads.append(w)
        w.merge_all()
        return (w,), {}

    def target(w):
        r = w.cow()
        results.append(r)
        return r

    try:
        benchmark.pedantic(
            target, setup=setup, teardown=lambda w: w.close(), rounds=rounds(benchmark)
        )
    finally:
        for w in workloads:
            w.close()
    for r in results:
        assert r["contents_ok"], r
        assert r["merged_before"] == n, r
        assert r["cow_faults"] == n, r
    us = measure.median([r["us_per_page"] for r in results])
    floor = shared.cache.get(("floor", n))
    if floor is None and shared.get("floor_exe", lambda: micro.compile_floor(shared.tmpdir)):
        floor = shared.floor(n)
        if floor is not None:
            floor = {k: floor[k] for k in ("sigsegv_mprotect", "cow_scattered", "cow_run")}
    f_cow = floor["cow_scattered"] if floor else None
    f_run = floor["cow_run"] if floor else None
    r_cow = measure.ratio(us, f_cow)
    f_kernel = shared.get(
        ("private_file_cow", n), lambda: micro.private_file_cow(n)["private_file_cow"]
    )
    report(
        benchmark,
        f"COW break uksm[cow={cow}] ({n} merged pages): {us:.2f} us/page; kernel floor "
        f"{f_kernel:.2f} us/page (uksm/floor {measure.fmt(measure.ratio(us, f_kernel), 2)}); "
        f"userspace floor {measure.fmt(f_cow, 2)} us/page (run layout "
        f"{measure.fmt(f_run, 2)}); uksm/userspace floor {measure.fmt(r_cow, 2)} "
        f"(target <= 1.5)",
        pages=n,
        cow=cow,
        us_per_page=us,
        floor_cow_us=f_cow,
        floor_cow_run_us=f_run,
        floor_private_file_cow_us=f_kernel,
        ratio_to_kernel_floor=measure.ratio(us, f_kernel),
        floor_sigsegv_mprotect_us=floor["sigsegv_mprotect"] if floor else None,
        ratio_to_floor=r_cow,
        ratio_to_run_floor=measure.ratio(us, f_run),
        meets_target=None if r_cow is None else r_cow <= 1.5,
    )


@pytest.mark.benchmark(group="cow-break")
def test_cow_kernel(benchmark, shared):
    need_kernel()
    n = pairs(benchmark)
    results = []
    workloads = []

    def setup():
        w = measure.KernelPairs(n)
        workloads.append(w)
        c = w.converge(target=1.0)
        if not c["converged"]:
            raise RuntimeError(f"kernel KSM did not merge the pairs: {c}")
        return (w,), {}

    def target(w):
        r = w.cow()
        results.append(r)
        return r

    def teardown(w):
        w.close()
        kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
        kernelksm.write("run", kernelksm.KSM_RUN_STOP)

    with kernelksm.session(pages_to_scan=10000, sleep_millisecs=0):
        try:
            benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds(benchmark))
        finally:
            for w in workloads:
                w.close()
    us = measure.median([r["us_per_page"] for r in results])
    floor = shared.cache.get(("floor", n))
    report(
        benchmark,
        f"COW break kernel KSM ({n} merged pages): {us:.2f} us/page "
        f"(userspace floor {measure.fmt(floor['cow_scattered'] if floor else None, 2)})",
        pages=n,
        us_per_page=us,
    )
