#!/usr/bin/env python3
"""Plots of bench/scale_bench.py results against the number of workers N (docs/scale.md):

    python3 bench/scale_plot.py RESULTS.jsonl [MORE.jsonl ...] --out docs/scale.png

One panel per figure (coordinator CPU share and RSS at steady state, generation 1's and the
next generation's Assign bytes, death -> Assign at all survivors, /v1/status bytes, step
aggregation latency); one line per configuration (experts x Switch layers, expert counts on or
off, peer tables whole or as edits). Every point is one measured run; nothing is interpolated or
fitted. Wall-clock panels are upper bounds on a shared machine (docs/scale.md "The machine")."""
import argparse
import json
import sys

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("scale_plot.py needs matplotlib (Debian: apt-get install python3-matplotlib)")

PANELS = [
    ("coord_cpu_share_steady", "coordinator CPU share (1 = one core)", 1),
    ("coord_rss_steady_kib", "coordinator RSS, steady (MiB)", 1 / 1024),
    ("assign_bytes_generation_total", "generation 1: Assign bytes, all members (MB)", 1e-6),
    ("assign2_bytes_generation_total", "after one loss: Assign bytes, all members (MB)", 1e-6),
    ("death_to_assign_all_ms", "death -> Assign at all survivors (ms, upper bound)", 1),
    ("status_bytes", "/v1/status bytes (first page, kB)", 1e-3),
]


def label(r):
    s = f"E={r['experts']}x{r['switch_layers']}"
    if r.get("counts") == "none":
        s += ", no counts"
    if r.get("peers") == "whole":
        s += ", peers whole"
    elif r.get("peers") == "edit":
        s += ", peers edited"
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = [json.loads(x) for f in a.results for x in open(f) if x.strip()]
    if not rows:
        sys.exit("no results")
    series = {}
    for r in rows:
        series.setdefault(label(r), []).append(r)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (key, title, scale) in zip(axes.flat, PANELS):
        for name, rs in sorted(series.items()):
            pts = sorted((r["workers"], r[key] * scale) for r in rs if r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("workers N")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("switchyard coordinator vs simulated workers (bench/scale_bench.py; 2 shared cores)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out} ({len(rows)} runs, {len(series)} series)")


if __name__ == "__main__":
    main()
