"""uksm: a userspace deduplicating page allocator for Python.

Arrays from a :class:`uksm.Pool` are ordinary numpy arrays; the pool's
scanner (a userspace ksmd) merges their identical pages onto one frame of an
anonymous memfd, and a write into a merged page transparently gets its own
copy back through a SIGSEGV copy-on-write handler written in C.
"""

from ._core import PAGE_SIZE
from .errors import (BufferInUseError, ForeignArrayError, PoolClosedError,
                     PoolFullError, UksmError, UksmSwapWarning, VirtualSpaceError)
from .pool import Pool, parse_size
from .swap import Group

__all__ = [
    "Pool", "PAGE_SIZE", "parse_size", "UksmError", "PoolFullError",
    "PoolClosedError", "ForeignArrayError", "BufferInUseError", "VirtualSpaceError",
    "UksmSwapWarning", "Group",
]
__version__ = "0.1.0"
