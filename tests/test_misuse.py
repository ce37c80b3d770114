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
        pool.checksum = "xxhash"  # read-only property


def test_misspelt_group_attribute_raises():
    with uksm.Pool("16MiB", max_resident="8MiB") as p:
        g = p.group("g", max_resident="4MiB")
        with pytest.raises(AttributeError, match="max_residnet"):
            g.max_residnet = "1MiB"
        g.max_resident = "2MiB"
        assert g.max_resident == 2 * MiB


# -------------------------------------------------- 2. NaN, infinity, negatives

INT_KNOBS = {
    "pages_to_scan": 1,
    "sleep_millisecs": 0,
    "max_page_sharing": 2,
    "advisor_min_pages_to_scan": 1,
    "advisor_max_pages_to_scan": 1,
    "advisor_max_cpu": 1,
}


@pytest.mark.parametrize("knob", sorted(INT_KNOBS))
@pytest.mark.parametrize("value", [NAN, INF, -INF, 1.0])
def test_int_knob_rejects_non_ints(knob, value):
    msg = raises_naming(TypeError, knob, uksm.Pool, "4MiB", **{knob: value})
    assert "an int" in msg and repr(value) in msg, msg


@pytest.mark.parametrize("knob", sorted(INT_KNOBS))
def test_int_knob_rejects_out_of_range(knob):
    lo = INT_KNOBS[knob]
    for bad in (lo - 1, -1, 1 << 40):
        msg = raises_naming(ValueError, knob, uksm.Pool, "4MiB", **{knob: bad})
        assert f"[{lo}, " in msg and str(bad) in msg, msg


@pytest.mark.parametrize("value", [NAN, INF, -INF, -1.0, 0, -5])
def test_advisor_target_scan_time_must_be_finite_and_positive(value):
    msg = raises_naming(
        ValueError, "advisor_target_scan_time", uksm.Pool, "4MiB", advisor_target_scan_time=value
    )
    assert "> 0" in msg and repr(value) in msg, msg


@pytest.mark.parametrize("value", [NAN, INF, -INF, -1.0, 0.5])
def test_compact_threshold_must_be_zero_or_a_finite_ratio(value):
    msg = raises_naming(ValueError, "compact_threshold", uksm.Pool, "4MiB", compact_threshold=value)
    assert ">= 1" in msg and repr(value) in msg, msg


@pytest.mark.parametrize("knob", ["capacity", "virtual_size", "max_resident", "swap_batch"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, -1, 0, -4096, "-1MiB", "nanMiB", "inf"])
def test_size_knobs_reject_nan_inf_and_negatives(knob, value):
    kw = {"capacity": "16MiB", "max_resident": "8MiB", knob: value}
    cap = kw.pop("capacity")
    with pytest.raises((ValueError, TypeError)) as info:
        uksm.Pool(cap, **kw)
    assert knob in str(info.value), str(info.value)


@pytest.mark.parametrize("value", [NAN, -1, "-1MiB"])
def test_swap_batch_is_checked_without_swap_too(value):
    raises_naming((ValueError, TypeError), "swap_batch", uksm.Pool, "4MiB", swap_batch=value)


@pytest.mark.parametrize(
    "knob", ["pages_to_scan", "sleep_millisecs", "max_page_sharing", "advisor_max_cpu"]
)
def test_knob_setters_reject_bad_values(pool, knob):
    before = getattr(pool, knob)
    for bad in (NAN, INF, 2.0):
        raises_naming(TypeError, knob, setattr, pool, knob, bad)
    for bad in (-1, 1 << 40):
        msg = raises_naming(ValueError, knob, setattr, pool, knob, bad)
        assert str(bad) in msg
    assert getattr(pool, knob) == before  # a refused value changes nothing


def test_advisor_max_cpu_is_a_percentage(pool):
    pool.advisor_max_cpu = 100
    raises_naming(ValueError, "advisor_max_cpu", setattr, pool, "advisor_max_cpu", 101)


