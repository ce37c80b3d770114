"""The public contract of uksm.Pool, tested on real memory.

Every figure uksm reports about memory is checked against the kernel's own
view, never against uksm's own word alone: the frame store's allocated
blocks (conftest.memfd_bytes) for the merged frames, and the anonymous
memory smaps shows in the pool's range (conftest.kernel_private_bytes) for
the private pages.
"""

import gc
import time

import numpy as np
import pytest

import uksm

from conftest import PAGE, kernel_private_bytes, kernel_resident_bytes, memfd_bytes, uss_bytes

STATS_KEYS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
    "bytes_resident",
    "bytes_private",
    "bytes_frames",
    "bytes_swap_cached",
    "rss_bytes",
    "uss_bytes",
    "pss_bytes",
    "bytes_mapped",
    "frames_deferred",
    "fork_detaches",
    "transit_faults",
    "cow_breaks",
    "cow_breaks_signal",
    "zero_page_cows",
)
# counters of the old model's mechanisms, which no longer exist
GONE_KEYS = ("cow_reserve_used_max", "swap_cache_hits", "reference_hint_faults")


def page_bytes(arr: np.ndarray) -> np.ndarray:
    """@arr's bytes as (pages, 4096): row i is page i."""
    b = arr.view(np.uint8).reshape(-1)
    return b[: b.size - b.size % PAGE].reshape(-1, PAGE)


def fill_pairs(arr: np.ndarray) -> None:
    """Pages 2k and 2k+1 equal, every pair different from every other pair,
    and no page all zeroes: after two full scans each pair is one KSM page."""
    words = arr.view(np.uint32).reshape(-1, PAGE // 4)
    words[:] = (np.arange(len(words), dtype=np.uint32) // 2 + 1)[:, None]


def check_invariants(pool) -> dict:
    """The counters add up, and uksm's resident bytes are the kernel's: its
    frames are the memfd's blocks, its private pages the anonymous memory
    in the pool's range."""
    s = pool.stats()
    assert (
        s["pages_shared"] + s["pages_sharing"] + s["pages_unshared"] + s["pages_volatile"]
    ) == s["pages_tracked"], s
    assert s["bytes_frames"] == memfd_bytes(pool), (s["bytes_frames"], memfd_bytes(pool))
    assert s["bytes_private"] == kernel_private_bytes(pool), (
        s["bytes_private"],
        kernel_private_bytes(pool),
    )
    assert s["bytes_resident"] == s["bytes_private"] + s["bytes_frames"] + s["bytes_swap_cached"]
    assert s["bytes_swap_cached"] == 0  # no swap area here
    return s


# -- the build ---------------------------------------------------------------


def test_native_module_is_built():
    # No skip on ImportError: a wheel built without its C core must fail here.
    import uksm._native as native

    assert hasattr(native, "ffi") and hasattr(native, "lib")
    assert callable(native.lib.uksm_merge)
    assert native.lib.UKSM_PAGE_SIZE == uksm.PAGE_SIZE == 4096


# -- construction ------------------------------------------------------------


def test_constructor_takes_the_ksm_knobs():
    with uksm.Pool(
        capacity="8MiB",
        pages_to_scan=123,
        sleep_millisecs=7,
        max_page_sharing=256,
        use_zero_pages=True,
        smart_scan=True,
        checksum="jhash2",
    ) as p:
        assert p.capacity == 8 << 20
        assert (p.pages_to_scan, p.sleep_millisecs, p.max_page_sharing) == (123, 7, 256)
        assert p.use_zero_pages is True and p.smart_scan is True
        assert p.checksum == "jhash2"
        s = p.stats()
        assert (s["pages_to_scan"], s["sleep_millisecs"], s["max_page_sharing"]) == (123, 7, 256)
        # knobs are writable attributes, validated like the constructor's
        p.pages_to_scan = 50
        p.use_zero_pages = False
        assert p.stats()["pages_to_scan"] == 50 and p.stats()["use_zero_pages"] == 0
        with pytest.raises(ValueError):
            p.pages_to_scan = 0
        with pytest.raises(TypeError):
            p.max_page_sharing = "10"
        assert p.pages_to_scan == 50


@pytest.mark.parametrize(
    "size, expected",
    [
        (40960, 40960),
        (np.int64(8192), 8192),
        ("512MiB", 512 << 20),
        ("64KiB", 64 << 10),
        ("2M", 2 << 20),
        ("1GiB", 1 << 30),
        (" 3 MiB ", 3 << 20),
    ],
)
def test_capacity_int_or_size_string(size, expected):
    with uksm.Pool(size) as p:
        assert p.capacity == expected
        assert uksm.parse_size(size) == expected


@pytest.mark.parametrize(
    "size", [0, -4096, 4097, 100, "0MiB", "-1MiB", "1.5KiB", "abc", "12 parsecs", ""]
)
def test_capacity_bad_values(size):
    with pytest.raises(ValueError):
        uksm.Pool(size)


@pytest.mark.parametrize("size", [1.5, None, True, [4096], b"4096"])
def test_capacity_bad_types(size):
    with pytest.raises(TypeError):
        uksm.Pool(size)


def test_unknown_checksum_is_named():
    with pytest.raises(ValueError, match="md5"):
        uksm.Pool("1MiB", checksum="md5")
    with pytest.raises(TypeError):
        uksm.Pool("1MiB", checksum=3)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"pages_to_scan": 0}, ValueError),
        ({"pages_to_scan": "100"}, TypeError),
        ({"pages_to_scan": 1.0}, TypeError),
        ({"sleep_millisecs": -1}, ValueError),
        ({"max_page_sharing": 1}, ValueError),
        ({"max_page_sharing": None}, TypeError),
        ({"use_zero_pages": "yes"}, TypeError),
        ({"smart_scan": None}, TypeError),
    ],
)
def test_bad_knobs(kwargs, exc):
    with pytest.raises(exc):
        uksm.Pool("1MiB", **kwargs)


