"""The memory model against the kernel and numpy, side by side in one run.

A pool's pages are private anonymous memory until merged, MAP_PRIVATE views
of a frame once merged, views of a swap slot once swapped (csrc/uksm.h).
The promise of that model is that a pool array costs what the kernel's own
memory costs: a copy on write like the kernel KSM's, a fork like numpy's,
read(2) and np.save like numpy's.  Each figure below is therefore measured
next to its reference in the same run, round by round in alternation, and
reported as a ratio (absolute times on a shared 2-vCPU VM wander by 2x and
more within minutes; a ratio of two figures taken side by side much less).
Every timing is the median of several rounds after a warm-up round.

  COW break    one byte written into each page of the merged half of the
               duplicate-pairs layout (page i equals page N + i, N = size/16
               pages, all pairs merged: pages_sharing == N), us/page, for
               cow="kernel", cow="signal", and the kernel's KSM on the same
               layout in MADV_MERGEABLE private memory.  Goal: kernel mode
               <= 1.2 x the kernel KSM.
  fork         a process holding a pool array of `size` bytes (all written,
               half of the pages merged in pairs, then the budget lowered
               until 10% of the pages are swapped) against one holding a
               numpy array of the same layout.  The two are forked "holder"
               processes driven in alternation (each fork copies all that a
               process holds, so one process cannot hold both).  os.fork()
               in the holder, the child exiting at once: goal <= 3 x.  The
               memory added by a child that writes nothing (goal <= 1% of
               the pool) and by one that writes one byte into every tenth
               page (goal <= 12%), by the child's USS and by the drop of the
               system's MemAvailable (system-wide: other processes'
               allocations show in it too, so its rounds scatter).  After
               the last child has measured, the holder writes into every
               hundredth page: each side must see its own writes only.
  multiprocessing
               a fork-start multiprocessing.Pool(4) started and one map over
               a trivial function, in the pool's holder against the numpy
               holder (goal <= 3 x).
  read(2)      size/4 bytes read from a file in the page cache into a fully
               merged pool array (every page a view: the kernel copies each
               on write) against a fresh numpy array (goal <= 2 x), and
               against the kernel KSM's merged memory.
  np.save      of a pool array of size/4 bytes whose pages are all swapped
               out, afresh each round: with the swap file's pages on disk,
               as reclaim leaves them (goal <= 2 x numpy), then again with
               them in the page cache; numpy's np.save of the same bytes;
               and the disk's floor, a cold read(2) of the same bytes from
               the same directory plus numpy's np.save.  The files must be
               identical.

    python bench/bench_memory_model.py [--size-mib N] [--rounds R] [--json FILE]

prints the table (Markdown), and every figure as JSON to FILE; the size
defaults to 1024 MiB, whose fork case needs about 3 GiB of free memory.
Under pytest, `--benchmark-disable` is the CI smoke run: size 16 MiB, one
round, no warm-up, and only the data is checked (merged copies intact after
a COW break, each side of a fork seeing its own writes only, bytes read and
saved identical), never the speed.  The kernel KSM parts need root and
/sys/kernel/mm/ksm; without them they are left out (n/a).  The KSM knobs
are left at run=0, pages_to_scan=100, sleep_millisecs=20.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import gc
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest

import uksm
from uksm import _core
from uksm.bench import kernelksm, measure

MiB = measure.MiB
PAGE = measure.PAGE
pages_of = measure.pages_of

DEFAULT_MIB = 1024
SMOKE_MIB = 16
DEFAULT_ROUNDS = 5
WARMUP = 1
MERGE_SCANS_MAX = 20  # full scans allowed to reach pages_sharing == N
SWAPPED_FRACTION = 0.10

# the knobs /sys/kernel/mm/ksm is left with, whatever happens
KSM_DEFAULTS = {"run": kernelksm.KSM_RUN_STOP, "pages_to_scan": 100, "sleep_millisecs": 20}

GOALS = {
    "cow_kernel": ("ratio", 1.2),
    "fork_time": ("ratio", 3.0),
    "fork_idle_uss": ("uksm", 0.01),
    "fork_idle_avail": ("uksm", 0.01),
    "fork_write_uss": ("uksm", 0.12),
    "fork_write_avail": ("uksm", 0.12),
    "mp_pool": ("ratio", 3.0),
    "read_merged": ("ratio", 2.0),
    "save_swapped": ("ratio", 2.0),
}


def sizes(size_mib: int) -> Dict[str, int]:
    """The workloads of one run, scaled from --size-mib (1024: 64 MiB of
    merged pages for the COW break, 1 GiB for fork, 256 MiB for I/O)."""
    size = size_mib * MiB
    return {"pool": size, "cow_pairs": max(size // 16 // PAGE, 16), "io": max(size // 4, 64 * PAGE)}


def median(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


# -- layouts ---------------------------------------------------------------------


def pairs_reference(n: int) -> np.ndarray:
    """What page i < n of measure.fill_pairs(arr, n) holds, as (n, PAGE)."""
    ref = np.empty((n, PAGE), np.uint8)
    idx = np.arange(n, dtype=np.int64)
    ref[:] = (idx & 0xFF).astype(np.uint8)[:, None]
    ref.view(np.uint32)[:, 2] = idx.astype(np.uint32)
    return ref


def fill_model(arr: np.ndarray) -> None:
    """The fork workload: the first half of the pages duplicate pairs (page
    i equals page h/2 + i; none all-zero), the second half all different."""
    p = pages_of(arr)
    h = len(p) // 2
    measure.fill_pairs(p[:h], h // 2)
    p[:h].view(np.uint32)[:, 3] = 0xFFFFFFFF
    p[h:] = 0x5A
    p[h:].view(np.uint64)[:, 0] = np.arange(len(p) - h, dtype=np.uint64) + (1 << 40)


def model_last_bytes(npages: int) -> np.ndarray:
    """The last byte of every page of fill_model()."""
    h = npages // 2
    out = np.full(npages, 0x5A, np.uint8)
    out[:h] = (np.arange(h) % (h // 2)) & 0xFF
    return out


def check_model(arr: np.ndarray, last: np.ndarray, full: bool = True) -> Optional[str]:
    """None if @arr holds fill_model()'s layout with last bytes @last, else
    what differs: the last byte of every page, and with @full every byte
    (in chunks: no temporaries the size of @arr)."""
    p = pages_of(arr)
    if not np.array_equal(p[:, -1], last):
        bad = np.flatnonzero(p[:, -1] != last)
        return f"last bytes of {len(bad)} pages, first at page {bad[0]}"
    if not full:
        return None
    npages = len(p)
    h = npages // 2
    q = h // 2
    idx = np.arange(h) % q
    if not np.array_equal(p[:h, 0], (idx & 0xFF).astype(np.uint8)):
        return "pairs half: first bytes"
    if not np.array_equal(p[:h].view(np.uint32)[:, 2], idx.astype(np.uint32)):
        return "pairs half: page stamps"
    if not np.all(p[:h].view(np.uint32)[:, 3] == 0xFFFFFFFF):
        return "pairs half: markers"
    if not np.array_equal(
        p[h:].view(np.uint64)[:, 0], np.arange(npages - h, dtype=np.uint64) + (1 << 40)
    ):
        return "distinct half: page stamps"
    for i in range(0, q, 2048):
        j = min(i + 2048, q)
        if not np.array_equal(p[i:j, 1:-1], p[q + i : q + j, 1:-1]):
            return f"pairs half: pages {i}..{j} differ from their twins"
    for i in range(h, npages, 2048):
        if not np.all(p[i : i + 2048, 8:-1] == 0x5A):
            return f"distinct half: page contents at {i}"
    return None


def merge_until(pool: uksm.Pool, sharing: int) -> dict:
    """pool.scan(2), then one full scan at a time, until pages_sharing ==
    @sharing; RuntimeError if MERGE_SCANS_MAX full scans do not get there."""
    st = pool.scan(full_scans=2)
    scans = 2
    while st["pages_sharing"] < sharing and scans < MERGE_SCANS_MAX:
        st = pool.scan(full_scans=1)
        scans += 1
    if st["pages_sharing"] != sharing:
        raise RuntimeError(
            f"uksm merged {st['pages_sharing']} of {sharing} pages in {scans} full scans"
        )
    return st


def state_counts(pool: uksm.Pool, arr: np.ndarray) -> Dict[str, int]:
    state, _, _ = pool.page_states(arr)
    names = {
        _core.PTE_PRIVATE: "private",
        _core.PTE_KSM: "ksm",
        _core.PTE_ZERO: "zero",
        _core.PTE_SWAPPED: "swapped",
    }
    return {name: int(np.count_nonzero(state == code)) for code, name in names.items()}


# -- /proc ------------------------------------------------------------------------


def mem_available() -> int:
    """MemAvailable in bytes, the per-CPU counters folded in first
    (vm/stat_refresh, root only) so that it is current."""
    try:
        with open("/proc/sys/vm/stat_refresh", "w") as f:
            f.write("1")
    except OSError:
        time.sleep(1.1)  # vm.stat_interval: the counters fold every second
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def uss_of(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_full_info().uss


def maps_count() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


# -- 1. COW break ---------------------------------------------------------------


def _uksm_cow_round(n: int, cow: str, ref: np.ndarray) -> Dict:
    w = measure.UksmPairs(n, pages_to_scan=10000, sleep_millisecs=0, cow=cow, use_zero_pages=False)
    try:
        merge_until(w.pool, n)
        before = state_counts(w.pool, w.arr)
        st0 = w.pool.stats()
        pages = pages_of(w.arr)
        t0 = time.perf_counter()
        pages[n:, 0] = 0xA5
        dt = time.perf_counter() - t0
        st1 = w.pool.stats()
        after = state_counts(w.pool, w.arr)
        checks = {
            "all_merged_before": before["ksm"] == 2 * n,
            "twin_intact": bool(np.array_equal(pages[:n], ref)),
            "written": bool(
                np.all(pages[n:, 0] == 0xA5) and np.array_equal(pages[n:, 1:], ref[:, 1:])
            ),
            "cow_breaks": st1["cow_breaks"] - st0["cow_breaks"] == n,
            "cow_breaks_signal": (
                st1["cow_breaks_signal"] - st0["cow_breaks_signal"] == (n if cow == "signal" else 0)
            ),
            "states_after": after["private"] == n and after["ksm"] == n,
        }
        return {
            "us_per_page": dt / n * 1e6,
            "checks": checks,
            "cow_breaks": st1["cow_breaks"] - st0["cow_breaks"],
            "pages_sharing_after": st1["pages_sharing"],
        }
    finally:
        w.close()


def _kernel_cow_round(n: int, ref: np.ndarray) -> Dict:
    w = measure.KernelPairs(n)
    try:
        c = w.converge(target=1.0)
        pages = pages_of(w.arr)
        t0 = time.perf_counter()
        pages[n:, 0] = 0xA5
        dt = time.perf_counter() - t0
        checks = {
            "all_merged_before": bool(c["converged"] and c["pages_sharing"] >= n),
            "twin_intact": bool(np.array_equal(pages[:n], ref)),
            "written": bool(
                np.all(pages[n:, 0] == 0xA5) and np.array_equal(pages[n:, 1:], ref[:, 1:])
            ),
        }
        del pages
        return {
            "us_per_page": dt / n * 1e6,
            "checks": checks,
            "pages_sharing_before": c["pages_sharing"],
        }
    finally:
        w.close()
        kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
        kernelksm.write("run", kernelksm.KSM_RUN_STOP)


def cow_break(n: int, rounds: int, warmup: int = WARMUP, kernel: bool = True) -> Dict:
    """us/page of a COW break on N merged pages: uksm in both COW modes and
    the kernel KSM, round by round side by side (the first @warmup rounds
    not counted)."""
    ref = pairs_reference(n)
    out = {"pages": n, "kernel": [], "signal": [], "ksm": []}
    use_kernel = kernel and kernelksm.available()
    out["ksm_skipped"] = (
        None if use_kernel else ("not asked" if not kernel else kernelksm.unavailable_reason())
    )

    def rounds_loop():
        for r in range(warmup + rounds):
            for cow in ("kernel", "signal"):
                res = _uksm_cow_round(n, cow, ref)
                res["warmup"] = r < warmup
                out[cow].append(res)
            if use_kernel:
                res = _kernel_cow_round(n, ref)
                res["warmup"] = r < warmup
                out["ksm"].append(res)

    if use_kernel:
        with kernelksm.session(pages_to_scan=10000, sleep_millisecs=0):
            rounds_loop()
    else:
        rounds_loop()
    for key in ("kernel", "signal", "ksm"):
        out[key + "_us"] = median(r["us_per_page"] for r in out[key] if not r["warmup"])
    out["checks"] = {
        f"{key}: {name}": ok
        for key in ("kernel", "signal", "ksm")
        for r in out[key]
        for name, ok in r["checks"].items()
    }
    return out


# -- 2 and 3. fork and multiprocessing ----------------------------------------------


def _trivial(x: int) -> int:
    return x * 2


class ModelProcess:
    """This process holding @size bytes in fill_model()'s layout, either in
    a pool (half merged, 10% of the pages swapped) or in a numpy array."""

    def __init__(self, kind: str, size: int, swap_dir: Optional[str] = None) -> None:
        self.kind = kind
        self.size = size
        self.npages = size // PAGE
        self.pool = None
        self.info: Dict = {}
        t0 = time.perf_counter()
        if kind == "uksm":
            batch = min(2 * MiB, max(64 * 1024, size // 256))
            self.pool = uksm.Pool(
                2 * size,
                max_resident=2 * size,
                swap_path=swap_dir,
                swap_batch=batch,
                pages_to_scan=10000,
                sleep_millisecs=0,
            )
            self.arr = self.pool.empty(size, np.uint8)
            fill_model(self.arr)
            st = merge_until(self.pool, self.npages // 4)
            self.info["merged"] = state_counts(self.pool, self.arr)
            self.info["bytes_resident_merged"] = st["bytes_resident"]
            self._swap_out(SWAPPED_FRACTION)
            st = self.pool.stats()
            self.info.update(
                states=state_counts(self.pool, self.arr),
                pages_swapped=st["pages_swapped"],
                swapped_fraction=st["pages_swapped"] / self.npages,
                max_resident=self.pool.max_resident,
                bytes_resident=st["bytes_resident"],
                swap_file_bytes=st["swap_file_bytes"],
            )
        else:
            self.arr = np.empty(size, np.uint8)
            fill_model(self.arr)
        self.info["build_seconds"] = time.perf_counter() - t0
        self.info["maps"] = maps_count()
        self.last = model_last_bytes(self.npages)

    def _swap_out(self, fraction: float) -> None:
        """Lower max_resident until @fraction of the pages are swapped (a
        swapped frame takes all its views along: step by half the deficit)."""
        want = int(fraction * self.npages)
        slack = max(self.npages // 200, 1)
        budget = self.pool.stats()["bytes_resident"]
        for _ in range(64):
            st = self.pool.stats()
            deficit = want - st["pages_swapped"]
            if deficit <= slack:
                return
            budget = min(budget, st["bytes_resident"]) - max(deficit // 2, 1) * PAGE
            self.pool.max_resident = budget
        raise RuntimeError(
            f"could not swap out {fraction:.0%} of the pool: "
            f"{self.pool.stats()['pages_swapped']} of {self.npages} pages"
        )

    # -- fork ----------------------------------------------------------------------

    def fork_times(self, rounds: int, warmup: int = WARMUP) -> List[float]:
        gc.collect()
        times = []
        for _ in range(warmup + rounds):
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            times.append(time.perf_counter() - t0)
            _, status = os.waitpid(pid, 0)
            if status:
                raise RuntimeError(f"forked child exited with status {status:#x}")
        return times[warmup:]

    def child_memory(self, write: bool, parent_marks: bool, settle: float = 0.2) -> Dict:
        """Fork a child that writes nothing, or one byte into every tenth
        page, and waits.  Its USS and the drop of MemAvailable (against the
        mean of before the fork and after the child is gone) are taken
        while it waits.  Then (@parent_marks) the parent writes into every
        hundredth page, and both sides check that each sees its own writes
        only (the last byte of every page; with @parent_marks every byte)."""
        p = pages_of(self.arr)
        mine = slice(5, None, 100)  # the parent's pages, after the fork
        child_last = self.last.copy()
        if write:
            child_last[::10] = 0xC3
        gc.collect()
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        avail0 = mem_available()
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                os.close(ready_r)
                os.close(go_w)
                if write:
                    p[::10, -1] = 0xC3
                os.write(ready_w, b"r")
                os.read(go_r, 1)
                err = check_model(self.arr, child_last, full=parent_marks)
                msg = b"ok" if err is None else err.encode()
                os.write(ready_w, msg)
                code = 0 if err is None else 1
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(go_r)
        try:
            if os.read(ready_r, 1) != b"r":
                raise RuntimeError("forked child died before it was ready")
            time.sleep(settle)
            uss = uss_of(pid)
            avail1 = mem_available()
            if parent_marks:
                p[mine, -1] = 0xE7
            os.write(go_w, b"g")
            child_said = os.read(ready_r, 4096).decode(errors="replace")
        finally:
            os.close(go_w)
            _, status = os.waitpid(pid, 0)
            os.close(ready_r)
        time.sleep(settle)
        avail2 = mem_available()
        parent_last = self.last.copy()
        if parent_marks:
            parent_last[mine] = 0xE7
        parent_err = check_model(self.arr, parent_last, full=parent_marks)
        if parent_marks:
            p[mine, -1] = self.last[mine]  # back to the layout
        return {
            "uss": uss,
            "uss_fraction": uss / self.size,
            "avail_drop": (avail0 + avail2) / 2 - avail1,
            "avail_fraction": ((avail0 + avail2) / 2 - avail1) / self.size,
            "child_status": status,
            "child_check": child_said,
            "parent_check": parent_err or "ok",
            "ok": status == 0 and child_said == "ok" and parent_err is None,
        }

    # -- multiprocessing ---------------------------------------------------------

    def mp_times(self, rounds: int, warmup: int = WARMUP) -> List[float]:
        ctx = multiprocessing.get_context("fork")
        times = []
        gc.collect()
        for _ in range(warmup + rounds):
            t0 = time.perf_counter()
            workers = ctx.Pool(4)
            try:
                got = workers.map(_trivial, range(16))
                times.append(time.perf_counter() - t0)
            finally:
                workers.close()
                workers.join()
            if got != [_trivial(x) for x in range(16)]:
                raise RuntimeError(f"multiprocessing map returned {got}")
        return times[warmup:]

    def final(self) -> Dict:
        """The layout checked once more, and the pool's counters."""
        out = {"check": check_model(self.arr, self.last) or "ok"}
        if self.pool is not None:
            st = self.pool.stats()
            out["stats"] = {
                k: st[k]
                for k in (
                    "pages_swapped",
                    "frames_deferred",
                    "fork_detaches",
                    "cow_breaks",
                    "swap_ins",
                    "bytes_resident",
                )
            }
        return out

    def close(self) -> None:
        self.arr = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        gc.collect()


