"""Concurrency soak, once with each copy-on-write mode.

Eight threads write and read random pages of several merged arrays while
the background scanner runs flat out (sleep_millisecs=0, a large
pages_to_scan), kswapd keeps a third of the data resident, and the main
thread keeps fragmenting the pool and calling pool.compact().  With
cow="kernel" the writers' COW breaks are the kernel's own faults, which
uksm learns of from pagemap; with cow="signal" each one is a SIGSEGV that
uksm's handler serves under the pool lock, racing the scanner, reclaim and
compaction for it.  Each thread owns a disjoint set of pages (page p of every
array belongs to thread p % 8) and keeps their shadow, so every read is
checked exactly, without locks; the writes come from a small palette of
page contents, so pages keep merging, COW-breaking and re-merging across
arrays and threads.  At the end every array must equal its shadow: zero
mismatches.

Watchdog: if any thread's operation count, or the scanner's pages_scanned,
stops advancing for STALL seconds, the test fails with every thread's stack
(faulthandler.dump_traceback(all_threads=True), read back from a file).  A
main thread stuck for good (inside the C core, or waiting for the GIL) cannot
run that check, so faulthandler.dump_traceback_later, re-armed each round,
ends the process after 3 x STALL seconds as a last resort, with the stacks
in /tmp/uksm-soak-watchdog-<pid>.txt.

The program around the pool misbehaves as real ones do: the main thread's
short-lived arrays are dropped through reference cycles whose finalizers
call pool.free() (the collector, run every 100 allocations, finalizes them
in whichever thread allocates: a writer, the scanner inside its batch, the
main thread inside a pool call), and a 50 ms interval timer's SIGALRM
handler allocates, frees and asks for stats() while the main thread may be
inside the pool.  Both must have run, nothing may hang, and the figures
must still add up.

At the end, memory adds up by the kernel's own accounting: the frame
store's allocated blocks are bytes_frames, no frame is left deferred (no
child was forked), and bytes_resident is the private pages, the frames and
the swap file's cached pages.

Duration: 4 s per mode by default, UKSM_SOAK_SECONDS overrides.  The
figures go to the module-level SOAK record, by mode (printed; see it with
pytest -s).
"""

import faulthandler
import gc
import os
import signal
import tempfile
import threading
import time

import numpy as np
import pytest

import uksm

PAGE = uksm.PAGE_SIZE
SWAPPED = uksm.PageState.SWAPPED  # pool.page_states() value
THREADS = 8
ARRAYS = 6
PAGES = 256  # per array: 1 MiB
PALETTE = 6
STALL = 20.0
SECONDS = float(os.environ.get("UKSM_SOAK_SECONDS", "4"))

SOAK = {}  # the record of the last run of each mode


class _Junk:
    """A short-lived array dropped through a reference cycle: only the
    collector frees it, and its finalizer gives the buffer back."""

    def __init__(self, pool, arr, counts):
        self.pool, self.arr, self.counts, self.me = pool, arr, counts, self

    def __del__(self):
        arr, self.arr = self.arr, None
        if self.pool._c.owned():
            self.counts["freed_nested"] += 1
        self.pool.free(arr)
        self.counts["freed"] += 1


def _dump_stacks(path: str) -> str:
    with open(path, "w") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
    with open(path) as f:
        return f.read()