# -- lifetime ----------------------------------------------------------------


def test_context_manager_closes_and_closed_pool_refuses_work():
    with uksm.Pool("1MiB", pages_to_scan=100, sleep_millisecs=0) as p:
        assert not p.closed
        a = p.full(1000, 7, dtype=np.int32)
        p.start()
        assert p.running
    assert p.closed
    assert not p.running
    calls = {
        "empty": lambda: p.empty(10),
        "zeros": lambda: p.zeros(10),
        "full": lambda: p.full(10, 1),
        "asarray": lambda: p.asarray([1, 2, 3]),
        "scan": lambda: p.scan(),
        "start": lambda: p.start(),
        "free": lambda: p.free(a),
        "unmerge": lambda: p.unmerge(a),
        "merge": lambda: p.merge(a),
        "buffer_stats": lambda: p.buffer_stats(a),
        "page_states": lambda: p.page_states(a),
    }
    for call in calls.values():
        with pytest.raises(uksm.PoolClosedError):
            call()
    assert issubclass(uksm.PoolClosedError, ValueError)
    p.close()  # idempotent
    # arrays outlive their pool's close: reads and writes still work
    assert (a == 7).all()
    a[:] = np.arange(1000)
    assert a.sum() == sum(range(1000))


def test_context_manager_closes_on_exception():
    with pytest.raises(RuntimeError):
        with uksm.Pool("1MiB") as p:
            raise RuntimeError("boom")
    assert p.closed
    with pytest.raises(uksm.PoolClosedError):
        p.empty(1)


# -- arrays ------------------------------------------------------------------


def _check_array(arr, shape, dtype):
    assert isinstance(arr, np.ndarray)
    assert arr.shape == shape
    assert arr.dtype == np.dtype(dtype)
    assert arr.flags.c_contiguous
    assert arr.flags.writeable
    assert arr.__array_interface__["data"][0] % PAGE == 0


@pytest.mark.parametrize(
    "shape, dtype",
    [
        (10, np.float64),
        ((3, 5), np.int16),
        ((2, 3, 4096), np.uint8),
        (5000, np.complex128),
        ((1024, 1024), np.float32),
        (0, np.int64),
    ],
)
def test_empty_and_zeros(pool, shape, dtype):
    norm = shape if isinstance(shape, tuple) else (shape,)
    for make in (pool.empty, pool.zeros):
        arr = make(shape, dtype)
        _check_array(arr, norm, dtype)
        assert not arr.any()  # no old contents, and zeros are zeros
        if arr.size:
            arr.reshape(-1)[-1] = 1  # writeable in fact, to the last byte
            assert arr.reshape(-1)[-1] == 1


def test_default_dtype_is_float64(pool):
    assert pool.empty(3).dtype == np.float64
    assert pool.zeros(3).dtype == np.float64


