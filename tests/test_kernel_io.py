"""The kernel's own accesses to pool memory (platform.md trap 1): the fault
handler never sees them.  With cow="kernel" (the default) a merged page is
a writable private view, so a syscall writing into it (read(2), readv,
readinto, recv_into) is copied on write by the kernel like a write from
user space, and uksm learns of the copy from pagemap.  With cow="signal" a
merged page is read-only to the kernel too, and such a syscall fails with
EFAULT; pool.pin() is the documented way to hand a buffer to that I/O (and
to I/O that holds pages for longer, as O_DIRECT does, in either mode).
Writing FROM merged pages (write(2), np.save) works in both modes."""

import errno
import os
import socket

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE
PRIVATE, KSM, SWAPPED = uksm.PageState.PRIVATE, uksm.PageState.KSM, uksm.PageState.SWAPPED


def merged_pair(pool, value=5.0, n=4 * PAGE // 8):
    a = pool.full(n, value)
    b = pool.full(n, value)
    pool.scan(full_scans=2)
    st, _, _ = pool.page_states(b)
    assert (st == KSM).all()
    return a, b


def test_write_from_merged_buffer_works(cow_pool, tmp_path):
    pool = cow_pool
    a, b = merged_pair(pool)
    path = tmp_path / "out.bin"
    b.tofile(path)
    np.save(tmp_path / "out.npy", b)
    with open(path, "rb") as f:
        assert np.array_equal(np.frombuffer(f.read(), b.dtype), a)
    assert np.array_equal(np.load(tmp_path / "out.npy"), a)
    # reading a merged page for the kernel copies nothing
    assert (pool.page_states(b)[0] == KSM).all()
    assert pool.stats()["cow_breaks"] == 0


def _recv_all(sock, view) -> int:
    got = 0
    while got < len(view):
        got += sock.recv_into(view[got:])
    return got


def test_readinto_merged_buffer_kernel_cow(tmp_path):
    """cow="kernel": read(2) and recv_into() into merged pages land in the
    reader's own copies; its twin keeps the old contents and frame."""
    with uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0, cow="kernel") as pool:
        a, b = merged_pair(pool)
        npages = b.nbytes // PAGE
        path = tmp_path / "in.bin"
        path.write_bytes(np.full(b.size, 9.0).tobytes())
        with open(path, "rb", buffering=0) as f:
            assert f.readinto(memoryview(b).cast("B")) == b.nbytes
        assert (b == 9.0).all() and (a == 5.0).all()
        s = pool.stats()
        assert s["cow_breaks"] == npages and s["cow_breaks_signal"] == 0
        assert (pool.page_states(b)[0] == PRIVATE).all()
        assert (pool.page_states(a)[0] == KSM).all()

        c = pool.full(b.size, 5.0)  # a's twin again
        pool.scan(full_scans=2)
        assert (pool.page_states(c)[0] == KSM).all()
        s1, s2 = socket.socketpair()
        try:
            s1.sendall(np.full(c.size, 3.0).tobytes())
            assert _recv_all(s2, memoryview(c).cast("B")) == c.nbytes
        finally:
            s1.close()
            s2.close()
        assert (c == 3.0).all() and (a == 5.0).all() and (b == 9.0).all()
        assert (pool.page_states(c)[0] == PRIVATE).all()
        assert pool.stats()["cow_breaks"] == 2 * npages


def test_readinto_merged_buffer_signal_is_efault_and_changes_nothing(tmp_path):
    with uksm.Pool("16MiB", pages_to_scan=1000, sleep_millisecs=0, cow="signal") as pool:
        a, b = merged_pair(pool)
        path = tmp_path / "in.bin"
        path.write_bytes(np.full(b.size, 9.0).tobytes())
        with open(path, "rb", buffering=0) as f:
            with pytest.raises(OSError) as exc:
                f.readinto(memoryview(b).cast("B"))
        assert exc.value.errno == errno.EFAULT
        assert (b == 5.0).all() and (a == 5.0).all()
        assert (pool.page_states(b)[0] == KSM).all()
        assert pool.stats()["cow_breaks"] == 0


