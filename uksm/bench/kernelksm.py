"""uksm.bench.kernelksm - drive the kernel's own KSM, to measure uksm against it.

DOC: Overview

uksm is a port of mm/ksm.c's policy to one process; the only honest yardstick
for it is the real ksmd, run on the same content, on the same machine, in the
same process run (absolute times on these VMs wander by 2x between runs, the
ratio of two figures taken side by side does not).  This module is that
yardstick: it allocates private anonymous memory as a numpy array, madvises it
MADV_MERGEABLE, turns ksmd on with the knobs the benchmark asks for, and
watches /sys/kernel/mm/ksm until the wanted number of pages share.

It needs root and a kernel built with CONFIG_KSM; ``available()`` says whether
both hold, and callers skip the kernel side when it says no.

The knobs are system-wide state that other people rely on, so they are only
ever changed inside a ``session()``: it saves every knob it may touch
(pages_to_scan, sleep_millisecs, run, use_zero_pages, max_page_sharing,
merge_across_nodes where NUMA has it, smart_scan, advisor_mode and the
advisor's own knobs) and puts them
back on the way out, however the way out is taken: an exception, Ctrl-C,
SIGTERM, or the interpreter exiting.  On the way out everything is first
unmerged with run=2: max_page_sharing and merge_across_nodes refuse to
change (EBUSY) while KSM pages exist, and stopping with run=0 alone would
leave our merged pages, and their rmap items, behind in the kernel.

Three traps, each met by the order of the writes:

 - advisor_mode: while the scan-time advisor is on, ksmd owns pages_to_scan;
   and any change of advisor_mode resets pages_to_scan to that mode's
   default.  So advisor_mode is always written before pages_to_scan, both
   when setting up and when restoring.
 - max_page_sharing and merge_across_nodes can only change while no page is
   shared: run=2 first.
 - counters are system-wide: a ``session()`` unmerges on entry too (as the
   selftests do with run=2), so pages_sharing starts from the other users'
   count, which ``converge()`` subtracts.
 - two processes, two sessions: each would save the knobs the other had
   just changed and "restore" them at its end, and ksmd would scan both
   processes' memory.  So the outermost session of a process holds an
   exclusive flock on LOCK_PATH from before it saves the knobs until after
   it has restored them: sessions in different processes take turns.

ksmd's CPU time comes from /proc/<pid>/schedstat of the kernel thread named
ksmd (time on CPU in nanoseconds; utime + stime from /proc/<pid>/stat, in
clock ticks, where schedstat is missing): that is the cost the kernel pays
to merge, the figure to set beside uksm's process CPU time.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import mmap
import os
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

import numpy as np

KSM_DIR = "/sys/kernel/mm/ksm"
PAGE_SIZE = mmap.PAGESIZE

# Every knob a session may change, in the order they are restored: the
# advisor's parameters, then advisor_mode, before pages_to_scan (see the trap
# above), run last.
KNOBS = (
    "advisor_target_scan_time",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_max_cpu",
    "advisor_mode",
    "max_page_sharing",
    "merge_across_nodes",
    "use_zero_pages",
    "smart_scan",
    "sleep_millisecs",
    "pages_to_scan",
    "run",
)

# The counters, as documented in Documentation/admin-guide/mm/ksm.rst.
COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)

# Knobs that the kernel refuses to change (EBUSY) while KSM pages exist.
_NEED_UNMERGED = ("max_page_sharing", "merge_across_nodes")

# Sessions of different processes take turns on this lock (see above).
LOCK_PATH = os.path.join(
    "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir(), "uksm-kernelksm.lock"
)
LOCK_TIMEOUT = 1800.0

KSM_RUN_STOP = 0
KSM_RUN_MERGE = 1
KSM_RUN_UNMERGE = 2


def _path(name: str) -> str:
    return os.path.join(KSM_DIR, name)


# What signal.signal() takes and gives back: a handler, SIG_DFL or SIG_IGN,
# or None for a handler not installed from Python.
SigHandler = Union[Callable[[int, Optional[FrameType]], object], int, signal.Handlers, None]


def catch_sigterm() -> SigHandler:
    """Make a default-action SIGTERM raise SystemExit, so that a session
    changing system state (KSM knobs, a swapfile, a cgroup) unwinds and
    restores it instead of dying.  Main thread only (signal's rule).
    Returns the handler replaced, for release_sigterm(), or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def on_term(signum: int, frame: Optional[FrameType]) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, on_term)


