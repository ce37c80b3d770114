"""Security properties.

* Domain isolation: two pools never merge with each other.  Dedup across
  security domains is what the timing side channels exploit (Dedup Est
  Machina, Flip Feng Shui: a write into a merged page is slow, so an attacker
  learns whether somebody else holds a page of given contents, and can
  steer which frame a victim's page shares).  Each pool is its own domain:
  identical contents in two pools keep two copies, checked by each memfd's
  allocated blocks and by /proc/self/maps (every page of a pool maps only
  its own memfd).
* A shared frame cannot be written through any view: views are mapped
  from a read-only descriptor of the memfd, so even a debugger's write
  through /proc/self/mem (which ignores page protections) is copied on
  write into a private page of the writer.
* A fresh allocation never shows old contents: not after free, not after
  merges, COW breaks, unmerge, compaction or shrink; a COW break of a zero
  page gives a page of zeroes; frames not in use read as zeroes through
  the memfd itself (they were punched).
* The backing memfd is anonymous (no name in any filesystem), close-on-exec
  (an exec'd child does not inherit it), and another user cannot reach it
  through /proc/<pid>/fd.  The swap file, which uksm no longer checksums
  (the kernel reads it straight back), is unlinked at once, 0600, and not
  reachable by another user either.
* fork, forkserver and spawn children never see the parent's later writes
  (and vice versa): tests/test_fork.py covers that, for all three methods.
"""

import gc
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import uksm

from conftest import PRIVATE, kernel_private_bytes

PAGE = uksm.PAGE_SIZE
KSM, ZERO = uksm.PageState.KSM, uksm.PageState.ZERO


def memfd_bytes(pool) -> int:
    return os.fstat(pool.fd).st_blocks * 512


def pool_maps(pool):
    """/proc/self/maps lines that lie in @pool's buffer range: (lo, hi, inode)."""
    lo_va = pool._native.va
    hi_va = lo_va + pool._native.va_pages * PAGE
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo < hi_va and hi > lo_va:
                out.append((lo, hi, int(parts[4]), parts[1]))
    return out


# -- domain isolation ------------------------------------------------------------


def test_two_pools_never_merge_with_each_other():
    rng = np.random.default_rng(11)
    data = rng.integers(1, 256, 256 * PAGE, dtype=np.uint8)
    with (
        uksm.Pool("16MiB", pages_to_scan=5000, sleep_millisecs=0) as p,
        uksm.Pool("16MiB", pages_to_scan=5000, sleep_millisecs=0) as q,
    ):
        a1, a2 = p.asarray(data), p.asarray(data)
        b1, b2 = q.asarray(data), q.asarray(data)
        lone_p = p.asarray(data[: 64 * PAGE][::-1])  # one copy in each pool only
        lone_q = q.asarray(data[: 64 * PAGE][::-1])
        p.scan(full_scans=2)
        q.scan(full_scans=2)
        p.scan(full_scans=2)
        # within a pool, the copies merge ...
        for pool, x, y in ((p, a1, a2), (q, b1, b2)):
            s = pool.stats()
            assert (pool.page_states(x)[0] == KSM).all()
            assert (pool.page_states(y)[0] == KSM).all()
            assert s["pages_shared"] == 256 and s["pages_sharing"] == 256
            # ... and each pool keeps its own copy: 256 frames of its own, and
            # its lone buffer's 64 private pages
            assert s["bytes_frames"] == memfd_bytes(pool) == 256 * PAGE
            assert s["bytes_private"] == kernel_private_bytes(pool) == 64 * PAGE
        # a page with an equal in the other pool only is not merged at all
        assert (p.page_states(lone_p)[0] == PRIVATE).all()
        assert (q.page_states(lone_q)[0] == PRIVATE).all()
        # every page of a pool maps its own memfd, never the other's
        ino_p, ino_q = os.fstat(p.fd).st_ino, os.fstat(q.fd).st_ino
        assert ino_p != ino_q
        for pool, own, other in ((p, ino_p, ino_q), (q, ino_q, ino_p)):
            maps = pool_maps(pool)
            assert maps
            assert not [m for m in maps if m[2] == other], "a pool maps the other pool's memfd"
            assert [m for m in maps if m[2] == own]
        # the write into a KSM page of one pool is a private COW in that pool
        a1[0] = 1
        assert a2[0] == data[0] and b1[0] == data[0] and b2[0] == data[0]
        assert p.page_states(a1)[0][0] == PRIVATE
        assert kernel_private_bytes(p) == 65 * PAGE
        assert memfd_bytes(q) == 256 * PAGE and kernel_private_bytes(q) == 64 * PAGE
        assert np.array_equal(b1, data) and np.array_equal(b2, data)


