"""uksm.bench.scale - ``python -m uksm bench --scale``: cost per page against pool size.

DOC: Overview

The suites of uksm.bench.harness measure one size; this mode asks how each
cost grows with the amount of memory watched, uksm and the kernel's KSM
side by side in the same run, one size after another (default 64 MiB to
8 GiB).  At each size S the workload is fresh duplicates: S / 2 of data,
every page different, and S / 2 of copies of it (page i of the copy equals
page i of the data), so that merging saves S / 2.  Each side runs in a
child process of its own (``python -m uksm.bench.scale child SIDE BYTES``),
so that its peak RSS is its own and nothing of one size is left for the
next; the child prints one JSON line.

Per size and side:

  merge_s_per_page       wall seconds until 99% of the copies share, per page
                         of the pool (uksm: pool.scan(1) in a loop, jhash2,
                         pages_to_scan=10000; kernel: MADV_MERGEABLE, then
                         ksmd with pages_to_scan=PAGES_TO_SCAN and
                         sleep_millisecs=0, pages_sharing polled)
  merge_cpu_per_page     the scanner's CPU over the same span (uksm: the
                         process's; kernel: ksmd's, /proc/<ksmd>/stat)
  steady_us_per_page     scanner CPU per page per full scan once nothing is
                         left to merge and nothing changes (smart_scan on,
                         both sides' default)
  metadata_bytes_per_page  bookkeeping per tracked page, as each reports it:
                         uksm's stats()["metadata_bytes_per_page"] (its
                         rmap items, trees and tables, by their allocations);
                         the kernel's ksm_rmap_items of the child
                         (/proc/<pid>/ksm_stat) x RMAP_ITEM_BYTES plus
                         pages_shared stable nodes x STABLE_NODE_BYTES
  peak_rss_bytes         the child's ru_maxrss
  cow_us_per_page        a one-byte write into each page of the first
                         half of the copies (each a merged page)
  unmerge_us_per_page    pool.unmerge() / MADV_UNMERGEABLE of the second
                         half of the copies, per page

COW and unmerge allocate a fresh page per page, and uksm's merge a frame
per pair (the kernel's allocates nothing: one of the pair becomes the KSM
page).  In a virtual machine the first touch of guest memory the host has
taken back (free page reporting of a balloon device, or never backed yet)
costs a host fault several times the guest's own: 1.5 us/page hot, 4 to 14
us/page cold on the machine this mode was written on, and which a phase
gets depends on how much was freed before it and how long ago.  So right
before each phase that allocates, the child touches and frees as many fresh
anonymous pages as the phase will allocate: the phase then takes pages the
host backs, as a process in its steady state does, and the cold touch is
reported beside it (touch_before_merge_us_per_page, uksm only;
touch_before_cow_us_per_page, touch_before_unmerge_us_per_page) as the
figure that shows the host's share when it is large.

The kernel's knobs are changed only inside a kernelksm.session() held by
the parent around every kernel child, and put back to run=0,
pages_to_scan=100, sleep_millisecs=20 afterwards, whatever happens.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import PAGE_SIZE, parse_size
from . import kernelksm

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZES = "64MiB,256MiB,1GiB,4GiB,8GiB"
PAGES_TO_SCAN = 100000  # "high": ksmd's batch between sleeps, sleep_millisecs=0
UKSM_PAGES_TO_SCAN = 10000
TARGET = 0.99
STEADY_SCANS = 3
STEADY_MIN_SECONDS = 0.5
# sizeof(struct ksm_rmap_item) and of struct ksm_stable_node on x86-64
# (mm/ksm.c): the kernel reports the counts, not the bytes.
RMAP_ITEM_BYTES = 64
STABLE_NODE_BYTES = 48
KSM_DEFAULTS = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20}

FIELDS = (
    "merge_s_per_page",
    "merge_cpu_per_page",
    "steady_us_per_page",
    "metadata_bytes_per_page",
    "peak_rss_bytes",
    "cow_us_per_page",
    "unmerge_us_per_page",
)
LABELS = {
    "merge_s_per_page": ("time to merge fresh duplicates", "us/page", 1e6),
    "merge_cpu_per_page": ("scanner CPU to merge", "us/page", 1e6),
    "steady_us_per_page": ("scanner CPU per full scan, steady state", "us/page", 1.0),
    "metadata_bytes_per_page": ("metadata per tracked page", "B/page", 1.0),
    "peak_rss_bytes": ("peak RSS of the process", "MiB", 1.0 / MiB),
    "cow_us_per_page": ("COW break of a merged page", "us/page", 1.0),
    "unmerge_us_per_page": ("unmerge", "us/page", 1.0),
}


def parse_sizes(text: str) -> List[int]:
    """ "64MiB,256MiB,..." as page multiples, in order; ValueError otherwise."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        n = parse_size(item, "--sizes")
        if n < 16 * PAGE_SIZE:
            raise ValueError(f"--sizes: {item} is below 16 pages")
        out.append(n - n % (2 * PAGE_SIZE))
    if not out:
        raise ValueError("--sizes: no size given")
    return out


