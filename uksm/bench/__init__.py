"""uksm.bench - the benchmark harness: uksm and the kernel's KSM, side by side.

Not part of the allocator: ``pip install "uksm[bench]"`` brings what it
needs beyond it (psutil for the processes' memory figures, matplotlib for
the plots).  ``python -m uksm bench`` runs it.

  harness    the suites of ``python -m uksm bench`` and their runner
  scale      ``python -m uksm bench --scale``: cost per page against pool size
  measure    the measurements the suites and bench/ share, as functions
  swapbench  the swap suite: uksm's swap, the raw I/O floor, the kernel's swap
  kernelksm  drive the kernel's own KSM (root), knobs always restored
  report     results.json into report.md, a console table and PNG plots
  micro      what only bench/'s pytest-benchmark files need

The timed loops of the swap suite are C (csrc/bench/swaphelper.c), built
with the package as uksm.bench._swaphelper.
"""

from __future__ import annotations

import importlib.util
from typing import List

INSTALL_HINT = 'pip install "uksm[bench]"'


def missing() -> List[str]:
    """The bench extra's distributions this interpreter cannot import."""
    return [name for name in ("psutil", "matplotlib") if importlib.util.find_spec(name) is None]
