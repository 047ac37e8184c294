#!/usr/bin/env python3
"""Markdown tables of bench/scale_bench.py results (docs/scale.md): python3 bench/scale_table.py RESULTS.jsonl"""
import json
import sys


def kib(v):
    return f"{v / 1024:.0f} MiB" if v is not None else "-"


def main():
    rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
    print("| N | E × layers | hb ms | CPU share | RSS steady / peak | all in → Assign at all | death → Assign at all "
          "| step agg. ms (median / max) | /v1/status bytes, ms | /metrics bytes, ms | Assign bytes (one / generation) "
          "| StepDone bytes | experts/worker max/min | moved after 1 loss (of the dead's) | loadavg |")
    print("|" + "---|" * 15)
    for r in rows:
        b = r.get("bytes", {})
        print(f"| {r['workers']} | {r['experts']} × {r['switch_layers']}{' (no counts)' if r.get('counts') == 'none' else ' (full counts)' if r.get('counts') == 'full' else ''} "
              f"| {r.get('heartbeat_ms', 500)} | {r['coord_cpu_share_steady']:.3f} "
              f"| {kib(r['coord_rss_steady_kib'])} / {kib(r['coord_rss_peak_kib'])} "
              f"| {r.get('first_generation_ms', '-')} ms | {r.get('death_to_assign_all_ms', '-')} ms "
              f"| {r.get('step_aggregation_ms_median', '-')} / {r.get('step_aggregation_ms_max', '-')} "
              f"| {r['status_bytes']}, {r['status_ms_median']} | {r['metrics_bytes']}, {r['metrics_ms_median']} "
              f"| {r.get('assign_bytes_max', '-')} / {r.get('assign_bytes_generation_total', 0) / 1e6:.1f} MB "
              f"| {b.get('step_done', {}).get('max', '-')} "
              f"| {'/'.join(map(str, r.get('placement_max_min') or []))} "
              f"| {r.get('experts_moved_after_loss', '-')} ({r.get('experts_of_dead', '-')}) "
              f"| {r['loadavg_before'][0]} |")


if __name__ == "__main__":
    main()
