"""uksm.swap - the swap area's Python side: the swap file, and groups.

The mechanism is csrc/swap.c (its essay tells the design: swapped pages
as private views of their slots, so that the kernel itself swaps them in;
clustered eviction under the page lock; the swap map; the page cache as
the second chance).  This module opens the swap file the way a swap
file must be opened, and gives groups (the memcg analogue of the seed's
patch 6) their Python face.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool


def open_swap_file(swap_path: Optional[str]) -> Tuple[int, int]:
    """An anonymous file for swap in @swap_path's directory (or the temp
    directory): O_TMPFILE, so it never has a name; failing that, a
    temporary file unlinked at once.  Mode 0600 either way: never readable
    by another user, gone when the process is.  Returns (fd, dir_fd); the
    directory stays open so that a forked child can make its own copy."""
    directory = swap_path or tempfile.gettempdir()
    if not os.path.isdir(directory):
        directory = os.path.dirname(os.path.abspath(directory)) or "."
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            fd, path = tempfile.mkstemp(prefix="uksm-swap-", dir=directory)
            os.unlink(path)
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(dir_fd)
        raise
    return fd, dir_fd


class Group:
    """A group of buffers with a memory limit of its own (the memcg of the
    seed's patch 6).  A buffer's private pages are charged to its group, a
    stable frame to the group of the page it was first copied from.  A
    group over its max_resident has its own pages swapped out, whatever the
    pool's budget, at its allocations and at every reclaim pass."""

    # as Pool's: a misspelt attribute must fail, not be set and ignored
    __slots__ = ("pool", "name", "gid", "_max")

    def __init__(self, pool: "Pool", name: str, gid: int, max_resident: Optional[int]):
        self.pool = pool
        self.name = name
        self.gid = gid
        self._max = 0
        if max_resident is not None:
            self.max_resident = max_resident

    @property
    def max_resident(self) -> Optional[int]:
        return self._max * self.pool.page_size if self._max else None

    @max_resident.setter
    def max_resident(self, value: Any) -> None:
        frames = 0 if value is None else self.pool._resident_frames(value, self.pool.capacity)
        self.pool._native.group_limit(self.gid, frames)
        self._max = frames
        if frames:
            self.pool._reclaim(group=self.gid)

    def empty(self, shape, dtype=float) -> np.ndarray:
        return self.pool._new_array(shape, dtype, group=self.gid)

    def zeros(self, shape, dtype=float) -> np.ndarray:
        return self.pool._new_array(shape, dtype, group=self.gid)

    def full(self, shape, fill_value, dtype=None) -> np.ndarray:
        if dtype is None:
            dtype = np.array(fill_value).dtype
        arr = self.pool._new_array(shape, dtype, group=self.gid)
        arr.fill(fill_value)
        return arr

    def asarray(self, obj, dtype=None) -> np.ndarray:
        src = np.asarray(obj, dtype=dtype)
        arr = self.pool._new_array(src.shape, src.dtype, group=self.gid)
        np.copyto(arr, src, casting="no")
        return arr

    def stats(self) -> dict:
        """bytes_resident (private pages and frames charged, at the last
        count), pages_swapped, swap_ins, max_resident."""
        s = self.pool._native.group_stats(self.gid)
        return {"name": self.name, "bytes_resident": s["pages"] * self.pool.page_size,
                "pages_swapped": s["pages_swapped"], "swap_ins": s["swap_ins"],
                "max_resident": self.max_resident}

    def __repr__(self) -> str:
        return f"<uksm.Group {self.name!r} max_resident={self.max_resident}>"
