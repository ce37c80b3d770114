"""The NEP 49 handler on unchanged numpy programs: each workload is run
plainly (`python prog.py`) and under `python -m uksm run`, in the same
invocation, as separate processes; the program reports its own figures.

  duplicates   a dataset and copies of it made by plain numpy (copy, tile,
               np.load of a saved copy), then some work on them: the
               saving against the ideal ((copies - 1) x the dataset)
  churn        allocation-heavy code with few duplicates: many short-lived
               arrays above the threshold; time and peak RSS

python bench/bench_handler.py [--size MiB] [--copies N] [--iters N] [--json FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

DUPLICATES = textwrap.dedent("""
    import json, os, resource, sys, time
    import numpy as np, psutil
    size_mib, copies, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(0)
    data = rng.standard_normal(size_mib << 17)          # size_mib MiB of float64
    path = os.path.join(tmp, "data.npy")
    np.save(path, data)
    made = [data.copy(), np.tile(data, 1)] + [np.load(path) for _ in range(copies - 3)]
    t0 = time.perf_counter()
    total = 0.0
    while time.perf_counter() - t0 < float(sys.argv[4]):   # the program's own work
        total = sum(float(m[::4096].sum()) for m in made)
        time.sleep(0.05)
    mi = psutil.Process().memory_full_info()
    print(json.dumps({"checksum": round(total, 6), "uss": mi.uss, "pss": mi.pss,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")

CHURN = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, psutil
    iters, kib = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    n = kib * 1024 // 8
    t0 = time.perf_counter()
    acc = 0.0
    for i in range(iters):
        a = rng.random(n)           # a fresh array each time, above the threshold
        b = a * 2.0 + 1.0           # and two temporaries
        acc += float(b.sum())
    seconds = time.perf_counter() - t0
    print(json.dumps({"checksum": round(acc, 3), "seconds": seconds,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "uss": psutil.Process().memory_full_info().uss}))
""")


def run(prog: str, args, under: bool, tmp: str, extra=()):
    path = os.path.join(tmp, "prog.py")
    with open(path, "w") as f:
        f.write(prog)
    js = os.path.join(tmp, "uksm.json")
    cmd = [sys.executable]
    if under:
        cmd += ["-m", "uksm", "run", "--json", js, *extra]
    cmd += [path, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if under:
        with open(js) as f:
            out["uksm"] = json.load(f)
        out["summary"] = r.stderr.strip().splitlines()[-1]
    out["command"] = " ".join(cmd[1:])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="dataset MiB (default 64)")
    ap.add_argument("--copies", type=int, default=4, help="copies (default 4)")
    ap.add_argument("--work", type=float, default=3.0, help="seconds of work (default 3)")
    ap.add_argument("--iters", type=int, default=20000, help="churn iterations")
    ap.add_argument("--kib", type=int, default=64, help="churn array KiB (default 64)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    knobs = ["--pages-to-scan", "5000", "--sleep-millisecs", "10"]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = (a.size, a.copies, tmp, a.work)
        plain = run(DUPLICATES, args, False, tmp)
        under = run(DUPLICATES, args, True, tmp, knobs)
        ideal = (a.copies - 1) * (a.size << 20)
        res["duplicates"] = {"plain": plain, "uksm": under, "ideal_saving": ideal}
        print(f"duplicates: {a.copies} x {a.size} MiB, ideal saving {ideal >> 20} MiB")
        print(f"  same output: {plain['checksum'] == under['checksum']}")
        for k in ("uss", "pss", "maxrss"):
            print(
                f"  {k:6s} plain {plain[k] >> 20:6d} MiB   uksm run {under[k] >> 20:6d} MiB"
                f"   saved {(plain[k] - under[k]) >> 20} MiB"
            )
        print(
            f"  pool: bytes_saved {under['uksm']['bytes_saved'] >> 20} MiB "
            f"(peak {under['uksm']['bytes_saved_peak'] >> 20} MiB) = "
            f"{100 * under['uksm']['bytes_saved_peak'] / ideal:.0f}% of ideal"
        )
        print(f"  {under['summary']}")
        cargs = (a.iters, a.kib)
        cp = run(CHURN, cargs, False, tmp)
        cu = run(CHURN, cargs, True, tmp, knobs)
        res["churn"] = {"plain": cp, "uksm": cu}
        print(f"churn: {a.iters} iterations of 3 arrays of {a.kib} KiB")
        print(f"  same output: {cp['checksum'] == cu['checksum']}")
        print(
            f"  time   plain {cp['seconds']:.2f} s   uksm run {cu['seconds']:.2f} s "
            f"({cu['seconds'] / cp['seconds']:.2f}x)"
        )
        print(f"  maxrss plain {cp['maxrss'] >> 20} MiB   uksm run {cu['maxrss'] >> 20} MiB")
        print(f"  handler: {cu['uksm']['handler']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
