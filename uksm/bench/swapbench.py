"""uksm.bench.swapbench - swap benchmarks: uksm's swap area, the raw I/O floor under
it, and the kernel's own swap, measured in the same run.

DOC: Overview

The swap benchmarks, as plain functions that bench/bench_swap.py (pytest)
and suite 5 of uksm.bench.harness (``python -m uksm bench``) both call:

  uksm_swap()   a pool holding N bytes of incompressible data, in three
                rounds: the budget is lowered (``pool.max_resident = B``)
                and timed until bytes_resident is within it (swap-out
                MiB/s: the pages written over that time, with and without
                the fdatasync of the swap file), then raised again; one
                element of each page of a sparse random sample of the
                swapped pages is read, each read timed (the fault latency
                of a swap-in: a swapped page is a private view of its slot,
                and reading it is the kernel's own file page fault, with
                its readahead), then one element of every other swapped
                page in address order (swap-in MiB/s).  A page read stays
                a view of its slot (only a write makes it private again),
                so each round ends by making every page private (pool.lock,
                untimed) for the next to swap out the same amount.  Round
                "cold" drops the fdatasync'ed swap file from the page cache
                first (POSIX_FADV_DONTNEED), so that the reads go to the
                disk as the kernel's swap-in does; round "warm" leaves it
                cached; round "unsynced" never writes it back (its slots
                are only in the page cache when they are read and freed).
                The contents are checked at the end.
  floor()       the same amount written and read with the raw syscalls
                uksm's swap path makes, on the same file system (a file in
                the same directory): pwritev of 256 pages a call
                (csrc/swap.c's IOV_BATCH) then fdatasync; pread of one page
                a call, in order and at the same sparse random pages, cold
                and warm.  A small C helper (compiled at run time, like
                bench/floor.c) does it; Python's os.pwritev/os.pread without
                a C compiler.
  KernelSwap    the kernel's swap, where root allows it: a swap file (dd,
                mkswap, swapon) and a memory cgroup for a child process
                (the same C helper) that touches N bytes; lowering the
                cgroup's memory limit to B is the swap-out (timed, bytes
                from the child's smaps_rollup Swap), raising it and reading
                the swapped pages in order the swap-in (with the kernel's
                swap readahead), single reads of sparse random swapped
                pages the fault latency.  Everything is put back on the
                way out, whatever the way out (an error, Ctrl-C, SIGTERM):
                the child is gone, the cgroup removed, the swap file
                swapoff'ed and deleted, and /proc/swaps and ``swapon
                --show`` are checked to read as before.

The cgroup is a cgroup v2 child of the root (memory.max lowered,
memory.swap.max unlimited, memory.zswap.max 0 so pages go to the swap file)
where /sys/fs/cgroup/cgroup.controllers lists memory.  On a cgroup v1
machine (the memory controller on /sys/fs/cgroup/memory), with
CGROUP_V1_FALLBACK set, it is a child of this process's own memory cgroup
(memory.limit_in_bytes, memsw unlimited): the same measurement through the
older interface, and the child stays inside this process's accounting.

Budgets and limits are the same for both sides: B = N / 4 by default.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np

from .. import _core
from . import kernelksm
from ..pool import Pool

PAGE = _core.PAGE_SIZE
MiB = 1 << 20
IOV_BATCH = 256          # csrc/swap.c: pages per pwritev
SPARSE = 16              # latency samples are at least this many pages apart
DEFAULT_SAMPLES = 2000   # latency samples per measurement
SWAP_DIR = "/var/tmp"    # where the kernel's swap file goes
NAME = "uksm-swapbench"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
# Measure the kernel's swap through cgroup v1's memory controller when the
# machine has no cgroup v2 memory controller (see the module's docstring).
CGROUP_V1_FALLBACK = True
LOCK_PATH = os.path.join("/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir(),
                         NAME + ".lock")

HELPER_SOURCE = r"""
/* SPDX-License-Identifier: MIT */
/*
 * swaphelper.c - uksm.bench.swapbench's helper, compiled at run time.
 *
 *   helper floor DIR PAGES SAMPLES SEED
 *       the raw I/O floor of uksm's swap path on DIR's file system: an
 *       O_TMPFILE (or unlinked) file; PAGES pages written with pwritev, 256
 *       pages a call, then fdatasync; read back one page a pread, in order,
 *       warm (page cache) and cold (after POSIX_FADV_DONTNEED); then
 *       SAMPLES single-page preads at sparse random pages (16 apart), cold,
 *       then the same pages warm; then those pages punched out one by one
 *       (fallocate PUNCH_HOLE, as csrc/swap.c frees a slot).  Prints
 *       "name value..." lines, seconds.
 *
 *   helper child PAGES SEED
 *       the kernel side's workload, driven over stdin: "fill" writes PAGES
 *       pages of private anonymous memory with xorshift words; "seq" reads
 *       one word of every page not resident (mincore) in order, timed;
 *       "lat K" reads one word of each of K sparse random non-resident
 *       pages, each timed; "dirty" rewrites one word a page; "quit".  Each
 *       answer is one line starting "ok".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PG		4096
#define IOV_BATCH	256
#define SPARSE		16

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static long majflt(void)
{
	struct rusage r;

	getrusage(RUSAGE_SELF, &r);
	return r.ru_majflt;
}

static void shuffle(size_t *a, size_t n)
{
	for (size_t i = n; i > 1; i--) {
		size_t j = next() % i, t = a[i - 1];

		a[i - 1] = a[j];
		a[j] = t;
	}
}

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void print_list(const char *name, const double *v, size_t n)
{
	printf("%s", name);
	for (size_t i = 0; i < n; i++)
		printf(" %.9f", v[i]);
	printf("\n");
}

static int open_tmp(const char *dir)
{
	char path[4096];
	int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);

	if (fd >= 0)
		return fd;
	snprintf(path, sizeof(path), "%s/uksm-floor-XXXXXX", dir);
	fd = mkstemp(path);
	if (fd >= 0)
		unlink(path);
	return fd;
}

static double read_all(int fd, char *page, size_t n)
{
	double t = now();

	for (size_t i = 0; i < n; i++)
		if (pread(fd, page, PG, (off_t)(i * PG)) != PG)
			die("pread");
	return now() - t;
}

static int floor_main(const char *dir, size_t n, size_t samples)
{
	struct iovec iov[IOV_BATCH];
	size_t *sample = malloc((n / SPARSE + 1) * sizeof(size_t)), m = 0;
	double *lat = malloc((n / SPARSE + 1) * sizeof(double));
	char *buf = aligned_alloc(PG, IOV_BATCH * PG), *page = aligned_alloc(PG, PG);
	int fd = open_tmp(dir);
	double t;

	if (fd < 0)
		die("open");
	if (!sample || !lat || !buf || !page)
		die("malloc");
	for (size_t i = 0; i < IOV_BATCH * PG / 8; i++)
		((uint64_t *)buf)[i] = next();
	t = now();
	for (size_t i = 0; i < n; i += IOV_BATCH) {
		size_t k = n - i < IOV_BATCH ? n - i : IOV_BATCH;

		for (size_t j = 0; j < k; j++) {
			iov[j].iov_base = buf + j * PG;
			iov[j].iov_len = PG;
		}
		if (pwritev(fd, iov, (int)k, (off_t)(i * PG)) != (ssize_t)(k * PG))
			die("pwritev");
	}
	printf("write_s %.9f\n", now() - t);
	t = now();
	if (fdatasync(fd))
		die("fdatasync");
	printf("sync_s %.9f\n", now() - t);
	printf("read_warm_s %.9f\n", read_all(fd, page, n));
	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	printf("read_cold_s %.9f\n", read_all(fd, page, n));
	for (size_t i = 0; i < n; i += SPARSE)
		sample[m++] = i;
	shuffle(sample, m);
	if (m > samples)
		m = samples;
	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	for (int pass = 0; pass < 2; pass++) {
		for (size_t j = 0; j < m; j++) {
			t = now();
			if (pread(fd, page, PG, (off_t)(sample[j] * PG)) != PG)
				die("pread");
			lat[j] = now() - t;
		}
		print_list(pass ? "lat_warm" : "lat_cold", lat, m);
	}
	/* what csrc/swap.c does to a slot it frees: punch it (written back) */
	for (size_t j = 0; j < m; j++) {
		t = now();
		if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      (off_t)(sample[j] * PG), PG))
			die("fallocate");
		lat[j] = now() - t;
	}
	print_list("punch", lat, m);
	close(fd);
	return 0;
}

