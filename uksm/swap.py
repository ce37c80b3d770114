"""uksm.swap - the swap area's Python side: the swap file, and groups.

The mechanism is csrc/swap.c (its essay tells the design: swapped pages
as private views of their slots, so that the kernel itself swaps them in;
clustered eviction under the page lock; the swap map; the page cache as
the second chance).  This module opens the swap file the way a swap
file must be opened, and gives groups (the memcg analogue of the seed's
patch 6) their Python face.

The pool owns its swap area and its groups, and the imports run that way
only: a Group calls back into its pool through GroupOwner, the few things
a memcg asks of its owner (allocate charged to it, reclaim it, read a
size), which uksm.Pool satisfies without this module importing it.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import Any, Dict, Optional, Protocol, Tuple

import numpy as np
import numpy.typing as npt

from ._core import NativePool
from .errors import error


class GroupOwner(Protocol):
    """What a Group needs of its pool (uksm.Pool is one): the pool's
    allocation charged to a group, its reclaim, its native tables (a
    group's limit and counters live there) and its sizes."""

    @property
    def page_size(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    @property
    def _native(self) -> NativePool: ...

    def _resident_frames(self, value: Any, capacity: int) -> int: ...

    def _new_array(self, shape: Any, dtype: npt.DTypeLike, group: int = 0) -> npt.NDArray[Any]: ...

    def _settle(self, nbytes: int) -> None: ...

    def _reclaim(self, group: int = -1) -> None: ...


def _swap_directory(swap_path: Optional[str]) -> str:
    """The directory @swap_path names: itself, or for a name that does not
    exist yet, the existing directory it is in.  Anything else is refused:
    a device such as /dev/null, a regular file or a missing directory
    would otherwise put the swap file somewhere nobody asked for."""
    if swap_path is None:
        return tempfile.gettempdir()
    try:
        path = os.fspath(swap_path)
    except TypeError:
        raise TypeError(
            f"swap_path must be a directory path (str), not "
            f"{type(swap_path).__name__} {swap_path!r}"
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("swap_path must name an existing directory, got ''")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise error(exc.errno, f"swap_path {path!r}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return path
        kind = (
            "a character device"
            if stat.S_ISCHR(st.st_mode)
            else "a block device"
            if stat.S_ISBLK(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a file"
        )
        raise ValueError(
            f"swap_path {path!r} is {kind}, not a directory: swap_path names "
            f"the directory the pool's nameless swap file is made in"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(
            f"swap_path {path!r} does not exist: it must be an existing "
            f"directory (or a new name in one)"
        )
    return parent


def open_swap_file(swap_path: Optional[str]) -> Tuple[int, int]:
    """An anonymous file for swap in @swap_path's directory (or the temp
    directory): O_TMPFILE, so it never has a name; failing that, a
    temporary file unlinked at once.  Mode 0600 either way: never readable
    by another user, gone when the process is.  Returns (fd, dir_fd); the
    directory stays open so that a forked child can make its own copy.
    ValueError if @swap_path is not a directory (nor a new name in one),
    OSError naming it if no file can be made there."""
    directory = _swap_directory(swap_path)
    try:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(exc.errno, f"swap_path {directory!r}: cannot open the directory") from None
    try:
        try:
            try:
                fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                fd, path = tempfile.mkstemp(prefix="uksm-swap-", dir=directory)
                os.unlink(path)
        except OSError as exc:
            # read-only, full, or a file system such as /proc that holds no
            # files: say which path the caller should change
            raise error(
                exc.errno, f"swap_path {directory!r}: cannot make the swap file there"
            ) from None
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

    def __init__(self, pool: GroupOwner, name: str, gid: int, max_resident: Any) -> None:
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

    def empty(self, shape: Any, dtype: npt.DTypeLike = float) -> npt.NDArray[Any]:
        return self.pool._new_array(shape, dtype, group=self.gid)

    def zeros(self, shape: Any, dtype: npt.DTypeLike = float) -> npt.NDArray[Any]:
        return self.pool._new_array(shape, dtype, group=self.gid)

    def full(
        self, shape: Any, fill_value: Any, dtype: Optional[npt.DTypeLike] = None
    ) -> npt.NDArray[Any]:
        if dtype is None:
            dtype = np.array(fill_value).dtype
        arr = self.pool._new_array(shape, dtype, group=self.gid)
        arr.fill(fill_value)
        self.pool._settle(arr.nbytes)
        return arr

    def asarray(self, obj: Any, dtype: Optional[npt.DTypeLike] = None) -> npt.NDArray[Any]:
        src = np.asarray(obj, dtype=dtype)
        arr = self.pool._new_array(src.shape, src.dtype, group=self.gid)
        np.copyto(arr, src, casting="no")
        self.pool._settle(arr.nbytes)
        return arr

    def stats(self) -> Dict[str, Any]:
        """bytes_resident (private pages and frames charged, at the last
        count), pages_swapped, swap_ins, max_resident."""
        s = self.pool._native.group_stats(self.gid)
        return {
            "name": self.name,
            "bytes_resident": s["pages"] * self.pool.page_size,
            "pages_swapped": s["pages_swapped"],
            "swap_ins": s["swap_ins"],
            "max_resident": self.max_resident,
        }

    def __repr__(self) -> str:
        return f"<uksm.Group {self.name!r} max_resident={self.max_resident}>"
