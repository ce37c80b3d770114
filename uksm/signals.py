"""Keeping uksm's SIGSEGV and SIGBUS handler first in line.

Merged pages fault: a write into one in cow="signal", a touch of a freed
buffer, a page in transit under the scanner.  uksm's handler
(csrc/fault.c) must see each of those faults before anyone else, and
Python programs install fault handlers of their own all the time:
faulthandler (pytest enables it around every run) and signal.signal().
This module wraps both, at import, so that every such call is followed by
putting uksm's handler back on top, chaining to the newcomer for the
faults that are not uksm's.  It is the only place that patches the
standard library; the pool imports it for that side effect, and its
handler is installed only while pools are live (uksm.policy.live_pools).
"""

from __future__ import annotations

import ctypes
import faulthandler
import signal
import warnings
from types import FrameType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import _core
from .policy import live_pools as _live_pools

# --- the SIGSEGV handler must stay first in line -----------------------------
#
# faulthandler installed after our handler sees every COW fault first and
# turns it into "Fatal Python error"; faulthandler.disable() puts back the
# handler it found, which may not be ours.  pytest does both around a run.
# So every enable/disable is followed by putting ours back on top (chaining to
# faulthandler for the faults that are not ours), and the pool also checks
# at every entry point and in the scanner loop.  The same goes for SIGBUS,
# which uksm takes too (a frame store truncated under its views).
#
# signal.signal() is worse than faulthandler: Python's C-level handler only
# notes the signal and returns, so a write to a merged page in cow="signal"
# re-executes and faults again for ever.  A handler installed that way goes
# through, and ours is put back on top of it, chaining to it for the faults
# that are not ours; the caller is told, since its handler no longer sees
# every SIGSEGV first.
#
# The program's call and our re-install are one C call made with the GIL
# held (csrc/pyglue.c): in between, no Python thread may run, since one that
# wrote a merged page there would fault into the newcomer for ever, holding
# the GIL the re-install needs.

_glue = ctypes.PyDLL(_core.native_path()).uksm_py_call_then_install
_glue.argtypes = [
    ctypes.py_object,
    ctypes.py_object,
    ctypes.py_object,
    ctypes.c_int,
    ctypes.py_object,
]
_glue.restype = ctypes.c_int


def _call_then_install(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: Optional[Dict[str, Any]]
) -> Tuple[Any, bool]:
    """(fn(*args, **kwargs), whether ours was re-installed), atomically."""
    out: List[Any] = []
    _glue(fn, tuple(args), dict(kwargs) if kwargs else None, 1 if _live_pools else 0, out)
    return out[0], out[1] > 0


_fh_enable = faulthandler.enable
_fh_disable = faulthandler.disable


_stacked_over_faulthandler = False


def _enable_then_reinstall(*args: Any, **kwargs: Any) -> Any:
    global _stacked_over_faulthandler
    result, installed = _call_then_install(_fh_enable, args, kwargs)
    if installed:
        _stacked_over_faulthandler = True
    return result


def _disable_then_reinstall(*args: Any, **kwargs: Any) -> Any:
    global _stacked_over_faulthandler
    result = _fh_disable(*args, **kwargs)
    if _stacked_over_faulthandler and _core.handler_installed():
        # faulthandler put back its predecessor, which was us: chain to the
        # handler we had before it, not to a disabled faulthandler
        _core.handler_pop_prev()
    _stacked_over_faulthandler = False
    if _live_pools:
        _core.install_handler()
    return result


_signal_signal = signal.signal
# signal.signal()'s handler argument and result, as typeshed spells them
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]
_FAULT_SIGNALS = (signal.SIGSEGV, signal.SIGBUS)


def _signal_then_reinstall(signalnum: int, handler: _Handler) -> Any:
    global _stacked_over_faulthandler
    if signalnum not in _FAULT_SIGNALS:
        return _signal_signal(signalnum, handler)
    old, installed = _call_then_install(_signal_signal, (signalnum, handler), None)
    if installed:
        # the handler we chain to is now this one, not faulthandler
        _stacked_over_faulthandler = False
        name = signal.Signals(signalnum).name
        warnings.warn(
            f"uksm: a {name} handler was installed over uksm's while uksm pools "
            f"are live; uksm put its own handler back on top (merged pages "
            f"need it) and passes the {name}s that are not uksm's on to the "
            f"new handler",
            RuntimeWarning,
            stacklevel=2,
        )
    return old


_enable_then_reinstall.__wrapped__ = _fh_enable  # type: ignore[attr-defined]
_disable_then_reinstall.__wrapped__ = _fh_disable  # type: ignore[attr-defined]
_signal_then_reinstall.__wrapped__ = _signal_signal  # type: ignore[attr-defined]
faulthandler.enable = _enable_then_reinstall
faulthandler.disable = _disable_then_reinstall
signal.signal = _signal_then_reinstall