def release_sigterm(old: SigHandler) -> None:
    """Put back what catch_sigterm() replaced."""
    if old is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, old)


def available() -> bool:
    """True if this process may drive the kernel's KSM: it runs as root and
    /sys/kernel/mm/ksm/run exists and is writable."""
    try:
        if os.geteuid() != 0:
            return False
    except AttributeError:  # not a POSIX system
        return False
    return os.access(_path("run"), os.W_OK)


def unavailable_reason() -> Optional[str]:
    """Why available() says no, in words for a report; None if it says yes."""
    try:
        euid = os.geteuid()
    except AttributeError:
        return "not a POSIX system"
    if not os.path.isdir(KSM_DIR):
        return f"{KSM_DIR} does not exist (kernel without CONFIG_KSM?)"
    if euid != 0:
        return f"needs root to change {KSM_DIR} (running as uid {euid})"
    if not os.access(_path("run"), os.W_OK):
        return f"{_path('run')} is not writable"
    return None


def has(name: str) -> bool:
    """Whether this kernel has the knob or counter @name (merge_across_nodes
    needs NUMA, smart_scan 6.7, advisor_mode 6.8)."""
    return os.path.exists(_path(name))


def read(name: str) -> Union[int, str]:
    """One knob or counter.  Numbers come back as int; a choice knob such as
    advisor_mode ("[none] scan-time") comes back as the selected word."""
    with open(_path(name)) as f:
        text = f.read().strip()
    if "[" in text:
        return text[text.index("[") + 1 : text.index("]")]
    try:
        return int(text)
    except ValueError:
        return text


