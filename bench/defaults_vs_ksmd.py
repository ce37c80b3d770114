"""Fresh duplicates merged with default knobs: uksm's against ksmd's.

    sudo python bench/defaults_vs_ksmd.py [SIZE ...]      (default 256MiB)

Half the region is data (every page different), the other half a copy of
it.  uksm: a Pool with no knob given, pool.start(), wall time until 99% of
the copies share.  Kernel: the same content in private anonymous memory,
MADV_MERGEABLE, ksmd with its defaults (pages_to_scan=100,
sleep_millisecs=20), the same wall time; the knobs are saved and restored
(uksm.bench.kernelksm.session).  Each side runs in a child process of its
own, one after the other, so that neither's memory is the other's."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
import time
from typing import Dict

import numpy as np

from uksm import PAGE_SIZE, Pool, parse_size
from uksm.bench import kernelksm

TARGET = 0.99


def fill(pages: np.ndarray) -> None:
    pages.view(np.uint64)[:, 0] = np.arange(len(pages), dtype=np.uint64) + 1


def uksm_side(size: int, q: "mp.Queue[Dict[str, float]]") -> None:
    half = size // 2 // PAGE_SIZE
    with Pool(size + (64 << 20)) as pool:
        data = pool.zeros(half * PAGE_SIZE, np.uint8)
        fill(data.reshape(half, PAGE_SIZE))
        copy = pool.asarray(data)
        t0 = time.perf_counter()
        pool.start()
        while pool.stats()["pages_sharing"] < math.ceil(TARGET * half):
            time.sleep(0.05)
        q.put({"seconds": time.perf_counter() - t0})
        del data, copy


def kernel_side(size: int, q: "mp.Queue[Dict[str, float]]") -> None:
    npages = size // PAGE_SIZE
    half = npages // 2
    mm, arr = kernelksm.alloc_private(size)
    pages = arr.reshape(npages, PAGE_SIZE)
    fill(pages[:half])
    pages[half:] = pages[:half]
    c0 = kernelksm.counters()["pages_sharing"]
    t0 = time.perf_counter()
    kernelksm.mark_mergeable(mm)
    while int(kernelksm.read("pages_sharing")) - c0 < math.ceil(TARGET * half):
        time.sleep(0.05)
    q.put({"seconds": time.perf_counter() - t0})
    del arr, pages
    kernelksm.free_private(mm)


def run(side: str, size: int) -> float:
    q: "mp.Queue[Dict[str, float]]" = mp.Queue()
    p = mp.Process(target=uksm_side if side == "uksm" else kernel_side, args=(size, q))
    p.start()
    r = q.get()
    p.join()
    return r["seconds"]


def main() -> None:
    sizes = [parse_size(s) for s in sys.argv[1:]] or [256 << 20]
    out = []
    for size in sizes:
        u = run("uksm", size)
        if kernelksm.available():
            with kernelksm.session(pages_to_scan=100, sleep_millisecs=20) as ks:
                with ks.ksmd_running():
                    k = run("kernel", size)
        else:
            k = math.nan
        row = {"bytes": size, "uksm_s": u, "kernel_s": k, "ratio": u / k}
        out.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
