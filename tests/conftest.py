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
        b[i * PAGE:(i + 1) * PAGE] = v


NORMAL, KSM, ZERO = 1, 2, 3     # pool.page_states() values


def page(a: np.ndarray, i: int) -> np.ndarray:
    """Page @i of @a as a writable uint8 view."""
    return a.view(np.uint8).reshape(-1)[i * PAGE:(i + 1) * PAGE]


def states(pool, a):
    """The page-table state of each page of @a."""
    return pool.page_states(a)[0]
