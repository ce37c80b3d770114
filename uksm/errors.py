"""Exceptions raised by uksm, and the one place an errno becomes one.

Each one is also a built-in exception a caller may already catch: running
out of pool capacity is a MemoryError, using a closed pool a ValueError.

The C core returns -errno, as the kernel's own calls do; check() and
error() turn such a return (or an OSError's errno) into the exception the
caller sees: an OSError carrying the errno, with the operation and
strerror in its message, unless the call site knows better what an errno
means there (ENOMEM from the core's mmap is a MemoryError, ENOSPC from
shrink a PoolFullError) and says so in @special.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional


class UksmError(Exception):
    """Base class of every error uksm raises on its own account."""


class PoolFullError(UksmError, MemoryError):
    """The pool's capacity (its frames) is exhausted; nothing stored was lost."""


class VirtualSpaceError(UksmError, MemoryError):
    """The pool's reserved virtual range has no free run long enough."""


class TooManyPoolsError(UksmError, OSError):
    """The process has as many pools open as the C core's registry holds
    (errno EMFILE, as before, for callers that caught OSError)."""


class PoolClosedError(UksmError, ValueError):
    """The pool was closed: it takes no new work."""


class ForeignArrayError(UksmError, ValueError):
    """The array's memory does not belong to this pool."""


class BufferInUseError(UksmError, BufferError):
    """A buffer cannot be freed while views of it are alive."""


class ReentrantCallError(UksmError, RuntimeError):
    """A pool call made by a finalizer or signal handler that interrupted
    this same thread inside the same pool: only the calls that need not wait
    for the interrupted one (allocation, free, stats, close) are served
    there; the others would wait for themselves."""


class UksmSwapWarning(UserWarning):
    """Swap writes failed (ENOSPC, EFBIG, EIO): eviction stopped, the pages
    stay resident, nothing was lost; stats() counts them in swap_errors."""


def error(
    rc: Optional[int],
    what: str,
    special: Optional[Mapping[int, Exception]] = None,
    *,
    detail: str = "",
) -> Exception:
    """The exception for the failure @rc of @what: the core's -errno return
    (an OSError's positive errno is taken too).  @special maps an errno to
    the exception to raise instead of the OSError; @detail is appended to
    the OSError's message (what was done, what was kept)."""
    if rc is None:
        return OSError(f"uksm: {what}: failed{'; ' + detail if detail else ''}")
    err = -rc if rc < 0 else rc
    if special is not None and err in special:
        return special[err]
    return OSError(err, f"uksm: {what}: {os.strerror(err)}{'; ' + detail if detail else ''}")


def check(
    rc: int, what: str, special: Optional[Mapping[int, Exception]] = None, *, detail: str = ""
) -> int:
    """@rc itself if it is not negative, else raise error(rc, what, ...):
    wraps every call into the core that returns 0, a count or -errno."""
    if rc >= 0:
        return rc
    raise error(rc, what, special, detail=detail)
