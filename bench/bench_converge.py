"""Time to merge: uksm against the kernel's ksmd on the same content, same run.

The kernel reference workload: 2 x 128 MiB where page i
equals page N + i, pages_to_scan=10000, sleep_millisecs=0, until 99% of the
N pairs share.  Targets: uksm/kernel <= 0.5 for wall and CPU time; bytes
saved >= 0.99 of one page per pair, both by the pool's memory as the
kernel accounts for it (private pages before, less private pages and memfd
blocks after) and by the process's PSS.

Then the selftests' -P workload (ksm_tests.c ksm_merge_time): a region of
'*' bytes, the time for two full scans, in MiB/s, for both.
"""

import pytest

from uksm.bench import kernelksm, measure
from uksm.bench.micro import need_kernel, report, rounds

MiB = measure.MiB
PAGE = measure.PAGE


def pairs(benchmark) -> int:
    """N: 2 x 128 MiB, or 2 x 4 MiB in the smoke run."""
    return (4 if benchmark.disabled else 128) * MiB // PAGE


def selftest_mib(benchmark) -> int:
    return 4 if benchmark.disabled else 100


@pytest.mark.benchmark(group="converge-2x128MiB")
def test_converge_kernel(benchmark, shared):
    need_kernel()
    n = pairs(benchmark)
    nrounds = rounds(benchmark, 5)
    results = []
    workloads = []

    def setup():
        w = measure.KernelPairs(n)
        workloads.append(w)
        return (w,), {}

    def target(w):
        r = w.converge()
        results.append(r)
        return r

    def teardown(w):
        w.close()
        kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
        kernelksm.write("run", kernelksm.KSM_RUN_STOP)

    with kernelksm.session(pages_to_scan=10000, sleep_millisecs=0):
        try:
            benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=nrounds)
        finally:
            for w in workloads:
                w.close()
    summary = {"rounds": results, **measure.summarize(results)}
    shared.cache[("kernel_converge", n)] = summary
    assert all(r["converged"] for r in results), results
    report(
        benchmark,
        f"converge 2x{n * PAGE // MiB}MiB kernel ksmd: wall {summary['wall']:.3f} s, "
        f"ksmd CPU {summary['cpu']:.3f} s, full scans {results[-1]['full_scans']}, "
        f"saved PSS {summary['saved_pss']:.3f} of ideal",
        pairs=n,
        wall_s=summary["wall"],
        ksmd_cpu_s=summary["cpu"],
        saved_pss_fraction=summary["saved_pss"],
        rounds=len(results),
    )


@pytest.mark.parametrize("driver", ["scan", "thread"])
@pytest.mark.parametrize("checksum", ["jhash2", "xxhash"])
@pytest.mark.benchmark(group="converge-2x128MiB")
def test_converge_uksm(benchmark, shared, checksum, driver):
    n = pairs(benchmark)
    nrounds = rounds(benchmark, 5)
    results = []
    workloads = []

    def setup():
        w = measure.UksmPairs(n, checksum, pages_to_scan=10000, sleep_millisecs=0)
        workloads.append(w)
        return (w,), {}

    def target(w):
        r = w.converge(driver, timeout=30 if benchmark.disabled else 300)
        results.append(r)
        return r

    try:
        benchmark.pedantic(target, setup=setup, teardown=lambda w: w.close(), rounds=nrounds)
    finally:
        for w in workloads:
            w.close()
    assert all(r["converged"] for r in results), results
    s = measure.summarize(results)
    kern = shared.kernel_converge(n, nrounds)
    k_wall = kern["wall"] if kern else None
    k_cpu = kern["cpu"] if kern else None
    r_wall = measure.ratio(s["wall"], k_wall)
    r_cpu = measure.ratio(s["cpu"], k_cpu)
    r_scanner_cpu = measure.ratio(s["scanner_cpu"], k_cpu)
    report(
        benchmark,
        f"converge 2x{n * PAGE // MiB}MiB uksm[{checksum},{driver}]: wall {s['wall']:.3f} s, "
        f"CPU {s['cpu']:.3f} s (scanner {s['scanner_cpu']:.3f}, runq wait "
        f"{measure.fmt(s.get('runq_wait'))}); kernel wall "
        f"{measure.fmt(k_wall)} s, ksmd {measure.fmt(k_cpu)} s; uksm/kernel wall "
        f"{measure.fmt(r_wall, 2)} CPU {measure.fmt(r_cpu, 2)} (target <= 0.5); "
        f"saved private+frames {s['saved_held']:.4f} PSS {s['saved_pss']:.4f} of ideal "
        f"(target >= 0.99)",
        pairs=n,
        checksum=checksum,
        driver=driver,
        wall_s=s["wall"],
        cpu_s=s["cpu"],
        scanner_cpu_s=s["scanner_cpu"],
        runq_wait_s=s.get("runq_wait"),
        kernel_wall_s=k_wall,
        kernel_cpu_s=k_cpu,
        ratio_wall=r_wall,
        ratio_cpu=r_cpu,
        ratio_scanner_cpu=r_scanner_cpu,
        saved_held_fraction=s["saved_held"],
        saved_pss_fraction=s["saved_pss"],
        full_scans=results[-1]["full_scans"],
        metadata_bytes_per_page=results[-1]["metadata_bytes_per_page"],
        meets_ratio_target=(None if r_wall is None else r_wall <= 0.5 and r_cpu <= 0.5),
        meets_savings_target=s["saved_held"] >= 0.99 and s["saved_pss"] >= 0.99,
        rounds=len(results),
    )


