"""uksm.bench.report - the benchmark harness's report: Markdown, a console table, plots.

Everything here reads the results dict that uksm.bench.harness builds (and writes
as results.json), so a report can be remade from a results.json alone:

    python -c "import json, uksm.bench.report as r; \\
               print(r.markdown(json.load(open('bench-out/results.json'))))"

Numbers are printed with three significant figures; a figure that was not
measured is never printed as a number: the kernel column says "not
available" (and the header says why) when the kernel side could not run,
and a suite that does not exist yet says "not available yet".

The plots use matplotlib's Agg canvas directly (no pyplot, no global
backend switch), so the harness can run inside a process that has its own
matplotlib setup.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MiB = 1 << 20

HEADER = ("suite", "metric", "uksm", "kernel", "ratio", "unit")


def num(v: Optional[float], unit: str = "") -> str:
    """A figure with three significant digits (fractions with four decimals)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if unit == "fraction":
        return f"{v:.4f}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    return f"{v:.3g}"


def _ratio(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def rows(results: Dict[str, Any]) -> List[List[str]]:
    """The table's rows (suite, metric, uksm, kernel, ratio, unit)."""
    out = []
    for key, s in results.get("suites", {}).items():
        out.extend(_suite_rows(s, key))
    return out


def _suite_rows(s: Dict[str, Any], key: str) -> List[List[str]]:
    name = f"{s['number']} {key}"
    out = []
    for m in s.get("metrics", []):
        if m.get("uksm_text"):
            u = m["uksm_text"]
        elif m["uksm"] is None:
            u = "failed" if s["status"] == "error" else "n/a"
        else:
            u = num(m["uksm"], m["unit"])
        if m.get("kernel_text"):
            k = m["kernel_text"]
        elif not s.get("kernel_measured"):
            k = "not available"
        elif m["kernel"] is None:
            k = "failed" if s["status"] == "error" else "n/a"
        else:
            k = num(m["kernel"], m["unit"])
        label = m["label"]
        if m.get("better"):
            label += f" ({m['better']} is better)"
        out.append([name, label, u, k, _ratio(m["ratio"]), m["unit"]])
    if s["status"] == "error":
        last = (s.get("error") or "").strip().splitlines()[-1:] or ["error"]
        out.append([name, f"suite failed: {last[0]}", "", "", "", ""])
    elif s["status"] == "interrupted":
        out.append([name, "interrupted", "", "", "", ""])
    return out


def markdown_table(table_rows: List[List[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in table_rows]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def text_table(table_rows: List[List[str]], header: bool = True) -> List[str]:
    """Aligned columns for the console."""
    body = ([list(HEADER)] if header else []) + table_rows
    if not body:
        return []
    widths = [max(len(r[i]) for r in body) for i in range(len(HEADER))]
    widths[1] = min(widths[1], 70)
    out = []
    for j, r in enumerate(body):
        cells = []
        for i, c in enumerate(r):
            if i in (2, 3, 4):
                cells.append(c.rjust(widths[i]))
            else:
                cells.append(c.ljust(widths[i]))
        out.append("  ".join(cells).rstrip())
        if header and j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def rows_text(suite: Dict[str, Any], key: str) -> List[str]:
    return text_table(_suite_rows(suite, key), header=True)


def table(results: Dict[str, Any]) -> str:
    return "\n".join(text_table(rows(results)))


def _knobs(k: Dict[str, Any]) -> str:
    if not k:
        return "n/a"
    return ", ".join(f"{n}={v}" for n, v in k.items())


def _gib(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / (1 << 30):.1f} GiB"


def markdown(results: Dict[str, Any]) -> str:
    """report.md: machine facts and knobs, the table, per-suite details, plots."""
    m = results["machine"]
    cfg = results["config"]
    ks = results["kernel_side"]
    out = ["# uksm benchmark: uksm and the kernel's KSM on this machine", ""]
    when = results.get("started", "")
    cmd = results.get("command") or "python -m uksm bench"
    status = results.get("status", "")
    out.append(
        f"Run {when} with `{cmd}`; {results.get('seconds', 0):.0f} s"
        + ("" if status == "done" else f" (**{status}**)")
        + "."
    )
    out.append("")
    out.append("## Machine")
    out.append("")
    out.append("| | |")
    out.append("|---|---|")
    out.append(f"| kernel | {m['kernel']} ({m['machine']}) {m.get('kernel_version', '')} |")
    out.append(
        f"| CPUs | {m['cpu_count']} ({m.get('cpu_model') or 'unknown model'}; "
        f"{m.get('cpus_usable')} usable) |"
    )
    out.append(f"| memory | {_gib(m.get('mem_total'))}; swap {_gib(m.get('swap_total'))} |")
    out.append(f"| page size, vm.max_map_count | {m['page_size']}, {m.get('max_map_count')} |")
    out.append(f"| transparent hugepages | {m.get('transparent_hugepage') or 'n/a'} |")
    out.append(f"| Python, numpy, uksm | {m['python']}, {m['numpy']}, {m['uksm']} |")
    if ks["available"]:
        side = (
            "measured in the same run, on the same content (private anonymous "
            "memory, MADV_MERGEABLE); knobs saved and restored around each suite"
        )
    else:
        side = f"**not available: {ks['reason']}**; only uksm was measured"
    out.append(f"| kernel KSM | {side} |")
    before = results.get("kernel_knobs_before") or {}
    if before:
        out.append(f"| kernel KSM knobs as found | {_knobs(before)} |")
        restored = results.get("knobs_restored")
        out.append(
            "| kernel KSM knobs after the run | "
            + (
                "unchanged (restored)"
                if restored
                else f"**CHANGED**: {_knobs(results.get('kernel_knobs_after') or {})}"
            )
            + " |"
        )
    out.append(
        f"| run | {cfg['repeats']} repeat(s); size {cfg['size'] / MiB:g} MiB; "
        f"checksum {cfg['checksum']}{'; quick' if cfg.get('quick_run') else ''} |"
    )
    out.append("")
    out.append("## Results")
    out.append("")
    out.append(
        "Each figure is the median over the repeats; **ratio = uksm / kernel**, "
        "computed within each repeat (both measured back to back, in alternating "
        "order), then the median of those ratios.  Whether a ratio below 1 favours "
        "uksm depends on the metric: it says which direction is better."
    )
    if not ks["available"]:
        out.append("")
        out.append(
            f"The kernel's KSM was not measured ({ks['reason']}): its column says "
            '"not available" and there are no ratios.'
        )
    out.append("")
    out.append(markdown_table(rows(results)))
    out.append("")
    plots = results.get("plots") or []
    if plots:
        out.append("## Plots")
        out.append("")
        for p in plots:
            caption = {
                "memory.png": "Memory over time while converging (suite 3): PSS and "
                "bytes_resident (private pages + frames) for uksm; PSS "
                "and the pages_sharing-derived figure for the kernel",
                "ratios.png": "uksm / kernel per metric, by suite: bars are medians, "
                "dots the individual repeats",
            }.get(p, p)
            out.append(f"![{caption}]({p})")
            out.append("")
            out.append(f"*{caption}.*")
            out.append("")
    out.append("## Suites: parameters, knobs, runs")
    for key, s in results.get("suites", {}).items():
        out.append("")
        out.append(f"### {s['number']}. {s['title']}")
        out.append("")
        out.append(f"Status: {s['status']}; {s['seconds']:.1f} s.")
        if s["parameters"]:
            out.append("")
            for name, v in s["parameters"].items():
                out.append(f"- {name}: {v}")
        if s.get("uksm_knobs"):
            out.append("")
            uk = s["uksm_knobs"]
            if isinstance(next(iter(uk.values())), dict):
                for var, k in uk.items():
                    out.append(f"- uksm knobs ({var}): {_knobs(k)}")
            else:
                out.append(f"- uksm knobs: {_knobs(uk)}")
        if s.get("kernel_measured"):
            kk = s.get("kernel_knobs") or {}
            if kk and isinstance(next(iter(kk.values())), dict):
                for var, k in kk.items():
                    out.append(f"- kernel knobs ({var}): {_knobs(k)}")
            elif kk:
                out.append(f"- kernel knobs: {_knobs(kk)}")
        elif key != "swap":
            out.append(f"- kernel: not available ({s.get('kernel_note') or ks['reason']})")
        for note in s.get("notes", []):
            out.append(f"- {note}")
        runs = [mm for mm in s.get("metrics", []) if mm["uksm_runs"] or mm["kernel_runs"]]
        if runs and cfg["repeats"] > 1:
            out.append("")
            out.append("| metric | uksm per run | kernel per run | ratio per run |")
            out.append("|---|---|---|---|")
            for mm in runs:
                out.append(
                    f"| {mm['label']} | "
                    + ", ".join(num(v, mm["unit"]) for v in mm["uksm_runs"])
                    + " | "
                    + (", ".join(num(v, mm["unit"]) for v in mm["kernel_runs"]) or "n/a")
                    + " | "
                    + (", ".join(_ratio(v) for v in mm["ratio_runs"]) or "n/a")
                    + " |"
                )
        if s["status"] == "error" and s.get("error"):
            out.append("")
            out.append("```")
            out.append(s["error"].rstrip())
            out.append("```")
    out.append("")
    out.append("## Reproduce")
    out.append("")
    out.append("```sh")
    out.append(f"{cmd}")
    out.append("```")
    out.append("")
    out.append(
        "(as root for the kernel side; results.json holds every run's figures and "
        "the sampled memory timelines)"
    )
    out.append("")
    return "\n".join(out)


# -- plots -------------------------------------------------------------------------------


def _figure(w: float, h: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def where(results: Dict[str, Any]) -> str:
    """The machine a chart was measured on, for its title."""
    m = results.get("machine", {})
    return (
        f"{m.get('cpu_model') or 'unknown CPU'}, {m.get('cpu_count')} cores, "
        f"{m.get('kernel', 'unknown kernel')}"
    )


def _pick(timelines: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The repeat whose time to target is the median one (else the first)."""
    if not timelines:
        return None
    done = [t for t in timelines if t.get("time_to_target") is not None]
    if not done:
        return timelines[0]
    done.sort(key=lambda t: t["time_to_target"])
    return done[(len(done) - 1) // 2]


def plot_memory(results: Dict[str, Any], path: str) -> bool:
    """Suite 3's memory over time, uksm and kernel side by side."""
    s = results.get("suites", {}).get("realistic")
    if not s or not s["timelines"]["uksm"]:
        return False
    fig = _figure(12, 4.8)
    axes = fig.subplots(1, 2, sharey=True)
    ks = results["kernel_side"]
    for ax, side, name, second in (
        (axes[0], "uksm", "uksm", "bytes_resident (private pages + frames)"),
        (axes[1], "kernel", "kernel KSM", "mapped - (pages_sharing + ksm_zero_pages)"),
    ):
        tl = _pick(s["timelines"][side])
        ax.set_title(name)
        ax.set_xlabel("seconds since the scanner started")
        ax.grid(True, alpha=0.3)
        if tl is None:
            why = ks["reason"] if not ks["available"] else "not measured"
            ax.text(
                0.5,
                0.5,
                f"kernel KSM not available:\n{why}",
                ha="center",
                va="center",
                transform=ax.transAxes,
                wrap=True,
            )
            continue
        t = [p["t"] for p in tl["samples"]]
        ax.plot(t, [p["pss"] / MiB for p in tl["samples"]], "-", lw=2, label="PSS (anon + shmem)")
        ax.plot(t, [p["resident"] / MiB for p in tl["samples"]], "--", lw=2, label=second)
        ideal = (tl["total_bytes"] - tl["ideal_pages"] * 4096) / MiB
        ax.axhline(ideal, color="gray", ls=":", label="ideal after merging")
        if tl.get("time_to_target") is not None:
            ax.axvline(
                tl["time_to_target"],
                color="green",
                ls="-.",
                lw=1,
                label=f"99% of ideal: {tl['time_to_target']:.2f} s",
            )
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("MiB")
    axes[0].set_ylim(bottom=0)
    size = s["parameters"].get("dataset_mib")
    fig.suptitle(
        f"Memory while converging: realistic numpy workload (dataset {size:g} MiB, "
        f"volatile region rewritten throughout); lower is better\n{where(results)}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path)
    return True


_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]


def plot_ratios(results: Dict[str, Any], path: str) -> None:
    """uksm/kernel per metric, grouped by suite, turned so that right is
    always uksm's better side: a metric where lower is better is drawn as
    kernel/uksm.  Log scale, 1 = parity; labels in full, wrapped."""
    import textwrap

    items = []
    for key, s in results.get("suites", {}).items():
        for m in s.get("metrics", []):
            # a ratio on the log scale, of a metric with a better side (a
            # setting such as the pages_to_scan an advisor chose has none)
            if m["ratio"] is not None and m["ratio"] > 0 and m.get("better"):
                items.append((s["number"], key, m))
    title = "uksm against the kernel's KSM, per metric (same content, same run)"
    if not items:
        fig = _figure(11, 2.5)
        ax = fig.subplots()
        ks = results["kernel_side"]
        why = ks["reason"] if not ks["available"] else "no suite measured both sides"
        ax.text(
            0.5,
            0.5,
            f"No uksm / kernel ratios: {why}",
            ha="center",
            va="center",
            transform=ax.transAxes,
            wrap=True,
        )
        ax.set_axis_off()
        fig.suptitle(f"{title}\n{where(results)}", fontsize=11)
        fig.savefig(path)
        return

    def advantage(r: float, better: Optional[str]) -> float:
        # > 1: uksm better, whichever way the metric runs
        return 1.0 / r if better == "lower" else r

    labels: List[str] = []
    for number, key, m in reversed(items):
        turn = {"lower": "kernel / uksm", "higher": "uksm / kernel"}.get(
            m["better"] or "", "uksm / kernel"
        )
        text = f"{number} {key}: {m['label']} [{m['unit']}; {turn}]"
        labels.append("\n".join(textwrap.wrap(text, 70)))
    heights = [0.28 * (lab.count("\n") + 1) + 0.2 for lab in labels]
    fig = _figure(14, max(3.0, sum(heights) + 2.0))
    ax = fig.subplots()
    ys, y = [], 0.0
    for h in heights:
        ys.append(y + h / 2)
        y += h
    vals = []
    for yy, (number, _key, m) in zip(ys, reversed(items)):
        color = _COLORS[(number - 1) % len(_COLORS)]
        adv = advantage(m["ratio"], m["better"])
        # bars start at parity (1) and reach the ratio, left or right
        ax.barh(yy, adv - 1.0, left=1.0, color=color, alpha=0.6, height=0.22)
        pts = [advantage(r, m["better"]) for r in m["ratio_runs"] if r is not None and r > 0]
        ax.plot(pts, [yy] * len(pts), "k.", ms=5)
        ax.text(max(pts + [adv, 1.0]) * 1.08, yy, f"{adv:.3g}x", va="center", fontsize=8)
        vals += pts + [adv]
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(0, y)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=1)
    lo, hi = min(vals + [1.0]), max(vals + [1.0])
    ax.set_xlim(lo / 1.6, hi * 2.2)
    ax.set_xlabel(
        "<- kernel KSM better          advantage (log scale; 1 = the same)          uksm better ->"
    )
    fig.suptitle(
        f"{title}\nbars: median of the per-run ratios, dots: each repeat; "
        f"right of 1 is better for uksm\n{where(results)}",
        fontsize=11,
    )
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_plots(results: Dict[str, Any], outdir: str) -> List[str]:
    """Write the PNGs into @outdir; returns their file names."""
    written = []
    if plot_memory(results, os.path.join(outdir, "memory.png")):
        written.append("memory.png")
    plot_ratios(results, os.path.join(outdir, "ratios.png"))
    written.append("ratios.png")
    return written
