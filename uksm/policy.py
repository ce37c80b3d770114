"""The policy lock and what runs under it (csrc/lock.c's Python side).

The C core has its own lock for its tables; the pool's Python side (the
scanner's trees, the buffer records) has the policy lock, a futex word
in csrc/lock.c that knows its owner.  Finalizers, signal handlers, numpy's
NEP 49 handler and fork hooks all reach a pool at moments when the thread
may be inside one of its sections already, and none of them may wait for
it there.  So the lock is entered through the section classes here, which
tell a nested entry from a fresh one, and the work that must be done
under the lock (a buffer freed by the garbage collector, one allocated
nested, the handler's events) is queued on _Core and drained by the next
holder in reap().

_Core is what an array's release callback holds instead of the Pool: an
array may outlive its Pool object.  live_pools, the pools whose Python
side is live, is here too: the fork hooks lock every one of them, and the
signal patching installs uksm's handler only while there are some.
"""

from __future__ import annotations

import collections
import errno
import threading
import weakref
from types import TracebackType
from typing import Callable, Dict, Optional, Protocol, Type

from . import _core, _handler
from .errors import ReentrantCallError, UksmError
from .scanner import Scanner

PAGE_SIZE = _core.PAGE_SIZE


class LivePool(Protocol):
    """What the fork hooks touch of a pool (uksm.Pool satisfies it)."""

    _c: _Core
    _thread: Optional[threading.Thread]
    _stop_event: threading.Event


# The pools whose Python side is live: the fork hooks lock each one, and
# uksm's fault handler stays first in line while there are any.
live_pools: "weakref.WeakSet[LivePool]" = weakref.WeakSet()


class _Buffer:
    """One allocation: a run of virtual pages (no per-page objects)."""

    __slots__ = (
        "vpn",
        "npages",
        "nbytes",
        "mergeable",
        "released",
        "collected",
        "va_freed",
        "pins",
        "handler",
        "__weakref__",
    )

    def __init__(self, vpn: int, npages: int, nbytes: int) -> None:
        self.vpn = vpn
        self.npages = npages
        self.nbytes = nbytes
        self.mergeable = True  # MADV_MERGEABLE (wanted, once unpinned)
        self.released = False  # its frames and pages given back
        self.collected = False  # no array reaches it any more
        self.va_freed = False
        self.pins = 0
        self.handler = False  # made by the NEP 49 handler: numpy frees it


_lock = _core.lib.uksm_plock_lock
_unlock = _core.lib.uksm_plock_unlock
_owned = _core.lib.uksm_plock_owned
_unlock_if_owned = _core.lib.uksm_plock_unlock_if_owned
_TAKEN = _core.lib.UKSM_PLOCK_TAKEN
_NESTED = _core.lib.UKSM_PLOCK_NESTED


class _Section:
    """The policy lock around a pool call: `with` yields whether the call is
    nested (this thread held the lock already, further up its stack); one
    that cannot be served nested names itself in @what, and raises there."""

    __slots__ = ("core", "what", "nested")

    def __init__(self, core: "_Core", what: Optional[str] = None) -> None:
        self.core, self.what = core, what

    def __enter__(self) -> bool:
        # the lock must be taken as the very last thing before returning:
        # `with` covers its body only once __enter__ has returned
        self.nested = True
        self.nested = self.core.enter(self.what)
        return self.nested

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if not self.nested:
            try:
                if exc is not None:
                    self.core.torn(exc)
            finally:
                self.core.leave()


class _TrySection:
    __slots__ = ("core", "got", "hooks")

    def __init__(self, core: "_Core", hooks: bool = True) -> None:
        self.core, self.hooks = core, hooks

    def __enter__(self) -> bool:
        self.got = False
        self.got = self.core.try_enter()
        return self.got

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if not self.got:
            return
        try:
            if exc is not None:
                self.core.torn(exc)
        finally:
            if self.hooks:
                self.core.leave()
            else:
                self.core._unlock()


