"""The NEP 49 handler's C side (csrc/handler.c), bound for the pool.

This is the mechanism under uksm.handler: the capsules numpy calls for
array data, the current context's handler, and whether any pool has made
a handler at all.  The pool's sections switch to numpy's own handler
while they run (uksm.policy) and Pool.allocating() makes capsules, so
the pool needs these; install() (uksm.handler) needs a Pool.  Keeping
the bindings apart from install() lets the imports run one way: handler
on pool, pool on these bindings.

The handler's functions take Python objects, which cffi's cdef cannot
declare: they are called through ctypes.PyDLL from the same shared object,
with the GIL held.
"""

from __future__ import annotations

import ctypes

from . import _native
from ._core import PAGE_SIZE

DEFAULT_THRESHOLD = 4 * PAGE_SIZE

_dll = ctypes.PyDLL(_native.__file__)

_new = _dll.uksm_handler_new
_new.restype = ctypes.py_object
_new.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.py_object]

_set = _dll.uksm_handler_set
_set.restype = ctypes.py_object
_set.argtypes = [ctypes.py_object]

_get = _dll.uksm_handler_get
_get.restype = ctypes.py_object
_get.argtypes = []

_pool_of = _dll.uksm_handler_pool
_pool_of.restype = ctypes.c_void_p
_pool_of.argtypes = [ctypes.py_object]

_threshold = _dll.uksm_handler_threshold
_threshold.restype = ctypes.c_size_t
_threshold.argtypes = [ctypes.py_object, ctypes.c_size_t]

# numpy's handler as uksm found it: the pool's own Python side allocates
# with it (see _Core.enter), never with a pool's handler
DEFAULT = _get()

# set once a pool has made a handler: until then nobody pays for the switch
active = False
