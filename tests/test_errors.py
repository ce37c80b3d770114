"""errors.check/error: where every -errno of the core (and every OSError
uksm relabels) becomes the exception the caller sees."""

from __future__ import annotations

import errno
import os

import pytest

import uksm
from uksm.errors import check, error


def test_check_passes_counts_through() -> None:
    assert check(0, "x") == 0
    assert check(7, "x") == 7


def test_negative_errno_is_an_oserror_naming_the_call() -> None:
    with pytest.raises(OSError) as ei:
        check(-errno.EINVAL, "release")
    assert ei.type is OSError
    assert ei.value.errno == errno.EINVAL
    assert str(ei.value) == f"[Errno {errno.EINVAL}] uksm: release: {os.strerror(errno.EINVAL)}"


def test_detail_and_positive_errno() -> None:
    e = error(errno.EIO, "writing to the swap file", detail="nothing lost")
    assert isinstance(e, OSError) and e.errno == errno.EIO
    assert e.strerror == f"uksm: writing to the swap file: {os.strerror(errno.EIO)}; nothing lost"


def test_special_maps_only_its_errno() -> None:
    special = {errno.ENOSPC: uksm.PoolFullError("full")}
    with pytest.raises(uksm.PoolFullError):
        check(-errno.ENOSPC, "shrink", special)
    with pytest.raises(OSError) as ei:
        check(-errno.EBUSY, "shrink", special)
    assert ei.value.errno == errno.EBUSY and not isinstance(ei.value, uksm.UksmError)


def test_errno_none_is_still_an_oserror() -> None:
    e = error(None, "swap_path 'x'")
    assert isinstance(e, OSError) and e.errno is None and "swap_path 'x'" in str(e)


def test_core_einval_through_check() -> None:
    """A real call into the core: a range outside the pool is EINVAL."""
    with uksm.Pool("1MiB") as pool:
        with pytest.raises(OSError) as ei:
            pool._native.release(pool._native.va_pages, 1)
    assert ei.value.errno == errno.EINVAL and "uksm: release:" in str(ei.value)


def test_swap_path_error_keeps_errno() -> None:
    """A swap file cannot be made in a file system that holds none (/proc):
    the OSError carries the errno and names the path."""
    with pytest.raises(OSError) as ei:
        uksm.Pool("1MiB", max_resident="512KiB", swap_path="/proc/self")
    assert ei.value.errno is not None and "swap_path '/proc/self'" in str(ei.value)
