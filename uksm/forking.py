"""The fork hooks: a pool's Python side across fork().

The C core makes a forked child's pools heirs of the parent's frame store
(fork epochs, csrc/pool.c); this is the Python half.  Around a fork every
live pool's policy lock is taken (csrc/lock.c: the child must not inherit
a lock some other thread held mid-section, with the tables half updated),
and given back on both sides after; in the child, the scanner thread that
did not survive is forgotten, and the lock word is adopted by the child's
own thread.  os.register_at_fork() is called once, at import: the pool
imports this module for that side effect.
"""

from __future__ import annotations

import os
import threading
from typing import List

from . import _core
from .policy import _Core
from .policy import live_pools as _live_pools

# The pools' cores locked around a fork, held strongly: a pool the garbage
# collector takes during another fork hook must not take its lock away
# (its __del__ defers to the lock's release instead: see Pool.__del__).
_fork_held: List[_Core] = []
_fork_tid = 0  # the forking thread, as the parent knew it


def _before_fork() -> None:
    # a fork from a finalizer or handler inside a pool section finds that
    # pool's lock held by its own thread: left alone, and not given back
    global _fork_held
    global _fork_tid
    _fork_tid = threading.get_native_id()
    _fork_held = []
    for pool in list(_live_pools):
        core = pool._c
        if core.owned():
            continue
        # (a handler raising right after enter(): the after-fork hooks give
        # back only what this thread owns, so listing it first is safe)
        _fork_held.append(core)
        core.enter()


def _after_fork_parent() -> None:
    global _fork_held
    cores, _fork_held = _fork_held, []
    for core in cores:
        core.leave()


def _after_fork_child() -> None:
    # The C core made the child's pools heirs of the parent's frame store;
    # the scanner thread did not survive the fork.  A pool whose section
    # this thread was in when it forked goes on in the child, owned by the
    # child's thread.
    global _fork_held
    cores, _fork_held = _fork_held, []
    for pool in list(_live_pools):
        pool._thread = None
        pool._stop_event = threading.Event()
        _core.lib.uksm_plock_adopt(pool._c.word, _fork_tid)
    for core in cores:
        core.leave()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child
)
