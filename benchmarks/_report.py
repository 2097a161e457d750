"""Reporting for the merge benchmark: per-job summaries, the Markdown table, the machine.

    res["summary"] = summarize(res["runs"])          # median wall time and peak RSS of the ok runs
    print(size_header(size, args)); print(size_table(size))
    print(compare_line(method, size["compare"][method]))
    report["machine"] = machine_info()

"x floor" is a job's wall time over the plain I/O floor's; GB/s is the bytes a
merge reads over its wall time. The (startup) row gets neither.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {"ok": False, "rc": runs[-1]["rc"] if runs else None}
    walls = [r["wall_s"] for r in ok]
    rss = [r["maxrss_kib"] / 1024 for r in ok]
    anon = [r["sampled_peak_kib"]["RssAnon"] / 1024 for r in ok]
    mapped = [r["sampled_peak_kib"]["RssFile"] / 1024 for r in ok]
    return {
        "ok": len(ok) == len(runs),
        "n": len(ok),
        "wall_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "wall_max_s": max(walls),
        "peak_rss_mib": statistics.median(rss),
        "peak_rss_max_mib": max(rss),
        "sampled_peak_anon_mib": statistics.median(anon),
        "sampled_peak_file_mib": statistics.median(mapped),
    }


def fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def size_table(size: dict) -> str:
    floor = size["results"].get("(floor)/io_floor", {}).get("summary")
    floor_wall = floor["wall_s"] if floor and "wall_s" in floor else None
    lines = [
        fmt_row(["method", "tool", "wall s", "peak RSS MiB", "GB/s", "x floor"]),
        fmt_row(["---", "---", "---:", "---:", "---:", "---:"]),
    ]
    for res in size["results"].values():
        s = res["summary"]
        if "wall_s" not in s:
            cells = [res["method"], res["tool"], f"FAILED rc={s.get('rc')}", "", "", ""]
        else:
            gbps = size["input_bytes"] / 1e9 / s["wall_s"] if res["method"] != "(startup)" else None
            xf = s["wall_s"] / floor_wall if floor_wall and res["method"] != "(startup)" else None
            cells = [
                res["method"],
                res["tool"] + ("" if s["ok"] else " (some runs failed)"),
                f"{s['wall_s']:.2f}",
                f"{s['peak_rss_mib']:.0f}",
                f"{gbps:.2f}" if gbps else "–",
                f"{xf:.2f}" if xf else "–",
            ]
        lines.append(fmt_row(cells))
    return "\n".join(lines)


def size_header(size: dict, args: argparse.Namespace) -> str:
    zero = size.get("zero_fraction") or 0.0
    sparse = f" with {zero:.0%} of each task vector exactly zero" if zero else ""
    loads = [r["load_before"] for res in size["results"].values() for r in res["runs"]]
    load_txt = ""
    if loads:
        l1 = [x[0] for x in loads]
        load_txt = (
            f"; 1-min load avg over runs {min(l1):.2f}–{max(l1):.2f} "
            f"(start {' '.join(f'{x:.2f}' for x in size['load_start'])}, "
            f"end {' '.join(f'{x:.2f}' for x in size['load_end'])})"
        )
    return (
        f"### {size['num_params'] / 1e6:.1f}M params x {size['n_models']} models, {size['dtype']}"
        f"{sparse}, "
        f"{size['model_bytes'] / 1e9:.3f} GB each ({size['input_bytes'] / 1e9:.3f} GB read per merge)\n\n"
        f"cache: {size['cache']}; settle {args.settle:g} s; median of {args.repeat}; "
        f"device: {args.device or 'tool default'}"
        f"{load_txt}\n"
    )


def compare_line(method: str, cmp: dict) -> str:
    """One line on how far wsmerge's output is from mergekit's (compare_outputs.py's JSON)."""
    if "error" in cmp:
        return f"compare {method}: error: {cmp['error'][-300:]}"
    return (
        f"compare {method} (wsmerge vs mergekit): {cmp['tensors_compared']} tensors, "
        f"max |diff| {cmp['max_abs_diff']:.3g} (rel {cmp['max_rel_diff']:.3g}), "
        f"{'equal' if cmp['equal_within_atol'] else 'DIFFERENT'} at atol {cmp['atol']:g}"
        f" ({cmp.get('elements_over_atol', 0)} elements in "
        f"{cmp.get('tensors_over_atol', 0)} tensors over it)"
    )


def matrix_table(report: dict) -> str:
    """Every (size, case, method) in one table: wsmerge's wall time and peak RSS, mergekit's,
    their ratios, and wsmerge's wall time over the plain I/O floor of the same checkpoints."""
    lines = [
        fmt_row(["case", "method", "wsmerge s", "mergekit s", "wall ratio", "wsmerge MiB",
                 "mergekit MiB", "RSS ratio", "wsmerge x floor"]),
        fmt_row(["---", "---"] + ["---:"] * 7),
    ]

    def cell(x: float | None, f: str) -> str:
        return "–" if x is None else format(x, f)

    for size in report["sizes"]:
        res = size["results"]
        floor = res.get("(floor)/io_floor", {}).get("summary", {}).get("wall_s")
        methods = dict.fromkeys(r["method"] for r in res.values() if not r["method"].startswith("("))
        case = f"{size['num_params'] / 1e6:.0f}M {size.get('case', size['dtype'])}"
        for m in methods:
            ws = res.get(f"{m}/wsmerge", {}).get("summary", {})
            mk = res.get(f"{m}/mergekit", {}).get("summary", {})
            w, k = ws.get("wall_s"), mk.get("wall_s")
            wr, kr = ws.get("peak_rss_mib"), mk.get("peak_rss_mib")
            lines.append(fmt_row([
                case, m, cell(w, ".2f"), cell(k, ".2f"),
                cell(w / k if w and k else None, ".2f"), cell(wr, ".0f"), cell(kr, ".0f"),
                cell(wr / kr if wr and kr else None, ".2f"),
                cell(w / floor if w and floor else None, ".2f"),
            ]))
    return "\n".join(lines)


def failed_runs(report: dict) -> list[str]:
    """"tag:method/tool" of every job with a failed run."""
    return [
        f"{s['tag']}:{key}"
        for s in report["sizes"]
        for key, res in s["results"].items()
        if not res["summary"].get("ok")
    ]


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return info
