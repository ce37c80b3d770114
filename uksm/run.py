"""python -m uksm run [options] script.py args... | -m module args...

Runs a Python program as `python script.py` / `python -m module` would (the
same sys.argv, __main__, exit code, exceptions and tracebacks) with every
numpy array of at least --threshold bytes allocated from a uksm pool whose
scanner runs in the background; at exit, one summary line on stderr.

Threads the program starts run in a copy of their starter's context, so
they allocate from the pool too (Python 3.14's -X thread_inherit_context=1;
--no-thread-inherit turns it off).

Knobs are Pool's keywords as options (--pages-to-scan 1000) or as
environment variables (UKSM_PAGES_TO_SCAN=1000); an option wins.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Tuple

# option name -> (Pool keyword or None, type); env var is UKSM_<NAME>
_KNOBS = {
    "capacity": str,
    "virtual-size": str,
    "pages-to-scan": int,
    "sleep-millisecs": int,
    "max-page-sharing": int,
    "use-zero-pages": int,
    "smart-scan": int,
    "checksum": str,
    "advisor-mode": str,
    "cow": str,
    "max-resident": str,
    "threshold": str,
}
_VALUED = {"--" + k for k in _KNOBS} | {"--json"}


def _split(argv: List[str]) -> Tuple[List[str], Optional[str], Optional[str], List[str]]:
    """(our options, module or None, script or None, the program's args)."""
    own: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-m":
            if i + 1 >= len(argv):
                raise SystemExit("python -m uksm run: -m needs a module name")
            return own, argv[i + 1], None, argv[i + 2 :]
        if a == "--":
            i += 1
            break
        if a.startswith("-") and a != "-":
            own.append(a)
            if a in _VALUED and "=" not in a:
                if i + 1 >= len(argv):
                    raise SystemExit(f"python -m uksm run: {a} needs a value")
                own.append(argv[i + 1])
                i += 1
            i += 1
            continue
        break
    if i >= len(argv):
        raise SystemExit(
            "usage: python -m uksm run [options] script.py args... | -m module args..."
        )
    return own, None, argv[i], argv[i + 1 :]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m uksm run", description=__doc__.split("\n\n")[1] if __doc__ else None
    )
    for name, typ in _KNOBS.items():
        env = "UKSM_" + name.upper().replace("-", "_")
        p.add_argument(
            "--" + name, type=typ, default=None, help=f"Pool's {name.replace('-', '_')} (env {env})"
        )
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.add_argument(
        "--no-thread-inherit",
        action="store_true",
        help="threads start with numpy's default handler, as Python makes "
        "them (by default a thread inherits its starter's context, as "
        "with Python 3.14's -X thread_inherit_context=1)",
    )
    p.add_argument("--json", metavar="FILE", help="write the final stats() as JSON")
    return p


def _fmt(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _strip_runner(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """The program's traceback, as python would print it: without the
    frames of this runner and runpy."""
    here = (os.path.abspath(__file__), os.path.abspath(runpy.__file__))
    while tb is not None and (
        tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")
        or os.path.abspath(tb.tb_frame.f_code.co_filename) in here
    ):
        tb = tb.tb_next
    return tb


def main(argv: Sequence[str]) -> int:
    own, module, script, args = _split(list(argv))
    opts = _parser().parse_args(own)
    from . import handler
    from .knobs import parse_size
    from .pool import Pool

    kw: Dict[str, Any] = {}
    for name, typ in _KNOBS.items():
        attr = name.replace("-", "_")
        value = getattr(opts, attr)
        if value is None:
            env = os.environ.get("UKSM_" + attr.upper())
            if env is not None:
                value = typ(env)
        if value is not None:
            kw[attr] = value
    threshold = kw.pop("threshold", handler.DEFAULT_THRESHOLD)
    for flag in ("use_zero_pages", "smart_scan"):
        if flag in kw:
            kw[flag] = bool(kw[flag])
    capacity = kw.pop("capacity", None)
    pool = Pool(
        parse_size(capacity, "--capacity") if capacity else handler.default_capacity(), **kw
    )
    pool.start()
    handler.install(pool, threshold=parse_size(threshold, "--threshold"))
    if not opts.no_thread_inherit:
        handler.threads_inherit(True)

    if module is not None:
        sys.argv = [module] + args
    else:
        assert script is not None  # _split gives one of the two
        sys.argv = [script] + args
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    kept: Optional[Dict[str, Any]] = None
    t0 = time.perf_counter()
    try:
        if module is not None:
            kept = runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            kept = runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:
        # as the interpreter would: the hook prints, the status is 1
        # (130 after ^C, as a shell reports python's SIGINT death)
        tb = _strip_runner(exc.__traceback__)
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    seconds = time.perf_counter() - t0
    try:
        sys.stdout.flush()
    except Exception:
        pass
    st = pool.stats()
    if not opts.quiet:
        print(
            f"uksm: saved {_fmt(st['bytes_saved_peak'])} at peak, "
            f"{_fmt(st['bytes_saved'])} at exit; pages_shared {st['pages_shared']}, "
            f"pages_sharing {st['pages_sharing']}; full_scans {st['full_scans']}; "
            f"handler buffers {st['handler']['allocs']} "
            f"({st['handler']['fallbacks']} fell back)",
            file=sys.stderr,
        )
    if opts.json:
        out = dict(st, exit_code=code, seconds=seconds, threshold=threshold, argv=sys.argv)
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    del kept
    return code
