"""The kernel's own accesses to pool memory (platform.md trap 1): the fault
handler never sees them, so a syscall writing into a merged page fails with
EFAULT; pool.pin() is the documented way to hand a buffer to such I/O."""
import errno
import os
import socket

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE


def merged_pair(pool, value=5.0, n=4 * PAGE // 8):
    a = pool.full(n, value)
    b = pool.full(n, value)
    pool.scan(full_scans=2)
    st, _, _ = pool.page_states(b)
    assert (st == 2).all()
    return a, b


def test_write_from_merged_buffer_works(pool, tmp_path):
    a, b = merged_pair(pool)
    path = tmp_path / "out.bin"
    b.tofile(path)
    np.save(tmp_path / "out.npy", b)
    with open(path, "rb") as f:
        assert np.array_equal(np.frombuffer(f.read(), b.dtype), a)
    assert np.array_equal(np.load(tmp_path / "out.npy"), a)


def test_readinto_merged_buffer_is_efault_and_changes_nothing(pool, tmp_path):
    a, b = merged_pair(pool)
    path = tmp_path / "in.bin"
    path.write_bytes(np.full(b.size, 9.0).tobytes())
    with open(path, "rb", buffering=0) as f:
        with pytest.raises(OSError) as exc:
            f.readinto(memoryview(b).cast("B"))
    assert exc.value.errno == errno.EFAULT
    assert (b == 5.0).all() and (a == 5.0).all()


def test_pin_makes_readinto_and_recv_into_work(pool, tmp_path):
    a, b = merged_pair(pool)
    path = tmp_path / "in.bin"
    path.write_bytes(np.full(b.size, 9.0).tobytes())
    with pool.pin(b):
        st, _, _ = pool.page_states(b)
        assert (st == 1).all()
        with open(path, "rb", buffering=0) as f:
            assert f.readinto(memoryview(b).cast("B")) == b.nbytes
        # the scanner leaves a pinned buffer alone, even when it has twins
        b[:] = a
        pool.scan(full_scans=2)
        assert (pool.page_states(b)[0] == 1).all()
        s1, s2 = socket.socketpair()
        try:
            s1.sendall(np.full(b.size, 3.0).tobytes())
            view = memoryview(b).cast("B")
            got = 0
            while got < b.nbytes:
                got += s2.recv_into(view[got:])
        finally:
            s1.close()
            s2.close()
        assert (b == 3.0).all()
    assert (a == 5.0).all()
    # unpinned, it is mergeable again: make it equal to a and scan
    b[:] = a
    pool.scan(full_scans=2)
    assert (pool.page_states(b)[0] == 2).all()


def test_pin_nests_and_respects_unmerge(pool):
    a, b = merged_pair(pool)
    with pool.pin(b):
        with pool.pin(b):
            pass
        pool.scan(full_scans=2)
        assert (pool.page_states(b)[0] == 1).all()     # outer pin still holds
    pool.unmerge(b)
    with pool.pin(b):
        pass
    b[:] = a
    pool.scan(full_scans=2)
    assert (pool.page_states(b)[0] == 1).all()         # unmerge() still holds
    pool.merge(b)
    pool.scan(full_scans=2)
    assert (pool.page_states(b)[0] == 2).all()


def test_os_write_and_readv_into_pinned(pool, tmp_path):
    a, b = merged_pair(pool)
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.write(fd, memoryview(b).cast("B")) == b.nbytes
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(OSError):
            os.readv(fd, [memoryview(b).cast("B")])
        os.lseek(fd, 0, os.SEEK_SET)
        with pool.pin(b):
            assert os.readv(fd, [memoryview(b).cast("B")]) == b.nbytes
    finally:
        os.close(fd)
    assert (b == 5.0).all()
