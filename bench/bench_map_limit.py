"""Merging under vm.max_map_count: 1 GiB in which every other page is a
duplicate, merged by a pool; what merged, what the kernel says it saved,
how long it took, at the limit in force.

    python bench/bench_map_limit.py [--mib 1024] [--variants same,pairs,runs]

Variants (each in a fresh interpreter, 1 GiB = 262144 pages, 131072 of
them duplicates):
  same   every odd page holds one content, every even page is unique: each
         merged page is a view between anonymous pages (2 mappings)
  pairs  page 2k + 1 is a copy of page 2k: both become views of one frame,
         and frames allocated in order join the views of neighbouring
         pairs (1 mapping per page saved)
  runs   blocks of 8 pages, the last 4 a copy of the first 4
Saved is measured by the kernel, from /proc/self/smaps_rollup before and
after the scans: Pss (a frame with n views counts 1/n in each: the frame
store is charged once) and Private_Clean + Private_Dirty (USS: frames with
two or more views are shared, so USS counts none of the frame store and
overstates the saving of new frames).  A view not read since its merge is
not in the page tables at all, so neither counts the frames it maps:
saved_mib_kernel is the Pss drop less the frame store's growth (its memfd's
st_blocks), the kernel's own figures for what the process holds.
"""

import argparse
import json
import subprocess
import sys
import time

PAGE = 4096


def rollup_kib() -> tuple:
    """(Pss, Private_Clean + Private_Dirty) of this process, KiB."""
    pss = priv = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                priv += int(line.split()[1])
    return pss, priv


def count_maps() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def one(kind: str, mib: int) -> dict:
    import numpy as np

    import uksm

    n = mib * 256
    rng = np.random.default_rng(0)
    pool = uksm.Pool(f"{2 * mib}MiB", pages_to_scan=32768, sleep_millisecs=0)
    a = pool.empty((n, PAGE), np.uint8)
    for i in range(0, n, 4096):
        a[i : i + 4096] = rng.integers(0, 255, (min(4096, n - i), PAGE), dtype=np.uint8)
    if kind == "pairs":
        a[1::2] = a[0::2]
    elif kind == "same":
        a[1::2] = 7
    elif kind == "runs":
        b = a.reshape(-1, 8, PAGE)
        b[:, 4:] = b[:, :4]
    check = a[::1021].copy()
    before = rollup_kib()
    memfd0 = pool.stats()["memfd_bytes"]
    t = time.monotonic()
    pool.scan(full_scans=3)
    secs = time.monotonic() - t
    after = rollup_kib()
    st = pool.stats()
    assert np.array_equal(a[::1021], check)
    out = {
        "variant": kind,
        "mib": mib,
        "candidates": n // 2,
        "pages_merged": st["pages_sharing"],
        "pages_shared": st["pages_shared"],
        "pages_unmerged_map_limit": st["pages_unmerged_map_limit"],
        "saved_mib_kernel": round(
            (before[0] - after[0]) / 1024 - (st["memfd_bytes"] - memfd0) / 2**20, 1
        ),
        "saved_mib_pss": round((before[0] - after[0]) / 1024, 1),
        "saved_mib_uss": round((before[1] - after[1]) / 1024, 1),
        "bytes_saved_mib_pool": round(st["bytes_saved"] / 2**20, 1),
        "seconds_3_full_scans": round(secs, 2),
        "maps": count_maps(),
        "map_count": st["map_count"],
        "map_count_max": st["map_count_max"],
        "map_count_reserve": st["map_count_reserve"],
    }
    pool.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--variants", default="same,pairs,runs")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.mib)))
        return
    for kind in args.variants.split(","):
        r = subprocess.run(
            [sys.executable, __file__, "--one", kind, "--mib", str(args.mib)],
            capture_output=True,
            text=True,
            check=True,
        )
        print(r.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
