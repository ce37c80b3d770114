"""Benchmark plumbing: collect bench_*.py, size the workloads, share the
kernel's and the floor's figures between benchmarks of one run.

`pytest bench --benchmark-disable` is the CI smoke run: every benchmark runs
once, on small sizes (benchmark.disabled), and the kernel side is skipped
when this is not root or there is no /sys/kernel/mm/ksm.  A real run:
`pytest bench -s --benchmark-min-rounds=1` prints one line per benchmark.
"""

import os

import pytest

from uksm.bench import kernelksm
from uksm.bench.micro import Shared


def pytest_collect_file(file_path, parent):
    # bench/ keeps its own file names (bench_*.py) and is not in testpaths.
    # A file named on the command line is collected by pytest itself.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    return Shared(str(tmp_path_factory.mktemp("uksm-bench")))


@pytest.fixture(scope="session", autouse=True)
def ksm_knobs_restored():
    """The kernel's KSM knobs are system-wide: check every one is as we found it."""
    if not os.path.isdir(kernelksm.KSM_DIR):
        yield
        return
    before = kernelksm.knobs()
    yield
    after = kernelksm.knobs()
    print(f"\n  /sys/kernel/mm/ksm before: {before}\n  /sys/kernel/mm/ksm after:  {after}")
    assert after == before, f"KSM knobs not restored: before {before}, after {after}"