static int child_main(size_t n)
{
	size_t *cand = malloc(n * sizeof(size_t));
	double *lat = malloc((n / SPARSE + 1) * sizeof(double));
	unsigned char *vec = malloc(n);
	volatile uint64_t sink = 0;
	char line[256], *m;

	if (!cand || !lat || !vec)
		die("malloc");
	m = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		die("mmap");
	madvise(m, n * PG, MADV_NOHUGEPAGE);	/* 4 KiB pages, as uksm's */
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "fill", 4)) {
			double t = now();

			for (size_t i = 0; i < n * PG / 8; i++)
				((uint64_t *)m)[i] = next();
			printf("ok %.9f\n", now() - t);
		} else if (!strncmp(line, "seq", 3)) {
			size_t k = 0;
			long f;
			double t;

			if (mincore(m, n * PG, vec))
				die("mincore");
			for (size_t i = 0; i < n; i++)
				if (!(vec[i] & 1))
					cand[k++] = i;
			f = majflt();
			t = now();
			for (size_t j = 0; j < k; j++)
				sink += *(volatile uint64_t *)(m + cand[j] * PG);
			t = now() - t;
			printf("ok %.9f %zu %ld\n", t, k, majflt() - f);
		} else if (!strncmp(line, "lat", 3)) {
			size_t want = strtoul(line + 3, NULL, 10), k = 0;
			long f;

			if (mincore(m, n * PG, vec))
				die("mincore");
			for (size_t i = 0; i < n; i += SPARSE)
				if (!(vec[i] & 1))
					cand[k++] = i;
			shuffle(cand, k);
			if (k > want)
				k = want;
			f = majflt();
			for (size_t j = 0; j < k; j++) {
				double t = now();

				sink += *(volatile uint64_t *)(m + cand[j] * PG);
				lat[j] = now() - t;
			}
			printf("ok %ld", majflt() - f);
			print_list("", lat, k);
		} else if (!strncmp(line, "dirty", 5)) {
			for (size_t i = 0; i < n; i++)
				*(uint64_t *)(m + i * PG) = next();
			printf("ok\n");
		} else if (!strncmp(line, "quit", 4)) {
			break;
		} else {
			printf("error unknown command\n");
		}
		fflush(stdout);
	}
	return (int)(sink & 0);
}

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "floor")) {
		rng ^= strtoull(argv[5], NULL, 0) * 0x2545F4914F6CDD1Dull;
		return floor_main(argv[2], strtoul(argv[3], NULL, 0), strtoul(argv[4], NULL, 0));
	}
	if (argc == 4 && !strcmp(argv[1], "child")) {
		rng ^= strtoull(argv[3], NULL, 0) * 0x2545F4914F6CDD1Dull;
		return child_main(strtoul(argv[2], NULL, 0));
	}
	fprintf(stderr, "usage: %s floor DIR PAGES SAMPLES SEED | child PAGES SEED\n", argv[0]);
	return 2;
}
"""


# -- helpers ----------------------------------------------------------------------------

def percentiles(seconds, overhead: float = 0.0) -> Dict:
    """p50, p99, mean and max in microseconds of latencies given in seconds,
    less a per-sample @overhead (seconds, clamped at zero)."""
    a = np.asarray(seconds, dtype=float)
    if a.size == 0:
        return {"n": 0, "p50_us": None, "p99_us": None, "mean_us": None, "max_us": None}
    a = np.maximum(a - overhead, 0.0) * 1e6
    return {"n": int(a.size), "p50_us": float(np.percentile(a, 50)),
            "p99_us": float(np.percentile(a, 99)), "mean_us": float(a.mean()),
            "max_us": float(a.max())}


def mib_s(nbytes: float, seconds: float) -> Optional[float]:
    if seconds is None or seconds <= 0:
        return None
    return nbytes / MiB / seconds


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def swap_dir(directory: Optional[str] = None) -> str:
    """The directory uksm's swap file (and the floor's file) goes in: the
    pool's default, the temp directory, unless told."""
    return directory or tempfile.gettempdir()


