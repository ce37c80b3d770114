"""Swap: uksm's swap-out, the sequential read of a swapped array and random
4 KiB reads of it, against the raw pwrite/pread floor of the same file
system measured in the same run and, where root allows it, against the
kernel's own swap (a swap file and a memory cgroup, restored afterwards).
Target (reported, not asserted): uksm within 2x of the kernel's swap
throughput.

    python -m pytest bench/bench_swap.py -q -s -p no:cacheprovider

The measuring is uksm.bench.swapbench, which ``python -m uksm bench`` (suite 5)
shares: N = 256 MiB of random bytes, the budget lowered to N / 4.  In the
smoke run (--benchmark-disable) N is 4 MiB and the kernel side is skipped:
it makes a swap file and a cgroup, slow and system-wide while it lasts.
test_swap_summary prints the three sides and their ratios in one table.
"""

import numpy as np
import pytest

from uksm.bench import swapbench
from uksm.bench.micro import report, rounds

MiB = 1 << 20


def size(benchmark) -> int:
    return (4 if benchmark.disabled else 256) * MiB


def samples(benchmark) -> int:
    return 256 if benchmark.disabled else swapbench.DEFAULT_SAMPLES


def medians(results):
    """The median of every numeric figure over the rounds' result dicts."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [r[key] for r in results if r.get(key) is not None]
            out[key] = float(np.median(vals)) if vals else None
    out["rounds"] = results
    return out


def fmt(v, digits=0):
    return "n/a" if v is None else f"{v:.{digits}f}"


def floor_for(shared, n, k):
    """The floor of this run (measured by test_swap_floor, or now)."""
    f = shared.cache.get(("swap_floor", n))
    if f is None:
        swapbench.settle()
        f = shared.cache[("swap_floor", n)] = swapbench.floor(n, samples=k)
    return f


@pytest.mark.benchmark(group="swap")
def test_swap_floor(benchmark, shared):
    n, k = size(benchmark), samples(benchmark)
    results = []

    def target():
        swapbench.settle()
        results.append(swapbench.floor(n, samples=k, seed=len(results) + 1))

    benchmark.pedantic(target, rounds=rounds(benchmark))
    f = medians(results)
    shared.cache[("swap_floor", n)] = f
    shared.cache["swap_size"] = n
    report(
        benchmark,
        f"swap floor ({n // MiB} MiB in {f['directory']}): write + fsync "
        f"{fmt(f['write_mib_s'])} MiB/s; pread 1 MiB a call, sequential, cold "
        f"{fmt(f['read_seq_cold_mib_s'])} MiB/s; pread 4 KiB at random pages, cold "
        f"{fmt(f['rand_cold_us'], 1)} us/page, cached {fmt(f['rand_warm_us'], 2)} us/page; "
        f"punch of one written-back slot p50 {fmt(f['punch_p50_us'], 1)} us",
        **{key: v for key, v in f.items() if key != "rounds"},
    )


@pytest.mark.benchmark(group="swap")
def test_swap_uksm(benchmark, shared):
    n, k = size(benchmark), samples(benchmark)
    results = []

    def target():
        swapbench.settle()
        results.append(swapbench.uksm_swap(n, samples=k, seed=len(results) + 1))

    benchmark.pedantic(target, rounds=rounds(benchmark))
    for r in results:
        assert r["contents_ok"], r
        assert r["swap_errors"] == 0, r
        for name, rd in r["rounds"].items():
            assert rd["reached"] and rd["pages_swapped"] == rd["expected"], (name, rd)
            assert rd["bytes_resident_after"] <= r["budget"], (name, rd)
            # read back, the pages stayed views of their slots until the
            # round made them private again (swapbench.uksm_swap)
            assert rd["still_swapped"] == 0, (name, rd)
    u = medians(results)
    shared.cache[("swap_uksm", n)] = u
    shared.cache["swap_size"] = n
    f = floor_for(shared, n, k)
    rows = {r["key"]: r for r in swapbench.compare(u, f, None)}
    report(
        benchmark,
        f"uksm swap ({n // MiB} MiB, budget {u['budget'] // MiB} MiB): swap-out "
        f"{fmt(u['swap_out_mib_s'])} MiB/s with fdatasync "
        f"({fmt(rows['swap_out']['uksm_floor'], 2)} x floor); sequential read of the "
        f"swapped array {fmt(u['seq_read_mib_s'])} MiB/s "
        f"({fmt(rows['seq_read']['uksm_floor'], 3)} x the pread floor); random 4 KiB "
        f"reads {fmt(u['rand_read_us'], 1)} us/page "
        f"({fmt(rows['rand_read']['uksm_floor'], 2)} x floor)",
        **{key: v for key, v in u.items() if key != "rounds"},
    )


@pytest.mark.benchmark(group="swap")
def test_swap_kernel(benchmark, shared):
    if benchmark.disabled:
        pytest.skip(
            "the kernel's swap is measured in a real run only (a swap file and a "
            "memory cgroup: slow, and system-wide while it lasts)"
        )
    reason = swapbench.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    n, k = size(benchmark), samples(benchmark)
    before = swapbench.swap_state()
    results = []
    ks = swapbench.KernelSwap(n)
    with ks:

        def target():
            swapbench.settle()
            results.append(ks.measure(n, samples=k, seed=len(results) + 1))

        benchmark.pedantic(target, rounds=rounds(benchmark))
    after = swapbench.swap_state()
    restored = dict(ks.restored, before=before, after=after)
    shared.cache["swap_kernel_restored"] = restored
    assert ks.restored["ok"], restored
    assert after == before, restored
    kr = medians(results)
    kr.update(cgroup=ks.mode, swapfile=ks.swapfile, cgroup_path=ks.cgroup)
    shared.cache[("swap_kernel", n)] = kr
    u = shared.cache.get(("swap_uksm", n))
    rows = {r["key"]: r for r in swapbench.compare(u or {}, floor_for(shared, n, k), kr)}
    report(
        benchmark,
        f"kernel swap ({n // MiB} MiB, limit {kr['budget'] // MiB} MiB, cgroup {ks.mode} "
        f"{ks.cgroup}, swap file {ks.swapfile} of {ks.swapfile_bytes // MiB} MiB): swap-out "
        f"{fmt(kr['swap_out_mib_s'])} MiB/s, sequential read {fmt(kr['seq_read_mib_s'])} "
        f"MiB/s, random {fmt(kr['rand_read_us'], 1)} us/page; uksm/kernel "
        f"swap-out {fmt(rows['swap_out']['uksm_kernel'], 2)}, sequential read "
        f"{fmt(rows['seq_read']['uksm_kernel'], 3)}; restored: swapoff, swap file and "
        f"cgroup removed, /proc/swaps and swapon --show as before",
        **{key: v for key, v in kr.items() if key != "rounds"},
    )


def test_swap_summary(shared):
    """The run's figures side by side (whatever of them this run measured)."""
    n = shared.cache.get("swap_size")
    u = shared.cache.get(("swap_uksm", n))
    if u is None:
        pytest.skip("test_swap_uksm did not run")
    f = shared.cache.get(("swap_floor", n))
    k = shared.cache.get(("swap_kernel", n))
    rows = swapbench.compare(u, f, k)
    print(
        f"\n\n  swap, {n // MiB} MiB of random bytes, budget {u['budget'] // MiB} MiB; uksm's "
        f"swap file and the floor in {u['directory']}; "
        + (
            f"kernel: swap file {k['swapfile']}, cgroup {k['cgroup']} {k['cgroup_path']}"
            if k
            else "kernel: not measured in this run"
        )
    )
    print("  " + swapbench.table(rows).replace("\n", "\n  "))
    if k:
        by = {r["key"]: r for r in rows}
        ro, ri = by["swap_out"]["uksm_kernel"], by["seq_read"]["uksm_kernel"]
        met = ro is not None and ri is not None and ro >= 0.5 and ri >= 0.5
        print(
            f"  target, uksm within 2x of the kernel's swap throughput: swap-out "
            f"{fmt(ro, 2)}, sequential read {fmt(ri, 3)} -> {'met' if met else 'NOT met'}"
        )
        print(f"  restored: {shared.cache.get('swap_kernel_restored')}")