class Holder:
    """A forked process holding one ModelProcess, driven over two pipes, so
    that the pool's and numpy's rounds can alternate (each fork copies all
    a process holds: one process cannot hold both).  Both holders are forks
    of this process, so they differ only in what they hold."""

    OPS = ("fork_times", "child_memory", "mp_times", "final")
    live: List["Holder"] = []  # a holder closes the others' pipe ends

    def __init__(self, kind: str, size: int, swap_dir: Optional[str]) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        gc.collect()
        pid = os.fork()
        if pid == 0:
            os.close(cmd_w)
            os.close(res_r)
            for other in Holder.live:
                for f in (other.cmd, other.res):
                    os.close(f.fileno())
            self._serve(kind, size, swap_dir, cmd_r, res_w)  # never returns
        os.close(cmd_r)
        os.close(res_w)
        self.kind = kind
        self.pid = pid
        self.cmd = os.fdopen(cmd_w, "w")
        self.res = os.fdopen(res_r, "r")
        Holder.live.append(self)
        self.info = self._answer()

    @staticmethod
    def _serve(kind, size, swap_dir, cmd_r, res_w) -> None:
        code = 1
        try:
            with os.fdopen(cmd_r, "r") as cmd, os.fdopen(res_w, "w") as res:
                try:
                    proc = ModelProcess(kind, size, swap_dir)
                    res.write(json.dumps({"ok": proc.info}) + "\n")
                    res.flush()
                    for line in cmd:
                        req = json.loads(line)
                        if req["op"] == "quit":
                            break
                        if req["op"] not in Holder.OPS:
                            raise ValueError(f"unknown op {req['op']!r}")
                        answer = getattr(proc, req["op"])(**req["args"])
                        res.write(json.dumps({"ok": answer}) + "\n")
                        res.flush()
                    proc.close()
                    code = 0
                except BaseException:
                    import traceback

                    res.write(json.dumps({"error": traceback.format_exc()}) + "\n")
                    res.flush()
        finally:
            os._exit(code)

    def _answer(self):
        line = self.res.readline()
        if not line:
            raise RuntimeError(f"{self.kind} holder (pid {self.pid}) died")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.kind} holder failed:\n{msg['error']}")
        return msg["ok"]

    def call(self, op: str, **args):
        self.cmd.write(json.dumps({"op": op, "args": args}) + "\n")
        self.cmd.flush()
        return self._answer()

    def close(self) -> int:
        """Ask the holder to quit; kill it if it does not within 60 s."""
        try:
            self.cmd.write(json.dumps({"op": "quit"}) + "\n")
            self.cmd.flush()
        except OSError:
            pass
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                status = st
                break
            time.sleep(0.05)
        if status is None:
            os.kill(self.pid, 9)
            _, status = os.waitpid(self.pid, 0)
        if self in Holder.live:
            Holder.live.remove(self)
        for f in (self.cmd, self.res):
            try:
                f.close()
            except OSError:
                pass
        return status


