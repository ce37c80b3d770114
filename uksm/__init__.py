"""uksm: a userspace deduplicating page allocator for Python.

Arrays from a :class:`uksm.Pool` are ordinary numpy arrays of private
anonymous memory; the pool's scanner (a userspace ksmd) maps their identical
pages as private views of one frame of its frame store, and a write into a
merged page is copied by the kernel itself, as for a KSM page.
"""

from ._core import PAGE_SIZE, PageState
from .errors import (
    BufferInUseError,
    ForeignArrayError,
    PoolClosedError,
    PoolFullError,
    ReentrantCallError,
    TooManyPoolsError,
    UksmError,
    UksmSwapWarning,
    VirtualSpaceError,
)
from .handler import install, uninstall
from .knobs import parse_size
from .pool import Pool
from .swap import Group

__all__ = [
    "Pool",
    "PAGE_SIZE",
    "PageState",
    "parse_size",
    "UksmError",
    "PoolFullError",
    "PoolClosedError",
    "ForeignArrayError",
    "BufferInUseError",
    "VirtualSpaceError",
    "ReentrantCallError",
    "TooManyPoolsError",
    "UksmSwapWarning",
    "Group",
    "install",
    "uninstall",
]
__version__ = "0.2.0"
