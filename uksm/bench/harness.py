"""uksm.bench.harness - ``python -m uksm bench``: uksm and the kernel's KSM, side by side.

DOC: Overview

The harness runs its suites on this machine and writes what a
user deciding between uksm and Linux KSM needs to read: results.json (every
run's figures), report.md (machine facts, the knobs, one table) and PNG
plots (memory over time while converging; the uksm/kernel ratio per suite).

  1 selftest   tools/testing/selftests/mm/ksm_tests.c's timing modes with its
               own parameters: -P merge time of a '*' region (MiB/s), -C COW
               time on merged and unmerged pages (4000 pages, 2000 distinct
               contents each in two pages), -D unmerge time;
  2 pairs      2 x N MiB where page i equals page N+i: time and CPU to 99%
               merged, bytes saved;
  3 realistic  numpy data with partial overlap, zero-filled regions and a
               volatile region rewritten while the scanner runs: memory
               (PSS, and the pool's private pages and frames or
               pages_sharing) over time;
  4 steady     scanner CPU per page per full scan once nothing is left to
               merge: smart_scan on, off, and the scan-time advisor;
  5 swap       uksm's swap area: swap-out and swap-in MiB/s and
               the swap-in fault latency, against the raw pwrite/pread
               floor of the same file system and, where root allows it
               (and not in a quick run), the kernel's own swap to a swap
               file under a memory cgroup limit, restored afterwards
               (uksm.bench.swapbench).

Each suite opens one ``kernelksm.session()`` (when root and
/sys/kernel/mm/ksm allow it), which saves every knob it may touch and puts
them back on the way out, however the way out is taken (an error in either
half of the suite, Ctrl-C, SIGTERM); inside it, every repeat measures uksm
and the kernel on the same content, in alternating order so that drift in
the machine falls on both.  A figure is the median over repeats; a ratio
is uksm/kernel computed within each repeat, and the median of those.  Where
the kernel side cannot run, the report says why instead of showing a
number.

A suite that fails is recorded as failed (with its traceback) and the run
goes on with the next; Ctrl-C ends the run, after writing what was measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
from typing import Any, Dict, List, Literal, Optional, Sequence, TextIO, Tuple, TypedDict, Union

import numpy as np

from .. import PAGE_SIZE, Pool, __version__
from . import kernelksm, measure

MiB = 1 << 20

SUITES = ("selftest", "pairs", "realistic", "steady", "swap")
TITLES = {
    "selftest": "Kernel selftest modes (ksm_tests.c -P, -C, -D)",
    "pairs": "Duplicate pairs (2 x N MiB, page i == page N+i)",
    "realistic": "Realistic numpy data, memory while converging",
    "steady": "Steady-state scanner cost",
    "swap": "Swap",
}

# The advisor's target scan time, in seconds: the kernel's smallest
# (advisor_target_scan_time_store refuses 0), so the suite stays short.
ADVISOR_TARGET_SCAN_TIME = 1
# kernel_ksm_reference.c's knobs, and the realistic and steady suites'.
FAST_PAGES_TO_SCAN = 10000
FAST_SLEEP_MILLISECS = 0


@dataclasses.dataclass
class Config:
    """What to run, and how big.  ``Config.quick()`` is the small run."""

    size: int = 128 * MiB  # N of suite 2; scale of suites 3 and 4
    swap_size: int = 256 * MiB  # the array of suite 5
    repeats: int = 3
    suites: Sequence[str] = SUITES
    selftest_mib: int = measure.SELFTEST_MIB
    cow_pages: int = measure.SELFTEST_COW_PAGES
    steady_warmup_scans: int = 8
    steady_scans: int = 8
    steady_min_seconds: float = 0.5
    advisor_scans: int = 3
    checksum: str = "jhash2"
    kernel: bool = True  # measure the kernel's KSM where allowed
    timeout: float = 120.0
    tail: float = 0.5  # seconds sampled after convergence
    interval: float = 0.025  # sampling interval of suite 3
    output: str = "bench-out"
    quick_run: bool = False
    command: str = ""

    @classmethod
    def quick(cls, **kw: Any) -> "Config":
        base: Dict[str, Any] = dict(
            size=16 * MiB,
            swap_size=16 * MiB,
            repeats=1,
            selftest_mib=16,
            steady_warmup_scans=4,
            steady_scans=4,
            steady_min_seconds=0.1,
            advisor_scans=2,
            timeout=60.0,
            tail=0.25,
            quick_run=True,
        )
        base.update(kw)
        return cls(**base)


# -- results -------------------------------------------------------------------------


class MetricSummary(TypedDict):
    """One metric of a suite in results.json (what report.py tabulates):
    medians over the repeats, the figures of each repeat, and the text
    shown instead of a number where a side has none."""

    key: str
    label: str
    unit: str
    better: Optional[str]
    uksm: Optional[float]
    kernel: Optional[float]
    ratio: Optional[float]  # median of the per-repeat uksm / kernel ratios
    uksm_runs: List[Optional[float]]
    kernel_runs: List[Optional[float]]
    ratio_runs: List[Optional[float]]
    uksm_text: Optional[str]
    kernel_text: Optional[str]


@dataclasses.dataclass
class Metric:
    """One row of the table: figures per repeat for each side."""

    key: str
    label: str
    unit: str
    better: Optional[str] = None  # "lower" or "higher" (for the ratio)
    uksm: List[Optional[float]] = dataclasses.field(default_factory=list)
    kernel: List[Optional[float]] = dataclasses.field(default_factory=list)
    uksm_text: Optional[str] = None  # instead of a number ("not available yet")
    kernel_text: Optional[str] = None

    def put(self, side: str, repeat: int, value: Optional[float]) -> None:
        runs = getattr(self, side)
        while len(runs) <= repeat:
            runs.append(None)
        runs[repeat] = None if value is None else float(value)

    def ratios(self) -> List[Optional[float]]:
        n = max(len(self.uksm), len(self.kernel))
        out: List[Optional[float]] = []
        for i in range(n):
            u = self.uksm[i] if i < len(self.uksm) else None
            k = self.kernel[i] if i < len(self.kernel) else None
            out.append(measure.ratio(u, k))
        return out

    @staticmethod
    def _median(values: Sequence[Optional[float]]) -> Optional[float]:
        vals = [v for v in values if v is not None and not math.isnan(v)]
        return measure.median(vals) if vals else None

    def summary(self) -> MetricSummary:
        ratios = self.ratios()
        return {
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "uksm": self._median(self.uksm),
            "kernel": self._median(self.kernel),
            "ratio": self._median(ratios),
            "uksm_runs": self.uksm,
            "kernel_runs": self.kernel,
            "ratio_runs": ratios,
            "uksm_text": self.uksm_text,
            "kernel_text": self.kernel_text,
        }


class SuiteResult:
    """Everything one suite measured: metrics, raw runs, knobs, timelines."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.number = SUITES.index(key) + 1
        self.title = TITLES[key]
        self.metrics: Dict[str, Metric] = {}
        self.runs: List[Dict[str, Any]] = []
        self.timelines: Dict[str, List[Dict[str, Any]]] = {"uksm": [], "kernel": []}
        # the knobs, or (suite 4) the knobs of each variant by name
        self.uksm_knobs: Dict[str, Any] = {}
        self.kernel_knobs: Dict[str, Any] = {}
        self.kernel_measured = False
        self.kernel_note: Optional[str] = None
        self.parameters: Dict[str, Any] = {}
        self.notes: List[str] = []
        self.status = "ok"
        self.error: Optional[str] = None
        self.seconds = 0.0

    def metric(self, key: str, label: str, unit: str, better: Optional[str] = None) -> Metric:
        if key not in self.metrics:
            self.metrics[key] = Metric(key, label, unit, better)
        return self.metrics[key]

    def to_json(self) -> Dict[str, Any]:
        return {
            "number": self.number,
            "title": self.title,
            "status": self.status,
            "error": self.error,
            "seconds": self.seconds,
            "kernel_measured": self.kernel_measured,
            "kernel_note": self.kernel_note,
            "parameters": self.parameters,
            "uksm_knobs": self.uksm_knobs,
            "kernel_knobs": self.kernel_knobs,
            "notes": self.notes,
            "metrics": [m.summary() for m in self.metrics.values()],
            "runs": self.runs,
            "timelines": self.timelines,
        }