def test_two_pools_with_background_scanners_stay_apart():
    rng = np.random.default_rng(12)
    data = rng.integers(1, 256, 128 * PAGE, dtype=np.uint8)
    with (
        uksm.Pool("16MiB", pages_to_scan=5000, sleep_millisecs=0) as p,
        uksm.Pool("16MiB", pages_to_scan=5000, sleep_millisecs=0) as q,
    ):
        xs = [p.asarray(data) for _ in range(3)]
        ys = [q.asarray(data) for _ in range(3)]
        p.start()
        q.start()
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if p.stats()["pages_sharing"] == 256 and q.stats()["pages_sharing"] == 256:
                break
            time.sleep(0.02)
        p.stop()
        q.stop()
        for pool in (p, q):
            s = pool.stats()
            assert s["pages_shared"] == 128 and s["pages_sharing"] == 256, s
            assert s["bytes_resident"] == memfd_bytes(pool) == 128 * PAGE
            assert kernel_private_bytes(pool) == 0
        ino_p, ino_q = os.fstat(p.fd).st_ino, os.fstat(q.fd).st_ino
        assert not [m for m in pool_maps(p) if m[2] == ino_q]
        assert not [m for m in pool_maps(q) if m[2] == ino_p]
        for a in xs + ys:
            assert np.array_equal(a, data)


# -- no old contents ---------------------------------------------------------------


MARK = 0xA5


def _marked(rng, pages):
    """Pages that are all MARK bytes but for a few bytes (so some are equal)."""
    a = np.full((pages, PAGE), MARK, np.uint8)
    a[:, 0] = rng.integers(0, 3, pages)
    return a


