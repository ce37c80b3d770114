"""Misuse of the public API: each mistake fails at once, with an exception
that names the argument, the value given and what is allowed, instead of
being ignored, kept silently or surfacing later as a bare OSError."""
import gc
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

import uksm
from conftest import kernel_private_bytes, run_isolated

PAGE = uksm.PAGE_SIZE
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NAN, INF = float("nan"), float("inf")


def raises_naming(exc, name, fn, *args, **kw):
    """@fn(*args, **kw) raises @exc, and its message names @name and says
    what is allowed."""
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert name in msg, msg
    return msg


# ------------------------------------------------------------ 1. attributes

def test_misspelt_pool_attribute_raises(pool):
    with pytest.raises(AttributeError, match="pages_to_scn"):
        pool.pages_to_scn = 5
    with pytest.raises(AttributeError):
        pool.max_residnet = "1MiB"
    assert not hasattr(pool, "__dict__")
    # the knobs, as properties, still work; pools can still be weakly held
    pool.pages_to_scan = 5
    pool.sleep_millisecs = 7
    st = pool.stats()
    assert (st["pages_to_scan"], st["sleep_millisecs"]) == (5, 7)
    assert weakref.ref(pool)() is pool
    with pytest.raises(AttributeError):
        pool.checksum = "xxhash"            # read-only property


def test_misspelt_group_attribute_raises():
    with uksm.Pool("16MiB", max_resident="8MiB") as p:
        g = p.group("g", max_resident="4MiB")
        with pytest.raises(AttributeError, match="max_residnet"):
            g.max_residnet = "1MiB"
        g.max_resident = "2MiB"
        assert g.max_resident == 2 * MiB