# -- the workload -----------------------------------------------------------------------


def fill_data(pages: np.ndarray, first: int = 0) -> None:
    """Every page different, none zero: word 0 its number, the rest a pattern."""
    words = pages.view(np.uint64)
    idx = np.arange(first, first + len(pages), dtype=np.uint64)
    for i in range(0, len(pages), 4096):  # no huge temporaries
        sl = slice(i, i + 4096)
        words[sl, :] = (idx[sl] * np.uint64(0x9E3779B97F4A7C15))[:, None]
        words[sl, 0] = idx[sl] + np.uint64(1)


def warm_pages(nbytes: int) -> float:
    """Touch and free @nbytes of fresh anonymous memory, 4 KiB pages, so
    that the next allocations of the process take guest pages the host
    backs (see the overview); returns the touch's seconds per page."""
    import mmap

    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_NOHUGEPAGE)
        rows = np.frombuffer(mm, np.uint8).reshape(-1, PAGE_SIZE)
        t0 = time.perf_counter()
        rows[:, 0] = 1
        dt = time.perf_counter() - t0
        del rows
    finally:
        mm.close()
    return dt / (nbytes // PAGE_SIZE)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """a == b, a MiB at a time: a comparison's temporary of the whole
    array would be in the peak RSS this mode reports."""
    if a.shape != b.shape:
        return False
    step = max(MiB // max(a[:1].nbytes, 1), 1)
    return all(np.array_equal(a[i : i + step], b[i : i + step]) for i in range(0, len(a), step))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Start the process's peak RSS again from its RSS now (VmHWM), so that
    warm_pages()' buffer, gone again, is not in the peak reported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then counts the warm-up too


def warm_phase(nbytes: int, peak: int) -> Tuple[float, int]:
    """warm_pages(@nbytes), keeping the peak RSS of the work before it."""
    peak = max(peak, _peak_rss())
    touch = warm_pages(nbytes)
    _reset_peak_rss()
    return touch, peak


def _uss() -> int:
    fields: Dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


def uksm_one(size: int, timeout: float) -> Dict[str, Any]:
    """The uksm side at one size, in this (child) process."""
    from ..pool import Pool

    npages = size // PAGE_SIZE
    half = npages // 2
    quarter = half // 2
    uss0 = _uss()
    pool = Pool(size + 64 * MiB, pages_to_scan=UKSM_PAGES_TO_SCAN, sleep_millisecs=0)
    try:
        data = pool.empty(half * PAGE_SIZE, np.uint8)
        fill_data(data.reshape(half, PAGE_SIZE))
        # the copies in two buffers: one for the COW writes, one to unmerge
        cow = pool.asarray(data[: quarter * PAGE_SIZE])
        unm = pool.asarray(data[quarter * PAGE_SIZE :])
        want = math.ceil(TARGET * half)
        touch_merge, peak = warm_phase(half * PAGE_SIZE, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        st = pool.scan(1)
        while st["pages_sharing"] < want:
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"uksm did not merge {want} pages in {timeout} s: {st}")
            st = pool.scan(1)
        merge_s, merge_cpu = time.perf_counter() - t0, time.process_time() - c0
        pool.scan(2)  # settle: smart_scan's skip counts
        s0 = pool.stats()
        t0, c0 = time.perf_counter(), time.process_time()
        while True:
            st = pool.scan(1)
            if (
                st["full_scans"] - s0["full_scans"] >= STEADY_SCANS
                and time.perf_counter() - t0 >= STEADY_MIN_SECONDS
            ):
                break
        steady_cpu = time.process_time() - c0
        scans = st["full_scans"] - s0["full_scans"]
        meta = st["metadata_bytes_per_page"]
        held = st["bytes_private"] + st["bytes_frames"]
        uss_meta = (_uss() - uss0 - held) / npages
        sharing = st["pages_sharing"]
        rows = cow.reshape(quarter, PAGE_SIZE)
        touch_cow, peak = warm_phase(quarter * PAGE_SIZE, peak)
        t0 = time.perf_counter()
        rows[:, 0] = 0xA5
        cow_s = time.perf_counter() - t0
        touch_unm, peak = warm_phase(unm.nbytes, peak)
        t0 = time.perf_counter()
        unmerged = pool.unmerge(unm)
        unmerge_s = time.perf_counter() - t0
        n_unm = unm.nbytes // PAGE_SIZE
        peak = max(peak, _peak_rss())
        ok = bool(
            _equal(unm, data[quarter * PAGE_SIZE :])
            and np.all(rows[:, 0] == 0xA5)
            and _equal(rows[:, 1:], data[: quarter * PAGE_SIZE].reshape(quarter, PAGE_SIZE)[:, 1:])
        )
        del rows, cow, unm, data
    finally:
        pool.close()
    return {
        "side": "uksm",
        "bytes": size,
        "pages": npages,
        "pages_sharing": sharing,
        "merge_s": merge_s,
        "merge_cpu_s": merge_cpu,
        "merge_s_per_page": merge_s / npages,
        "merge_cpu_per_page": merge_cpu / npages,
        "steady_scans": scans,
        "steady_cpu_s": steady_cpu,
        "steady_us_per_page": steady_cpu / (scans * npages) * 1e6,
        "metadata_bytes_per_page": meta,
        "metadata_bytes_per_page_uss": uss_meta,
        "peak_rss_bytes": peak,
        "cow_us_per_page": cow_s / quarter * 1e6,
        "unmerge_us_per_page": unmerge_s / n_unm * 1e6,
        "touch_before_merge_us_per_page": touch_merge * 1e6,
        "touch_before_cow_us_per_page": touch_cow * 1e6,
        "touch_before_unmerge_us_per_page": touch_unm * 1e6,
        "pages_unmerged": unmerged,
        "contents_ok": ok,
    }


def _ksm_stat(pid: int) -> Dict[str, int]:
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if value.strip().lstrip("-").isdigit():
                    out[name] = int(value)
    except OSError:
        pass
    return out


def kernel_one(size: int, timeout: float) -> Dict[str, Any]:
    """The kernel side at one size, in this (child) process: its own
    private anonymous memory, madvised MADV_MERGEABLE, merged by ksmd.  The
    parent holds the kernelksm session that restores the knobs."""
    import mmap

    npages = size // PAGE_SIZE
    half = npages // 2
    quarter = half // 2
    mm, arr = kernelksm.alloc_private(size)
    try:
        mm.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages, as uksm's
        pages = arr.reshape(npages, PAGE_SIZE)
        fill_data(pages[:half])
        pages[half:] = pages[:half]
        kernelksm.write("run", kernelksm.KSM_RUN_STOP)
        kernelksm.write("pages_to_scan", PAGES_TO_SCAN)
        kernelksm.write("sleep_millisecs", 0)
        c0 = kernelksm.counters()
        want = math.ceil(TARGET * half)
        cpu0 = kernelksm.ksmd_cpu_seconds()
        t0 = time.perf_counter()
        mm.madvise(mmap.MADV_MERGEABLE)
        kernelksm.write("run", kernelksm.KSM_RUN_MERGE)
        try:
            while int(kernelksm.read("pages_sharing")) - c0["pages_sharing"] < want:
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"ksmd did not merge {want} pages in {timeout} s")
                time.sleep(0.002)
            merge_s = time.perf_counter() - t0
            merge_cpu = kernelksm.ksmd_cpu_seconds() - cpu0

            def scans_done(k0: int, n: int) -> None:
                t = time.perf_counter()
                while int(kernelksm.read("full_scans")) - k0 < n:
                    if time.perf_counter() - t > timeout:
                        raise RuntimeError("ksmd's full scans timed out")
                    time.sleep(0.002)

            scans_done(int(kernelksm.read("full_scans")), 3)  # settle
            k0 = kernelksm.counters()
            t0, cpu0 = time.perf_counter(), kernelksm.ksmd_cpu_seconds()
            while True:
                scans_done(k0["full_scans"], STEADY_SCANS)
                if time.perf_counter() - t0 >= STEADY_MIN_SECONDS:
                    break
                scans_done(int(kernelksm.read("full_scans")), 1)
            steady_cpu = kernelksm.ksmd_cpu_seconds() - cpu0
            k1 = kernelksm.counters()
        finally:
            kernelksm.write("run", kernelksm.KSM_RUN_STOP)
        scans = k1["full_scans"] - k0["full_scans"]
        per_scan = (
            k1["pages_scanned"]
            - k0["pages_scanned"]
            + k1.get("pages_skipped", 0)
            - k0.get("pages_skipped", 0)
        ) / max(scans, 1)
        stat = _ksm_stat(os.getpid())
        rmap = stat.get("ksm_rmap_items", 0)
        shared = k1["pages_shared"] - c0["pages_shared"]
        sharing = k1["pages_sharing"] - c0["pages_sharing"]
        rows = pages[half : half + quarter]
        touch_cow, peak = warm_phase(quarter * PAGE_SIZE, 0)
        t0 = time.perf_counter()
        rows[:, 0] = 0xA5
        cow_s = time.perf_counter() - t0
        region = half + quarter
        touch_unm, peak = warm_phase((npages - region) * PAGE_SIZE, peak)
        t0 = time.perf_counter()
        mm.madvise(mmap.MADV_UNMERGEABLE, region * PAGE_SIZE, (npages - region) * PAGE_SIZE)
        unmerge_s = time.perf_counter() - t0
        n_unm = npages - region
        peak = max(peak, _peak_rss())
        ok = bool(
            _equal(pages[region:], pages[quarter:half])
            and np.all(rows[:, 0] == 0xA5)
            and _equal(rows[:, 1:], pages[:quarter, 1:])
        )
        del rows, pages
    finally:
        del arr
        kernelksm.free_private(mm)
        kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
        kernelksm.write("run", kernelksm.KSM_RUN_STOP)
    return {
        "side": "kernel",
        "bytes": size,
        "pages": npages,
        "pages_sharing": sharing,
        "merge_s": merge_s,
        "merge_cpu_s": merge_cpu,
        "merge_s_per_page": merge_s / npages,
        "merge_cpu_per_page": merge_cpu / npages,
        "steady_scans": scans,
        "steady_cpu_s": steady_cpu,
        "steady_us_per_page": steady_cpu / (scans * npages) * 1e6,
        # ksmd walks every mergeable VMA of every process: more than ours
        # on its list and the steady CPU is not ours alone
        "foreign_pages": per_scan > 1.5 * npages + PAGES_TO_SCAN,
        "ksm_rmap_items": rmap,
        "pages_shared": shared,
        "metadata_bytes_per_page": (rmap * RMAP_ITEM_BYTES + shared * STABLE_NODE_BYTES) / npages,
        "peak_rss_bytes": peak,
        "cow_us_per_page": cow_s / quarter * 1e6,
        "unmerge_us_per_page": unmerge_s / n_unm * 1e6,
        "touch_before_cow_us_per_page": touch_cow * 1e6,
        "touch_before_unmerge_us_per_page": touch_unm * 1e6,
        "contents_ok": ok,
    }


# -- the parent --------------------------------------------------------------------------


def _child(side: str, size: int, timeout: float) -> Dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "uksm.bench.scale", "child", side, str(size), str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout * 4 + 120,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(
            f"{side} at {size // MiB} MiB failed ({proc.returncode}):\n"
            f"{proc.stderr.strip()[-3000:]}"
        )
    result: Dict[str, Any] = json.loads(lines[-1])
    return result


def _restore_defaults() -> Dict[str, Any]:
    """run=0, pages_to_scan=100, sleep_millisecs=20: this machine's KSM as
    it is to be left, checked."""
    if not os.path.isdir(kernelksm.KSM_DIR) or not kernelksm.available():
        return {}
    for name in ("run", "sleep_millisecs", "pages_to_scan"):
        if kernelksm.read(name) != KSM_DEFAULTS[name]:
            kernelksm.write(name, KSM_DEFAULTS[name])
    return {name: kernelksm.read(name) for name in KSM_DEFAULTS}


def machine() -> Dict[str, Any]:
    from .harness import machine_facts

    return machine_facts()


def run(
    sizes: Sequence[int],
    output: str,
    kernel: bool = True,
    timeout: float = 600.0,
    command: str = "",
    out: Optional[IO[str]] = None,
) -> Dict[str, Any]:
    """Measure every size on both sides (the kernel where it may be
    driven), write scale.json, scale.md and scale.png into @output."""
    say = out if out is not None else sys.stdout
    reason = kernelksm.unavailable_reason() if kernel else "not requested (--no-kernel)"
    results: Dict[str, Any] = {
        "uksm_bench_scale": 1,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "workload": "fresh duplicates: half the pool data (every page different), the "
        "other half a copy of it; merged until 99% of the copies share",
        "kernel_side": {"available": reason is None, "reason": reason},
        "parameters": {
            "uksm_pages_to_scan": UKSM_PAGES_TO_SCAN,
            "kernel_pages_to_scan": PAGES_TO_SCAN,
            "sleep_millisecs": 0,
            "target": TARGET,
            "steady_scans": STEADY_SCANS,
            "rmap_item_bytes": RMAP_ITEM_BYTES,
            "stable_node_bytes": STABLE_NODE_BYTES,
        },
        "sizes": [],
        "status": "running",
    }
    t_start = time.perf_counter()
    m = results["machine"]
    say.write(
        f"uksm bench --scale: {m.get('cpu_model')}, {m['cpu_count']} CPUs, "
        f"{m['kernel']}; sizes {', '.join(_size(s) for s in sizes)}; kernel KSM "
        + ("measured" if reason is None else f"not available ({reason})")
        + "\n"
    )
    say.flush()
    try:
        for size in sizes:
            row: Dict[str, Any] = {"bytes": size, "uksm": None, "kernel": None}
            results["sizes"].append(row)
            row["uksm"] = _child("uksm", size, timeout)
            say.write(f"  {_size(size):>8s} uksm   {_line(row['uksm'])}\n")
            say.flush()
            if reason is None:
                with kernelksm.session(pages_to_scan=PAGES_TO_SCAN, sleep_millisecs=0):
                    row["kernel"] = _child("kernel", size, timeout)
                say.write(f"  {_size(size):>8s} kernel {_line(row['kernel'])}\n")
                say.flush()
        results["status"] = "done"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        raise
    except Exception as e:
        results["status"] = f"error: {type(e).__name__}: {e}"
        raise
    finally:
        results["kernel_knobs_after"] = _restore_defaults()
        results["seconds"] = time.perf_counter() - t_start
        write(results, output)
        say.write(f"wrote {output}/scale.json, scale.md, scale.png\n")
    return results


def _size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def _line(r: Dict[str, Any]) -> str:
    return (
        f"merge {r['merge_s']:.3f} s, steady {r['steady_us_per_page']:.3f} us/page/scan, "
        f"metadata {r['metadata_bytes_per_page']:.1f} B/page, peak RSS "
        f"{r['peak_rss_bytes'] / MiB:.0f} MiB, COW {r['cow_us_per_page']:.2f} us/page, "
        f"unmerge {r['unmerge_us_per_page']:.2f} us/page"
    )


def _num(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    return (
        f"{v:,.0f}"
        if a >= 1000
        else f"{v:.0f}"
        if a >= 100
        else f"{v:.1f}"
        if a >= 10
        else f"{v:.3g}"
    )


def markdown(results: Dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# uksm bench --scale: cost per page against pool size",
        "",
        f"{m.get('cpu_model') or 'unknown CPU'}, {m['cpu_count']} CPUs, {m['kernel']}; "
        f"run {results['started']} with `{results['command'] or 'python -m uksm bench --scale'}`"
        f" ({results['status']}, {results.get('seconds', 0):.0f} s).",
        "",
        f"Workload: {results['workload']}.  Kernel KSM: "
        + (
            "measured in the same run (ksmd, MADV_MERGEABLE in a child process)."
            if results["kernel_side"]["available"]
            else f"not available ({results['kernel_side']['reason']})."
        ),
        "",
    ]
    head = "| pool size | metric | uksm | kernel | uksm / kernel | unit |"
    lines += [head, "|---|---|---|---|---|---|"]
    for row in results["sizes"]:
        for f in FIELDS:
            label, unit, scale = LABELS[f]
            u = row["uksm"][f] * scale if row["uksm"] else None
            k = row["kernel"][f] * scale if row["kernel"] else None
            r = u / k if u is not None and k else None
            lines.append(
                f"| {_size(row['bytes'])} | {label} | {_num(u)} | {_num(k)} | "
                f"{'n/a' if r is None else f'{r:.3g}'} | {unit} |"
            )
    lines += [
        "",
        "Lower is better in every row.  Metadata: uksm's own bookkeeping "
        "(stats()['metadata_bytes_per_page']); the kernel's ksm_rmap_items "
        f"(/proc/<pid>/ksm_stat) x {RMAP_ITEM_BYTES} B plus stable nodes "
        f"(pages_shared) x {STABLE_NODE_BYTES} B.",
        "",
        "![scale](scale.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results: Dict[str, Any], path: str) -> None:
    """Log-log: each cost per page against pool size, both sides."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    fig = Figure(figsize=(14, 8.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4).ravel()
    done = [r for r in results["sizes"] if r["uksm"]]
    for ax, f in zip(axes, FIELDS):
        label, unit, scale = LABELS[f]
        for side, style in (("uksm", "o-"), ("kernel", "s--")):
            pts = [
                (r["bytes"] / MiB, r[side][f] * scale)
                for r in done
                if r[side] and r[side][f] and r[side][f] > 0
            ]
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    label="uksm" if side == "uksm" else "kernel KSM",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["bytes"] / MiB for r in done])
        ax.set_xticklabels([_size(r["bytes"]) for r in done], fontsize=7, rotation=30)
        # 1-2-5 steps on the cost axis, printed plainly: a panel whose
        # costs stay within one decade still has numbers to read
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"{label}\n({unit}; lower is better)", fontsize=9)
        ax.set_xlabel("pool size", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_axis_off()
    m = results["machine"]
    fig.suptitle(
        f"uksm and kernel KSM, cost per page against pool size (fresh duplicates)\n"
        f"{m.get('cpu_model') or 'unknown CPU'}, {m['cpu_count']} cores, "
        f"{m['kernel']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path)


def write(results: Dict[str, Any], output: str) -> None:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "scale.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(os.path.join(output, "scale.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(output, "scale.png"))


def _main(argv: List[str]) -> int:
    if len(argv) == 4 and argv[0] == "child" and argv[1] in ("uksm", "kernel"):
        fn = uksm_one if argv[1] == "uksm" else kernel_one
        print(json.dumps(fn(int(argv[2]), float(argv[3]))))
        return 0
    print("usage: python -m uksm.bench.scale child uksm|kernel BYTES TIMEOUT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