# ----------------------------------------------------- 3. max_resident setter


def test_max_resident_setter_above_capacity_raises():
    with uksm.Pool("16MiB", max_resident="8MiB") as p:
        msg = raises_naming(ValueError, "max_resident", setattr, p, "max_resident", "1GiB")
        assert "capacity" in msg and str(16 * MiB) in msg and "'1GiB'" in msg, msg
        assert p.max_resident == 8 * MiB
        p.max_resident = "16MiB"  # up to capacity is fine
        assert p.max_resident == 16 * MiB
        for bad in (NAN, -1, 0):
            raises_naming((ValueError, TypeError), "max_resident", setattr, p, "max_resident", bad)
        g = p.group("g", max_resident="4MiB")
        raises_naming(ValueError, "max_resident", setattr, g, "max_resident", "17MiB")
        raises_naming(ValueError, "max_resident", p.group, "h", max_resident="1GiB")
    raises_naming(ValueError, "max_resident", uksm.Pool, "16MiB", max_resident="17MiB")


# ------------------------------------------------------------ 4. size strings


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1gb", GiB),
        ("1GB", GiB),
        ("1G", GiB),
        ("1g", GiB),
        ("1GiB", GiB),
        ("1gib", GiB),
        ("1 GiB", GiB),
        (" 1 G ", GiB),
        ("1PiB", 1 << 50),
        ("1PB", 1 << 50),
        ("1P", 1 << 50),
        ("1EiB", 1 << 60),
        ("2TB", 2 << 40),
        ("2t", 2 << 40),
        ("512k", 512 * KiB),
        ("512KB", 512 * KiB),
        ("512kib", 512 * KiB),
        ("64MB", 64 * MiB),
        ("64 mib", 64 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1.5 gb", 3 * GiB // 2),
        ("4096", 4096),
        ("4096b", 4096),
        ("4096 B", 4096),
        (".5k", 512),
        ("1.k", 1024),
        # a fraction is rounded up to whole bytes, computed exactly
        ("0.1k", 103),
        ("1.5", 2),
        ("1.1E", -(-11 * (1 << 60) // 10)),
    ],
)
def test_parse_size_units_are_1024_based(text, expected):
    assert uksm.parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1 gigabyte",
        "",
        "   ",
        "-1G",
        "1e3G",
        "nanG",
        "infG",
        "nan",
        "G",
        "1GG",
        "1iB",
        "1.2.3k",
        "1 K B",
        "0x10M",
        "1_000",
        "+1G",
    ],
)
def test_parse_size_rejects_garbage_with_an_example(text):
    msg = raises_naming(ValueError, "capacity", uksm.parse_size, text, "capacity")
    assert repr(text) in msg and "MiB'" in msg, msg


@pytest.mark.parametrize("value", ["0", "0k", "0.0G", 0, -1])
def test_parse_size_rejects_zero_and_negative(value):
    msg = raises_naming(ValueError, "max_resident", uksm.parse_size, value, "max_resident")
    assert "positive" in msg


def test_size_strings_are_documented_as_1024_based():
    assert "1024-based" in uksm.parse_size.__doc__
    assert "1024-based" in uksm.Pool.__doc__


def test_pool_takes_the_new_size_spellings():
    with uksm.Pool("16mb", max_resident="8m", swap_batch="64kb") as p:
        assert p.capacity == 16 * MiB and p.max_resident == 8 * MiB


# ------------------------------------------------ 5. more address space than mappable


@pytest.mark.parametrize("capacity", [1 << 50, 1 << 60, "1PiB", "8TiB"])
def test_pool_too_large_for_the_address_space(capacity):
    msg = raises_naming(ValueError, "capacity", uksm.Pool, capacity)
    asked = 2 * uksm.parse_size(capacity)
    assert "address space" in msg and str(asked) in msg and "exceeds" in msg, msg