class Worker(threading.Thread):
    def __init__(self, tid, arrays, shadows, palette, stop, seed):
        super().__init__(name=f"soak-{tid}", daemon=True)
        self.tid = tid
        self.arrays = arrays
        self.shadows = shadows
        self.palette = palette
        self.stop = stop
        self.rng = np.random.default_rng(seed)
        self.ops = 0
        self.reads = 0
        self.writes = 0
        self.mismatches = []
        self.error = None
        self.pages = np.arange(tid, PAGES, THREADS)

    def run(self):
        try:
            self._run()
        except BaseException:  # reported by the test
            import traceback

            self.error = traceback.format_exc()

    def _run(self):
        rng = self.rng
        arrays, shadows, palette = self.arrays, self.shadows, self.palette
        while not self.stop.is_set():
            k = int(rng.integers(ARRAYS))
            p = int(self.pages[rng.integers(len(self.pages))])
            a, s = arrays[k], shadows[k]
            op = int(rng.integers(10))
            if op < 4:  # read the page back
                if not np.array_equal(a[p], s[p]):
                    bad = np.flatnonzero(a[p] != s[p])
                    self.mismatches.append((k, p, len(bad), int(bad[0])))
                self.reads += 1
            elif op < 7:  # a whole page from the palette
                v = int(rng.integers(PALETTE))
                a[p] = palette[v]
                s[p] = palette[v]
                self.writes += 1
            elif op < 8:  # one byte
                i = int(rng.integers(PAGE))
                b = int(rng.integers(256))
                a[p, i] = b
                s[p, i] = b
                self.writes += 1
            elif op < 9:  # a slice, through a float64 view
                lo = int(rng.integers(PAGE // 8))
                hi = min(PAGE // 8, lo + int(rng.integers(1, 64)))
                val = float(rng.integers(1 << 20))
                a[p].view(np.float64)[lo:hi] = val
                s[p].view(np.float64)[lo:hi] = val
                self.writes += 1
            else:  # copy one of its own pages to another
                q = int(self.pages[rng.integers(len(self.pages))])
                j = int(rng.integers(ARRAYS))
                a[p] = arrays[j][q]
                s[p] = shadows[j][q]
                self.writes += 1
            self.ops += 1


@pytest.mark.parametrize("cow", ["kernel", "signal"])
def test_soak_threads_scanner_compaction(tmp_path, cow):
    rng = np.random.default_rng(1234)
    palette = rng.integers(1, 256, (PALETTE, PAGE), dtype=np.uint8)
    palette[0] = 0
    base = palette[rng.integers(PALETTE, size=PAGES)]
    dump_path = str(tmp_path / "stacks.txt")
    last_resort = f"{tempfile.gettempdir()}/uksm-soak-watchdog-{os.getpid()}.txt"
    # a tight budget: about a third of the data resident, the rest swapped,
    # so writers, readers, the scanner, kswapd and compaction all collide
    budget = max(ARRAYS * PAGES * PAGE // 3, 1 << 20)
    pool = uksm.Pool(
        "64MiB",
        pages_to_scan=20000,
        sleep_millisecs=0,
        checksum="xxhash",
        cow=cow,
        max_resident=os.environ.get("UKSM_SOAK_BUDGET", budget),
        swap_batch="64KiB",
    )
    threads = []
    stop = threading.Event()
    lr_file = open(last_resort, "w")
    counts = {"freed": 0, "freed_nested": 0, "alarms": 0}
    keep_pal = palette[[1, 2]]

    def on_alarm(signum, frame):
        counts["alarms"] += 1
        pool.stats()
        x = pool.asarray(keep_pal)
        assert np.array_equal(x, keep_pal)
        pool.free(x)

    old_threshold = gc.get_threshold()
    try:
        arrays = [pool.asarray(base) for _ in range(ARRAYS)]
        shadows = [base.copy() for _ in range(ARRAYS)]
        pool.scan(full_scans=2)
        assert pool.stats()["pages_sharing"] > 0
        pool.start()
        gc.set_threshold(100, 5, 5)
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        threads = [Worker(t, arrays, shadows, palette, stop, 1000 + t) for t in range(THREADS)]
        for t in threads:
            t.start()

        t0 = time.monotonic()
        last_ops = [0] * THREADS
        last_scanned = -1
        last_change = [t0] * (THREADS + 1)
        junk = []
        compactions = frames_moved = 0
        max_pause = 0.0
        stalled = None
        rounds = 0
        while True:
            faulthandler.dump_traceback_later(3 * STALL, exit=True, file=lr_file)
            now = time.monotonic()
            running = now - t0 < SECONDS
            if not running:
                stop.set()
            # fragment: short-lived copies and zeros, half of them dropped
            if running:
                junk.append(pool.asarray(palette[rng.integers(PALETTE, size=32)]))
                junk.append(pool.zeros(16 * PAGE, np.uint8))
                _Junk(pool, pool.asarray(palette[rng.integers(PALETTE, size=4)]), counts)
                if len(junk) > 8:
                    for a in junk[: len(junk) // 2]:
                        _Junk(pool, a, counts)
                    del junk[: len(junk) // 2], a
                r = pool.compact()
                compactions += 1
                frames_moved += r["frames_moved"]
                max_pause = max(max_pause, r["max_pause_seconds"])
            rounds += 1
            # the watchdog: every worker and the scanner must keep moving
            now = time.monotonic()
            for i, t in enumerate(threads):
                if t.ops != last_ops[i] or not t.is_alive():
                    last_ops[i] = t.ops
                    last_change[i] = now
            scanned = pool.stats()["pages_scanned"]
            if scanned != last_scanned or not running:
                last_scanned = scanned
                last_change[THREADS] = now
            stuck = [i for i in range(THREADS + 1) if now - last_change[i] > STALL]
            if stuck:
                names = [threads[i].name if i < THREADS else "uksm-ksmd" for i in stuck]
                stalled = (names, _dump_stacks(dump_path))
                break
            if not running and not any(t.is_alive() for t in threads):
                break
            time.sleep(0.02)
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        stop.set()
        if stalled:
            pytest.fail(
                f"no progress for {STALL:.0f} s in {', '.join(stalled[0])}; "
                f"all thread stacks:\n{stalled[1]}"
            )
        elapsed = time.monotonic() - t0
        pool.stop()
        errors = [t.error for t in threads if t.error]
        assert not errors, errors[0]
        mismatches = [m for t in threads for m in t.mismatches]
        final_bad = [k for k in range(ARRAYS) if not np.array_equal(arrays[k], shadows[k])]
        st = pool.stats()
        SOAK[cow] = {
            "seconds": round(elapsed, 2),
            "threads": THREADS,
            "operations": sum(t.ops for t in threads),
            "reads": sum(t.reads for t in threads),
            "writes": sum(t.writes for t in threads),
            "mismatches": len(mismatches) + len(final_bad),
            "compactions_main": compactions,
            "compactions_total": st["compactions"],
            "frames_moved": frames_moved,
            "max_pause_ms": round(max_pause * 1e3, 3),
            "full_scans": st["full_scans"],
            "pages_scanned": st["pages_scanned"],
            "pages_merged_total": st["pages_merged_total"],
            "cow_breaks": st["cow_breaks"],
            "cow_breaks_signal": st["cow_breaks_signal"],
            "swap_outs": st["swap_outs"],
            "swap_ins": st["swap_ins"],
            "zero_page_cows": st["zero_page_cows"],
            "fault_lock_waits": st["fault_lock_waits"],
            "transit_faults": st["transit_faults"],
            "bytes_resident": st["bytes_resident"],
            "max_resident": st["max_resident"],
            "finalizer_frees": counts["freed"],
            "finalizer_frees_nested": counts["freed_nested"],
            "alarm_handlers": counts["alarms"],
        }
        print(f"\nuksm soak (cow={cow}): {SOAK[cow]}")
        assert not mismatches, f"{len(mismatches)} reads differed from the shadow: {mismatches[:5]}"
        assert not final_bad, f"arrays {final_bad} differ from their shadows at the end"
        assert SOAK[cow]["operations"] > 0 and all(t.ops > 0 for t in threads)
        assert st["cow_breaks"] > 0 and st["pages_merged_total"] > 0
        if cow == "kernel":
            assert st["cow_breaks_signal"] == 0
        else:
            # (not <= cow_breaks: test_signal_counts_only_cow_breaks)
            assert st["cow_breaks_signal"] > 0
        assert compactions > 0
        gc.collect()
        assert counts["freed"] > 0 and counts["alarms"] > 0, counts
        assert st["swap_outs"] > 0 and st["swap_ins"] > 0
        # the accounting still holds after all that
        assert (
            st["pages_shared"] + st["pages_sharing"] + st["pages_unshared"] + st["pages_volatile"]
        ) == st["pages_tracked"], st
        assert st["bytes_frames"] == os.fstat(pool.fd).st_blocks * 512 == st["memfd_bytes"]
        assert st["bytes_frames"] <= st["pages_shared"] * PAGE
        assert st["frames_deferred"] == 0 and st["fork_detaches"] == 0
        assert st["bytes_resident"] == (
            st["bytes_private"] + st["bytes_frames"] + st["bytes_swap_cached"]
        ), st
        # the budget holds again once reclaim has caught up with the writers
        # (and with the final reads, which brought swapped pages back into
        # the page cache)
        pool._reclaim()
        st = pool.stats()
        assert st["bytes_resident"] <= st["max_resident"], {
            k: st[k]
            for k in (
                "bytes_resident",
                "bytes_private",
                "bytes_frames",
                "bytes_swap_cached",
                "max_resident",
            )
        }
        del junk, arrays
        gc.collect()
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        gc.set_threshold(*old_threshold)
        stop.set()
        deadline = time.monotonic() + 5.0
        for t in threads:
            t.join(timeout=max(deadline - time.monotonic(), 0.01))
        lr_file.close()
        try:
            os.unlink(last_resort)
        except OSError:
            pass
        pool.close()


def test_signal_counts_only_cow_breaks(tmp_path):
    """cow_breaks_signal is the part of cow_breaks that uksm's handler did:
    a write into a swapped page is a swap-in (swap_ins), not a COW break."""
    with uksm.Pool(
        "4MiB", sleep_millisecs=0, cow="signal", max_resident="1MiB", swap_path=str(tmp_path)
    ) as pool:
        a = pool.full(16 * PAGE, 7, np.uint8)  # 16 private pages
        pool.max_resident = 4 * PAGE
        swapped = int(np.count_nonzero(pool.page_states(a)[0] == SWAPPED))
        assert swapped >= 12
        a[::PAGE] = 8  # write each one
        st = pool.stats()
        assert st["swap_ins"] == swapped and st["cow_breaks"] == 0
        assert st["cow_breaks_signal"] <= st["cow_breaks"], st["cow_breaks_signal"]
        del a
