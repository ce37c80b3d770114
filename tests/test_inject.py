"""Fault injection (issue 6): the C core's own mmap, mprotect and fallocate
calls made to fail on purpose (uksm_inject), at the places the real world
fails them: vm.max_map_count (ENOMEM), a full /dev/shm (ENOSPC), I/O (EIO).
Every failure must surface as a clear exception or a counted skip, and no
stored byte may change."""
import errno
import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import uksm
from uksm import _core

from conftest import KSM, NORMAL, memfd_bytes, states

PAGE = uksm.PAGE_SIZE


@pytest.fixture(autouse=True)
def disarm():
    yield
    for op in ("mmap", "mprotect", "fallocate", "pwrite"):
        _core.inject(op, 0, 0, errno.EIO)


def recount(pool, arrays):
    """frames_used and the KSM counters, recounted from the page tables."""
    frames, ksm = set(), set()
    mappings = 0
    for a in arrays:
        st, pfn, _ = pool.page_states(a)
        frames.update(pfn[(st == NORMAL) | (st == KSM)].tolist())
        ksm.update(pfn[st == KSM].tolist())
        mappings += int((st == KSM).sum())
    return len(frames), len(ksm), mappings


def check_counters(pool, arrays):
    s = pool.stats()
    nframes, nksm, nmap = recount(pool, arrays)
    assert s["bytes_resident"] == memfd_bytes(pool) == nframes * PAGE
    assert s["pages_shared"] == nksm and s["pages_shared"] + s["pages_sharing"] == nmap


def test_alloc_fallocate_enospc_is_a_clear_error(pool):
    a = pool.full(64 * PAGE, 7, dtype=np.uint8)
    before = pool.stats()["bytes_resident"]
    _core.inject("fallocate", 0, 1, errno.ENOSPC)
    with pytest.raises(OSError) as exc:
        pool.empty(32 * PAGE, np.uint8)
    assert exc.value.errno == errno.ENOSPC and "fallocate" in str(exc.value)
    assert pool.stats()["bytes_resident"] == before == memfd_bytes(pool)
    assert (a == 7).all()
    b = pool.full(32 * PAGE, 1, dtype=np.uint8)       # and then it works again
    assert (b == 1).all()


def test_alloc_mmap_enomem_names_the_map_limit(pool):
    a = pool.full(16 * PAGE, 3, dtype=np.uint8)
    before = pool.stats()
    _core.inject("mmap", 0, 1, errno.ENOMEM)
    with pytest.raises(OSError) as exc:
        pool.empty(8 * PAGE, np.uint8)
    assert exc.value.errno == errno.ENOMEM and "max_map_count" in str(exc.value)
    after = pool.stats()
    assert after["bytes_resident"] == before["bytes_resident"] == memfd_bytes(pool)
    assert after["bytes_mapped"] == before["bytes_mapped"]
    assert (a == 3).all()


@pytest.mark.parametrize("op", ["mprotect", "mmap"])
def test_merge_failures_are_counted_skips(pool, op):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, 64 * PAGE, dtype=np.uint8)
    a, b = pool.asarray(data), pool.asarray(data)
    pool.scan(full_scans=1)
    _core.inject(op, 0, -1, errno.ENOMEM)
    s = pool.scan(full_scans=1)
    assert _core.inject_hits(op) > 0
    assert s["merges_skipped_vma"] > 0 and s["pages_sharing"] == 0
    assert np.array_equal(a, data) and np.array_equal(b, data)
    a[:PAGE] = 1                                    # still writable everywhere
    b[-PAGE:] = 2
    check_counters(pool, [a, b])
    _core.inject(op, 0, 0, errno.ENOMEM)
    a[:PAGE] = data[:PAGE]
    b[-PAGE:] = data[-PAGE:]
    pool.scan(full_scans=3)
    assert (states(pool, b) == KSM).all()
    check_counters(pool, [a, b])