def test_virtual_size_too_large_for_the_address_space():
    msg = raises_naming(ValueError, "virtual_size", uksm.Pool, "4MiB", virtual_size="1EiB")
    assert str(1 << 60) in msg


def _address_space_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (16 * GiB, resource.RLIM_INFINITY))
    try:
        uksm.Pool("64GiB")  # 128 GiB of reservation, over the limit
    except MemoryError as exc:
        msg = str(exc)
        assert "address space" in msg and str(128 * GiB) in msg, msg
        assert "RLIMIT_AS" in msg, msg
        print("MemoryError ok")
        return
    raise AssertionError("no MemoryError under RLIMIT_AS")


def test_reservation_refused_by_rlimit_as_is_a_memory_error():
    assert "MemoryError ok" in run_isolated("test_misuse", "_address_space_limit")


# ------------------------------------------------------------- 6. too many pools


def _too_many_pools():
    import resource

    limit = uksm._core.MAX_POOLS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * limit + 64  # each pool holds its memfd and a read-only copy
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        except (ValueError, OSError):
            print(f"SKIP: RLIMIT_NOFILE {soft}/{hard} is below {need}")
            return
    pools = [uksm.Pool("64KiB") for _ in range(limit)]
    try:
        uksm.Pool("64KiB")
    except uksm.TooManyPoolsError as exc:
        msg = str(exc)
        assert isinstance(exc, uksm.UksmError) and isinstance(exc, OSError)
        assert f"at most {limit} pools" in msg and "clos" in msg, msg
    else:
        raise AssertionError("the pool past the limit was created")
    pools.pop().close()
    gc.collect()
    extra = uksm.Pool("64KiB")  # the freed slot is used again
    a = extra.asarray(np.arange(10))
    assert a.sum() == 45
    print("limit ok")


def test_pool_past_the_registry_limit_says_so():
    out = run_isolated("test_misuse", "_too_many_pools", timeout=180)
    if out.startswith("SKIP"):
        pytest.skip(out)
    assert "limit ok" in out


# ------------------------------------------------------------------ 7. swap_path


@pytest.mark.parametrize("path", ["/dev/null", "/dev/zero"])
def test_swap_path_device_is_refused(path):
    msg = raises_naming(
        ValueError, "swap_path", uksm.Pool, "4MiB", max_resident="1MiB", swap_path=path
    )
    assert repr(path) in msg and "not a directory" in msg, msg


def test_swap_path_regular_file_is_refused(tmp_path):
    f = tmp_path / "swapfile"
    f.write_bytes(b"keep me")
    msg = raises_naming(
        ValueError, "swap_path", uksm.Pool, "4MiB", max_resident="1MiB", swap_path=str(f)
    )
    assert "not a directory" in msg
    assert f.read_bytes() == b"keep me"


def test_swap_path_missing_is_refused(tmp_path):
    for path in (tmp_path / "no" / "such", "/nonexistent-uksm-dir/swap"):
        msg = raises_naming(
            ValueError, "swap_path", uksm.Pool, "4MiB", max_resident="1MiB", swap_path=str(path)
        )
        assert "does not exist" in msg, msg


def test_swap_path_that_cannot_hold_a_file_is_refused():
    # procfs holds no files, for root either
    msg = raises_naming(
        OSError, "swap_path", uksm.Pool, "4MiB", max_resident="1MiB", swap_path="/proc/self"
    )
    assert "/proc/self" in msg


def test_swap_path_directory_and_new_name_still_work(tmp_path):
    with uksm.Pool("4MiB", max_resident="1MiB", swap_path=str(tmp_path)) as p:
        assert p.max_resident == MiB
    # a new name in an existing directory means that directory (documented)
    with uksm.Pool("4MiB", max_resident="1MiB", swap_path=str(tmp_path / "new")) as p:
        assert p.max_resident == MiB
    assert os.listdir(tmp_path) == []


