"""Exceptions raised by uksm.

Each one is also a built-in exception a caller may already catch: running
out of pool capacity is a MemoryError, using a closed pool a ValueError.
"""


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
