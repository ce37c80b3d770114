"""The uksm command line: `python -m uksm demo` and friends.

demo    builds duplicated arrays in a pool (copies of one dataset, a
        zero-filled array, a buffer that is rewritten while the scanner
        runs), runs the background scanner with a progress bar, then prints
        memory before and after as the kernel accounts for it (the pool's
        private pages from pagemap, its frames from the memfd's allocated
        blocks, the process's PSS and USS from smaps_rollup), the saving by each,
        and the KSM counters.
stats   the same workload, just the counters as JSON (for scripts).
run     runs a Python program with every numpy array of --threshold
        bytes or more allocated from a pool (uksm.run): python -m uksm run
        [options] script.py args... or -m module args...
bench   the benchmark harness (uksm.bench, the "bench" extra: pip install
        "uksm[bench]"): uksm and the kernel's KSM on the same content, side
        by side; writes results.json, report.md and PNG plots into --output.
        --scale: cost per page against pool size, both implementations.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import PAGE_SIZE, Pool, parse_size


def _mib(n: float) -> str:
    return f"{n / (1 << 20):9.1f} MiB"


def _pss_uss() -> Tuple[int, int]:
    """The process's PSS and USS, as psutil's memory_full_info() computes
    them, from /proc/self/smaps_rollup (psutil is the bench extra's, not the
    allocator's): USS is the private clean and dirty pages."""
    fields: Dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def _need_extra(command: str) -> bool:
    """False, having said which extra to install, if the bench extra is missing."""
    from .bench import INSTALL_HINT, missing

    gone = missing()
    if gone:
        print(
            f"python -m uksm {command} needs {' and '.join(gone)}: {INSTALL_HINT}", file=sys.stderr
        )
        return False
    return True


def _progress(fraction: float, width: int = 40) -> str:
    done = int(round(fraction * width))
    return "[" + "#" * done + "-" * (width - done) + f"] {fraction * 100:5.1f}%"


def build_workload(
    pool: Pool, size: int, copies: int, seed: int = 0
) -> Tuple[np.ndarray, List[np.ndarray], np.ndarray, np.ndarray]:
    """Copies of one dataset, one zero-filled array, one volatile buffer.
    The zero-filled array is written with zeroes, as a program zeroes a
    buffer it has used (an optimizer's gradients): fresh pages never
    written are the kernel's zero page already and cost nothing, so there
    would be nothing to save on them."""
    rng = np.random.default_rng(seed)
    n = size // 8
    dataset = rng.standard_normal(n)
    arrays = [pool.asarray(dataset) for _ in range(copies)]
    zeros = pool.zeros(n)
    zeros.fill(1.0)
    zeros.fill(0.0)
    # random numbers straight into the pool: a temporary this size would
    # stay in malloc's heap, and in the PSS, after it is freed
    volatile = pool.empty(n)
    rng.standard_normal(out=volatile)
    return dataset, arrays, zeros, volatile


def demo(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    copies = args.copies
    capacity = (copies + 2) * size + (64 << 20)
    capacity -= capacity % PAGE_SIZE
    print(
        f"uksm demo: {copies} copies of a {_mib(size).strip()} dataset, "
        f"one zero-filled array, one array rewritten while scanning "
        f"(checksum={args.checksum})"
    )
    pss0, _ = _pss_uss()
    with Pool(
        capacity, pages_to_scan=args.pages_to_scan, sleep_millisecs=0, checksum=args.checksum
    ) as pool:
        dataset, arrays, zeros, volatile = build_workload(pool, size, copies)
        before = pool.stats()
        pss_before, uss_before = _pss_uss()
        dup_pages = (copies - 1) * (size // PAGE_SIZE)
        zero_pages = size // PAGE_SIZE
        ideal = dup_pages + zero_pages
        t0 = time.perf_counter()
        pool.start()
        tty = sys.stdout.isatty()
        shown = -1
        try:
            while True:
                volatile[:: PAGE_SIZE // 8] += 1.0  # one word per page: never stable
                s = pool.stats()
                saved = s["pages_sharing"] + s["ksm_zero_pages"]
                frac = min(saved / ideal, 1.0) if ideal else 1.0
                if not args.quiet and (tty or int(frac * 10) != shown):
                    shown = int(frac * 10)
                    line = f"  merging {_progress(frac)}  full_scans={s['full_scans']}"
                    sys.stdout.write(("\r" + line) if tty else (line + "\n"))
                    sys.stdout.flush()
                if frac >= 0.999 or time.perf_counter() - t0 > args.timeout:
                    break
                time.sleep(0.05)
        finally:
            pool.stop()
        elapsed = time.perf_counter() - t0
        if not args.quiet and tty:
            sys.stdout.write("\n")
        # reading the data maps the merged pages' views in, as any use of it
        # would: a frame is in the PSS only once a view of it is touched.  One
        # word a page, before the check below, whose temporaries would stay
        # in malloc's heap and in the PSS.
        for a in arrays + [zeros]:
            float(a[:: PAGE_SIZE // 8].sum())
        after = pool.stats()
        pss_after, uss_after = _pss_uss()
        ok = all(np.array_equal(a, dataset) for a in arrays) and not zeros.any()
        # copy-on-write: one writer gets its own page, the others keep theirs
        arrays[0][0] = -1.0
        cow_ok = arrays[0][0] == -1.0 and all(a[0] == dataset[0] for a in arrays[1:])

        # The pool's memory is its private pages (anonymous memory, counted
        # from pagemap) plus its frames (the memfd's allocated blocks): a
        # merged page is a view of a frame and costs no private page.
        held_before = before["bytes_private"] + before["bytes_frames"]
        held_after = after["bytes_private"] + after["bytes_frames"]
        rows = [
            ("private pages (pagemap)", before["bytes_private"], after["bytes_private"]),
            ("frames (memfd blocks)", before["bytes_frames"], after["bytes_frames"]),
            ("pool total (private + frames)", held_before, held_after),
            ("process PSS (smaps_rollup)", pss_before, pss_after),
            ("process USS (smaps_rollup)", uss_before, uss_after),
            ("bytes_mapped (live buffers)", before["bytes_mapped"], after["bytes_mapped"]),
        ]
        print(f"\nconverged in {elapsed:.2f} s ({after['full_scans']} full scans)\n")
        print(f"  {'':32s}{'before':>14s}{'after':>14s}")
        for name, b, a in rows:
            print(f"  {name:32s}{_mib(b):>14s}{_mib(a):>14s}")
        saved = held_before - held_after
        print(
            f"\n  saved, pool (private + frames):  {_mib(saved).strip()} of an ideal "
            f"{_mib(ideal * PAGE_SIZE).strip()}"
        )
        print(f"  saved, process PSS (smaps_rollup): {_mib(pss_before - pss_after).strip()}")
        print(
            f"  saved, process USS (smaps_rollup): {_mib(uss_before - uss_after).strip()} "
            f"(a frame shared by several views is in no one's USS)"
        )
        print(f"\n  process PSS before the pool: {_mib(pss0).strip()}")
        print("\n  counters (names as in /sys/kernel/mm/ksm):")
        for key in (
            "pages_shared",
            "pages_sharing",
            "pages_unshared",
            "pages_volatile",
            "ksm_zero_pages",
            "pages_scanned",
            "pages_skipped",
            "full_scans",
            "stable_node_chains",
            "stable_node_dups",
            "general_profit",
        ):
            print(f"    {key:22s}{after[key]:>14,}")
        print(
            f"\n  data intact after merging: {'yes' if ok else 'NO'}; "
            f"copy-on-write isolated: {'yes' if cow_ok else 'NO'}"
        )
    if args.no_handler:
        return 0 if ok and cow_ok else 1
    return 0 if ok and cow_ok and handler_demo(args.quiet) else 1


# An unchanged numpy program: duplicates made by copy, tile and np.load, and
# some work on them.  It knows nothing of uksm.
_PROGRAM = """
import json, os, sys, tempfile, time
import numpy as np
size_mib, copies, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
data = np.random.default_rng(0).standard_normal(size_mib << 17)
with tempfile.TemporaryDirectory() as tmp:
    np.save(os.path.join(tmp, "data.npy"), data)
    made = [data.copy(), np.tile(data, 1)]
    made += [np.load(os.path.join(tmp, "data.npy")) for _ in range(copies - 3)]
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    total = sum(float(m.sum()) for m in made)
    time.sleep(0.05)
print(json.dumps({"checksum": repr(total), "arrays": len(made) + 1}))
"""


def handler_demo(quiet: bool, size_mib: int = 16, copies: int = 4, seconds: float = 2.5) -> bool:
    """The same program run plainly and under `python -m uksm run`: the
    output must be the same, and the saving near the ideal."""
    import json
    import subprocess
    import tempfile

    print(
        f"\nuksm run: an unchanged numpy program ({copies} copies of a {size_mib} MiB "
        f"array, made by copy, tile and np.load), run plainly and under "
        f"`python -m uksm run`"
    )
    with tempfile.TemporaryDirectory() as tmp:
        prog = os.path.join(tmp, "program.py")
        stats = os.path.join(tmp, "stats.json")
        with open(prog, "w") as f:
            f.write(_PROGRAM)
        argv = [prog, str(size_mib), str(copies), str(seconds)]
        plain = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        under = subprocess.run(
            [
                sys.executable,
                "-m",
                "uksm",
                "run",
                "--quiet",
                "--pages-to-scan",
                "5000",
                "--sleep-millisecs",
                "10",
                "--json",
                stats,
                *argv,
            ],
            capture_output=True,
            text=True,
        )
        if plain.returncode or under.returncode:
            print(f"  a run failed:\n{plain.stderr[-2000:]}{under.stderr[-2000:]}")
            return False
        with open(stats) as f:
            st = json.load(f)
    same = plain.stdout == under.stdout
    ideal = (copies - 1) * (size_mib << 20)
    saved = st.get("bytes_saved_peak", 0)
    print(f"  output identical: {'yes' if same else 'NO'}")
    print(
        f"  saved under uksm run (peak): {_mib(saved).strip()} of an ideal "
        f"{_mib(ideal).strip()} ({100 * saved / ideal:.0f}%), "
        f"pages_sharing {st.get('pages_sharing', 0):,}"
    )
    return same and saved >= 0.95 * ideal


def stats_cmd(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    with Pool(
        (args.copies + 2) * size + (64 << 20), sleep_millisecs=0, checksum=args.checksum
    ) as pool:
        # held until the scan is done: a dropped array is freed at once
        workload = build_workload(pool, size, args.copies)
        json.dump(pool.scan(full_scans=2), sys.stdout, indent=2)
        del workload
        sys.stdout.write("\n")
    return 0


def bench_cmd(args: argparse.Namespace) -> int:
    if not _need_extra("bench"):
        return 2
    if args.scale:
        return scale_cmd(args)
    from .bench import harness

    try:
        suites = harness.parse_suites(args.suites)
    except ValueError as e:
        print(f"python -m uksm bench: {e}", file=sys.stderr)
        return 2
    given = list(sys.argv[1:] if args.argv is None else args.argv)
    given = given[given.index("bench") + 1 :] if "bench" in given else given
    kw: Dict[str, Any] = {
        "suites": suites,
        "output": args.output,
        "checksum": args.checksum,
        "kernel": not args.no_kernel,
        "command": shlex.join(["python", "-m", "uksm", "bench"] + given),
    }
    if args.size is not None:
        kw["size"] = parse_size(args.size, "--size")
    if args.swap_size is not None:
        kw["swap_size"] = parse_size(args.swap_size, "--swap-size")
    if args.repeats is not None:
        if args.repeats < 1:
            print("python -m uksm bench: --repeats must be at least 1", file=sys.stderr)
            return 2
        kw["repeats"] = args.repeats
    if args.selftest_size is not None:
        kw["selftest_mib"] = max(1, parse_size(args.selftest_size, "--selftest-size") >> 20)
    if args.timeout is not None:
        kw["timeout"] = args.timeout
    cfg = harness.Config.quick(**kw) if args.quick else harness.Config(**kw)
    try:
        harness.run(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted; what was measured is in {cfg.output}/", file=sys.stderr)
        return 130
    return 0


def scale_cmd(args: argparse.Namespace) -> int:
    """python -m uksm bench --scale [--sizes ...]: uksm.bench.scale."""
    from .bench import scale

    try:
        sizes = scale.parse_sizes(args.sizes or scale.DEFAULT_SIZES)
    except ValueError as e:
        print(f"python -m uksm bench: {e}", file=sys.stderr)
        return 2
    given = list(sys.argv[1:] if args.argv is None else args.argv)
    given = given[given.index("bench") + 1 :] if "bench" in given else given
    output = args.output if args.output != "bench-out" else "bench-out/scale"
    try:
        scale.run(
            sizes,
            output,
            kernel=not args.no_kernel,
            timeout=args.timeout if args.timeout is not None else 600.0,
            command=shlex.join(["python", "-m", "uksm", "bench"] + given),
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; what was measured is in {output}/", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if given and given[0] == "run":
        # the program's own options follow: argparse must not see them
        from . import run

        return run.main(given[1:])
    parser = argparse.ArgumentParser(
        prog="python -m uksm", description="uksm: userspace KSM for numpy buffers"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "run",
        help="run a program with its numpy arrays in a pool: "
        "run [options] script.py args... | -m module args...",
    )
    for name, fn, helptext in (
        ("demo", demo, "merge duplicated arrays and show the savings"),
        ("stats", stats_cmd, "scan the demo workload, print stats as JSON"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--size", default="64MiB", help="dataset size (default 64MiB)")
        p.add_argument("--copies", type=int, default=4, help="copies of the dataset (default 4)")
        p.add_argument("--checksum", default="jhash2", choices=["jhash2", "xxhash"])
        p.add_argument("--pages-to-scan", type=int, default=10000)
        p.add_argument("--timeout", type=float, default=60.0)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "demo":
            p.add_argument(
                "--no-handler",
                action="store_true",
                help="skip the second part: an unchanged numpy program run "
                "under `python -m uksm run`",
            )
        p.set_defaults(fn=fn)
    b = sub.add_parser(
        "bench",
        help="uksm against the kernel's KSM: suites, report, plots",
        description="Run the benchmark suites on uksm and (as root, where "
        "/sys/kernel/mm/ksm exists) on the kernel's KSM with the same content "
        "in the same run; write results.json, report.md and PNG plots.",
    )
    b.add_argument(
        "--size",
        default=None,
        help="N of the 2 x N MiB duplicate pairs, and the dataset of the realistic "
        "and steady-state suites (default 128MiB; --quick 16MiB)",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each measurement, medians reported (default 3; --quick 1)",
    )
    b.add_argument(
        "--suites",
        default="all",
        help="comma-separated suite numbers or names: 1 selftest, 2 pairs, "
        "3 realistic, 4 steady, 5 swap (default all)",
    )
    b.add_argument(
        "--quick", action="store_true", help="a small run of every suite (well under three minutes)"
    )
    b.add_argument(
        "--output",
        default="bench-out",
        help="directory for results.json, report.md and the plots (default ./bench-out)",
    )
    b.add_argument(
        "--selftest-size",
        default=None,
        help="region of the selftest -P and -D modes (default 100MiB, as "
        "run_vmtests.sh's ksm_tests -P -s 100; --quick 16MiB)",
    )
    b.add_argument("--checksum", default="jhash2", choices=["jhash2", "xxhash"])
    b.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for any one convergence (default 120)",
    )
    b.add_argument("--no-kernel", action="store_true", help="measure uksm only, even as root")
    b.add_argument(
        "--swap-size",
        default=None,
        help="the array of the swap suite (default 256MiB; --quick 16MiB)",
    )
    b.add_argument(
        "--scale",
        action="store_true",
        help="instead of the suites: cost per page against pool size, uksm and "
        "the kernel's KSM side by side (scale.json, scale.md, scale.png in "
        "--output, default ./bench-out/scale)",
    )
    b.add_argument(
        "--sizes",
        default=None,
        help="pool sizes of --scale, comma-separated (default 64MiB,256MiB,1GiB,4GiB,8GiB)",
    )
    b.set_defaults(fn=bench_cmd, argv=argv)
    args = parser.parse_args(argv)
    if getattr(args, "copies", 1) < 1:
        parser.error("--copies must be at least 1")
    command: Callable[[argparse.Namespace], int] = args.fn
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