def test_unmerge_mmap_failure_raises_and_keeps_the_data(pool):
    data = np.arange(64 * PAGE // 8, dtype=np.float64)
    a, b = pool.asarray(data), pool.asarray(data)
    pool.scan(full_scans=2)
    assert (states(pool, b) == KSM).all()
    _core.inject("mmap", 0, -1, errno.ENOMEM)
    with pytest.raises(OSError):
        pool.unmerge(b)
    _core.inject("mmap", 0, 0, errno.ENOMEM)
    assert np.array_equal(a, data) and np.array_equal(b, data)
    check_counters(pool, [a, b])
    pool.unmerge(b)
    assert (states(pool, b) == NORMAL).all()
    check_counters(pool, [a, b])


def test_cow_mmap_failure_falls_back_to_the_whole_run(pool):
    data = np.arange(64 * PAGE // 8, dtype=np.float64)
    a, b = pool.asarray(data), pool.asarray(data)
    pool.scan(full_scans=2)
    _core.inject("mmap", 0, 1, errno.ENOMEM)         # the single-page remap fails
    b[10 * PAGE // 8] = -1.0
    assert _core.inject_hits("mmap") >= 1
    assert b[10 * PAGE // 8] == -1.0 and np.array_equal(a, data)
    assert (states(pool, b) == NORMAL).all()         # the whole run went private
    check_counters(pool, [a, b])


def test_cow_that_cannot_be_done_ends_the_process_clearly():
    code = textwrap.dedent("""
        import errno, numpy as np, uksm
        from uksm import _core
        pool = uksm.Pool("16MiB")
        a = pool.full(8 * 4096, 5, dtype=np.uint8)
        b = pool.full(8 * 4096, 5, dtype=np.uint8)
        pool.scan(full_scans=2)
        _core.inject("mmap", 0, -1, errno.ENOMEM)
        _core.inject("mprotect", 0, -1, errno.ENOMEM)
        b[0] = 6
        print("WRONG: the write went on", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode < 0 and "WRONG" not in proc.stdout
    assert "uksm: fatal" in proc.stderr and "copy-on-write" in proc.stderr


def test_compaction_with_failing_remaps_rolls_forward():
    with uksm.Pool("128MiB", checksum="xxhash", compact_threshold=0) as pool:
        rng = np.random.default_rng(3)
        keep = []
        for i in range(24):
            x = pool.asarray(rng.standard_normal(64 * PAGE // 8))
            keep.append(x)
            keep.append(pool.asarray(x))             # a twin: KSM frames to move
        pool.scan(full_scans=2)
        del keep[::4]
        gc.collect()
        shadow = [np.array(x) for x in keep]
        for skip in (0, 3, 17, 40):
            _core.inject("mmap", skip, 2, errno.ENOMEM)
            pool.compact()
            _core.inject("mmap", 0, 0, errno.ENOMEM)
            for x, s in zip(keep, shadow):
                assert np.array_equal(x, s)
            check_counters(pool, keep)
        for x in keep[1::3]:                          # COW on moved frames
            x[5] = 1.5
        for x, s in zip(keep, shadow):
            s[5] = x[5]
            assert np.array_equal(x, s)
        result = pool.compact()
        assert os.fstat(pool.fd).st_size <= pool.stats()["bytes_resident"] + 16 * PAGE
        assert result["frames_skipped"] == 0


def test_release_that_cannot_unmap_keeps_frames_until_retried(pool):
    a = pool.full(16 * PAGE, 9, dtype=np.uint8)
    b = pool.full(16 * PAGE, 4, dtype=np.uint8)
    _core.inject("mmap", 0, -1, errno.ENOMEM)
    _core.inject("mprotect", 0, -1, errno.ENOMEM)
    del a
    gc.collect()
    # nothing could cut the pages off: their frames must still be there
    assert pool.stats()["bytes_resident"] == 32 * PAGE == memfd_bytes(pool)
    _core.inject("mmap", 0, 0, errno.ENOMEM)
    _core.inject("mprotect", 0, 0, errno.ENOMEM)
    c = pool.full(8 * PAGE, 1, dtype=np.uint8)      # the next reap retries
    assert pool.stats()["bytes_resident"] == 24 * PAGE == memfd_bytes(pool)
    assert (b == 4).all() and (c == 1).all()


def test_failed_punch_still_gives_zeroed_frames(pool):
    a = pool.full(32 * PAGE, 0xAB, dtype=np.uint8)
    _core.inject("fallocate", 0, -1, errno.EIO)      # punching fails: memset instead
    del a
    gc.collect()
    _core.inject("fallocate", 0, 0, errno.EIO)
    b = pool.empty(32 * PAGE, np.uint8)
    assert not b.any()


def test_cow_without_any_free_frame_ends_the_process_clearly():
    """Capacity and the COW reserve both exhausted: a write into a merged page
    cannot be given its own frame, and must not be lost silently either."""
    code = textwrap.dedent("""
        import numpy as np, uksm
        pool = uksm.Pool("4MiB", cow_reserve="64KiB", use_zero_pages=False)
        a = pool.full(512 * 512, 1.0)                 # 2 MiB of one page, repeated
        pool.scan(full_scans=2)                        # -> 2 frames or so
        filler = pool.empty(pool.capacity - pool.stats()["bytes_resident"] - 8192, np.uint8)
        print("reserve", pool.stats()["cow_reserve_used_max"], flush=True)
        a[:] = 2.0                                     # 512 COW breaks, 16 frames of reserve
        print("WRONG: all the writes went through", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode < 0 and "WRONG" not in proc.stdout, proc.stdout + proc.stderr
    assert "uksm: fatal" in proc.stderr and "no free frame" in proc.stderr