# -- machine facts ---------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _meminfo(field: str) -> Optional[int]:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def machine_facts() -> Dict[str, Any]:
    """Kernel, CPUs, memory and the versions that matter to these figures."""
    uname = platform.uname()
    cpu_model = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "kernel": f"{uname.system} {uname.release}",
        "kernel_version": uname.version,
        "machine": uname.machine,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model,
        "mem_total": _meminfo("MemTotal"),
        "swap_total": _meminfo("SwapTotal"),
        "page_size": PAGE_SIZE,
        "max_map_count": _read("/proc/sys/vm/max_map_count"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "uksm": __version__,
        "hostname": uname.node,
    }


def _pool_knobs(**knobs: Any) -> Dict[str, Any]:
    """The uksm knobs a suite uses: the pool's defaults, overridden."""
    base: Dict[str, Any] = {
        "pages_to_scan": 100,
        "sleep_millisecs": 20,
        "max_page_sharing": 256,
        "use_zero_pages": True,
        "smart_scan": True,
        "checksum": "jhash2",
        "advisor_mode": "none",
    }
    base.update(knobs)
    return base


def _has_compaction() -> bool:
    """Whether this Pool has background compaction (compact_threshold)."""
    return "compact_threshold" in inspect.signature(Pool.__init__).parameters


def _kernel_knobs_now() -> Dict[str, Union[int, str]]:
    k = kernelksm.knobs()
    k.pop("run", None)
    return k


# -- the runner -------------------------------------------------------------------------