def write(name: str, value: Union[int, str]) -> None:
    """Write one knob.  The kernel's -errno comes back as OSError (EBUSY for
    max_page_sharing while pages are shared, EINVAL for bad values)."""
    if isinstance(value, bool):
        value = int(value)
    fd = os.open(_path(name), os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def counters() -> Dict[str, int]:
    """The counters of /sys/kernel/mm/ksm this kernel has, as ints."""
    out = {}
    for name in COUNTERS:
        if has(name):
            out[name] = int(read(name))
    return out


def knobs() -> Dict[str, Union[int, str]]:
    """The current value of every knob in KNOBS this kernel has."""
    return {name: read(name) for name in KNOBS if has(name)}


# -- ksmd's CPU time ------------------------------------------------------------

_ksmd_pid: Optional[int] = None


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def ksmd_pid() -> Optional[int]:
    """The pid of the ksmd kernel thread, or None (found once, then checked)."""
    global _ksmd_pid
    if _ksmd_pid is not None and _comm(str(_ksmd_pid)) == "ksmd":
        return _ksmd_pid
    _ksmd_pid = None
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _comm(entry) == "ksmd":
            _ksmd_pid = int(entry)
            break
    return _ksmd_pid


def ksmd_cpu_seconds() -> float:
    """ksmd's time on CPU, in seconds (0.0 if there is no ksmd).

    /proc/<pid>/schedstat's first field (nanoseconds) where the kernel has
    it; else utime + stime, read after the last ')' of /proc/<pid>/stat
    (comm may contain spaces and parentheses of its own), in clock ticks of
    10 ms: too coarse for a window of a few full scans."""
    pid = ksmd_pid()
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- private anonymous memory ----------------------------------------------------


def alloc_private(nbytes: int) -> Tuple[mmap.mmap, np.ndarray]:
    """@nbytes (rounded up to pages) of private anonymous memory, the only
    kind ksmd merges, as (the mmap, a uint8 numpy array over it).

    The array holds a buffer export of the mmap: delete every array over it
    before free_private(), or the mapping stays (emptied) until they go."""
    size = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
    mm = mmap.mmap(
        -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )
    return mm, np.frombuffer(mm, dtype=np.uint8)


def mark_mergeable(mm: mmap.mmap) -> None:
    """MADV_MERGEABLE over the whole mapping: ksmd may now scan it."""
    mm.madvise(mmap.MADV_MERGEABLE)


def free_private(mm: mmap.mmap) -> None:
    """Give a region back.  MADV_DONTNEED first: it zaps the pages (KSM ones
    too) even if some array still pins the mapping, so the memory is gone
    and ksmd has nothing left to scan there; then unmap if we can."""
    if mm.closed:
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass
    try:
        mm.close()
    except BufferError:
        pass


# -- sessions: change knobs, always put them back ----------------------------------

_active: List["Session"] = []
_lock_fd: Optional[int] = None
_lock_depth = 0


def _lock_acquire(timeout: float) -> float:
    """Take the cross-process session lock (nested sessions of this process
    share it); returns the seconds spent waiting for another process."""
    global _lock_fd, _lock_depth
    if _lock_depth:
        _lock_depth += 1
        return 0.0
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    t0 = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(
                        f"kernelksm: another process has held {LOCK_PATH} "
                        f"(a KSM session) for over {timeout:.0f} s"
                    ) from None
                time.sleep(0.05)
    except BaseException:  # the timeout, or Ctrl-C while waiting
        os.close(fd)
        raise
    _lock_fd = fd
    _lock_depth = 1
    return time.monotonic() - t0


def _lock_release() -> None:
    global _lock_fd, _lock_depth
    if _lock_depth == 0:
        return
    _lock_depth -= 1
    if _lock_depth == 0 and _lock_fd is not None:
        fd, _lock_fd = _lock_fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class Session:
    """Knobs changed for the life of a with-block, restored at its end.

    ``Session(pages_to_scan=10000, sleep_millisecs=0)`` saves every knob in
    KNOBS, unmerges (run=2, unless unmerge_first=False), stops ksmd (run=0)
    and applies the given knobs; ksmd runs only inside converge().  The
    restore unmerges (run=2) and writes back every knob that differs, in an
    order the kernel accepts.  It runs on exceptions, KeyboardInterrupt and
    SystemExit (a SIGTERM in the main thread is turned into SystemExit while
    the session is open), and from atexit as a last resort; a Ctrl-C that
    arrives during the restore is held back until the restore is done.
    """

    def __init__(self, unmerge_first: bool = True, **settings: Union[int, str]) -> None:
        unknown = set(settings) - set(KNOBS)
        if unknown:
            raise ValueError(f"not a KSM knob this module manages: {sorted(unknown)}")
        if "run" in settings:
            raise ValueError("run is driven by converge(), not set by a session")
        self.settings = dict(settings)
        self.unmerge_first = unmerge_first
        self.saved: Dict[str, Union[int, str]] = {}
        self._open = False
        self._old_sigterm: SigHandler = None
        self._locked = False
        self.lock_wait = 0.0  # seconds spent waiting for another process

    # -- entry --------------------------------------------------------------------

    def __enter__(self) -> "Session":
        if not available():
            raise PermissionError(f"kernel KSM not available: needs root and {KSM_DIR}")
        self.lock_wait = _lock_acquire(LOCK_TIMEOUT)
        self._locked = True
        try:
            self.saved = knobs()
        except BaseException:
            self._locked = False
            _lock_release()
            raise
        self._open = True
        _active.append(self)
        atexit.register(self._restore_at_exit)
        self._catch_sigterm()
        try:
            # Stop ksmd and (by default) empty the stable tree, as the
            # selftests do, so the counters start clean.
            if self.unmerge_first:
                write("run", KSM_RUN_UNMERGE)
            write("run", KSM_RUN_STOP)
            self.apply(**self.settings)
        except BaseException:
            self._close()
            raise
        return self

    def apply(self, **settings: Union[int, str]) -> None:
        """Change knobs inside the session (advisor_mode first; run=2 first
        when a knob that needs no shared pages changes)."""
        if not self._open:
            raise RuntimeError("kernelksm session is not open")
        for name in settings:
            if name not in KNOBS or name == "run":
                raise ValueError(f"{name!r} cannot be set through a session")
            if name not in self.saved:
                raise ValueError(f"this kernel has no KSM knob {name!r}")
        todo = {k: v for k, v in settings.items() if read(k) != v}
        if any(k in todo for k in _NEED_UNMERGED):
            run = read("run")
            write("run", KSM_RUN_UNMERGE)
            write("run", run if run != KSM_RUN_UNMERGE else KSM_RUN_STOP)
        for name in KNOBS:
            if name in todo:
                write(name, todo[name])

    # -- exit ---------------------------------------------------------------------

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        errors = self._close()
        if errors and exc_type is None:
            raise RuntimeError("kernelksm: could not restore " + "; ".join(errors))

    def _close(self) -> List[str]:
        if not self._open:
            return []
        held = _HoldSignals()
        with held:
            errors = self._restore()
            self._open = False
            if self in _active:
                _active.remove(self)
            atexit.unregister(self._restore_at_exit)
            self._release_sigterm()
            if self._locked:
                self._locked = False
                _lock_release()
        held.replay()
        for err in errors:
            warnings.warn(f"kernelksm: could not restore {err}", RuntimeWarning, stacklevel=2)
        return errors

    def _restore(self) -> List[str]:
        """Unmerge, then write back every saved knob that differs; run last.
        Each write is tried on its own: one refusal must not leave the rest."""
        errors = []
        try:
            write("run", KSM_RUN_UNMERGE)
            write("run", KSM_RUN_STOP)
        except OSError as e:
            errors.append(f"run=2 (unmerge): {e}")
        for name in KNOBS:
            if name not in self.saved or name == "run":
                continue
            want = self.saved[name]
            if name == "pages_to_scan" and self.saved.get("advisor_mode", "none") != "none":
                continue  # the advisor owns pages_to_scan
            try:
                if read(name) != want:
                    write(name, want)
            except OSError as e:
                errors.append(f"{name}={want}: {e}")
        try:
            if read("run") != self.saved["run"]:
                write("run", self.saved["run"])
        except OSError as e:
            errors.append(f"run={self.saved['run']}: {e}")
        return errors

    def _restore_at_exit(self) -> None:
        if self._open:
            self._close()

    def _catch_sigterm(self) -> None:
        # A SIGTERM with the default action would kill us with ksmd spinning
        # at sleep_millisecs=0: make it unwind through __exit__ instead.
        self._old_sigterm = catch_sigterm()

    def _release_sigterm(self) -> None:
        release_sigterm(self._old_sigterm)
        self._old_sigterm = None

    # -- measuring ----------------------------------------------------------------

    @contextlib.contextmanager
    def ksmd_running(self) -> Iterator["Session"]:
        """run=1 for the with-block, run=0 after it, however it ends (for
        callers that watch the counters themselves, as converge() does)."""
        if not self._open:
            raise RuntimeError("kernelksm session is not open")
        write("run", KSM_RUN_MERGE)
        try:
            yield self
        finally:
            write("run", KSM_RUN_STOP)

    def converge(
        self,
        region: mmap.mmap,
        target_pages_sharing: int,
        pages_to_scan: int = 10000,
        sleep_millisecs: int = 0,
        timeout: float = 300.0,
        *,
        min_full_scans: int = 0,
        poll: float = 0.002,
    ) -> "Convergence":
        return converge(
            region,
            target_pages_sharing,
            pages_to_scan,
            sleep_millisecs,
            timeout,
            min_full_scans=min_full_scans,
            poll=poll,
            within=self,
        )


def session(unmerge_first: bool = True, **settings: Union[int, str]) -> Session:
    """``with kernelksm.session(pages_to_scan=10000) as ksm: ...``"""
    return Session(unmerge_first=unmerge_first, **settings)


def current_session() -> Session:
    """The innermost open session; RuntimeError outside one."""
    if not _active or not _active[-1]._open:
        raise RuntimeError(
            "this changes system-wide KSM knobs: call it inside `with kernelksm.session(): ...`"
        )
    return _active[-1]


class _HoldSignals:
    """Defer SIGINT and SIGTERM (main thread only) while knobs are restored:
    a second Ctrl-C must not leave ksmd spinning with half the knobs back."""

    def __init__(self) -> None:
        self.pending: List[int] = []
        self.old: Dict[int, SigHandler] = {}

    def __enter__(self) -> "_HoldSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.old[sig] = signal.signal(sig, self._hold)
                except (ValueError, OSError):
                    pass
        return self

    def _hold(self, signum: int, frame: Optional[FrameType]) -> None:
        self.pending.append(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def replay(self) -> None:
        for sig in self.pending:
            handler = self.old.get(sig)
            if callable(handler):
                handler(sig, None)  # default_int_handler raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


@dataclass
class Convergence:
    """What converge() saw: wall seconds from run=1 until the target, ksmd's
    CPU seconds over the same span, full scans completed, and pages_sharing
    gained (relative to the count at the start); converged is False on
    timeout."""

    wall: float
    cpu: float
    full_scans: int
    pages_sharing: int
    converged: bool


def converge(
    region: mmap.mmap,
    target_pages_sharing: int,
    pages_to_scan: int = 10000,
    sleep_millisecs: int = 0,
    timeout: float = 300.0,
    *,
    min_full_scans: int = 0,
    poll: float = 0.002,
    within: Optional[Session] = None,
) -> Convergence:
    """Merge @region with ksmd and time it, as kernel_ksm_reference.c does.

    Marks @region MADV_MERGEABLE, sets pages_to_scan (unless the scan-time
    advisor is on: then it is the advisor's) and sleep_millisecs,
    starts ksmd (run=1) and polls pages_sharing every @poll seconds until it
    has grown by @target_pages_sharing and at least @min_full_scans full
    scans have completed (2 gives the selftests' "merge time", which waits
    for two scans), or @timeout passes; then stops ksmd (run=0) without
    unmerging, so the caller can time COW breaks on the merged pages.

    Must run inside a session() (@within, or the innermost one open), which
    owns the knobs and restores them.
    """
    sess = within or (_active[-1] if _active else None)
    if sess is None or not sess._open:
        raise RuntimeError(
            "kernelksm.converge() changes system-wide knobs: call it "
            "inside `with kernelksm.session(): ...`"
        )
    if has("advisor_mode") and read("advisor_mode") != "none":
        # the advisor owns pages_to_scan: writing it is EINVAL
        sess.apply(sleep_millisecs=sleep_millisecs)
    else:
        sess.apply(pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs)
    mark_mergeable(region)
    start = counters()
    scans0 = start["full_scans"]
    sharing0 = start["pages_sharing"]
    cpu0 = ksmd_cpu_seconds()
    write("run", KSM_RUN_MERGE)
    t0 = time.perf_counter()
    ok = False
    try:
        while True:
            sharing = int(read("pages_sharing")) - sharing0
            scans = int(read("full_scans")) - scans0
            if sharing >= target_pages_sharing and scans >= min_full_scans:
                ok = True
                break
            if time.perf_counter() - t0 > timeout:
                break
            time.sleep(poll)
        wall = time.perf_counter() - t0
    finally:
        write("run", KSM_RUN_STOP)
    cpu = ksmd_cpu_seconds() - cpu0
    end = counters()
    return Convergence(
        wall=wall,
        cpu=cpu,
        full_scans=end["full_scans"] - scans0,
        pages_sharing=end["pages_sharing"] - sharing0,
        converged=ok,
    )