def settle() -> None:
    """sync(2) before a measurement: what the one before left dirty (or
    freed: the file system discards freed blocks at commit) is not written
    on this one's time."""
    os.sync()


_helper_lock = threading.Lock()
_helper: Dict[str, Optional[str]] = {}


def compile_helper() -> Optional[str]:
    """The C helper, built once per process with the system cc into a
    private temporary directory (removed at exit); None without cc."""
    with _helper_lock:
        if "exe" in _helper:
            return _helper["exe"]
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            _helper["exe"] = None
            return None
        workdir = tempfile.mkdtemp(prefix="uksm-swaphelper-")
        atexit.register(shutil.rmtree, workdir, True)
        src = os.path.join(workdir, "swaphelper.c")
        exe = os.path.join(workdir, "swaphelper")
        with open(src, "w") as f:
            f.write(HELPER_SOURCE)
        proc = subprocess.run([cc, "-O2", "-Wall", "-o", exe, src],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"compiling the swap benchmark helper failed:\n{proc.stderr}")
        _helper["exe"] = exe
        return exe


# -- the floor ---------------------------------------------------------------------------

_libc = None


def _punch(fd: int, offset: int, length: int) -> None:
    global _libc
    import ctypes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    if _libc.fallocate(fd, 3, offset, length):     # PUNCH_HOLE | KEEP_SIZE
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _floor_python(directory: str, pages: int, samples: int, seed: int) -> Dict:
    """floor() without a C compiler: the same syscalls from Python."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        fd, path = tempfile.mkstemp(prefix="uksm-floor-", dir=directory)
        os.unlink(path)
    try:
        rng = np.random.default_rng(seed)
        buf = rng.integers(0, 256, IOV_BATCH * PAGE, dtype=np.uint8)
        views = [memoryview(buf[j * PAGE:(j + 1) * PAGE]) for j in range(IOV_BATCH)]
        out: Dict = {}
        t = time.perf_counter()
        for i in range(0, pages, IOV_BATCH):
            k = min(IOV_BATCH, pages - i)
            os.pwritev(fd, views[:k], i * PAGE)
        out["write_s"] = time.perf_counter() - t
        t = time.perf_counter()
        os.fdatasync(fd)
        out["sync_s"] = time.perf_counter() - t

        def read_all() -> float:
            t0 = time.perf_counter()
            for i in range(pages):
                os.pread(fd, PAGE, i * PAGE)
            return time.perf_counter() - t0
        out["read_warm_s"] = read_all()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out["read_cold_s"] = read_all()
        sample = np.arange(0, pages, SPARSE)
        rng.shuffle(sample)
        sample = sample[:samples].tolist()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        pc = time.perf_counter
        for name in ("lat_cold", "lat_warm", "punch"):
            lat = []
            for p in sample:
                t0 = pc()
                if name == "punch":
                    _punch(fd, p * PAGE, PAGE)
                else:
                    os.pread(fd, PAGE, p * PAGE)
                lat.append(pc() - t0)
            out[name] = lat
        return out
    finally:
        os.close(fd)


def floor(nbytes: int, directory: Optional[str] = None, samples: int = DEFAULT_SAMPLES,
          seed: int = 1) -> Dict:
    """The raw pwrite/pread floor of uksm's swap path for @nbytes on
    @directory's file system (see the module docstring).  Throughputs in
    MiB/s, latencies in microseconds."""
    directory = swap_dir(directory)
    pages = max(nbytes // PAGE, 1)
    exe = compile_helper()
    if exe is not None:
        proc = subprocess.run([exe, "floor", directory, str(pages), str(samples), str(seed)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"swap floor helper failed ({proc.returncode}): {proc.stderr}")
        raw: Dict = {}
        for line in proc.stdout.splitlines():
            name, *vals = line.split()
            raw[name] = ([float(v) for v in vals] if name in ("lat_cold", "lat_warm", "punch")
                         else float(vals[0]))
        tool = "C helper (pwritev 256 pages a call, fdatasync, pread 1 page a call)"
    else:
        raw = _floor_python(directory, pages, samples, seed)
        tool = "Python os.pwritev/os.pread (no C compiler)"
    size = pages * PAGE
    cold = percentiles(raw["lat_cold"])
    warm = percentiles(raw["lat_warm"])
    punch = percentiles(raw["punch"])
    return {
        "bytes": size, "pages": pages, "directory": directory, "tool": tool,
        "write_s": raw["write_s"], "sync_s": raw["sync_s"],
        "write_cached_mib_s": mib_s(size, raw["write_s"]),
        "write_mib_s": mib_s(size, raw["write_s"] + raw["sync_s"]),
        "read_warm_mib_s": mib_s(size, raw["read_warm_s"]),
        "read_cold_mib_s": mib_s(size, raw["read_cold_s"]),
        "pread_cold_p50_us": cold["p50_us"], "pread_cold_p99_us": cold["p99_us"],
        "pread_warm_p50_us": warm["p50_us"], "pread_warm_p99_us": warm["p99_us"],
        "punch_p50_us": punch["p50_us"], "punch_p99_us": punch["p99_us"],
        "latency_samples": cold["n"],
    }


# -- uksm -------------------------------------------------------------------------------

def _new_fds(before: set) -> List[int]:
    try:
        now_fds = {int(x) for x in os.listdir("/proc/self/fd")}
    except OSError:
        return []
    return sorted(now_fds - before)


def _find_swap_fd(before: set, directory: str) -> Optional[int]:
    """The pool's swap file among the descriptors it opened: a regular file
    with no name left (O_TMPFILE or unlinked) on @directory's file system.
    (The memfd is on another file system; the directory's fd is O_PATH.)"""
    dev = os.stat(directory).st_dev
    for fd in _new_fds(before):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == dev and st.st_nlink == 0 and (st.st_mode & 0o170000) == 0o100000:
            return fd
    return None


def _swapped(pool: Pool, arr: np.ndarray) -> np.ndarray:
    state, _, _ = pool.page_states(arr)
    return np.flatnonzero(state == _core.PTE_SWAPPED)


def _lower(pool: Pool, budget: int, swap_fd: Optional[int], sync: bool,
           timeout: float) -> Dict:
    """Lower the budget to @budget bytes and time it until bytes_resident
    (private pages, frames and the swap file's cached pages, as the kernel
    counts them) is within it and pages_swapped is what that asks for;
    then, if @sync, fdatasync the swap file (timed).  Every page is
    private when this starts (see uksm_swap): all but the budget's worth of
    them are written out."""
    st = pool.stats()
    before_swapped = st["pages_swapped"]
    private = st["bytes_private"] // PAGE
    budget_pages = -(-budget // PAGE)
    expected = before_swapped + max(private - budget_pages, 0)
    outs0 = st["swap_outs"]
    t0 = time.perf_counter()
    pool.max_resident = budget

    def done(st):
        return st["bytes_resident"] <= budget and st["pages_swapped"] >= expected
    t_call = time.perf_counter() - t0
    st = pool.stats()
    while not done(st) and time.perf_counter() - t0 < timeout:
        time.sleep(0.0005)
        st = pool.stats()
    t_reached = time.perf_counter() - t0 if done(st) else None
    t_sync = None
    if sync and swap_fd is not None:
        t1 = time.perf_counter()
        os.fdatasync(swap_fd)
        t_sync = time.perf_counter() - t1
    return {"expected": expected - before_swapped,
            "pages_swapped": st["pages_swapped"] - before_swapped,
            "pages_written": st["swap_outs"] - outs0, "call_s": t_call,
            "reached_s": t_reached, "sync_s": t_sync, "reached": t_reached is not None,
            "bytes_resident_after": st["bytes_resident"],
            "bytes_swap_cached_after": st["bytes_swap_cached"],
            "reclaim_batches": st["reclaim_batches"], "swap_errors": st["swap_errors"]}


def _drop_cache(swap_fd: Optional[int]) -> bool:
    """Write-back done, drop the swap file from the page cache."""
    if swap_fd is None:
        return False
    os.posix_fadvise(swap_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


# uksm's rounds: (name, fdatasync the swap file after the swap-out, drop it
# from the page cache before the swap-in)
UKSM_PHASES = (("cold", True, True), ("warm", True, False), ("unsynced", False, False))


def uksm_swap(nbytes: int, budget: Optional[int] = None, directory: Optional[str] = None,
              swap_batch="2MiB", samples: int = DEFAULT_SAMPLES, seed: int = 1,
              timeout: float = 120.0) -> Dict:
    """uksm's swap-out and swap-in throughput and swap-in fault latency on
    @nbytes of incompressible data with the budget lowered to @budget
    (default nbytes / 4).  Three rounds (UKSM_PHASES), each: lower the
    budget (timed until bytes_resident is within it), raise it again, read
    one element of each of @samples sparse random swapped pages (each
    timed: the fault latency), then one element of every other swapped page
    in address order (timed: the swap-in throughput), then make every page
    private again (pool.lock and unlock, untimed: a page read stays a view
    of its slot, and the next round must write the same pages).
    Round "cold" fdatasyncs the swap file and drops it from the page cache
    first, round "warm" only fdatasyncs it, round "unsynced" neither (the
    swap-ins then find slots never written back).  Throughputs in MiB/s,
    latencies in microseconds, less the cost of the same Python element read
    on a resident page (read_overhead_us)."""
    directory = swap_dir(directory)
    pages = max(nbytes // PAGE, 4)
    size = pages * PAGE
    if budget is None:
        budget = size // 4
    budget = max(PAGE, budget - budget % PAGE)
    capacity = size + 16 * MiB
    fds_before = {int(x) for x in os.listdir("/proc/self/fd")}
    pool = Pool(capacity, max_resident=capacity, swap_path=directory, swap_batch=swap_batch,
                compact_threshold=0)
    arr = by_page = flat = None
    try:
        swap_fd = _find_swap_fd(fds_before, directory)
        arr = pool.empty(size, np.uint8)
        shadow = np.frombuffer(np.random.default_rng(seed).bytes(size), dtype=np.uint8)
        t = time.perf_counter()
        arr[:] = shadow
        fill_s = time.perf_counter() - t
        by_page = arr.reshape(pages, PAGE)
        flat = arr.reshape(-1)
        rng = np.random.default_rng(seed + 1)
        pc = time.perf_counter
        rounds: Dict[str, Dict] = {}
        lat: Dict[str, List[float]] = {}
        sample = np.zeros(0, dtype=np.int64)
        for name, sync, drop in UKSM_PHASES:
            out = _lower(pool, budget, swap_fd, sync, timeout)
            if not out["reached"]:
                raise RuntimeError(f"uksm: pages_swapped did not reach {out['expected']} within "
                                   f"{timeout} s after max_resident = {budget}: {out}")
            dropped = drop and _drop_cache(swap_fd)
            pool.max_resident = capacity     # no eviction while swapping in
            idx = _swapped(pool, arr)
            sparse = idx[idx % SPARSE == 0]
            rng.shuffle(sparse)
            sample = sparse[:samples]
            got = []
            for o in (sample * PAGE).tolist():
                t0 = pc()
                flat[o]
                got.append(pc() - t0)
            lat[name] = got
            rest = np.setdiff1d(idx, sample, assume_unique=True)
            t0 = pc()
            by_page[rest, 0].sum()
            dt = pc() - t0
            # read back, the pages are still views of their slots, in the
            # page cache: bytes_swap_cached (a write, or lock, makes them
            # private and frees the slots)
            after = pool.stats()
            ins0 = after["swap_ins"]
            pool.lock(arr)
            pool.unlock(arr)
            _drop_cache(swap_fd)        # the freed slots' cached pages
            rounds[name] = dict(out, fdatasync=sync, dropped=dropped, swapped=int(idx.size),
                                latency_pages=len(got), seq_pages=int(rest.size),
                                seq_s=dt, seq_mib_s=mib_s(rest.size * PAGE, dt),
                                swap_cached_after_reads=after["bytes_swap_cached"],
                                swap_ins=pool.stats()["swap_ins"] - ins0,
                                still_swapped=int(_swapped(pool, arr).size))
        # the same reads once more, the pages resident: what Python's
        # element read costs without a fault, subtracted from the latencies
        base = []
        for o in (sample * PAGE).tolist():
            t0 = pc()
            flat[o]
            base.append(pc() - t0)
        overhead = float(np.median(base)) if base else 0.0
        contents_ok = bool(np.array_equal(arr, shadow))
        st = pool.stats()
    finally:
        arr = by_page = flat = None       # the pool's buffers go before the pool
        pool.close()
    fl = {name: percentiles(v, overhead) for name, v in lat.items()}
    cold, warm, unsynced = rounds["cold"], rounds["warm"], rounds["unsynced"]
    synced = [r for r in (cold, warm) if r["sync_s"] is not None]

    def out_rate(rs, with_sync):
        vals = [mib_s(r["pages_swapped"] * PAGE,
                      r["reached_s"] + (r["sync_s"] if with_sync else 0.0)) for r in rs]
        vals = [v for v in vals if v]
        return float(np.median(vals)) if vals else None
    return {
        "bytes": size, "budget": budget, "directory": directory, "swap_batch": swap_batch,
        "fill_s": fill_s, "swap_fd_found": swap_fd is not None, "rounds": rounds,
        "swap_out_mib_s": out_rate(synced, True) if synced else None,
        "swap_out_cached_mib_s": out_rate(synced, False) if synced else None,
        "swap_in_cold_mib_s": cold["seq_mib_s"] if cold["dropped"] else None,
        "swap_in_warm_mib_s": warm["seq_mib_s"] if warm["sync_s"] is not None else None,
        "swap_in_unsynced_mib_s": unsynced["seq_mib_s"],
        "fault_cold_p50_us": fl["cold"]["p50_us"] if cold["dropped"] else None,
        "fault_cold_p99_us": fl["cold"]["p99_us"] if cold["dropped"] else None,
        "fault_warm_p50_us": fl["warm"]["p50_us"] if warm["sync_s"] is not None else None,
        "fault_warm_p99_us": fl["warm"]["p99_us"] if warm["sync_s"] is not None else None,
        "fault_unsynced_p50_us": fl["unsynced"]["p50_us"],
        "fault_unsynced_p99_us": fl["unsynced"]["p99_us"],
        "faults": fl, "read_overhead_us": overhead * 1e6,
        "latency_samples": fl["cold"]["n"], "contents_ok": contents_ok,
        "swap_errors": st["swap_errors"], "transit_faults": st["transit_faults"],
        "swap_file_bytes": st["swap_file_bytes"],
    }


# -- the kernel's swap ---------------------------------------------------------------------

def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _tool(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/sbin/{name}", f"/usr/sbin/{name}")
                                       if os.access(p, os.X_OK)), None)


def cgroup_mode() -> Optional[str]:
    """"v2" with a cgroup v2 memory controller at /sys/fs/cgroup, "v1" with
    cgroup v1's memory controller (and CGROUP_V1_FALLBACK), else None."""
    controllers = _read(os.path.join(CGROUP_ROOT, "cgroup.controllers"))
    if controllers is not None and "memory" in controllers.split():
        return "v2"
    if CGROUP_V1_FALLBACK and _v1_parent() is not None:
        return "v1"
    return None


def _v1_parent() -> Optional[str]:
    """This process's own cgroup v1 memory cgroup directory, if writable."""
    text = _read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            path = os.path.join(CGROUP_V1_MEMORY, parts[2].lstrip("/"))
            if os.path.isfile(os.path.join(path, "memory.limit_in_bytes")) and \
                    os.access(path, os.W_OK):
                return path.rstrip("/")
    return None


def kernel_unavailable_reason(directory: str = SWAP_DIR) -> Optional[str]:
    """Why the kernel's swap cannot be measured here, or None."""
    if os.geteuid() != 0:
        return "the kernel's swap needs root (swapon and a memory cgroup)"
    if _read("/proc/swaps") is None:
        return "this kernel has no swap (no /proc/swaps)"
    for tool in ("dd", "mkswap", "swapon", "swapoff"):
        if _tool(tool) is None:
            return f"{tool} not found"
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        return "no C compiler for the kernel side's helper"
    if cgroup_mode() is None:
        return ("no memory cgroup: /sys/fs/cgroup/cgroup.controllers lists no memory "
                "controller" + ("" if CGROUP_V1_FALLBACK else " (cgroup v1 not used)"))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return f"{directory} is not a writable directory"
    return None


def swap_state() -> Dict[str, str]:
    """/proc/swaps and ``swapon --show``, to compare before and after."""
    show = subprocess.run([_tool("swapon") or "swapon", "--show"], capture_output=True,
                          text=True)
    return {"proc_swaps": _read("/proc/swaps") or "", "swapon_show": show.stdout}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(directory: str = SWAP_DIR) -> List[str]:
    """Undo what a run killed before it could restore left behind (its pid
    is in the names): swap files still on, swap files, cgroups."""
    done = []
    pat = re.compile(re.escape(NAME) + r"-(\d+)(\.swap)?$")
    for line in (_read("/proc/swaps") or "").splitlines()[1:]:
        path = line.split()[0] if line.split() else ""
        m = pat.search(os.path.basename(path))
        if m and not _alive(int(m.group(1))):
            if subprocess.run([_tool("swapoff") or "swapoff", path],
                              capture_output=True).returncode == 0:
                done.append(f"swapoff {path}")
    parents = [directory, CGROUP_ROOT]
    v1 = _v1_parent()
    if v1:
        parents.append(v1)
    for parent in parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            m = pat.match(name)
            if not m or _alive(int(m.group(1))):
                continue
            path = os.path.join(parent, name)
            try:
                if os.path.isdir(path):
                    os.rmdir(path)
                elif os.path.isfile(path) and path.endswith(".swap"):
                    if path not in (_read("/proc/swaps") or ""):
                        os.unlink(path)
                    else:
                        continue
                else:
                    continue
                done.append(f"removed {path}")
            except OSError:
                pass
    return done


class _Child:
    """The kernel side's workload process (the C helper in child mode)."""

    def __init__(self, exe: str, pages: int, seed: int, timeout: float) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen([exe, "child", str(pages), str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        try:
            line = self._line()
            if not line.startswith("ready"):
                raise RuntimeError(f"swap helper did not start: {line!r}")
        except BaseException:
            self.close()
            raise

    def _line(self) -> str:
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], self.timeout)
        if not r:
            raise TimeoutError(f"swap helper silent for {self.timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"swap helper exited ({self.proc.poll()}; killed by the OOM "
                               f"killer?): {err.strip()}")
        return line.strip()

    def cmd(self, text: str) -> List[str]:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        line = self._line()
        if not line.startswith("ok"):
            raise RuntimeError(f"swap helper: {text!r} -> {line!r}")
        return line.split()[1:]

    def swap_bytes(self) -> int:
        """Bytes of this process in swap (smaps_rollup: exact, page walk)."""
        for line in (_read(f"/proc/{self.pid}/smaps_rollup") or "").splitlines():
            if line.startswith("Swap:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no Swap: line in smaps_rollup")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


class KernelSwap:
    """The kernel's own swap for the length of a with-block:

        with KernelSwap(nbytes) as ks:
            figures = ks.measure(nbytes)

    On entry: an exclusive lock (LOCK_PATH; one such run at a time), a swap
    file of @swapfile_bytes (default max(64 MiB, 2 x nbytes)) in @directory
    made with dd and mkswap and swapon'ed at the highest priority, and a
    memory cgroup (see cgroup_mode()).  On exit, however it comes (an error,
    KeyboardInterrupt, SIGTERM turned into SystemExit): the child killed,
    the cgroup removed, swapoff, the swap file deleted, the root cgroup's
    subtree_control put back if it was changed, and /proc/swaps and
    ``swapon --show`` compared with what they were (``self.restored``)."""

    def __init__(self, nbytes: int, directory: str = SWAP_DIR,
                 swapfile_bytes: Optional[int] = None, timeout: float = 300.0) -> None:
        self.directory = directory
        want = max(64 * MiB, 2 * nbytes)
        self.swapfile_bytes = -(-(swapfile_bytes or want) // MiB) * MiB
        self.timeout = timeout
        self.mode = cgroup_mode()
        self.swapfile = os.path.join(directory, f"{NAME}-{os.getpid()}.swap")
        self.cgroup: Optional[str] = None
        self.before: Dict[str, str] = {}
        self.after: Dict[str, str] = {}
        self.restored: Dict = {}
        self.stale_cleaned: List[str] = []
        self.setup_s = 0.0
        self._lock_fd: Optional[int] = None
        self._subtree_added = False
        self._swapon = False
        self._old_sigterm = None
        self._child: Optional[_Child] = None

    # -- setup and restore ---------------------------------------------------------

    def __enter__(self) -> "KernelSwap":
        reason = kernel_unavailable_reason(self.directory)
        if reason:
            raise RuntimeError(f"the kernel's swap cannot be measured here: {reason}")
        self._catch_sigterm()
        try:
            self._lock()
            self.stale_cleaned = cleanup_stale(self.directory)
            self.before = swap_state()
            t = time.perf_counter()
            self._make_swapfile()
            self._make_cgroup()
            self.setup_s = time.perf_counter() - t
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _catch_sigterm(self) -> None:
        self._old_sigterm = kernelksm.catch_sigterm()

    def _lock(self) -> None:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another process holds {LOCK_PATH}")
                time.sleep(0.1)
        self._lock_fd = fd

    def _make_swapfile(self) -> None:
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        if free < self.swapfile_bytes + 256 * MiB:
            raise RuntimeError(f"{self.directory}: {free // MiB} MiB free, the swap file "
                               f"needs {self.swapfile_bytes // MiB} MiB and a margin")
        # created 0600 before a byte is written: swap holds other memory
        fd = os.open(self.swapfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        subprocess.run([_tool("dd"), "if=/dev/zero", f"of={self.swapfile}", "bs=1M",
                        f"count={self.swapfile_bytes // MiB}", "conv=notrunc,fsync",
                        "status=none"], check=True, capture_output=True)
        subprocess.run([_tool("mkswap"), self.swapfile], check=True, capture_output=True)
        proc = subprocess.run([_tool("swapon"), "-p", "32767", self.swapfile],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"swapon {self.swapfile} failed: {proc.stderr.strip()}")
        self._swapon = True

    def _make_cgroup(self) -> None:
        name = f"{NAME}-{os.getpid()}"
        if self.mode == "v2":
            sub = os.path.join(CGROUP_ROOT, "cgroup.subtree_control")
            if "memory" not in (_read(sub) or "").split():
                _write(sub, "+memory")
                self._subtree_added = True
            self.cgroup = os.path.join(CGROUP_ROOT, name)
            os.mkdir(self.cgroup)
            self._limit("max")
            _write(os.path.join(self.cgroup, "memory.swap.max"), "max")
            if os.path.exists(os.path.join(self.cgroup, "memory.zswap.max")):
                _write(os.path.join(self.cgroup, "memory.zswap.max"), "0")
        else:
            self.cgroup = os.path.join(_v1_parent(), name)
            os.mkdir(self.cgroup)
            self._limit("max")
            if (_read(os.path.join(self.cgroup, "memory.swappiness")) or "").strip() == "0":
                _write(os.path.join(self.cgroup, "memory.swappiness"), "60")

    def _limit(self, value) -> None:
        """memory.max (v2) or memory.limit_in_bytes (v1): bytes, or "max"."""
        if self.mode == "v2":
            _write(os.path.join(self.cgroup, "memory.max"), value)
        else:
            _write(os.path.join(self.cgroup, "memory.limit_in_bytes"),
                   -1 if value == "max" else value)

    def _usage(self) -> int:
        f = "memory.current" if self.mode == "v2" else "memory.usage_in_bytes"
        return int(_read(os.path.join(self.cgroup, f)) or 0)

    def _restore(self) -> None:
        from .kernelksm import _HoldSignals
        errors = []
        with _HoldSignals() as held:
            if self._child is not None:
                self._child.close()
                self._child = None
            if self.cgroup and os.path.isdir(self.cgroup):
                for _ in range(100):
                    try:
                        os.rmdir(self.cgroup)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EBUSY, errno.EAGAIN):
                            errors.append(f"rmdir {self.cgroup}: {e}")
                            break
                        time.sleep(0.05)
                else:
                    errors.append(f"rmdir {self.cgroup}: still busy")
            if self._subtree_added:
                try:
                    _write(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "-memory")
                    self._subtree_added = False
                except OSError as e:
                    errors.append(f"cgroup.subtree_control -memory: {e}")
            if self._swapon or self.swapfile in (_read("/proc/swaps") or ""):
                proc = subprocess.run([_tool("swapoff") or "swapoff", self.swapfile],
                                      capture_output=True, text=True)
                if proc.returncode:
                    errors.append(f"swapoff {self.swapfile}: {proc.stderr.strip()}")
                else:
                    self._swapon = False
            if os.path.exists(self.swapfile) and not self._swapon:
                try:
                    os.unlink(self.swapfile)
                except OSError as e:
                    errors.append(f"rm {self.swapfile}: {e}")
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
            kernelksm.release_sigterm(self._old_sigterm)
            self._old_sigterm = None
            self.after = swap_state() if self.before else {}
            self.restored = {
                "proc_swaps_as_before": self.after.get("proc_swaps") ==
                self.before.get("proc_swaps"),
                "swapon_show_as_before": self.after.get("swapon_show") ==
                self.before.get("swapon_show"),
                "swapfile_removed": not os.path.exists(self.swapfile),
                "cgroup_removed": not (self.cgroup and os.path.isdir(self.cgroup)),
                "errors": errors,
            }
            self.restored["ok"] = (not errors and all(
                v for k, v in self.restored.items() if k not in ("errors",)))
        held.replay()

    # -- the measurement ----------------------------------------------------------------

    def _lower(self, child: _Child, limit: int) -> Dict:
        """Lower the limit to @limit, timed until the write returns (the
        kernel reclaims synchronously); v1 answers EBUSY when a reclaim pass
        makes no progress: retried until the usage is under the limit."""
        s0 = child.swap_bytes()
        t0 = time.perf_counter()
        busy = 0
        while True:
            try:
                self._limit(limit)
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.perf_counter() - t0 > self.timeout:
                    raise
                busy += 1
        dt = time.perf_counter() - t0
        s1 = child.swap_bytes()
        return {"seconds": dt, "bytes": s1 - s0, "ebusy_retries": busy,
                "usage_after": self._usage(), "mib_s": mib_s(s1 - s0, dt)}

    def measure(self, nbytes: int, budget: Optional[int] = None,
                samples: int = DEFAULT_SAMPLES, seed: int = 1, rounds: int = 2) -> Dict:
        """Swap-out, swap-in and fault latency of a child touching @nbytes
        under a limit of @budget (default nbytes / 4), in this block's swap
        file and cgroup, as uksm_swap() measures uksm: @rounds times, lower
        the limit (timed), raise it, read @samples sparse random swapped
        pages one by one (each timed), then every other swapped page in
        address order (timed), then dirty every page so that the next
        swap-out must write it again.  Medians over the rounds."""
        if self.cgroup is None:
            raise RuntimeError("KernelSwap.measure() outside its with-block")
        pages = max(nbytes // PAGE, 4)
        size = pages * PAGE
        if budget is None:
            budget = size // 4
        exe = compile_helper()
        self._child = child = _Child(exe, pages, seed, self.timeout)
        runs = []
        lat: List[float] = []
        try:
            _write(os.path.join(self.cgroup, "cgroup.procs"), child.pid)
            self._limit("max")
            fill_s = float(child.cmd("fill")[0])
            for _ in range(rounds):
                out = self._lower(child, budget)
                self._limit("max")
                r = child.cmd(f"lat {samples}")
                lat_major, got = int(r[0]), [float(x) for x in r[1:]]
                secs, k, majflt = child.cmd("seq")
                child.cmd("dirty")
                lc = percentiles(got)
                lat.extend(got)
                runs.append(dict(out, swapped=out["bytes"] // PAGE, latency_pages=len(got),
                                 latency_major_faults=lat_major, fault_p50_us=lc["p50_us"],
                                 fault_p99_us=lc["p99_us"], seq_pages=int(k),
                                 seq_s=float(secs), seq_major_faults=int(majflt),
                                 seq_mib_s=mib_s(int(k) * PAGE, float(secs))))
        finally:
            child.close()
            self._child = None
            try:
                self._limit("max")
            except OSError:
                pass

        def med(key):
            vals = [r[key] for r in runs if r[key] is not None]
            return float(np.median(vals)) if vals else None
        return {
            "bytes": size, "budget": budget, "cgroup": self.mode, "fill_s": fill_s,
            "swapfile_bytes": self.swapfile_bytes, "rounds": runs,
            "swap_out_mib_s": med("mib_s"), "swap_in_mib_s": med("seq_mib_s"),
            "fault_p50_us": med("fault_p50_us"), "fault_p99_us": med("fault_p99_us"),
            "fault_all": percentiles(lat), "latency_samples": len(lat),
        }


def kernel_swap(nbytes: int, budget: Optional[int] = None, samples: int = DEFAULT_SAMPLES,
                directory: str = SWAP_DIR) -> Dict:
    """KernelSwap's measurement in a block of its own; the result also
    carries what was restored."""
    ks = KernelSwap(nbytes, directory)
    with ks:
        res = ks.measure(nbytes, budget, samples)
    res["restored"] = ks.restored
    res["setup_s"] = ks.setup_s
    res["stale_cleaned"] = ks.stale_cleaned
    return res


# -- the figures side by side -----------------------------------------------------------------

# (key, label, uksm key, floor key, kernel key, unit, better).  The first
# four compare uksm with the kernel; the others are uksm's alone.
ROWS = [
    ("swap_out", "swap-out to the budget, + fdatasync", "swap_out_mib_s", "write_mib_s",
     "swap_out_mib_s", "MiB/s", "higher"),
    ("swap_in", "swap-in, sequential, cold", "swap_in_cold_mib_s", "read_cold_mib_s",
     "swap_in_mib_s", "MiB/s", "higher"),
    ("fault_p50", "swap-in fault p50, cold", "fault_cold_p50_us", "pread_cold_p50_us",
     "fault_p50_us", "us", "lower"),
    ("fault_p99", "swap-in fault p99, cold", "fault_cold_p99_us", "pread_cold_p99_us",
     "fault_p99_us", "us", "lower"),
    ("swap_out_cached", "swap-out to the budget, page cache only", "swap_out_cached_mib_s",
     "write_cached_mib_s", None, "MiB/s", "higher"),
    ("swap_in_warm", "swap-in, sequential, warm (written back, cached)",
     "swap_in_warm_mib_s", "read_warm_mib_s", None, "MiB/s", "higher"),
    ("fault_warm_p50", "swap-in fault p50, warm", "fault_warm_p50_us", "pread_warm_p50_us",
     None, "us", "lower"),
    ("fault_warm_p99", "swap-in fault p99, warm", "fault_warm_p99_us", "pread_warm_p99_us",
     None, "us", "lower"),
    ("swap_in_unsynced", "swap-in, sequential, slots never written back",
     "swap_in_unsynced_mib_s", "read_warm_mib_s", None, "MiB/s", "higher"),
    ("fault_unsynced_p50", "swap-in fault p50, slots never written back",
     "fault_unsynced_p50_us", "pread_warm_p50_us", None, "us", "lower"),
]

# The floor's own figures: (key, label, floor key, unit)
FLOOR_ROWS = [
    ("write", "floor: pwritev 256 x 4 KiB a call, + fdatasync", "write_mib_s", "MiB/s"),
    ("read_cold", "floor: pread 4 KiB a call, sequential, cold", "read_cold_mib_s", "MiB/s"),
    ("pread_cold_p50", "floor: pread 4 KiB, cold, p50", "pread_cold_p50_us", "us"),
    ("pread_cold_p99", "floor: pread 4 KiB, cold, p99", "pread_cold_p99_us", "us"),
    ("pread_warm_p50", "floor: pread 4 KiB, cached, p50", "pread_warm_p50_us", "us"),
    ("punch_p50", "floor: punch one written-back 4 KiB slot, p50", "punch_p50_us", "us"),
]


def compare(uksm: Dict, floor_: Optional[Dict], kernel: Optional[Dict]) -> List[Dict]:
    """One dict a row: the three figures and the ratios uksm/floor,
    uksm/kernel (and kernel/floor)."""
    out = []
    for key, label, uk, fk, kk, unit, better in ROWS:
        u = uksm.get(uk) if uksm else None
        f = floor_.get(fk) if floor_ else None
        k = kernel.get(kk) if (kernel and kk) else None
        out.append({"key": key, "label": label, "unit": unit, "better": better,
                    "uksm": u, "floor": f, "kernel": k, "uksm_floor": ratio(u, f),
                    "uksm_kernel": ratio(u, k), "kernel_floor": ratio(k, f)})
    return out


def _num(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table(rows: List[Dict]) -> str:
    """The rows of compare() as aligned text."""
    head = ["metric", "unit", "uksm", "floor", "kernel", "uksm/floor", "uksm/kernel",
            "kernel/floor"]
    body = [[r["label"], r["unit"], _num(r["uksm"]), _num(r["floor"]), _num(r["kernel"]),
             _num(r["uksm_floor"]), _num(r["uksm_kernel"]), _num(r["kernel_floor"])]
            for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = []
    for j, x in enumerate([head] + body):
        lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                               for i, c in enumerate(x)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