def test_full(pool):
    a = pool.full((4, 3000), 2.5)
    _check_array(a, (4, 3000), np.float64)
    assert (a == 2.5).all()
    b = pool.full(7000, -3, dtype=np.int8)
    _check_array(b, (7000,), np.int8)
    assert (b == -3).all()


def test_asarray_copies(pool):
    src = np.arange(3 * 4096, dtype=np.int32).reshape(3, 4096)
    a = pool.asarray(src)
    _check_array(a, src.shape, np.int32)
    assert (a == src).all()
    assert not np.shares_memory(a, src)
    b = pool.asarray(a)  # a copy even of a pool array
    assert not np.shares_memory(a, b)
    b[0, 0] = -1
    assert a[0, 0] == 0
    c = pool.asarray([[1, 2], [3, 4]], dtype=np.int16)
    _check_array(c, (2, 2), np.int16)
    assert c.tolist() == [[1, 2], [3, 4]]
    d = pool.asarray(src[:, ::2])  # non-contiguous source
    _check_array(d, (3, 2048), np.int32)
    assert (d == src[:, ::2]).all()


@pytest.mark.parametrize("shape", ["x", "12", (2.5,), None, 1.5, [3, "a"]])
def test_bad_shape_types(pool, shape):
    # what numpy.empty raises for the same shape
    with pytest.raises(TypeError):
        np.empty(shape)
    with pytest.raises(TypeError):
        pool.empty(shape)


def test_bad_shape_values_and_dtypes(pool):
    with pytest.raises(ValueError):
        pool.empty(-1)
    with pytest.raises(ValueError):
        pool.zeros((3, -2))
    with pytest.raises(TypeError):
        pool.empty(4, dtype=object)
    with pytest.raises(TypeError):
        pool.empty(4, dtype="not a dtype")


def test_fresh_allocation_never_shows_old_contents():
    # a pool just large enough that the second buffer must reuse the range
    with uksm.Pool("1MiB", pages_to_scan=1000, sleep_millisecs=0) as p:
        frames = p.capacity // PAGE
        a = p.full((frames, PAGE), 0xAB, dtype=np.uint8)
        del a
        gc.collect()
        b = p.empty((frames, PAGE), dtype=np.uint8)
        assert not b.any()
        b[:] = 0xCD
        p.free(b)
        c = p.zeros((frames, PAGE), dtype=np.uint8)
        assert not c.any()
        # and frames that were KSM frames, once freed, come back clean too
        fill_pairs(c)
        p.scan(full_scans=2)
        assert p.stats()["pages_sharing"] == frames // 2
        del c
        gc.collect()
        d = p.empty((frames, PAGE), dtype=np.uint8)
        assert not d.any()