class _Core:
    """What the arrays' release callbacks need of a pool, without the Pool:
    an array may outlive its Pool object, and the last array to go must
    still give the native pool back (else its memfd, address range and
    registry slot leak, and the 65th pool fails).

    It also owns the policy lock (csrc/lock.c), the lock the pool's Python
    side runs under.  Finalizers and signal handlers may run in a thread
    that holds it, further up the stack, so nothing they can reach ever
    waits for it there: enter() says "nested" instead of waiting, and the
    work that must happen under the lock (forgetting a freed buffer's
    pages, giving its range back, tracking a buffer allocated meanwhile) is
    queued on deques (append and popleft are atomic under the GIL) that the
    next holder drains in reap().  Waiting for a lock another thread holds
    is safe: that thread never needs this one to finish its section."""

    __slots__ = (
        "native",
        "scanner",
        "buffers",
        "pending",
        "failed",
        "adds",
        "word",
        "on_exit",
        "closed",
        "recheck",
        "saved_handler",
        "__weakref__",
    )

    def __init__(self, native: "_core.NativePool", scanner: Scanner) -> None:
        self.native = native
        self.scanner = scanner
        self.buffers: Dict[int, _Buffer] = {}
        self.pending: "collections.deque[_Buffer]" = collections.deque()
        self.failed: "collections.deque[_Buffer]" = collections.deque()
        self.adds: "collections.deque[_Buffer]" = collections.deque()
        self.word = _core.ffi.new("uint32_t *")
        # run once, right after the lock is next given back
        self.on_exit: Optional[Callable[[], None]] = None
        self.closed = False
        self.recheck = False  # a handler capsule went: reap once more at leave()
        self.saved_handler: object = None  # the section's caller's numpy handler

    # -- the policy lock ------------------------------------------------------------

    def enter(self, what: Optional[str] = None) -> bool:
        """Take the policy lock.  True when this thread holds it already (a
        finalizer or signal handler interrupted one of its own sections):
        then nothing was taken, and the caller must not give it back.  With
        @what, that case raises ReentrantCallError naming the call.

        A Python signal handler may run (and raise) as the call that took
        the lock returns: that is cleaned up here.  (Further up, `with`
        protects its body only from __enter__'s return on, so enter() must be
        the last call of an __enter__, or of anything before a `try`: the
        pool's own sections go through served() and section().)  The lock
        keeps the asynchronous signals blocked in this thread while held
        (csrc/lock.c), so no handler runs inside a section unless another
        thread took the signal."""
        w = self.word
        if _owned(w):
            r = _NESTED
        else:
            try:
                r = _lock(w, 1)
            except BaseException:
                _unlock_if_owned(w)
                raise
        if r == _TAKEN:
            if _handler.active:
                try:
                    self._held()
                except BaseException:
                    self._unlock()
                    raise
            return False
        if r == _NESTED:
            if what is not None:
                raise ReentrantCallError(
                    f"uksm: {what} was called from a finalizer or signal handler that "
                    f"interrupted this thread inside the same pool; only allocation, "
                    f"free(), stats() and close() are served there (the others would "
                    f"wait for the interrupted call)"
                )
            return True
        raise _core.error(
            r,
            "the pool's lock",
            {
                errno.EDEADLK: UksmError(
                    "uksm: waiting for this pool's lock would deadlock: another "
                    "thread holds it and waits for a pool whose section this "
                    "thread is in (a finalizer or signal handler calling one pool "
                    "from inside another's)"
                )
            },
        )

    def try_enter(self) -> bool:
        """Take the policy lock if nobody holds it (not nested either)."""
        w = self.word
        if _owned(w):
            return False
        try:
            if _lock(w, 0) != _TAKEN:
                return False
            if _handler.active:
                self._held()
            return True
        except BaseException:
            self._unlock()
            raise

    def _held(self) -> None:
        # The section allocates with numpy's own handler, not with a pool's
        # that the caller may have installed: an array the scanner keeps
        # (its trees grow) would hold that handler's capsule, the capsule
        # holds its pool, and a cycle through a capsule is one the garbage
        # collector cannot see.
        self.saved_handler = _handler._set(_handler.DEFAULT)

    def _unlock(self) -> None:
        saved, self.saved_handler = self.saved_handler, None
        try:
            if saved is not None:
                _handler._set(saved)
        finally:
            _unlock_if_owned(self.word)

    def reap_if_free(self) -> None:
        """Reap now if nobody holds the lock; else its holder will."""
        with _TrySection(self) as got:
            if got:
                self.reap()

    def leave(self) -> None:
        """Give the policy lock back (the caller took it), then run what was
        left for its holder: a close deferred by a finalizer, the reaping of
        a closed pool."""
        self._unlock()
        while (
            self.on_exit is not None
            or self.recheck
            or (self.closed and (self.pending or self.adds or self.events_queued()))
        ):
            hook, self.on_exit = self.on_exit, None
            if hook is not None:
                hook()
                continue
            with _TrySection(self, hooks=False) as got:
                if not got:
                    return  # its holder reaps when it leaves
                self.reap()

    def events_queued(self) -> bool:
        native = self.native
        return not native.closed and native.events_enabled and native.events_stats()["queued"] > 0

    def owned(self) -> bool:
        return bool(_owned(self.word))

    def torn(self, exc: BaseException) -> None:
        """An exception left a section (its holder still holds the lock).
        If it left the scanner in the middle of an update (a signal
        handler's exception: KeyboardInterrupt is the common one), rebuild
        the scanner's state; errors raised before any update (a bad
        argument) cost nothing."""
        if not self.scanner.dirty or self.native.closed:
            return
        self.scanner.recover(
            [
                (r.vpn, r.npages)
                for r in list(self.buffers.values())
                if r.mergeable and not r.pins and not r.released
            ]
        )

    def served(self) -> "_Section":
        """The policy lock for a call that is served nested too: `with`
        yields whether it is (then it must not drain the queues)."""
        return _Section(self)

    def section(self, what: str) -> "_Section":
        """The policy lock for a call that cannot be served nested."""
        return _Section(self, what)

    # -- releases and the queues --------------------------------------------------

    def reap(self) -> None:
        """Drain the queues (holds the lock): track the buffers allocated
        while the lock was held further up the stack, finish the releases
        that free() and the garbage collector started.  Each record leaves
        its queue only once its work is done, so that an exception (a signal
        handler's, in a program whose own threads take signals) leaves the
        rest for the next reap, never a record lost."""
        self.recheck = False
        for _ in range(len(self.failed)):
            self.pending.append(self.failed[0])
            self.failed.popleft()
        self.drain_events()
        while self.adds:
            rec = self.adds[0]
            if not rec.released and rec.mergeable and not rec.pins:
                self.scanner.add_range(rec.vpn, rec.npages)
            self.adds.popleft()
        freed = bool(self.pending)
        while self.pending:
            rec = self.pending[0]
            if not rec.released:
                try:
                    self.native.release(rec.vpn, rec.npages)
                except OSError:
                    # no mapping could cut the pages off (vm.max_map_count):
                    # the frames and the range stay, tried again next time
                    self.failed.append(rec)
                    self.pending.popleft()
                    continue
                rec.released = True
            self.scanner.remove_range(rec.vpn, rec.npages)
            if rec.collected and not rec.va_freed:
                # the range is reused only once no array can reach it; the
                # record goes first, since an allocation nested right after
                # va_free() may take the same vpn
                rec.va_freed = True
                if self.buffers.get(rec.vpn) is rec:
                    del self.buffers[rec.vpn]
                self.native.va_free(rec.vpn, rec.npages)
            self.pending.popleft()
        if freed and not self.native.closed:
            self.native.swap_trim()  # freed buffers' slots: disk back now
        if (
            self.closed
            and not self.buffers
            and not self.native.closed
            and (not self.native.events_enabled or self.native.events_idle())
        ):
            self.native.destroy()

    def drain_events(self) -> None:
        """Apply the NEP 49 handler's events (csrc/handler.c), in order:
        buffers numpy made and freed without the policy lock.  A freed
        buffer's range is still reserved (the C side never reuses it): it
        goes through the same pending path as a collected pool array, and
        its va_free() comes only after the scanner forgot it."""
        native = self.native
        if native.closed or not native.events_enabled:
            return
        while True:
            events = native.drain_events()
            for kind, vpn, npages, released in events:
                if kind == _core.EV_ALLOC:
                    new = _Buffer(vpn, npages, npages * PAGE_SIZE)
                    new.handler = True
                    self.buffers[vpn] = new
                    self.scanner.add_range(vpn, npages)
                    continue
                rec = self.buffers.get(vpn)
                if rec is None or not rec.handler:
                    continue  # cannot happen: the range stayed reserved
                if kind == _core.EV_FREE:
                    rec.released = bool(released)
                    self.on_release(rec, collected=True)
                elif kind == _core.EV_TRIM and npages < rec.npages:
                    tail, ntail = vpn + npages, rec.npages - npages
                    # the scanner keeps whole extents: take the buffer's out
                    # and put the head back (its rmap state starts afresh;
                    # merged pages stay merged in the C tables), or the tail
                    # would stay in an extent after another buffer has it
                    if self.scanner.remove_range(vpn, rec.npages):
                        self.scanner.add_range(vpn, npages)
                    try:
                        if not released:
                            native.release(tail, ntail)
                    except OSError:
                        pass  # left mapped and reserved: the buffer's end
                    else:
                        native.va_free(tail, ntail)
                    rec.npages = npages
                    rec.nbytes = npages * PAGE_SIZE
            if len(events) < native.EVENT_BATCH:
                return

    def on_release(self, rec: _Buffer, collected: bool) -> None:
        """Give a buffer's frames back: pool.free(), or with @collected the
        cffi gc callback once an array and all its views are gone (any
        thread, any moment, possibly inside a section holding the lock).
        Through the C core's own lock only; the scanner forgets the pages
        and the range is reused at reap().  The collector's record is queued
        before anything else, so that whatever interrupts the release,
        reap() finishes it; a failed release (no mapping could cut the pages
        off, at vm.max_map_count) is retried there too.  free()'s own
        failure is the caller's to hear."""
        if collected:
            rec.collected = True
            self.pending.append(rec)
            if not rec.released:
                try:
                    self.native.release(rec.vpn, rec.npages)
                    rec.released = True
                except OSError:
                    pass
        else:
            self.native.release(rec.vpn, rec.npages)
            rec.released = True
            self.pending.append(rec)
        if self.closed:
            # nobody else may come to reap a closed pool: do it now (if the
            # lock is held, its holder does it as it leaves)
            self.reap_if_free()