class Bench:
    """One benchmark run: ``Bench(Config()).run()`` returns the results
    dict (also written to cfg.output, with the report and the plots)."""

    def __init__(self, cfg: Config, out: Optional[TextIO] = None) -> None:
        self.cfg = cfg
        self.out = out if out is not None else sys.stdout
        self.results: Dict[str, Any] = {}
        self.t_start = 0.0
        reason = kernelksm.unavailable_reason()
        if not cfg.kernel:
            reason = "not requested (--no-kernel)"
        self.kernel_ok = reason is None
        self.kernel_reason = reason

    # -- output as it goes -----------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.t_start:6.1f}s"

    def progress(self, suite: SuiteResult, repeat: int, side: str, text: str) -> None:
        self.say(
            f"  [{self._elapsed()}] {suite.number}.{suite.key:<9s} "
            f"run {repeat + 1}/{self.cfg.repeats}  {side:<6s} {text}"
        )

    # -- the kernel side ------------------------------------------------------------------

    class _NoKernel:
        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> Literal[False]:
            return False

    def kernel_session(
        self, suite: SuiteResult, **knobs: Union[int, str]
    ) -> Union[kernelksm.Session, "Bench._NoKernel"]:
        """kernelksm.session(**knobs) with the knobs this kernel has, or a
        stand-in yielding None when the kernel side cannot run."""
        if not self.kernel_ok:
            suite.kernel_note = self.kernel_reason
            return self._NoKernel()
        have = {k: v for k, v in knobs.items() if kernelksm.has(k)}
        suite.kernel_measured = True
        return kernelksm.session(unmerge_first=True, **have)

    def _entered(
        self, suite: SuiteResult, ks: Optional[kernelksm.Session], knobs: bool = True
    ) -> None:
        """Note the knobs a suite's session set, and any wait for the
        session lock (another process's KSM session)."""
        if ks is None:
            return
        if knobs:
            suite.kernel_knobs = _kernel_knobs_now()
        if ks.lock_wait > 1.0:
            msg = (
                f"waited {ks.lock_wait:.1f} s for another process's kernel KSM session "
                f"({kernelksm.LOCK_PATH}) to end"
            )
            suite.notes.append(msg.capitalize() + ".")
            self.say("  " + msg)

    def order(self, repeat: int) -> List[str]:
        """uksm first on even repeats, the kernel first on odd ones."""
        return ["uksm", "kernel"] if repeat % 2 == 0 else ["kernel", "uksm"]

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.t_start = time.perf_counter()
        started = datetime.datetime.now().astimezone()
        knobs_before = kernelksm.knobs() if os.path.isdir(kernelksm.KSM_DIR) else {}
        self.results = {
            "uksm_bench": 1,
            "started": started.isoformat(timespec="seconds"),
            "command": cfg.command,
            "config": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(cfg).items()
            },
            "machine": machine_facts(),
            "kernel_side": {"available": self.kernel_ok, "reason": self.kernel_reason},
            "kernel_knobs_before": knobs_before,
            "kernel_knobs_after": None,
            "knobs_restored": None,
            "status": "running",
            "suites": {},
        }
        m = self.results["machine"]
        self.say(
            f"uksm bench: {m['kernel']}, {m['cpu_count']} CPUs, "
            f"{'quick run, ' if cfg.quick_run else ''}{cfg.repeats} repeat(s), "
            f"suites {', '.join(cfg.suites)}, output {cfg.output}"
        )
        if self.kernel_ok:
            self.say(
                "kernel KSM: measured in the same run; knobs saved and restored around each suite"
            )
        else:
            self.say(f"kernel KSM: not available ({self.kernel_reason}); uksm only")
        runners = {
            "selftest": self.suite_selftest,
            "pairs": self.suite_pairs,
            "realistic": self.suite_realistic,
            "steady": self.suite_steady,
            "swap": self.suite_swap,
        }
        interrupted = False
        try:
            for i, key in enumerate(cfg.suites):
                suite = SuiteResult(key)
                self.say(f"\n[{i + 1}/{len(cfg.suites)}] suite {suite.number}: {suite.title}")
                t0 = time.perf_counter()
                try:
                    runners[key](suite)
                except Exception:
                    suite.status = "error"
                    suite.error = traceback.format_exc()
                    self.say(
                        f"  suite {key} FAILED:\n    " + suite.error.strip().replace("\n", "\n    ")
                    )
                except BaseException:
                    suite.status = "interrupted"
                    raise
                finally:
                    suite.seconds = time.perf_counter() - t0
                    self.results["suites"][key] = suite.to_json()
                    self._print_rows(suite)
        except KeyboardInterrupt:
            interrupted = True
            self.say("\ninterrupted: writing what was measured so far")
            raise
        finally:
            after = kernelksm.knobs() if os.path.isdir(kernelksm.KSM_DIR) else {}
            self.results["kernel_knobs_after"] = after
            self.results["knobs_restored"] = after == knobs_before
            self.results["seconds"] = time.perf_counter() - self.t_start
            self.results["status"] = "interrupted" if interrupted else "done"
            self.write()
        return self.results

    def write(self) -> None:
        from . import report

        os.makedirs(self.cfg.output, exist_ok=True)
        plots = report.write_plots(self.results, self.cfg.output)
        self.results["plots"] = plots
        with open(os.path.join(self.cfg.output, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=_json_default)
            f.write("\n")
        text = report.markdown(self.results)
        with open(os.path.join(self.cfg.output, "report.md"), "w") as f:
            f.write(text)
        self.say("\n" + report.table(self.results))
        self.say(
            f"\nwrote {self.cfg.output}/results.json, report.md"
            + "".join(f", {p}" for p in plots)
            + f" in {self.results['seconds']:.1f} s; kernel KSM knobs "
            + ("restored" if self.results["knobs_restored"] else "CHANGED: see report")
        )

    def _print_rows(self, suite: SuiteResult) -> None:
        from . import report

        for line in report.rows_text(self.results["suites"][suite.key], suite.key):
            self.say("  " + line)

    # -- suite 1 ------------------------------------------------------------------------

    def suite_selftest(self, suite: SuiteResult) -> None:
        cfg = self.cfg
        mib = cfg.selftest_mib
        ukn = dict(
            pages_to_scan=measure.SELFTEST_PAGES_TO_SCAN,
            sleep_millisecs=measure.SELFTEST_SLEEP_MILLISECS,
        )
        suite.uksm_knobs = _pool_knobs(checksum=cfg.checksum, **ukn)
        suite.parameters = {
            "merge_mib": mib,
            "unmerge_mib": mib,
            "cow_pages": cfg.cow_pages,
            "cow_pages_written": cfg.cow_pages // 2,
            "full_scans_per_merge": 2,
            "uksm_driver": "pool.scan(full_scans=2)",
            "kernel_driver": "MADV_MERGEABLE, run=1, wait for 2 full scans",
        }
        if mib != measure.SELFTEST_MIB:
            suite.notes.append(
                f"-P and -D use {mib} MiB here; run_vmtests.sh runs "
                f"ksm_tests -P -s {measure.SELFTEST_MIB}."
            )
        P_t = suite.metric(
            "merge_time", f"-P merge time, '*' x {mib} MiB, 2 full scans", "s", "lower"
        )
        P_s = suite.metric("merge_speed", "-P merge speed", "MiB/s", "higher")
        P_f = suite.metric(
            "merge_fraction", "-P pages merged after 2 full scans", "fraction", "higher"
        )
        C_m = suite.metric(
            "cow_merged",
            f"-C COW break, merged pages ({cfg.cow_pages // 2} writes)",
            "us/page",
            "lower",
        )
        C_ms = suite.metric("cow_merged_speed", "-C COW speed, merged pages", "MiB/s", "higher")
        C_u = suite.metric("cow_unmerged", "-C write, unmerged pages", "us/page", "lower")
        D_t = suite.metric("unmerge_time", f"-D unmerge time, {mib} MiB", "s", "lower")
        D_s = suite.metric("unmerge_speed", "-D unmerge speed", "MiB/s", "higher")
        kknobs = dict(
            pages_to_scan=measure.SELFTEST_PAGES_TO_SCAN,
            sleep_millisecs=measure.SELFTEST_SLEEP_MILLISECS,
            merge_across_nodes=1,
        )
        suite.notes.append(
            "Each side runs one discarded warm-up round first (fresh "
            "memory's first touch is slow on a VM)."
        )

        def one_round(side: str) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
            if side == "uksm":
                return (
                    measure.uksm_merge_time(mib, cfg.checksum, **ukn),
                    measure.uksm_cow_time(cfg.cow_pages, cfg.checksum, **ukn),
                    measure.uksm_unmerge_time(mib, cfg.checksum, **ukn),
                )
            return (
                measure.kernel_merge_time(mib),
                measure.kernel_cow_time(cfg.cow_pages),
                measure.kernel_unmerge_time(mib),
            )

        with self.kernel_session(suite, **kknobs) as ks:
            self._entered(suite, ks)
            for side in ("uksm", "kernel") if ks is not None else ("uksm",):
                one_round(side)
            for r in range(cfg.repeats):
                for side in self.order(r):
                    if side == "kernel" and ks is None:
                        continue
                    p, c, d = one_round(side)
                    P_t.put(side, r, p["wall"])
                    P_s.put(side, r, p["mib_per_s"])
                    P_f.put(side, r, p["merged_fraction"])
                    C_m.put(side, r, c["merged_us_per_page"])
                    C_ms.put(side, r, c["merged_mib_per_s"])
                    C_u.put(side, r, c["unmerged_us_per_page"])
                    D_t.put(side, r, d["wall"])
                    D_s.put(side, r, d["mib_per_s"])
                    suite.runs.append(
                        {"repeat": r, "side": side, "merge": p, "cow": c, "unmerge": d}
                    )
                    self.progress(
                        suite,
                        r,
                        side,
                        f"-P {p['wall']:.3f} s ({p['mib_per_s']:.0f} MiB/s, "
                        f"{p['merged_fraction']:.3f} merged)  -C merged "
                        f"{c['merged_us_per_page']:.2f} us/page  -D "
                        f"{d['wall']:.3f} s",
                    )

    # -- suite 2 ------------------------------------------------------------------------

    def suite_pairs(self, suite: SuiteResult) -> None:
        cfg = self.cfg
        n = max(cfg.size // PAGE_SIZE, 16)
        mib = n * PAGE_SIZE / MiB
        knobs = dict(pages_to_scan=FAST_PAGES_TO_SCAN, sleep_millisecs=FAST_SLEEP_MILLISECS)
        compaction = _has_compaction()
        # Merging alone, as ksmd does it; then, where the pool has it, with
        # the pool's default background compaction, which the scanner thread
        # runs right after the full scan that merged (ksmd has no such step).
        variants = [("", dict(knobs, compact_threshold=0) if compaction else dict(knobs))]
        if compaction:
            variants.append(("_default", dict(knobs)))
        suite.uksm_knobs = _pool_knobs(checksum=cfg.checksum, **variants[0][1])
        if compaction:
            suite.notes.append(
                "uksm's pool compacts its memfd in the background scanner "
                "thread after a full scan leaves it fragmented "
                "(compact_threshold, default 2.0); ksmd has no such step.  "
                "The first rows measure merging alone (compact_threshold=0); "
                'the rows "with background compaction" use the pool\'s '
                "default, against the same kernel figures."
            )
        suite.parameters = {
            "pairs": n,
            "mib_each_half": mib,
            "target": 0.99,
            "uksm_driver": "pool.start() (background scanner thread), polling stats() every 2 ms",
            "kernel_driver": "MADV_MERGEABLE, run=1, polling pages_sharing "
            "every 2 ms (kernel_ksm_reference.c)",
        }
        suite.notes.append(
            "CPU: uksm's scanner thread (process CPU less the polling "
            "thread's), ksmd's time on CPU from /proc/<ksmd>/schedstat."
        )
        T = suite.metric("time_to_99", f"time to 99% merged, 2 x {mib:g} MiB", "s", "lower")
        C = suite.metric("cpu_to_99", "scanner CPU to 99% merged", "s", "lower")
        S_p = suite.metric("saved_pss", "bytes saved (PSS)", "MiB", "higher")
        S_c = suite.metric(
            "saved_counter",
            "bytes saved (uksm: private pages before less "
            "private pages and memfd blocks after; kernel: pages_sharing)",
            "MiB",
            "higher",
        )
        if compaction:
            T_d = suite.metric(
                "time_to_99_default",
                "time to 99% merged, uksm with background compaction (its default)",
                "s",
                "lower",
            )
            C_d = suite.metric(
                "cpu_to_99_default",
                "scanner CPU to 99% merged, uksm with background compaction (its default)",
                "s",
                "lower",
            )
        with self.kernel_session(suite, **knobs) as ks:
            self._entered(suite, ks)
            for r in range(cfg.repeats):
                for side in self.order(r):
                    if side == "kernel" and ks is None:
                        continue
                    if side == "uksm":
                        extra = {}
                        for tag, k in variants:
                            w = measure.UksmPairs(n, cfg.checksum, **k)
                            try:
                                one = w.converge("thread", timeout=cfg.timeout)
                                one["compactions"] = w.pool.stats().get("compactions")
                            finally:
                                w.close()
                            if not one["converged"]:
                                raise RuntimeError(
                                    f"uksm did not reach 99% merged within {cfg.timeout} s: {one}"
                                )
                            if tag:
                                extra = one
                            else:
                                res = one
                        cpu = res["scanner_cpu"]
                        counter = res["saved_held_bytes"]
                        if extra:
                            T_d.put(side, r, extra["wall"])
                            C_d.put(side, r, extra["scanner_cpu"])
                            res = dict(res, with_compaction=extra)
                    else:
                        kp = measure.KernelPairs(n)
                        try:
                            res = kp.converge(timeout=cfg.timeout, **knobs)
                        finally:
                            kp.close()
                            measure._kernel_reset()
                        cpu = res["cpu"]
                        counter = res["saved_counter_bytes"]
                    if not res["converged"]:
                        raise RuntimeError(
                            f"{side} did not reach 99% merged within {cfg.timeout} s: {res}"
                        )
                    T.put(side, r, res["wall"])
                    C.put(side, r, cpu)
                    if compaction and side == "kernel":
                        T_d.put(side, r, res["wall"])
                        C_d.put(side, r, cpu)
                    S_p.put(side, r, res["saved_pss_bytes"] / MiB)
                    S_c.put(side, r, counter / MiB)
                    suite.runs.append({"repeat": r, "side": side, **res})
                    more = ""
                    if "with_compaction" in res:
                        wc = res["with_compaction"]
                        more = (
                            f"; with background compaction {wc['wall']:.3f} s, "
                            f"CPU {wc['scanner_cpu']:.3f} s"
                        )
                    self.progress(
                        suite,
                        r,
                        side,
                        f"99% merged in {res['wall']:.3f} s, CPU {cpu:.3f} s, "
                        f"saved {res['saved_pss_bytes'] / MiB:.1f} MiB PSS "
                        f"({res['full_scans']} full scans){more}",
                    )

    # -- suite 3 ------------------------------------------------------------------------

    def suite_realistic(self, suite: SuiteResult) -> None:
        cfg = self.cfg
        size = max(cfg.size, 4 * PAGE_SIZE)
        ukn = dict(pages_to_scan=FAST_PAGES_TO_SCAN, sleep_millisecs=FAST_SLEEP_MILLISECS)
        suite.uksm_knobs = _pool_knobs(checksum=cfg.checksum, **ukn)
        suite.parameters = {
            "dataset_mib": size / MiB,
            "arrays": "weights (B), replica (B, exact copy), finetuned (B, 75% overlap), "
            "concat (B, 50% overlap), grad_buffer (B/2, zeros), padded (B/2, "
            "75% zeros), volatile (B/4, one word per page rewritten every "
            f"{cfg.interval * 1000:.0f} ms)",
            "target": "99% of the ideal saving (duplicate pages beyond the first copy, "
            "plus zero pages)",
            "sample_interval_s": cfg.interval,
            "tail_s": cfg.tail,
            "uksm_driver": "pool.start() (background scanner thread)",
            "kernel_driver": "one private mapping per array, MADV_MERGEABLE, run=1",
        }
        if _has_compaction():
            suite.notes.append(
                "uksm runs with its defaults here, background compaction "
                "(compact_threshold=2.0) included; ksmd has no such step."
            )
        suite.notes.append(
            "uksm's samples come when its scanner thread lets go of the pool "
            "lock (after each batch), so its time to target is known to about "
            "one batch; the kernel's are taken every sampling interval."
        )
        suite.notes.append(
            "PSS is the process's anonymous + shmem PSS "
            "(/proc/self/smaps_rollup) less its value before the workload; "
            "uksm's includes its own metadata.  A merged page is a view of its "
            "frame, mapped in when touched: uksm's PSS samples count a frame "
            "once something has read it, and the figures after converging "
            'are taken with every array read (both sides).  uksm "resident" '
            "is bytes_resident: the pool's private pages present (pagemap) "
            "plus its frames (the memfd's allocated blocks).  Kernel "
            '"resident" is the bytes mapped less (pages_sharing + '
            "ksm_zero_pages) pages."
        )
        T = suite.metric(
            "time_to_99", f"time to 99% of ideal saving, dataset {size / MiB:g} MiB", "s", "lower"
        )
        B = suite.metric("pss_before", "memory before merging (PSS)", "MiB", None)
        A = suite.metric("pss_after", "memory after converging (PSS)", "MiB", "lower")
        S_p = suite.metric("saved_pss", "bytes saved (PSS)", "MiB", "higher")
        S_c = suite.metric(
            "saved_counter",
            "bytes saved (uksm: bytes_resident, private "
            "pages + memfd blocks; kernel: pages_sharing + ksm_zero_pages)",
            "MiB",
            "higher",
        )
        F = suite.metric(
            "saved_fraction", "saving as a fraction of ideal (counters)", "fraction", "higher"
        )
        kknobs = dict(ukn, use_zero_pages=1)
        with self.kernel_session(suite, **kknobs) as ks:
            self._entered(suite, ks)
            for r in range(cfg.repeats):
                for side in self.order(r):
                    if side == "kernel" and ks is None:
                        continue
                    if side == "uksm":
                        res = measure.uksm_realistic(
                            size,
                            cfg.checksum,
                            timeout=cfg.timeout,
                            tail=cfg.tail,
                            interval=cfg.interval,
                            **ukn,
                        )
                        counter = res["resident_before"] - res["resident_after"]
                    else:
                        res = measure.kernel_realistic(
                            size, timeout=cfg.timeout, tail=cfg.tail, interval=cfg.interval, **ukn
                        )
                        counter = res["saved_counter_bytes"]
                    if not res["contents_ok"]:
                        raise RuntimeError(f"{side}: merging changed the data")
                    T.put(side, r, res["time_to_target"])
                    B.put(side, r, res["pss_before"] / MiB)
                    A.put(side, r, res["pss_after"] / MiB)
                    S_p.put(side, r, res["saved_pss_bytes"] / MiB)
                    S_c.put(side, r, counter / MiB)
                    F.put(side, r, res["saved_fraction"])
                    samples = res.pop("samples")
                    suite.timelines[side].append(
                        {
                            "repeat": r,
                            "samples": samples,
                            "time_to_target": res["time_to_target"],
                            "ideal_pages": res["ideal_pages"],
                            "total_bytes": res["total_bytes"],
                        }
                    )
                    suite.runs.append({"repeat": r, "side": side, **res})
                    tt = res["time_to_target"]
                    self.progress(
                        suite,
                        r,
                        side,
                        f"99% of ideal in {measure.fmt(tt)} s; PSS "
                        f"{res['pss_before'] / MiB:.1f} -> "
                        f"{res['pss_after'] / MiB:.1f} MiB ({len(samples)} samples)",
                    )
                    if not res["converged"]:
                        suite.notes.append(
                            f"run {r + 1}, {side}: did not reach 99% of the "
                            f"ideal saving within {cfg.timeout:g} s"
                        )

    # -- suite 4 ------------------------------------------------------------------------

    def suite_steady(self, suite: SuiteResult) -> None:
        cfg = self.cfg
        size = max(cfg.size - cfg.size % PAGE_SIZE, 64 * PAGE_SIZE)
        fast: Dict[str, int] = dict(
            pages_to_scan=FAST_PAGES_TO_SCAN, sleep_millisecs=FAST_SLEEP_MILLISECS
        )
        adv: Dict[str, Union[int, str]] = dict(
            advisor_mode="scan-time",
            advisor_target_scan_time=ADVISOR_TARGET_SCAN_TIME,
            advisor_min_pages_to_scan=500,
            advisor_max_pages_to_scan=30000,
            advisor_max_cpu=70,
            sleep_millisecs=20,
        )
        # (key, label, the pool's knobs, the kernel's knobs)
        variants: List[Tuple[str, str, Dict[str, Any], Dict[str, Union[int, str]]]] = [
            ("smart_on", "smart_scan on", dict(fast, smart_scan=True), dict(fast, smart_scan=1)),
            ("smart_off", "smart_scan off", dict(fast, smart_scan=False), dict(fast, smart_scan=0)),
            (
                "advisor",
                f"advisor scan-time, target {ADVISOR_TARGET_SCAN_TIME} s",
                dict(adv, smart_scan=True, pages_to_scan=500),
                dict(adv, smart_scan=1),
            ),
        ]
        suite.uksm_knobs = {
            key: _pool_knobs(checksum=cfg.checksum, **k) for key, _, k, _ in variants
        }
        suite.kernel_knobs = {}
        suite.parameters = {
            "region_mib": size / MiB,
            "content": "first half duplicate pairs (merged before measuring), second half "
            "random pages that never merge",
            "warmup_full_scans": cfg.steady_warmup_scans,
            "measured_full_scans": cfg.steady_scans,
            "min_seconds": cfg.steady_min_seconds,
            "advisor_full_scans": (2, cfg.advisor_scans),
            "uksm_driver": "pool.scan() in the caller's thread; the advisor variant runs "
            "the background thread (the advisor retunes its pages_to_scan)",
            "kernel_driver": "run=1, windows aligned on full_scans increments",
        }
        suite.notes.append(
            "Figure: scanner CPU over the measured full scans / (full scans x "
            "pages in the region), in microseconds."
        )
        metrics = {
            key: suite.metric(key, f"CPU per page per full scan, {label}", "us", "lower")
            for key, label, _, _ in variants
        }
        adv_pages = suite.metric(
            "advisor_pages_to_scan", "pages_to_scan the advisor settled on", "pages", None
        )
        suite.notes.append(
            "The advisor aims for a full scan every advisor_target_scan_time "
            "seconds but never spends less than a minimum CPU share "
            "(mm/ksm.c's advisor, ported to uksm): on a region that a scan "
            "covers in well under the target it raises pages_to_scan, up to "
            "advisor_max_pages_to_scan."
        )
        base_kernel: Dict[str, Union[int, str]] = dict(fast, smart_scan=1, advisor_mode="none")
        with self.kernel_session(suite, **base_kernel) as ks:
            self._entered(suite, ks, knobs=False)
            for r in range(cfg.repeats):
                for key, label, uk, kk in variants:
                    warm, scans, min_s = (
                        cfg.steady_warmup_scans,
                        cfg.steady_scans,
                        cfg.steady_min_seconds,
                    )
                    if key == "advisor":
                        warm, scans = 2, cfg.advisor_scans
                    for side in self.order(r):
                        if side == "kernel" and ks is None:
                            continue
                        if side == "uksm":
                            k = dict(uk)
                            driver = "thread" if k.get("advisor_mode") == "scan-time" else "scan"
                            if driver == "thread":
                                k["advisor_target_scan_time"] = float(k["advisor_target_scan_time"])
                            res = measure.uksm_steady(
                                size,
                                warm,
                                scans,
                                min_s,
                                cfg.checksum,
                                driver=driver,
                                timeout=cfg.timeout,
                                **k,
                            )
                        else:
                            assert ks is not None  # the kernel side runs in its session
                            want = {n: v for n, v in kk.items() if kernelksm.has(n)}
                            if kk.get("advisor_mode") == "scan-time" and "advisor_mode" not in want:
                                suite.notes.append(
                                    "this kernel has no scan-time advisor "
                                    "(Linux 6.8+): kernel side skipped"
                                )
                                continue
                            if "advisor_mode" not in kk and kernelksm.has("advisor_mode"):
                                want["advisor_mode"] = "none"
                            if want.get("advisor_mode", "none") != "none":
                                want.pop("pages_to_scan", None)
                            ks.apply(**want)
                            suite.kernel_knobs[key] = _kernel_knobs_now()
                            res = measure.kernel_steady(
                                size,
                                warm,
                                scans,
                                min_s,
                                pages_to_scan=int(kk.get("pages_to_scan", FAST_PAGES_TO_SCAN)),
                                sleep_millisecs=int(kk["sleep_millisecs"]),
                                timeout=cfg.timeout,
                            )
                        metrics[key].put(side, r, res["us_per_page_per_scan"])
                        if res.get("foreign_pages"):
                            seen = res["pages_scanned"] + res["pages_skipped"]
                            per_scan = seen // res["full_scans"]
                            suite.notes.append(
                                f"Run {r + 1}, kernel, {label}: ksmd scanned "
                                f"{per_scan:,}"
                                f" pages per full scan against {res['pages']:,} of ours: other "
                                "processes' MADV_MERGEABLE memory was on its list, so that "
                                "run's CPU is not ours alone."
                            )
                        if key == "advisor":
                            adv_pages.put(side, r, res["pages_to_scan"])
                        suite.runs.append({"repeat": r, "side": side, "variant": key, **res})
                        self.progress(
                            suite,
                            r,
                            side,
                            f"{label}: {res['us_per_page_per_scan']:.3f} us/page/scan"
                            f" ({res['full_scans']} scans, {res['cpu']:.3f} s CPU, "
                            f"pages_to_scan {res['pages_to_scan']})",
                        )

    # -- suite 5 ------------------------------------------------------------------------

    def suite_swap(self, suite: SuiteResult) -> None:
        """uksm's swap against the raw pread/pwrite floor of the same file
        system and the kernel's own swap (uksm.bench.swapbench)."""
        from . import swapbench

        cfg = self.cfg
        size = max(cfg.swap_size - cfg.swap_size % PAGE_SIZE, 64 * PAGE_SIZE)
        budget = size // 8
        directory = swapbench.swap_dir()
        samples = swapbench.DEFAULT_SAMPLES
        reason: Optional[str]
        if not cfg.kernel:
            reason = "not requested (--no-kernel)"
        elif cfg.quick_run:
            reason = (
                "left out of a quick run (it makes a swap file and a memory cgroup: "
                "slow, and system-wide while it lasts); run without --quick"
            )
        else:
            reason = swapbench.kernel_unavailable_reason()
        suite.uksm_knobs = {
            "max_resident": f"{size / MiB:g} MiB, lowered to {budget / MiB:g} MiB",
            "swap_batch": "2MiB",
            "swap_path": directory,
            "compact_threshold": 0,
        }
        suite.parameters = {
            "array_mib": size / MiB,
            "budget_mib": budget / MiB,
            "content": "random bytes (incompressible, nothing to merge)",
            "random_reads": f"{samples} random swapped pages, one 8-byte read each",
            "swap_directory": directory,
            "uksm_driver": "Pool(max_resident=, swap_path=): max_resident lowered to the "
            "budget (timed until bytes_resident is within it, + fdatasync of "
            "the swap file), raised again, the swap file dropped from the page "
            "cache (POSIX_FADV_DONTNEED), then one round reads the whole array "
            "in order and one reads random swapped pages (C loops over the "
            "array); the pages made private again between rounds (untimed)",
            "floor": "a file of the array's size in the same directory: pwritev 256 pages a "
            "call, fsync, POSIX_FADV_DONTNEED, pread 1 MiB a call in order; pread 4 "
            "KiB at random pages, cold and cached (C)",
            "kernel_driver": (
                f"swap file in {swapbench.SWAP_DIR} (dd, mkswap, swapon), a "
                "forked child (C) in a memory cgroup touching the same amount; "
                "the cgroup's limit lowered to the budget (timed), raised, the "
                "same reads"
            )
            if reason is None
            else None,
        }
        rows = {r[0]: r for r in swapbench.ROWS}
        M: Dict[str, Metric] = {}
        for key, label, _, _, kk, unit, better in swapbench.ROWS:
            M[key] = suite.metric(key, label, unit, better)
            if kk is None:
                M[key].kernel_text = "uksm only"
        for key, label, _, unit in swapbench.FLOOR_ROWS:
            M["floor_" + key] = suite.metric("floor_" + key, label, unit)
            M["floor_" + key].kernel_text = "-"
        for key in ("swap_out", "seq_read", "rand_read"):
            M[key + "_x_floor"] = suite.metric(
                key + "_x_floor", f"{rows[key][1]} / floor", "x floor", rows[key][6]
            )
        suite.notes.append(
            "Both sides hold the same array of incompressible data under the "
            "same budget (7/8 of it swapped out).  The sequential read is MiB/s "
            "over the whole array; the random reads are microseconds per page, "
            "each page a different swapped one.  Every timed read is a C loop, "
            "the same code for uksm's array, the kernel side's memory and the "
            "floor's file."
        )
        suite.notes.append(
            'The "floor:" rows are plain I/O on the same file system, '
            "measured in the same run with no uksm in the way (in the uksm "
            'column); the "/ floor" rows divide each side by its floor figure, '
            "and their ratio column is then uksm / kernel."
        )
        if reason is not None:
            suite.kernel_note = reason
            suite.notes.append(f"The kernel's swap was not measured: {reason}.")
        ks_cm: Union[swapbench.KernelSwap, contextlib.nullcontext[None]] = (
            swapbench.KernelSwap(size) if reason is None else contextlib.nullcontext()
        )
        with ks_cm as ks:
            if ks is not None:
                suite.kernel_measured = True
                suite.kernel_knobs = {
                    "cgroup": ks.mode,
                    "cgroup_path": ks.cgroup,
                    "swapfile": ks.swapfile,
                    "swapfile_mib": ks.swapfile_bytes // MiB,
                    "limit_mib": budget / MiB,
                }
                if ks.stale_cleaned:
                    suite.notes.append(
                        "Left behind by an earlier run, and undone first: "
                        + "; ".join(ks.stale_cleaned)
                        + "."
                    )
            for r in range(cfg.repeats):
                swapbench.settle()
                fl = swapbench.floor(size, directory, samples, seed=r + 1)
                for key, _, fk, _ in swapbench.FLOOR_ROWS:
                    M["floor_" + key].put("uksm", r, fl[fk])
                suite.runs.append({"repeat": r, "side": "floor", **fl})
                self.progress(
                    suite,
                    r,
                    "floor",
                    f"write {measure.fmt(fl['write_mib_s'], 0)} MiB/s, pread "
                    f"sequential cold {measure.fmt(fl['read_seq_cold_mib_s'], 0)} "
                    f"MiB/s, random cold {measure.fmt(fl['rand_cold_us'], 1)} us/page",
                )
                for side in self.order(r):
                    if side == "kernel" and ks is None:
                        continue
                    swapbench.settle()
                    if side == "uksm":
                        res = swapbench.uksm_swap(
                            size,
                            budget,
                            directory,
                            samples=samples,
                            seed=r + 1,
                            timeout=cfg.timeout,
                        )
                        if not res["contents_ok"]:
                            raise RuntimeError("uksm: swapping changed the data")
                        if res["swap_errors"]:
                            raise RuntimeError(f"uksm: {res['swap_errors']} swap write errors")
                    else:
                        assert ks is not None  # the kernel side runs in its block
                        res = ks.measure(size, budget, samples, seed=r + 1)
                    text = (
                        f"swap-out {measure.fmt(res['swap_out_mib_s'], 0)} MiB/s, "
                        f"sequential read {measure.fmt(res['seq_read_mib_s'], 0)} MiB/s, "
                        f"random {measure.fmt(res['rand_read_us'], 1)} us/page"
                    )
                    for key, _, uk, fk, kk, _, _ in swapbench.ROWS:
                        k = uk if side == "uksm" else kk
                        if k is None:
                            continue
                        M[key].put(side, r, res[k])
                        x = M.get(key + "_x_floor")
                        if x is not None:
                            x.put(side, r, swapbench.ratio(res[k], fl[fk]))
                    suite.runs.append({"repeat": r, "side": side, **res})
                    self.progress(suite, r, side, text)
        if ks is not None:
            suite.kernel_knobs["restored"] = ks.restored
            if ks.restored.get("ok"):
                suite.notes.append(
                    f"Restored after the suite and checked: swapoff and rm "
                    f"{ks.swapfile}, rmdir {ks.cgroup}; /proc/swaps and "
                    "`swapon --show` read as before."
                )
            else:
                raise RuntimeError(f"the kernel's swap was not restored as found: {ks.restored}")
            if ks.mode == "v1":
                suite.notes.append(
                    "This machine's memory controller is cgroup v1's: the "
                    "kernel side's cgroup is a v1 child of this process's own "
                    "memory cgroup (memory.limit_in_bytes)."
                )


def _json_default(obj: object) -> object:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def parse_suites(text: str) -> List[str]:
    """ "all", or a comma-separated list of suite numbers or names."""
    if text.strip().lower() in ("", "all"):
        return list(SUITES)
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item.isdigit() and 1 <= int(item) <= len(SUITES):
            key = SUITES[int(item) - 1]
        elif item in SUITES:
            key = item
        else:
            raise ValueError(f"unknown suite {item!r}: use 1-{len(SUITES)} or {', '.join(SUITES)}")
        if key not in out:
            out.append(key)
    return sorted(out, key=SUITES.index)


def run(cfg: Config, out: Optional[TextIO] = None) -> Dict[str, Any]:
    """Run the benchmark described by @cfg; see Bench."""
    return Bench(cfg, out).run()
