"""Shared fixtures: real pools, and the kernel's own view of their memory."""

import os

import numpy as np
import psutil
import pytest

import uksm

PAGE = uksm.PAGE_SIZE


@pytest.fixture
def pool():
    """A small pool, closed after the test; scans are driven with pool.scan()."""
    p = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0)
    yield p
    p.close()


def memfd_bytes(pool) -> int:
    """Bytes the kernel has really allocated to the pool's backing memfd."""
    return os.fstat(pool.fd).st_blocks * 512


def pss_bytes() -> int:
    """This process's proportional set size, from /proc/self/smaps(_rollup)."""
    return psutil.Process().memory_full_info().pss


def fill_pages(arr: np.ndarray, page_values) -> None:
    """Fill @arr page by page: page i gets bytes page_values[i], and its page
    index-independent content is exactly that value repeated."""
    b = arr.reshape(-1).view(np.uint8)
    for i, v in enumerate(page_values):
        b[i * PAGE : (i + 1) * PAGE] = v


# pool.page_states() values
NORMAL, KSM, ZERO = uksm.PageState.PRIVATE, uksm.PageState.KSM, uksm.PageState.ZERO


def page(a: np.ndarray, i: int) -> np.ndarray:
    """Page @i of @a as a writable uint8 view."""
    return a.view(np.uint8).reshape(-1)[i * PAGE : (i + 1) * PAGE]


def states(pool, a):
    """The page-table state of each page of @a."""
    return pool.page_states(a)[0]


PRIVATE, SWAPPED = uksm.PageState.PRIVATE, uksm.PageState.SWAPPED  # NORMAL is PRIVATE's old name


@pytest.fixture(params=["kernel", "signal"])
def cow_pool(request):
    """pool, once with each copy-on-write mode: the kernel's fault path, and
    uksm's SIGSEGV handler."""
    p = uksm.Pool("64MiB", pages_to_scan=1000, sleep_millisecs=0, cow=request.param)
    yield p
    p.close()


def pool_smaps(pool, field: str = "Anonymous") -> int:
    """Bytes of @field summed over /proc/self/smaps for the mappings that lie
    in @pool's buffer range: the kernel's own count, page by page."""
    lo_va = pool._native.va
    hi_va = lo_va + pool._native.va_pages * PAGE
    total, inside, key = 0, False, field + ":"
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":"):  # a mapping's header line
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                inside = lo < hi_va and hi > lo_va
            elif inside and parts[0] == key:
                total += int(parts[1]) * 1024
    return total


def kernel_private_bytes(pool) -> int:
    """Anonymous memory the kernel holds in @pool's range: its private pages
    (written fresh pages and pages copied on write out of a view)."""
    return pool_smaps(pool, "Anonymous")


def kernel_resident_bytes(pool) -> int:
    """What the kernel holds for @pool without swap: its anonymous pages plus
    the frame store's allocated blocks (stats()["bytes_resident"]'s parts)."""
    return kernel_private_bytes(pool) + memfd_bytes(pool)


def uss_bytes() -> int:
    """This process's unique set size (psutil)."""
    return psutil.Process().memory_full_info().uss


def run_isolated(module: str, fn: str, *args, timeout: float = 90) -> str:
    """Run test module @module's function @fn(*args) in a fresh interpreter,
    so that a crash, a SIGBUS or a hang fails the test instead of killing
    or stalling pytest.  Returns its stdout."""
    import signal
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import {module} as m; m.{fn}(*{args!r})"
    try:
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{fn}{args} hung for {timeout}s:\n{exc.stdout}\n{exc.stderr}")
    died = f" (killed by {signal.Signals(-r.returncode).name})" if r.returncode < 0 else ""
    assert r.returncode == 0, (
        f"{fn}{args} exited with {r.returncode}{died}:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    )
    return r.stdout
