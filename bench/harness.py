"""Helpers shared by the bench_*.py files (pytest side; the measuring is in
measure.py)."""
import pytest

import measure
from uksm import kernelksm


def rounds(benchmark, real: int = 3) -> int:
    """Rounds for a heavy pedantic benchmark: 1 in the smoke run."""
    return 1 if benchmark.disabled else real


def need_kernel() -> None:
    if not kernelksm.available():
        pytest.skip("kernel KSM side needs root and a writable /sys/kernel/mm/ksm")


def report(benchmark, line: str, **extra) -> None:
    """One human-readable line (shown with -s) and the figures in extra_info."""
    for key, value in extra.items():
        benchmark.extra_info[key] = value
    print("\n  " + line)


class Shared:
    """Figures measured once per run and reused by every benchmark that needs
    them (the kernel's convergence, the floor), keyed by what was measured."""

    def __init__(self, tmpdir: str) -> None:
        self.tmpdir = tmpdir
        self.cache = {}

    def get(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def kernel_converge(self, n: int, nrounds: int):
        """Median kernel figures for the pairs workload, or None without KSM."""
        if not kernelksm.available():
            return None

        def compute():
            res = measure.kernel_converge_rounds(n, nrounds)
            return {"rounds": res, **measure.summarize(res)}
        return self.get(("kernel_converge", n), compute)

    def floor(self, pages: int):
        """bench/floor.c's figures (us/page), or None without a C compiler."""
        def compute():
            exe = self.get("floor_exe", lambda: measure.compile_floor(self.tmpdir))
            if exe is None:
                return None
            return measure.run_floor(exe, pages)
        return self.get(("floor", pages), compute)