def fork_and_mp(
    size: int,
    rounds: int,
    swap_dir: Optional[str],
    warmup: int = WARMUP,
    mem_rounds: Optional[int] = None,
) -> Dict:
    """fork time, children's memory and multiprocessing start: a holder
    process with the pool and one with the numpy array, round by round
    (the order alternating), the first @warmup rounds not counted."""
    mem_rounds = mem_rounds or max(1, rounds)
    out: Dict = {"size": size}
    holders: Dict[str, Holder] = {}
    try:
        for kind in ("uksm", "numpy"):
            holders[kind] = Holder(kind, size, swap_dir)
        res: Dict[str, Dict] = {
            k: {"info": h.info, "fork_s": [], "mp_s": [], "idle": [], "write": []}
            for k, h in holders.items()
        }

        def each(r):
            return ("uksm", "numpy") if r % 2 == 0 else ("numpy", "uksm")

        for r in range(warmup + rounds):
            for kind in each(r):
                t = holders[kind].call("fork_times", rounds=1, warmup=0)
                if r >= warmup:
                    res[kind]["fork_s"] += t
        for name, write in (("idle", False), ("write", True)):
            for r in range(mem_rounds):
                for kind in each(r):
                    res[kind][name].append(
                        holders[kind].call(
                            "child_memory", write=write, parent_marks=(r == mem_rounds - 1)
                        )
                    )
        for r in range(warmup + rounds):
            for kind in each(r):
                t = holders[kind].call("mp_times", rounds=1, warmup=0)
                if r >= warmup:
                    res[kind]["mp_s"] += t
        for kind, h in holders.items():
            res[kind]["final"] = h.call("final")
    finally:
        status = {kind: h.close() for kind, h in holders.items()}
    out.update(res)
    out["holder_status"] = status
    for kind in ("uksm", "numpy"):
        r = out[kind]
        r["fork_median_s"] = median(r["fork_s"])
        r["mp_median_s"] = median(r["mp_s"])
        for name in ("idle", "write"):
            r[name + "_uss_fraction"] = median(c["uss_fraction"] for c in r[name])
            r[name + "_avail_fraction"] = median(c["avail_fraction"] for c in r[name])
    info = out["uksm"]["info"]
    out["checks"] = {
        "uksm: 10% of the pages swapped": 0.09 <= info["swapped_fraction"] <= 0.13,
        "uksm: half the pages merged": info["merged"]["ksm"] == size // PAGE // 2,
    }
    for kind in ("uksm", "numpy"):
        r = out[kind]
        out["checks"][f"{kind}: layout intact after the forks"] = r["final"]["check"] == "ok"
        out["checks"][f"{kind}: holder exited cleanly"] = status[kind] == 0
        for name in ("idle", "write"):
            for i, c in enumerate(r[name]):
                out["checks"][f"{kind}: {name} child {i} saw its own writes only"] = c["ok"]
    return out


