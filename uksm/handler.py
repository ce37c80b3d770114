"""Every numpy array, without changing the program: the NEP 49 handler.

numpy (1.22+) asks the data-memory handler of the current context for the
data of every array.  uksm.install() makes a pool's handler (csrc/handler.c)
the current one: arrays of at least `threshold` bytes come from the pool,
where the scanner merges their duplicate pages; smaller ones from the
handler that was in place before.  Nothing in the program changes.

numpy keeps the handler in a context variable, so "current" means the
current context: install() covers the thread that called it and every
asyncio task created from it afterwards (a task copies its creator's
context); a thread starts with a fresh context (CPython before 3.14, and
3.14's default build) and so with numpy's default handler, unless it runs
inside contextvars.copy_context().run() of a covered context or calls
install() or pool.allocating() itself.

install() is policy over a Pool: it sits above uksm.pool, and the
bindings the pool itself needs (making a capsule, switching the current
handler) are uksm._handler, below it.
"""

from __future__ import annotations

import contextvars
import os
import threading
from typing import Any, List, Optional, Tuple

from ._core import PAGE_SIZE
from ._handler import DEFAULT as DEFAULT
from ._handler import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD
from ._handler import _get, _pool_of, _set
from .pool import Pool

# install()'s stack: (pool, the handler it replaced)
_installed: List[Tuple[Any, Any]] = []


def _meminfo_bytes(field: str) -> Optional[int]:
    """One "Name:  N kB" line of /proc/meminfo, in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_capacity() -> int:
    """What a program may use: the machine's memory and swap (MemTotal +
    SwapTotal, as free(1) shows them).  Address space is reserved for it,
    nothing is committed.  Read from /proc/meminfo rather than through
    psutil: the allocator imports nothing it does not need at run time."""
    ram = _meminfo_bytes("MemTotal")
    if ram is None:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    total = ram + (_meminfo_bytes("SwapTotal") or 0)
    return max(total // PAGE_SIZE, 1 << 14) * PAGE_SIZE


def install(
    pool: Optional[Pool] = None, *, threshold: Any = DEFAULT_THRESHOLD, start: bool = True
) -> Pool:
    """Send every numpy array of at least @threshold bytes (default 4
    pages) made in this context from now on to @pool (default: a new pool
    spanning the machine's memory, its scanner started).  Returns the pool.
    Calls nest: uninstall() puts back what this call replaced."""
    if pool is None:
        pool = Pool(default_capacity())
        if start:
            pool.start()
    capsule = pool._handler(threshold)
    old = _set(capsule)
    _installed.append((pool, old))
    return pool


def uninstall() -> None:
    """Put back the handler the last install() replaced.  Arrays made under
    it stay valid, and keep their pool alive while they live."""
    if not _installed:
        raise RuntimeError("uksm.uninstall() without install()")
    _pool, old = _installed.pop()
    _set(old)


_thread_start = threading.Thread.start


def _start_in_copied_context(self: threading.Thread) -> None:
    ctx = contextvars.copy_context()
    run = self.run
    self.run = lambda: ctx.run(run)  # type: ignore[method-assign]
    _thread_start(self)


def threads_inherit(on: bool = True) -> None:
    """Make every thread started from now on run in a copy of its
    starter's context (Python 3.14's -X thread_inherit_context=1), so that
    it allocates with the handler its starter had.  `python -m uksm run`
    turns this on (--no-thread-inherit: off)."""
    threading.Thread.start = (  # type: ignore[method-assign]
        _start_in_copied_context if on else _thread_start
    )


def current_pool_address() -> Optional[int]:
    """The native pool of the current context's handler, if it is ours."""
    address: Optional[int] = _pool_of(_get())
    return address


def handler_name() -> str:
    import numpy as np

    try:
        from numpy._core.multiarray import get_handler_name
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import get_handler_name  # type: ignore[no-redef]
    # None only for an array that does not own its data
    return str(get_handler_name(np.empty(0)))