@pytest.mark.benchmark(group="selftest-merge-time")
def test_merge_time_kernel(benchmark, shared):
    need_kernel()
    mib = selftest_mib(benchmark)
    results = []

    def target():
        r = measure.kernel_merge_time(mib)
        results.append(r)
        return r

    with kernelksm.session(pages_to_scan=10000, sleep_millisecs=0):
        benchmark.pedantic(target, rounds=rounds(benchmark))
    s = measure.summarize(results, ("wall", "cpu", "mib_per_s", "merged_fraction"))
    shared.cache[("kernel_merge_time", mib)] = s
    report(
        benchmark,
        f"merge time ('*' x {mib} MiB, 2 full scans) kernel: {s['wall']:.3f} s, "
        f"{s['mib_per_s']:.0f} MiB/s, ksmd CPU {s['cpu']:.3f} s, merged "
        f"{s['merged_fraction']:.3f} of all",
        mib=mib,
        wall_s=s["wall"],
        mib_per_s=s["mib_per_s"],
        ksmd_cpu_s=s["cpu"],
        merged_fraction=s["merged_fraction"],
    )


@pytest.mark.parametrize("checksum", ["jhash2", "xxhash"])
@pytest.mark.benchmark(group="selftest-merge-time")
def test_merge_time_uksm(benchmark, shared, checksum):
    mib = selftest_mib(benchmark)
    results = []

    def target():
        r = measure.uksm_merge_time(mib, checksum)
        results.append(r)
        return r

    benchmark.pedantic(target, rounds=rounds(benchmark))
    s = measure.summarize(
        results, ("wall", "cpu", "mib_per_s", "merged_fraction", "merged_fraction_final")
    )
    kern = shared.cache.get(("kernel_merge_time", mib))
    k_wall = kern["wall"] if kern else None
    r_wall = measure.ratio(s["wall"], k_wall)
    last = results[-1]
    report(
        benchmark,
        f"merge time ('*' x {mib} MiB, 2 full scans) uksm[{checksum}]: {s['wall']:.3f} s, "
        f"{s['mib_per_s']:.0f} MiB/s, merged {s['merged_fraction']:.3f} of all "
        f"(kernel {measure.fmt(kern['merged_fraction'] if kern else None)}); "
        f"uksm/kernel wall {measure.fmt(r_wall, 2)}; 99% merged after "
        f"{measure.fmt(last['scans_to_target'])} scans, {measure.fmt(last['wall_to_target'])} s "
        f"(final {last['merged_fraction_final']:.3f}, merges_skipped_vma "
        f"{last['merges_skipped_vma']})",
        mib=mib,
        checksum=checksum,
        wall_s=s["wall"],
        cpu_s=s["cpu"],
        mib_per_s=s["mib_per_s"],
        merged_fraction=s["merged_fraction"],
        kernel_wall_s=k_wall,
        ratio_wall=r_wall,
        scans_to_99pct=last["scans_to_target"],
        wall_to_99pct_s=last["wall_to_target"],
        merged_fraction_final=last["merged_fraction_final"],
        merges_skipped_vma=last["merges_skipped_vma"],
    )