# -- 4. read(2) into merged pages, np.save of swapped pages --------------------------


def _read_into(path: str, arr: np.ndarray) -> float:
    mv = memoryview(arr).cast("B")
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(mv):
            k = f.readinto(mv[got:])
            if not k:
                raise RuntimeError(f"short read: {got} of {len(mv)} bytes")
            got += k
    dt = time.perf_counter() - t0
    mv.release()
    return dt


def read_merged(
    size: int, workdir: str, rounds: int, warmup: int = WARMUP, kernel: bool = True
) -> Dict:
    """read(2) of @size bytes (page cache warm) into a fully merged pool
    array, a fresh numpy array and (root) the kernel KSM's merged memory,
    round by round."""
    npages = size // PAGE
    n = npages // 2
    data = np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8)
    path = os.path.join(workdir, "read-source.bin")
    data.tofile(path)
    for _ in range(2):  # into the page cache
        with open(path, "rb") as f:
            while f.read(16 * MiB):
                pass
    out: Dict = {"size": size, "uksm": [], "numpy": [], "ksm": [], "checks": {}}
    use_kernel = kernel and kernelksm.available()
    if not use_kernel:
        out["ksm_skipped"] = "not asked" if not kernel else kernelksm.unavailable_reason()
    pool = uksm.Pool(
        2 * size + 16 * MiB, pages_to_scan=10000, sleep_millisecs=0, use_zero_pages=False
    )
    session = (
        kernelksm.session(pages_to_scan=10000, sleep_millisecs=0)
        if use_kernel
        else contextlib.nullcontext()
    )
    try:
        with session:
            for r in range(warmup + rounds):
                warm = r < warmup
                a = pool.empty(size, np.uint8)
                measure.fill_pairs(a, n)
                merge_until(pool, n)
                states = state_counts(pool, a)
                c0 = pool.stats()["cow_breaks"]
                dt = _read_into(path, a)
                st = pool.stats()
                out["uksm"].append(
                    {
                        "s": dt,
                        "warmup": warm,
                        "ksm_before": states["ksm"],
                        "cow_breaks": st["cow_breaks"] - c0,
                    }
                )
                out["checks"][f"uksm round {r}: all merged before"] = states["ksm"] == npages
                out["checks"][f"uksm round {r}: bytes read"] = bool(np.array_equal(a, data))
                out["checks"][f"uksm round {r}: every page copied"] = (
                    st["cow_breaks"] - c0 == npages
                )
                del a
                b = np.empty(size, np.uint8)
                dt = _read_into(path, b)
                out["numpy"].append({"s": dt, "warmup": warm})
                out["checks"][f"numpy round {r}: bytes read"] = bool(np.array_equal(b, data))
                del b
                if not use_kernel:
                    continue
                w = measure.KernelPairs(n)
                try:
                    c = w.converge(target=1.0)
                    dt = _read_into(path, w.arr)
                    out["ksm"].append(
                        {"s": dt, "warmup": warm, "pages_sharing": c["pages_sharing"]}
                    )
                    out["checks"][f"ksm round {r}: merged before"] = bool(
                        c["converged"] and c["pages_sharing"] >= n
                    )
                    out["checks"][f"ksm round {r}: bytes read"] = bool(np.array_equal(w.arr, data))
                finally:
                    w.close()
                    kernelksm.write("run", kernelksm.KSM_RUN_UNMERGE)
                    kernelksm.write("run", kernelksm.KSM_RUN_STOP)
    finally:
        pool.close()
        os.unlink(path)
    for key in ("uksm", "numpy", "ksm"):
        out[key + "_s"] = median(x["s"] for x in out[key] if not x["warmup"])
    return out


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def save_swapped(size: int, workdir: str, rounds: int, warmup: int = WARMUP) -> Dict:
    """np.save of a pool array whose pages are all swapped out, afresh each
    round: cold (the swap file's pages on disk, as reclaim leaves them),
    then warm (read once, so in the page cache); np.save of the same bytes
    in a numpy array; and the disk's floor: read(2) of the same bytes from a
    file in the same directory with its page cache dropped.  Files compared
    byte for byte.  The disk is synced before each timed step."""
    npages = size // PAGE
    data = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8)
    batch = min(2 * MiB, max(64 * 1024, size // 64))
    floor_path = os.path.join(workdir, "save-floor.bin")
    data.tofile(floor_path)
    floor_buf = np.ones(size, np.uint8)
    files = {k: os.path.join(workdir, f"save-{k}.npy") for k in ("cold", "warm", "numpy")}
    pool = uksm.Pool(2 * size, max_resident=2 * size, swap_path=workdir, swap_batch=batch)
    out: Dict = {"size": size, "rounds": [], "checks": {}}

    def timed(fn) -> float:
        os.sync()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    try:
        for r in range(warmup + rounds):
            a = pool.empty(size, np.uint8)
            a[:] = data
            pool.max_resident = PAGE
            st = pool.stats()
            rd = {
                "warmup": r < warmup,
                "pages_swapped": st["pages_swapped"],
                "swap_cached_before": st["bytes_swap_cached"],
            }
            rd["cold"] = timed(lambda a=a: np.save(files["cold"], a))
            rd["swap_cached_after_cold"] = pool.stats()["bytes_swap_cached"]
            rd["warm"] = timed(lambda a=a: np.save(files["warm"], a))
            rd["numpy"] = timed(lambda: np.save(files["numpy"], data))
            _drop_cache(floor_path)
            rd["floor_read"] = timed(lambda: _read_into(floor_path, floor_buf))
            rd["floor"] = rd["floor_read"] + rd["numpy"]
            out["rounds"].append(rd)
            ck = out["checks"]
            ck[f"round {r}: all swapped before"] = st["pages_swapped"] >= npages - 1
            ck[f"round {r}: cold file identical"] = filecmp.cmp(
                files["cold"], files["numpy"], shallow=False
            )
            ck[f"round {r}: warm file identical"] = filecmp.cmp(
                files["warm"], files["numpy"], shallow=False
            )
            ck[f"round {r}: still swapped after"] = (
                pool.stats()["pages_swapped"] == st["pages_swapped"]
            )
            ck[f"round {r}: floor bytes read"] = bool(np.array_equal(floor_buf, data))
            for f in files.values():
                os.unlink(f)
            del a
            pool.max_resident = 2 * size
    finally:
        pool.close()
        for f in list(files.values()) + [floor_path]:
            if os.path.exists(f):
                os.unlink(f)
    measured = [x for x in out["rounds"] if not x["warmup"]]
    for key in ("cold", "warm", "numpy", "floor_read", "floor"):
        out[key + "_s"] = median(x[key] for x in measured)
    return out


# -- rows and the table ---------------------------------------------------------------


def row(
    key: str, what: str, uksm_value, reference, ref_name: str, unit: str, goal: Optional[str] = None
) -> Dict:
    ratio = measure.ratio(uksm_value, reference)
    goal_on, limit = GOALS.get(key, (None, None))
    met = None
    if goal_on == "ratio" and ratio is not None:
        met = ratio <= limit
    elif goal_on == "uksm" and uksm_value is not None:
        met = uksm_value <= limit
    if goal is None and goal_on is not None:
        goal = f"ratio <= {limit:g}" if goal_on == "ratio" else f"uksm <= {limit * 100:g}% of pool"
    return {
        "key": key,
        "what": what,
        "uksm": uksm_value,
        "reference": reference,
        "reference_name": ref_name,
        "unit": unit,
        "ratio": ratio,
        "goal": goal or "-",
        "met": met,
    }


def cow_rows(c: Dict) -> List[Dict]:
    n = c["pages"]
    return [
        row(
            "cow_kernel",
            f'COW break, {n} merged pages, cow="kernel"',
            c["kernel_us"],
            c["ksm_us"],
            "kernel KSM",
            "us/page",
        ),
        row(
            "cow_signal",
            f'COW break, {n} merged pages, cow="signal"',
            c["signal_us"],
            c["ksm_us"],
            "kernel KSM",
            "us/page",
        ),
    ]


def fork_rows(f: Dict) -> List[Dict]:
    mib = f["size"] // MiB
    u, n = f["uksm"], f["numpy"]
    shape = f"{mib} MiB pool (half merged, {u['info']['swapped_fraction']:.0%} swapped)"
    return [
        row(
            "fork_time",
            f"os.fork() holding a {shape}",
            u["fork_median_s"],
            n["fork_median_s"],
            "numpy array",
            "s",
        ),
        row(
            "fork_idle_uss",
            "memory added by a child that writes nothing (its USS)",
            u["idle_uss_fraction"],
            n["idle_uss_fraction"],
            "numpy array",
            "fraction",
        ),
        row(
            "fork_idle_avail",
            "memory added by a child that writes nothing (MemAvailable drop)",
            u["idle_avail_fraction"],
            n["idle_avail_fraction"],
            "numpy array",
            "fraction",
        ),
        row(
            "fork_write_uss",
            "memory added by a child writing 10% of the pages (its USS)",
            u["write_uss_fraction"],
            n["write_uss_fraction"],
            "numpy array",
            "fraction",
        ),
        row(
            "fork_write_avail",
            "memory added by a child writing 10% of the pages (MemAvailable drop)",
            u["write_avail_fraction"],
            n["write_avail_fraction"],
            "numpy array",
            "fraction",
        ),
        row(
            "mp_pool",
            f"multiprocessing Pool(4) start + map, holding the {mib} MiB pool",
            u["mp_median_s"],
            n["mp_median_s"],
            "numpy array",
            "s",
        ),
    ]


def read_rows(r: Dict) -> List[Dict]:
    mib = r["size"] // MiB
    return [
        row(
            "read_merged",
            f"read(2) of {mib} MiB into a fully merged pool array",
            r["uksm_s"],
            r["numpy_s"],
            "fresh numpy array",
            "s",
        ),
        row(
            "read_merged_ksm",
            f"read(2) of {mib} MiB into merged memory",
            r["uksm_s"],
            r["ksm_s"],
            "kernel KSM",
            "s",
        ),
    ]


def save_rows(s: Dict) -> List[Dict]:
    mib = s["size"] // MiB
    what = f"np.save of a {mib} MiB pool array, all swapped out"
    return [
        row(
            "save_swapped", what + ", slots on disk", s["cold_s"], s["numpy_s"], "numpy array", "s"
        ),
        row(
            "save_swapped_warm",
            what + ", slots in the page cache",
            s["warm_s"],
            s["numpy_s"],
            "numpy array",
            "s",
        ),
        row(
            "save_swapped_floor",
            what + ", slots on disk, against the disk",
            s["cold_s"],
            s["floor_s"],
            "cold read(2) of the bytes + numpy's np.save",
            "s",
        ),
    ]


def fmt_value(value, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "fraction":
        return f"{value * 100:.2f}% of pool"
    if unit == "s":
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} {unit}"


def table(rows: List[Dict]) -> str:
    lines = ["| what | uksm | reference | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        ref = fmt_value(r["reference"], r["unit"])
        if r["reference"] is not None:
            ref += f" ({r['reference_name']})"
        lines.append(
            f"| {r['what']} | {fmt_value(r['uksm'], r['unit'])} | {ref} | "
            f"{measure.fmt(r['ratio'], 2)} | {r['goal']} | {met} |"
        )
    return "\n".join(lines)


def restore_ksm_defaults() -> Dict:
    """Leave /sys/kernel/mm/ksm stopped at its default scan rate (run=0,
    pages_to_scan=100, sleep_millisecs=20).  The sessions put back what
    they found; should that differ, a session of its own (which waits for
    any other process's session to end) writes the defaults.  Returns the
    knobs found different."""
    if not kernelksm.available():
        return {}
    if all(kernelksm.read(k) == v for k, v in KSM_DEFAULTS.items()):
        return {}
    with kernelksm.session(unmerge_first=False) as sess:
        found = {k: sess.saved[k] for k, v in KSM_DEFAULTS.items() if sess.saved[k] != v}
        sess.saved.update(KSM_DEFAULTS)  # what the session restores on exit
    return found


def run_all(
    size_mib: int,
    rounds: int,
    workdir: str,
    warmup: int = WARMUP,
    log: Callable[[str], None] = lambda s: None,
) -> Dict:
    sz = sizes(size_mib)
    result: Dict = {
        "size_mib": size_mib,
        "rounds": rounds,
        "warmup": warmup,
        "sizes": sz,
        "kernel_ksm": kernelksm.unavailable_reason() or "available",
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
    }
    try:
        log(f"COW break: {sz['cow_pairs']} pairs")
        result["cow"] = cow_break(sz["cow_pairs"], rounds, warmup)
        log(f"fork and multiprocessing: {sz['pool'] // MiB} MiB")
        result["fork"] = fork_and_mp(sz["pool"], rounds, workdir, warmup)
        log(f"read(2): {sz['io'] // MiB} MiB")
        result["read"] = read_merged(sz["io"], workdir, rounds, warmup)
        log(f"np.save: {sz['io'] // MiB} MiB")
        result["save"] = save_swapped(sz["io"], workdir, rounds, warmup)
    finally:
        result["ksm_knobs_reset"] = restore_ksm_defaults()
    result["rows"] = (
        cow_rows(result["cow"])
        + fork_rows(result["fork"])
        + read_rows(result["read"])
        + save_rows(result["save"])
    )
    result["checks"] = {
        f"{part}: {name}": ok
        for part in ("cow", "fork", "read", "save")
        for name, ok in result[part]["checks"].items()
    }
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size-mib",
        type=int,
        default=DEFAULT_MIB,
        help="pool size for fork and multiprocessing (COW: size/16 of "
        "merged pages, I/O: size/4); default %(default)s",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="measured rounds per figure, after one warm-up (default %(default)s)",
    )
    ap.add_argument("--json", metavar="FILE", help="write every figure here")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="uksm-bench-")
    t0 = time.perf_counter()
    try:
        result = run_all(
            args.size_mib,
            args.rounds,
            workdir,
            log=lambda s: print(f"  {s} ...", file=sys.stderr, flush=True),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    print(
        f"\nuksm memory model, {args.size_mib} MiB, median of {args.rounds} rounds "
        f"after {WARMUP} warm-up; kernel KSM: {result['kernel_ksm']}\n"
    )
    print(table(result["rows"]))
    bad = [name for name, ok in result["checks"].items() if not ok]
    print(
        f"\ndata checks: {len(result['checks']) - len(bad)} of {len(result['checks'])} "
        f"passed" + ("" if not bad else "; FAILED: " + "; ".join(bad))
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"figures written to {args.json}")
    return 1 if bad else 0


# -- pytest -------------------------------------------------------------------------
#
# One test per measurement; `--benchmark-disable` (benchmark.disabled) is the
# smoke run: SMOKE_MIB, one round and no warm-up, and only the data checked.


def _scale(benchmark):
    if benchmark.disabled:
        return sizes(SMOKE_MIB), 1, 0
    return sizes(DEFAULT_MIB), DEFAULT_ROUNDS, WARMUP


def _run(benchmark, fn):
    """fn() once under the benchmark fixture (it takes its own rounds)."""
    results = []
    benchmark.pedantic(lambda: results.append(fn()), rounds=1, iterations=1)
    return results[-1]


def _assert_checks(checks: Dict[str, bool]) -> None:
    bad = [name for name, ok in checks.items() if not ok]
    assert not bad, f"data checks failed: {bad}"


def _report(benchmark, shared, rows: List[Dict]) -> None:
    from uksm.bench.micro import report

    shared.cache.setdefault("memory_model_rows", {}).update({r["key"]: r for r in rows})
    for r in rows:
        report(
            benchmark,
            f"{r['what']}: uksm {fmt_value(r['uksm'], r['unit'])}, "
            f"{r['reference_name']} {fmt_value(r['reference'], r['unit'])}, ratio "
            f"{measure.fmt(r['ratio'], 2)} (goal {r['goal']})",
            **{r["key"]: r},
        )


@pytest.fixture
def ksm_defaults():
    yield
    restore_ksm_defaults()


@pytest.mark.benchmark(group="memory-model")
def test_cow_break(benchmark, shared, ksm_defaults):
    sz, rounds, warmup = _scale(benchmark)
    c = _run(benchmark, lambda: cow_break(sz["cow_pairs"], rounds, warmup))
    _assert_checks(c["checks"])
    assert c["kernel"] and c["signal"]
    if kernelksm.available():
        assert c["ksm"], "the kernel KSM part did not run"
    _report(benchmark, shared, cow_rows(c))


@pytest.mark.benchmark(group="memory-model")
def test_fork_and_multiprocessing(benchmark, shared):
    pytest.importorskip("psutil")
    sz, rounds, warmup = _scale(benchmark)
    f = _run(benchmark, lambda: fork_and_mp(sz["pool"], rounds, shared.tmpdir, warmup))
    _assert_checks(f["checks"])
    _report(benchmark, shared, fork_rows(f))


@pytest.mark.benchmark(group="memory-model")
def test_read_into_merged(benchmark, shared, ksm_defaults):
    sz, rounds, warmup = _scale(benchmark)
    r = _run(benchmark, lambda: read_merged(sz["io"], shared.tmpdir, rounds, warmup))
    _assert_checks(r["checks"])
    _report(benchmark, shared, read_rows(r))


@pytest.mark.benchmark(group="memory-model")
def test_save_swapped(benchmark, shared):
    sz, rounds, warmup = _scale(benchmark)
    s = _run(benchmark, lambda: save_swapped(sz["io"], shared.tmpdir, rounds, warmup))
    _assert_checks(s["checks"])
    _report(benchmark, shared, save_rows(s))


def test_memory_model_summary(shared):
    """This run's rows in one table (whatever of them this run measured)."""
    rows = shared.cache.get("memory_model_rows")
    if not rows:
        pytest.skip("no memory-model benchmark ran")
    print("\n\n" + table(list(rows.values())))


if __name__ == "__main__":
    sys.exit(main())