def test_swap_path_type_is_checked():
    raises_naming(TypeError, "swap_path", uksm.Pool, "4MiB", max_resident="1MiB", swap_path=3)


# ----------------------------------------------- 8. swap_path needs max_resident


def test_swap_path_without_max_resident_raises(tmp_path):
    msg = raises_naming(ValueError, "swap_path", uksm.Pool, "4MiB", swap_path=str(tmp_path))
    assert "max_resident" in msg


# ------------------------------------------- 9. the budget holds where memory grows

BUDGET, BATCH = 16 * MiB, 2 * MiB


def _assert_within(p, limit, tag):
    st = p.stats()
    for key in ("bytes_resident", "bytes_private"):
        assert st[key] <= limit + BATCH, (tag, key, st[key] >> 20, limit >> 20)
    # and as the kernel counts the anonymous memory in the pool's range
    assert kernel_private_bytes(p) <= limit + BATCH, tag
    assert st["full_scans"] == 0  # no scan ran


def _varied(nbytes, seed=0):
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def test_asarray_reclaims_to_max_resident():
    src = _varied(64 * MiB)
    with uksm.Pool("256MiB", max_resident=BUDGET, swap_batch=BATCH) as p:
        a = p.asarray(src)
        _assert_within(p, BUDGET, "after asarray")
        assert p.stats()["pages_swapped"] >= (48 * MiB - BATCH) // PAGE
        assert np.array_equal(a, src)  # nothing lost
        del a
        gc.collect()


def test_full_reclaims_to_max_resident():
    with uksm.Pool("256MiB", max_resident=BUDGET, swap_batch=BATCH) as p:
        a = p.full(64 * MiB // 8, 1.5)
        _assert_within(p, BUDGET, "after full")
        assert (a[:: PAGE // 8] == 1.5).all()
        del a
        gc.collect()


def test_many_small_arrays_stay_within_max_resident():
    """Small buffers share a reclaim pass per swap batch written: between
    passes they hold less than the one batch a pass may leave over."""
    with uksm.Pool("256MiB", max_resident=BUDGET, swap_batch=BATCH) as p:
        arrs = []
        for i in range(64 * MiB // (48 * KiB)):
            arrs.append(
                p.asarray(_varied(48 * KiB, seed=i))
                if i % 2
                else p.full(48 * KiB, i % 251 + 1, dtype=np.uint8)
            )
            if i % 97 == 0:
                _assert_within(p, BUDGET, f"after {i + 1} small arrays")
        _assert_within(p, BUDGET, "after all the small arrays")
        assert (arrs[2][::PAGE] == 3).all() and np.array_equal(arrs[1], _varied(48 * KiB, 1))
        del arrs
        gc.collect()


@pytest.mark.parametrize("how", ["asarray", "full"])
def test_group_allocation_reclaims_to_its_own_limit(how):
    src = _varied(64 * MiB, seed=1)
    with uksm.Pool("256MiB", max_resident="200MiB", swap_batch=BATCH) as p:
        g = p.group("g", max_resident=BUDGET)
        a = g.asarray(src) if how == "asarray" else g.full(64 * MiB, 7, dtype=np.uint8)
        assert g.stats()["bytes_resident"] <= BUDGET + BATCH, g.stats()
        _assert_within(p, BUDGET, f"group {how}")
        assert (a[::PAGE] == (src[::PAGE] if how == "asarray" else 7)).all()
        del a
        gc.collect()


# ---------------------------------------------------------------- 10. the CLI


def test_cli_stats_counts_the_merged_workload():
    size, copies = 4 * MiB, 3
    r = subprocess.run(
        [sys.executable, "-m", "uksm", "stats", "--size", "4MiB", "--copies", str(copies)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    pages = size // PAGE
    assert st["full_scans"] >= 2
    assert st["pages_shared"] >= pages and st["pages_sharing"] >= (copies - 1) * pages, st
    assert st["ksm_zero_pages"] >= pages, st