def test_memory_returns_when_array_and_views_are_collected(pool):
    n = 1024  # 4 MiB
    gc.collect()
    assert pool.stats()["bytes_resident"] == kernel_resident_bytes(pool) == 0
    a = pool.full((n, PAGE // 8), 3.0)
    # written pages are private anonymous memory: none of it is in the memfd
    assert pool.stats()["bytes_resident"] == kernel_resident_bytes(pool) == n * PAGE
    assert memfd_bytes(pool) == 0
    views = [
        a[1:],
        a.reshape(-1),
        a.view(np.uint8),
        a.T,
        memoryview(a),
        np.frombuffer(a, dtype=np.uint8),
    ]
    del a
    gc.collect()
    assert pool.stats()["bytes_resident"] == kernel_resident_bytes(pool) == n * PAGE
    assert (views[0] == 3.0).all()  # the views still work
    views.pop(0)
    gc.collect()
    assert kernel_resident_bytes(pool) == n * PAGE  # the others still hold it
    del views
    gc.collect()
    s = pool.stats()
    assert s["bytes_resident"] == 0 and kernel_resident_bytes(pool) == 0
    assert s["bytes_mapped"] == 0 and s["buffers"] == 0


def test_allocation_commits_nothing(pool):
    """Like numpy's own arrays, a pool's buffer costs nothing until written;
    then exactly the pages written are resident, by the kernel's count."""
    n = 4096  # 16 MiB
    uss0 = uss_bytes()
    big = pool.empty((n, PAGE), dtype=np.uint8)
    s = pool.stats()
    assert s["bytes_mapped"] == n * PAGE
    assert s["bytes_resident"] == s["bytes_private"] == kernel_resident_bytes(pool) == 0
    assert uss_bytes() - uss0 < n * PAGE // 4
    # below a huge page, so that the kernel allocates page by page
    m = 384
    a = pool.empty((m, PAGE), dtype=np.uint8)
    a[::4, 0] = np.arange(1, m // 4 + 1)  # one page in four, all different
    s = check_invariants(pool)
    assert s["bytes_resident"] == s["bytes_private"] == m // 4 * PAGE
    assert s["bytes_frames"] == 0
    # untouched pages are not scanned and never merged with each other
    pool.scan(full_scans=2)
    assert pool.buffer_stats(big)["pages_merged"] == 0
    assert pool.stats()["pages_sharing"] == 0
    assert check_invariants(pool)["bytes_resident"] == m // 4 * PAGE


@pytest.mark.parametrize(
    "n, merged",
    [
        (256, False),
        (256, True),
        # big enough for huge pages: a read maps the kernel's huge zero page
        (1024, False),
        (1024, True),
    ],
    ids=["fresh", "zero-merged", "fresh-huge", "zero-merged-huge"],
)
def test_reading_zero_pages_commits_nothing(pool, n, merged):
    """A read of a fresh page, or of a page merged with the zero page, maps
    the kernel's shared zero page: no memory is allocated (smaps shows no
    anonymous memory, RSS does not grow), so uksm must not count it
    resident either."""
    a = pool.zeros((n, PAGE), dtype=np.uint8)
    if merged:
        a.fill(1)
        a.fill(0)
        assert pool.scan(full_scans=2)["ksm_zero_pages"] == n
    assert pool.stats()["bytes_resident"] == 0
    assert not a.any()  # reads every page
    assert kernel_private_bytes(pool) == 0
    s = pool.stats()
    assert s["bytes_private"] == s["bytes_resident"] == 0, s
    assert s["rss_bytes"] == 0, s


def test_free_returns_memory_now(pool):
    a = pool.full((512, PAGE), 1, dtype=np.uint8)
    b = pool.full((256, PAGE), 2, dtype=np.uint8)
    assert kernel_resident_bytes(pool) == 768 * PAGE
    pool.free(a)
    # at once, with no garbage collection in between
    assert pool.stats()["bytes_resident"] == kernel_resident_bytes(pool) == 256 * PAGE
    assert (b == 2).all()
    with pytest.raises(uksm.ForeignArrayError):  # not a live buffer any more
        pool.free(a)
    del a
    gc.collect()  # no double release
    assert pool.stats()["bytes_resident"] == kernel_resident_bytes(pool) == 256 * PAGE
    # merged pages too: the frames go with their last view
    c = pool.full((256, PAGE), 2, dtype=np.uint8)
    pool.scan(full_scans=2)
    assert memfd_bytes(pool) > 0
    pool.free(b)
    pool.free(c)
    assert pool.stats()["bytes_resident"] == kernel_resident_bytes(pool) == 0


@pytest.mark.parametrize(
    "make_view",
    [
        lambda a: a[1:],
        lambda a: a.view(np.int8),
        lambda a: a.reshape(64, 64),
        lambda a: memoryview(a),
        lambda a: np.frombuffer(a, dtype=np.uint8),
    ],
    ids=["slice", "view", "reshape", "memoryview", "frombuffer"],
)
def test_free_with_live_view_raises(pool, make_view):
    a = pool.full(PAGE, 9, dtype=np.uint8)
    view = make_view(a)
    try:
        pool.free(a)
    except uksm.BufferInUseError as e:
        raised = e
    else:
        raised = None
        # the view now points at freed (PROT_NONE) memory: never touch it
        del view
    assert raised is not None, "free() succeeded while a view was alive"
    assert isinstance(raised, BufferError)
    assert kernel_resident_bytes(pool) == PAGE and (a == 9).all()
    assert (np.asarray(view).view(np.uint8) == 9).all()
    del view
    pool.free(a)
    assert kernel_resident_bytes(pool) == 0


def test_foreign_and_non_arrays(pool):
    ops = [pool.free, pool.unmerge, pool.merge, pool.buffer_stats, pool.page_states]
    own = pool.empty((4, PAGE), dtype=np.uint8)
    own[:, 0] = 0  # written: resident
    with uksm.Pool("1MiB") as other:
        theirs = other.empty(10)
        for op in ops:
            for foreign in (np.zeros(10), theirs, own[1:], own[2]):
                with pytest.raises(uksm.ForeignArrayError):
                    op(foreign)
            for not_array in ([1, 2, 3], "abc", None, memoryview(b"x" * 8)):
                with pytest.raises(TypeError):
                    op(not_array)
    assert issubclass(uksm.ForeignArrayError, ValueError)
    assert (own == 0).all() and kernel_resident_bytes(pool) == 4 * PAGE


def test_pool_full_keeps_stored_data():
    with uksm.Pool("1MiB", pages_to_scan=1000, sleep_millisecs=0) as p:
        frames = p.capacity // PAGE
        rng = np.random.default_rng(1)
        a = p.asarray(rng.integers(0, 255, (frames // 2, PAGE), dtype=np.uint8))
        b = p.asarray(rng.integers(0, 255, (frames // 4, PAGE), dtype=np.uint8))
        a_copy, b_copy = a.copy(), b.copy()
        before = p.stats()
        for pages in (frames // 4 + 1, frames, 1 << 30):
            with pytest.raises(uksm.PoolFullError):
                p.empty((pages, PAGE), dtype=np.uint8)
        assert issubclass(uksm.PoolFullError, MemoryError)
        after = check_invariants(p)
        assert (a == a_copy).all() and (b == b_copy).all()
        assert after["bytes_resident"] == before["bytes_resident"] == 3 * frames // 4 * PAGE
        assert after["buffers"] == before["buffers"]
        c = p.empty((frames // 4, PAGE), dtype=np.uint8)  # what does fit, fits
        c[:] = 1
        with pytest.raises(uksm.PoolFullError):
            p.empty(1)
        # capacity bounds the span of live buffers, not memory: merging
        # saves memory but every merged page stays mapped, so nothing fits
        fill_pairs(c)
        s = p.scan(full_scans=2)
        assert s["pages_sharing"] == frames // 8
        assert s["bytes_resident"] < s["bytes_mapped"] == p.capacity
        with pytest.raises(uksm.PoolFullError):
            p.empty(1)
        # giving a buffer back makes its span usable again
        p.free(c)
        d = p.empty((frames // 8, PAGE), dtype=np.uint8)
        assert not d.any()
        assert (a == a_copy).all() and (b == b_copy).all()
        check_invariants(p)


# -- statistics --------------------------------------------------------------


def test_buffer_stats(pool):
    n = 256
    a = pool.empty((n, PAGE), dtype=np.uint8)
    z = pool.empty((n, PAGE), dtype=np.uint8)
    odd = pool.empty(10000, dtype=np.uint8)  # 3 pages, the last partly used
    fill_pairs(a)
    z[:] = 1
    z[:] = 0
    odd[:] = np.arange(10000) % 251 + 1
    fields = {"pages", "pages_merged", "pages_ksm", "pages_zero", "bytes_saved", "mergeable"}
    bs = pool.buffer_stats(a)
    assert fields <= set(bs)
    assert bs["pages"] == n and bs["pages_merged"] == 0 and bs["bytes_saved"] == 0
    assert bs["mergeable"] is True
    assert pool.buffer_stats(odd)["pages"] == 3
    pool.scan(full_scans=2)
    bs = pool.buffer_stats(a)
    assert bs["pages_ksm"] == bs["pages_merged"] == n and bs["pages_zero"] == 0
    assert bs["bytes_saved"] == n // 2 * PAGE  # each frame serves 2 pages
    bz = pool.buffer_stats(z)
    assert bz["pages_zero"] == bz["pages_merged"] == n and bz["pages_ksm"] == 0
    assert bz["bytes_saved"] == n * PAGE
    assert pool.buffer_stats(odd)["pages_merged"] == 0
    pool.unmerge(a)
    bs = pool.buffer_stats(a)
    assert bs["mergeable"] is False and bs["pages_merged"] == 0 and bs["bytes_saved"] == 0


def test_stats_keys(pool):
    s = pool.stats()
    missing = [k for k in STATS_KEYS if k not in s]
    assert not missing
    for k in STATS_KEYS:
        assert isinstance(s[k], int), k
    assert not [k for k in GONE_KEYS if k in s]
    assert s["cow"] == pool.cow == "kernel"
    assert s["general_profit"] <= 0  # nothing merged yet


def test_stats_invariants_through_a_lifecycle(cow_pool):
    pool = cow_pool
    n = 1024
    s = check_invariants(pool)
    a = pool.empty((n, PAGE), dtype=np.uint8)
    b = pool.empty((n // 2, PAGE), dtype=np.uint8)
    fill_pairs(a)
    b[:] = 7
    b[:] = 0
    s = check_invariants(pool)
    assert s["bytes_mapped"] == s["bytes_resident"] == 3 * n // 2 * PAGE
    pool.scan(full_scans=1)
    s = check_invariants(pool)
    assert s["full_scans"] == 1 and s["pages_scanned"] >= 3 * n // 2
    pool.scan(full_scans=1)
    s = check_invariants(pool)
    assert s["full_scans"] == 2
    assert s["pages_shared"] == n // 2 and s["pages_sharing"] == n // 2
    assert s["ksm_zero_pages"] == n // 2
    # only the frames are left: every private page went back to the kernel
    assert s["bytes_resident"] == s["bytes_frames"] == n // 2 * PAGE
    assert s["bytes_private"] == 0
    assert s["bytes_mapped"] == 3 * n // 2 * PAGE  # every page still mapped
    assert s["general_profit"] > 0
    assert s["general_profit"] <= (s["pages_sharing"] + s["ksm_zero_pages"]) * PAGE
    a[0, 0] = 0xEE  # COW break
    b[0, 0] = 0xEE  # zero-page COW
    s = check_invariants(pool)
    assert s["pages_sharing"] == n // 2 - 1 and s["ksm_zero_pages"] == n // 2 - 1
    assert s["cow_breaks"] == 1 and s["zero_page_cows"] == 1
    assert s["cow_breaks_signal"] == (1 if pool.cow == "signal" else 0)
    # a[1] still maps the pair's frame, now alone; the writers have a page each
    assert s["bytes_frames"] == n // 2 * PAGE and s["bytes_private"] == 2 * PAGE
    pool.unmerge(a)
    s = check_invariants(pool)
    assert s["pages_shared"] == s["pages_sharing"] == 0
    assert s["bytes_resident"] == s["bytes_private"] == (n + 1) * PAGE
    assert s["bytes_frames"] == 0
    pool.free(a)
    s = check_invariants(pool)
    assert s["bytes_resident"] == PAGE
    del b
    gc.collect()
    s = check_invariants(pool)
    assert s["bytes_resident"] == 0 and s["ksm_zero_pages"] == 0


def test_accounting_after_unmerging_zero_pages(pool):
    # unmerge gives each zero page a private page of its own at once
    # (MADV_POPULATE_WRITE): the kernel must see it allocated, as it does
    # for every page uksm counts as resident
    z = pool.empty((512, PAGE), dtype=np.uint8)
    z[:] = 1
    z[:] = 0
    assert pool.scan(full_scans=2)["ksm_zero_pages"] == 512
    check_invariants(pool)
    assert pool.unmerge(z) == 512
    s = pool.stats()
    assert s["ksm_zero_pages"] == 0 and s["bytes_resident"] == 512 * PAGE
    check_invariants(pool)
    assert not z.any()


@pytest.mark.parametrize("checksum", ["jhash2", "xxhash"])
def test_checksums_merge_alike(checksum):
    with uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0, checksum=checksum) as p:
        a = p.empty((512, PAGE), dtype=np.uint8)
        fill_pairs(a)
        ref = a.copy()
        s = p.scan(full_scans=2)
        assert s["pages_shared"] == s["pages_sharing"] == 256
        assert memfd_bytes(p) == 256 * PAGE
        assert (a == ref).all()


# -- the background scanner ----------------------------------------------------


def test_background_scanner_merges_within_a_bounded_wait():
    with uksm.Pool("32MiB", pages_to_scan=500, sleep_millisecs=1) as p:
        n = 2048
        a = p.empty((n, PAGE), dtype=np.uint8)
        fill_pairs(a)
        ref = a.copy()
        assert not p.running
        p.start()
        p.start()  # idempotent
        assert p.running
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            s = p.stats()
            if s["pages_sharing"] == n // 2:
                break
            time.sleep(0.02)
        assert s["pages_shared"] == s["pages_sharing"] == n // 2, s
        assert memfd_bytes(p) == n // 2 * PAGE
        # writes while the scanner runs are kept (COW under a live scanner)
        a[::2, 5] = 0x5A
        ref[::2, 5] = 0x5A
        p.stop()
        assert not p.running
        scans = p.stats()["full_scans"]
        time.sleep(0.05)
        assert p.stats()["full_scans"] == scans  # stopped means stopped
        assert (a == ref).all()
        check_invariants(p)