def test_pin_makes_readinto_and_recv_into_work(cow_pool, tmp_path):
    pool = cow_pool
    a, b = merged_pair(pool)
    path = tmp_path / "in.bin"
    path.write_bytes(np.full(b.size, 9.0).tobytes())
    with pool.pin(b):
        st, _, _ = pool.page_states(b)
        assert (st == PRIVATE).all()
        with open(path, "rb", buffering=0) as f:
            assert f.readinto(memoryview(b).cast("B")) == b.nbytes
        # the scanner leaves a pinned buffer alone, even when it has twins
        b[:] = a
        pool.scan(full_scans=2)
        assert (pool.page_states(b)[0] == PRIVATE).all()
        s1, s2 = socket.socketpair()
        try:
            s1.sendall(np.full(b.size, 3.0).tobytes())
            _recv_all(s2, memoryview(b).cast("B"))
        finally:
            s1.close()
            s2.close()
        assert (b == 3.0).all()
    assert (a == 5.0).all()
    # unpinned, it is mergeable again: make it equal to a and scan
    b[:] = a
    pool.scan(full_scans=2)
    assert (pool.page_states(b)[0] == KSM).all()


def test_pin_nests_and_respects_unmerge(pool):
    a, b = merged_pair(pool)
    with pool.pin(b):
        with pool.pin(b):
            pass
        pool.scan(full_scans=2)
        assert (pool.page_states(b)[0] == PRIVATE).all()  # outer pin still holds
    pool.unmerge(b)
    with pool.pin(b):
        pass
    b[:] = a
    pool.scan(full_scans=2)
    assert (pool.page_states(b)[0] == PRIVATE).all()  # unmerge() still holds
    pool.merge(b)
    pool.scan(full_scans=2)
    assert (pool.page_states(b)[0] == KSM).all()


def test_os_write_and_readv(cow_pool, tmp_path):
    """write(2) from merged pages works in both modes; readv(2) into them
    works in kernel mode and is EFAULT in signal mode, until pinned."""
    pool = cow_pool
    a, b = merged_pair(pool)
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.write(fd, memoryview(b).cast("B")) == b.nbytes
        os.lseek(fd, 0, os.SEEK_SET)
        if pool.cow == "signal":
            with pytest.raises(OSError) as exc:
                os.readv(fd, [memoryview(b).cast("B")])
            assert exc.value.errno == errno.EFAULT
            assert (pool.page_states(b)[0] == KSM).all()
        else:
            assert os.readv(fd, [memoryview(b).cast("B")]) == b.nbytes
            assert (pool.page_states(b)[0] == PRIVATE).all()
        os.lseek(fd, 0, os.SEEK_SET)
        with pool.pin(b):
            assert os.readv(fd, [memoryview(b).cast("B")]) == b.nbytes
    finally:
        os.close(fd)
    assert (b == 5.0).all() and (a == 5.0).all()


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_kernel_io_on_swapped_pages(cow, tmp_path):
    """A swapped page is a view of its swap slot: write(2) from it reads it
    back through the page cache in both modes; read(2) into it is copied on
    write by the kernel in kernel mode, and is EFAULT in signal mode."""
    with uksm.Pool(
        "16MiB",
        pages_to_scan=1000,
        sleep_millisecs=0,
        cow=cow,
        max_resident="1MiB",
        swap_path=str(tmp_path),
    ) as pool:
        rng = np.random.default_rng(7)
        src = rng.integers(1, 256, 2 << 20, dtype=np.uint8)
        x = pool.asarray(src)  # 2 MiB: half must go out
        pool.max_resident = "1MiB"  # reclaims now
        assert (pool.page_states(x)[0] == SWAPPED).any()
        path = tmp_path / "out.bin"
        with open(path, "wb") as f:
            f.write(memoryview(x))
        assert path.read_bytes() == src.tobytes()
        swapped = np.flatnonzero(pool.page_states(x)[0] == SWAPPED)
        i = int(swapped[0])
        view = memoryview(x)[i * PAGE : (i + 1) * PAGE]
        new = bytes(range(256)) * (PAGE // 256)
        fd = os.open(tmp_path / "in.bin", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, new)
            os.lseek(fd, 0, os.SEEK_SET)
            if pool.cow == "signal":
                with pytest.raises(OSError) as exc:
                    os.readv(fd, [view])
                assert exc.value.errno == errno.EFAULT
                assert bytes(view) == src[i * PAGE : (i + 1) * PAGE].tobytes()
            else:
                assert os.readv(fd, [view]) == PAGE
                assert bytes(view) == new
                assert pool.page_states(x)[0][i] == PRIVATE
        finally:
            os.close(fd)
        del view
        # the other pages, swapped or not, are as they were
        rest = np.ones(len(src) // PAGE, bool)
        rest[i] = False
        assert np.array_equal(x.reshape(-1, PAGE)[rest], src.reshape(-1, PAGE)[rest])