def _free_frames_are_zero(pool, live):
    """Every frame of the memfd that no live page maps reads as zeroes (the
    hole was punched); reading holes allocates nothing.  (Only KSM pages
    map frames: a private page is anonymous memory of its own.)"""
    used = set()
    for a in live:
        st, pfn, _ = pool.page_states(a)
        used.update(pfn[st == KSM].tolist())
    size = os.fstat(pool.fd).st_size
    blocks = memfd_bytes(pool)
    for f in range(size // PAGE):
        if f in used:
            continue
        data = os.pread(pool.fd, PAGE, f * PAGE)
        assert data.count(0) == len(data), f"free frame {f} still holds old data"
    assert memfd_bytes(pool) == blocks


def test_fresh_allocations_never_show_old_contents_through_merges_cow_and_compaction():
    rng = np.random.default_rng(21)
    # small enough that fresh buffers must reuse the frames just given back
    with uksm.Pool("4MiB", pages_to_scan=5000, sleep_millisecs=0) as pool:
        keep = []
        for rnd in range(12):
            # marked buffers, duplicated so that they merge
            bufs = [pool.asarray(_marked(rng, int(rng.integers(8, 96)))) for _ in range(3)]
            bufs += [pool.asarray(b) for b in bufs[:2]]
            z = pool.zeros((32, PAGE), np.uint8)
            z[:, 7] = MARK  # touched, then back to zero
            z[:, 7] = 0
            pool.scan(full_scans=2)
            assert pool.stats()["pages_sharing"] > 0
            assert (pool.page_states(z)[0] == ZERO).all()
            # COW breaks of merged marked pages: the fresh frames get MARK too
            for b in bufs[::2]:
                b[::3, 100] = MARK
            # a COW break of a zero page is a page of zeroes and the one byte
            z[5, 9] = 1
            assert int(z[5].sum()) == 1 and not z[:5].any() and not z[6:].any()
            what = rnd % 4
            if what == 0:
                pool.unmerge(bufs[1])
            elif what == 1:
                with pool.pin(bufs[3]):
                    bufs[3][:, 1] = MARK
            # free: explicitly, and by dropping the last reference
            pool.free(bufs.pop(0))
            del bufs[0]
            gc.collect()
            if rnd % 2:
                pool.compact()
            mapped = pool.stats()["bytes_mapped"]
            if rnd % 3 == 2 and mapped + (256 << 10) <= pool.capacity - (64 << 10):
                pool.shrink(64 << 10)
            _free_frames_are_zero(pool, bufs + [z] + keep)
            # fresh buffers, as large as the span still free: all zeroes
            room = (pool.capacity - pool.stats()["bytes_mapped"]) // PAGE
            fresh = []
            for k in range(3):
                n = int(rng.integers(1, max(2, room // 3)))
                fresh.append((pool.empty if k % 2 else pool.zeros)((n, PAGE), np.uint8))
            for f in fresh:
                assert not f.any(), f"round {rnd}: a fresh buffer shows old contents"
            # unmerging zero pages gives frames of zeroes too
            assert pool.unmerge(z) == 31
            assert int(z.sum()) == 1
            keep = [b for b in bufs if rng.random() < 0.3][:2]
            del bufs, fresh, z, f, b
            gc.collect()
        del keep
        gc.collect()
        assert pool.stats()["bytes_resident"] == memfd_bytes(pool) == 0


# -- the memfd --------------------------------------------------------------------


def test_memfd_is_anonymous_and_close_on_exec():
    with uksm.Pool("4MiB") as pool:
        fd = pool.fd
        link = os.readlink(f"/proc/self/fd/{fd}")
        assert link == "/memfd:uksm (deleted)", link
        st = os.fstat(fd)
        assert st.st_nlink == 0  # no name anywhere
        assert not os.get_inheritable(fd)  # FD_CLOEXEC
        # /proc/self/fd itself is private to the process (dr-x------)
        assert os.stat("/proc/self/fd").st_mode & 0o077 == 0


def test_memfd_of_an_exec_child_is_absent():
    with uksm.Pool("4MiB") as pool:
        a = pool.full(PAGE, 0x5A, np.uint8)
        fd = pool.fd
        code = (
            f"import os, sys\n"
            f"try:\n    os.fstat({fd})\nexcept OSError:\n    sys.exit(0)\n"
            f"link = os.readlink('/proc/self/fd/{fd}')\n"
            f"sys.exit(3 if 'uksm' in link else 0)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], close_fds=False, timeout=60)
        assert r.returncode == 0, "an exec'd child inherited the pool's memfd"
        assert (a == 0x5A).all()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_other_users_cannot_open_the_memfd():
    with uksm.Pool("4MiB", pages_to_scan=1000, sleep_millisecs=0) as pool:
        # a merged pair: the memfd holds their one frame
        a = pool.full(PAGE, 0x5A, np.uint8)
        b = pool.full(PAGE, 0x5A, np.uint8)
        pool.scan(full_scans=2)
        assert memfd_bytes(pool) == PAGE
        path = f"/proc/{os.getpid()}/fd/{pool.fd}"
        # another user (nobody) cannot follow the process's fd link ...
        r = subprocess.run(
            ["/bin/cat", path],
            user=65534,
            group=65534,
            extra_groups=[],
            timeout=60,
            capture_output=True,
        )
        assert r.returncode != 0 and b"Permission denied" in r.stderr, (
            r.returncode,
            r.stdout[:16],
            r.stderr[-300:],
        )
        assert not r.stdout
        # ... which does work for the owner: the check above means something
        r = subprocess.run(["/bin/cat", path], timeout=60, capture_output=True)
        assert r.returncode == 0 and r.stdout[:PAGE] == b"\x5a" * PAGE
        del a, b


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_proc_self_mem_cannot_write_a_shared_frame(cow):
    """/proc/self/mem writes ignore page protections (a debugger's poke):
    into a view they are copied on write, never into the shared frame, so
    the other sharers and the frame store keep their bytes."""
    with uksm.Pool("4MiB", pages_to_scan=1000, sleep_millisecs=0, cow=cow) as pool:
        a = pool.full(4 * PAGE, 0x5A, np.uint8)
        b = pool.full(4 * PAGE, 0x5A, np.uint8)
        pool.scan(full_scans=2)
        st, pfn, _ = pool.page_states(a)
        assert (st == KSM).all()
        addr = a.__array_interface__["data"][0] + PAGE + 10
        fd = os.open("/proc/self/mem", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"\x01\x02", addr) == 2
        finally:
            os.close(fd)
        assert a[PAGE + 10] == 1 and a[PAGE + 11] == 2
        assert (b == 0x5A).all()
        assert os.pread(pool.fd, PAGE, int(pfn[1]) * PAGE) == b"\x5a" * PAGE
        # uksm finds the copy the kernel made, and the page is a private
        # page like any other (writable by the program too)
        st, _, _ = pool.page_states(a)
        assert st[1] == PRIVATE and (np.delete(st, 1) == KSM).all()
        s = pool.stats()
        assert s["cow_breaks"] == 1 and s["bytes_private"] == kernel_private_bytes(pool) == PAGE
        a[PAGE + 20] = 7
        assert a[PAGE + 20] == 7 and (b == 0x5A).all()
        assert a[PAGE : 2 * PAGE].sum() == 0x5A * (PAGE - 3) + 1 + 2 + 7


def _swap_files(before, directory):
    """The descriptors opened since @before that name a file in @directory."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in before:
            continue
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith(str(directory) + "/"):
            out.append((fd, link))
    return out


def test_swap_file_is_unlinked_private_and_close_on_exec(tmp_path):
    """uksm does not checksum swap slots any more (the kernel reads them
    back itself): what keeps them from other eyes is the file.  It lives in
    swap_path, has no name there, is 0600 and close-on-exec."""
    before = {int(n) for n in os.listdir("/proc/self/fd")}
    with uksm.Pool(
        "4MiB", pages_to_scan=1000, sleep_millisecs=0, max_resident="1MiB", swap_path=str(tmp_path)
    ) as pool:
        a = pool.asarray(np.random.default_rng(3).integers(1, 256, 2 << 20, dtype=np.uint8))
        pool.max_resident = "1MiB"
        assert pool.stats()["pages_swapped"] > 0
        # (one file, possibly open twice: read-write, and read-only for views)
        files = _swap_files(before, tmp_path)
        assert files
        assert len({(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd, _ in files}) == 1, files
        for fd, link in files:
            assert link.endswith("(deleted)"), link
            st = os.fstat(fd)
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_nlink == 0 and st.st_dev == os.stat(tmp_path).st_dev
            assert st.st_blocks > 0  # the slots are in it
            assert not os.get_inheritable(fd)
        assert os.listdir(tmp_path) == []
        del a
