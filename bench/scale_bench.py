#!/usr/bin/env python3
"""Control-plane scale benchmark (issue 14, docs/scale.md): the real switchyard-coordinator
against N simulated workers of tests/tools/sy_loadgen, E experts per Switch layer.

    python3 bench/scale_bench.py --workers N --experts E [--switch-layers L] [--step-ms MS]
        [--steady-s S] [--counts owned|full|none] [--store file|s3] [--kill] [--out FILE]

One run: writes a config, starts the coordinator (--expect-workers N), starts the load
generator, waits until generation 1 reached every worker, measures the coordinator over
--steady-s seconds of steady state (CPU seconds from /proc/PID/stat, RSS from /proc/PID/status,
/v1/status and /metrics sizes and latencies), then (with --kill) closes one member's socket and
waits for the next generation to reach all survivors. The steady window starts 2 s after the
first step is recorded (every member then had its Assign). Prints one JSON object (and appends it to
--out): the load generator's report digested, the coordinator's numbers, /proc/loadavg before and
after. Needs a build folder (SY_BUILD, default ./build).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
BUILD = os.environ.get("SY_BUILD", os.path.join(SRC, "build"))
sys.path.insert(0, os.path.join(SRC, "tests", "py"))

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK  # utime, stime


def mem_kib(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def get(url, timeout=30):
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read()
    return body, (time.perf_counter() - t) * 1e3


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def merge(reps):
    """One report from the load generators' reports: times on one clock (ms after the first's
    start), generations by number (members and sizes summed), placement balance and experts
    moved computed over the whole membership."""
    base = min(r["t0_mono_ms"] for r in reps)
    shift = [r["t0_mono_ms"] - base for r in reps]
    out = {"all_in_ms": max(r["all_in_ms"] + d for r, d in zip(reps, shift)), "events": [], "bytes": {},
           "last_report_wall": {}}
    for r, d in zip(reps, shift):
        for e in r["events"]:
            out["events"].append(dict(e, at_ms=e["at_ms"] + d))
        for k, v in r["bytes"].items():
            b = out["bytes"].setdefault(k, {"count": 0, "total": 0, "max": 0})
            b["count"] += v["count"]
            b["total"] += v["total"]
            b["max"] = max(b["max"], v["max"])
        for k, v in r["last_report_wall"].items():
            out["last_report_wall"][k] = max(v, out["last_report_wall"].get(k, 0))
    gens = {}
    for r, d in zip(reps, shift):
        for g in r["generations"]:
            m = gens.setdefault(g["generation"], {"generation": g["generation"], "world": g["world"], "received": 0,
                                                  "first_assign_ms": 1 << 60, "last_assign_ms": 0,
                                                  "assign_bytes_max": 0, "assign_bytes_total": 0, "members": {},
                                                  "placement": g["placement"]})
            m["received"] += g["received"]
            m["first_assign_ms"] = min(m["first_assign_ms"], g["first_assign_ms"] + d)
            m["last_assign_ms"] = max(m["last_assign_ms"], g["last_assign_ms"] + d)
            m["assign_bytes_max"] = max(m["assign_bytes_max"], g["assign_bytes_max"])
            m["assign_bytes_total"] += g["assign_bytes_total"]
            m["assign_edited"] = m.get("assign_edited", 0) + g.get("assign_edited", 0)
            m["peers_unresolved"] = m.get("peers_unresolved", 0) + g.get("peers_unresolved", 0) + g.get("peers_mismatched", 0)
            m["members"].update({rank: wid for rank, wid in g["members"]})
    out["generations"] = [gens[k] for k in sorted(gens)]
    prev = None
    for g in out["generations"]:
        per = [0] * g["world"]
        for owner in g["placement"]:
            per[owner] += 1
        g["balance"] = [max(per), min(per)]
        if prev:
            members = set(g["members"].values())
            old = [prev["members"].get(o) for o in prev["placement"]]
            new = [g["members"].get(o) for o in g["placement"]]
            g["experts_moved"] = sum(1 for x, y in zip(old, new) if x != y)
            g["experts_of_departed"] = sum(1 for x in old if x not in members)
        prev = g
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--switch-layers", type=int, default=2)
    ap.add_argument("--step-ms", type=int, default=1000)
    ap.add_argument("--steady-s", type=float, default=10)
    ap.add_argument("--counts", default="owned", choices=["owned", "full", "none"])
    ap.add_argument("--peers", default="edit", choices=["edit", "whole"],
                    help="whole: the simulated workers report no peer table held (every Assign whole, as before issue 14's edits)")
    ap.add_argument("--table-frame", default="on", choices=["on", "off"],
                    help="simulated workers take generation 1's peer table as a second frame (Assign.peers_follow)")
    ap.add_argument("--store", default="file")
    ap.add_argument("--every", type=int, default=0, help="checkpoint.every (0: the end only)")
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--failure-ms", type=int, default=3000, help="cluster.failure_timeout_ms (raise it where the "
                    "machine is too loaded for the simulated workers to keep their heartbeats)")
    ap.add_argument("--heartbeat-ms", type=int, default=500, help="cluster.heartbeat_ms")
    ap.add_argument("--coord", default=None, help="the switchyard-coordinator binary (default: the build's)")
    ap.add_argument("--io-threads", type=int, default=1)
    ap.add_argument("--procs", type=int, default=1, help="load generator processes (file descriptors: ~2 per worker)")
    ap.add_argument("--out")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="sy-scale-")
    env = dict(os.environ)
    moto = None
    if a.store == "s3":
        import s3util
        moto = s3util.Moto(auth=False, log=f"{tmp}/moto.log")
        moto.start()
        moto.make_bucket("scale")
        env.update(moto.env())
        store = "s3://scale/ckpt"
    else:
        store = f"{tmp}/store"
    N = a.workers
    cfg = f"{tmp}/scale.yaml"
    with open(cfg, "w") as f:
        f.write(f"""run:
  name: scale
  steps: 1000000
  state_dir: {tmp}/state
  log_every: 100000
model:
  n_experts: {a.experts}
  n_layers: {2 * a.switch_layers}
  switch_every: 2
checkpoint:
  store: {store}
  every: {a.every if a.every else 1000000}
  keep_last: 1
cluster:
  min_workers: {max(1, N // 2)}
  max_workers: {N}
  failure_timeout_ms: {a.failure_ms}
  heartbeat_ms: {a.heartbeat_ms}
status:
  token: t
""")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    clog = open(f"{tmp}/coord.log", "w")
    coord = subprocess.Popen([a.coord or os.path.join(BUILD, "switchyard-coordinator"), cfg, "--bind", "tcp://127.0.0.1:0",
                              "--status-addr", "127.0.0.1:0", "--expect-workers", str(N)],
                             stdout=subprocess.PIPE, stderr=clog, text=True, env=env)
    line = coord.stdout.readline()
    fields = dict(kv.split("=", 1) for kv in line.split()[2:])
    ep, base = fields["bind"], fields["status"]
    res = {"peers": a.peers, "coordinator": a.coord or "build", "workers": N, "experts": a.experts, "switch_layers": a.switch_layers, "step_ms": a.step_ms, "heartbeat_ms": a.heartbeat_ms, "failure_timeout_ms": a.failure_ms,
           "counts": a.counts, "table_frame": a.table_frame, "store": a.store, "loadavg_before": loadavg()}
    cpu0 = cpu_s(coord.pid)
    res["coord_rss_idle_kib"] = mem_kib(coord.pid, "VmRSS")
    t_start = time.time()
    events = ["%g:kill:1" % (a.steady_s + 3 + a.step_ms / 1000)] if a.kill else []
    duration = a.steady_s + (10 if a.kill else 3)
    P = a.procs
    lgs = []
    for k in range(P):
        n = N // P + (1 if k < N % P else 0)
        lgs.append(subprocess.Popen([os.path.join(BUILD, "tests", "sy_loadgen"), "--coordinator", ep, "--workers", str(n),
                                     "--step-ms", str(a.step_ms), "--counts", a.counts, "--peers", a.peers, "--table-frame", a.table_frame,
                                     # the generators without the events outlive the one with them: their
                                     # workers leaving first would open a generation of their own
                                     "--duration", str(duration if k == 0 else duration + 20),
                                     "--report", f"{tmp}/report{k}.json", "--io-threads", str(a.io_threads),
                                     "--prefix", f"lg{k}"] + (sum([["--event", e] for e in events], []) if k == 0 else []),
                                    stderr=open(f"{tmp}/loadgen{k}.log", "w"), env=env))
    lg = lgs[0]
    # wait for generation 1 on every worker (the coordinator's world)
    t_gen = None
    while time.time() - t_start < 600 and lg.poll() is None:
        try:
            st = json.loads(get(base + "/v1/status")[0])
            # a step recorded: every member had its Assign (the Assign flood is over)
            if st.get("generation", 0) >= 1 and st.get("world") == N and st.get("step", 0) >= 1:
                t_gen = time.time()
                break
        except Exception:
            pass
        time.sleep(0.2)
    res["coord_cpu_s_to_first_generation"] = round(cpu_s(coord.pid) - cpu0, 2)
    time.sleep(2)
    c1, w1 = cpu_s(coord.pid), time.time()
    sizes, lat = {"status": [], "metrics": []}, {"status": [], "metrics": []}
    while time.time() - w1 < a.steady_s and lg.poll() is None:
        for k, path in (("status", "/v1/status"), ("metrics", "/metrics")):
            body, ms = get(base + path)
            sizes[k].append(len(body))
            lat[k].append(ms)
        time.sleep(1)
    c2, w2 = cpu_s(coord.pid), time.time()
    res["coord_cpu_share_steady"] = round((c2 - c1) / (w2 - w1), 3)
    res["coord_rss_steady_kib"] = mem_kib(coord.pid, "VmRSS")
    for k in sizes:
        res[f"{k}_bytes"] = max(sizes[k]) if sizes[k] else None
        res[f"{k}_ms_median"] = round(statistics.median(lat[k]), 1) if lat[k] else None
        res[f"{k}_ms_max"] = round(max(lat[k]), 1) if lat[k] else None
    for p in lgs:
        p.wait(timeout=600)
    res["loadgen_rc"] = [p.returncode for p in lgs]
    res["coord_rss_peak_kib"] = mem_kib(coord.pid, "VmHWM")
    res["coord_cpu_s_total"] = round(cpu_s(coord.pid) - cpu0, 2)
    res["loadavg_after"] = loadavg()
    rep = merge([json.load(open(f"{tmp}/report{k}.json")) for k in range(P)])
    gens = rep["generations"]
    res["all_in_ms"] = rep["all_in_ms"]
    if gens:
        g1 = gens[0]
        res["first_generation_ms"] = g1["last_assign_ms"] - rep["all_in_ms"]  # last worker welcomed -> last Assign in
        res["assign_bytes_max"] = g1["assign_bytes_max"]
        res["assign_bytes_generation_total"] = g1["assign_bytes_total"]
        res["placement_max_min"] = g1["balance"]
    kills = [e for e in rep["events"] if e["kind"] == "kill" and e["done"]]
    if kills and len(gens) > 1:
        g2 = gens[1]
        res["death_to_assign_all_ms"] = g2["last_assign_ms"] - kills[0]["at_ms"] if g2["received"] == g2["world"] else None
        res["experts_moved_after_loss"] = g2.get("experts_moved")
        res["experts_of_dead"] = g2.get("experts_of_departed")
        res["placement_max_min_after_loss"] = g2["balance"]
        # the next generation's Assigns: edits of generation 1's peer table (or whole with --peers whole)
        res["assign2_bytes_max"] = g2["assign_bytes_max"]
        res["assign2_bytes_generation_total"] = g2["assign_bytes_total"]
        res["assign2_edited"] = g2.get("assign_edited", 0)
        res["peers_unresolved"] = sum(g.get("peers_unresolved", 0) for g in gens)
    res["generations"] = [{k: g[k] for k in ("generation", "world", "received")} for g in gens]
    res["bytes"] = {k: {"max": v["max"], "per_msg": round(v["total"] / v["count"]) if v["count"] else 0}
                    for k, v in rep["bytes"].items()}
    # step aggregation: last StepDone sent (loadgen wall clock) -> metrics.jsonl "time" of the step
    lat_agg = []
    for line in open(f"{tmp}/state/metrics.jsonl"):
        m = json.loads(line)
        sent = rep["last_report_wall"].get(f"{m['generation']}:{m['step']}")
        if sent is not None:
            lat_agg.append((m["time"] - sent) * 1e3)
    if lat_agg:
        res["steps_recorded"] = len(lat_agg)
        res["step_aggregation_ms_median"] = round(statistics.median(lat_agg), 2)
        res["step_aggregation_ms_max"] = round(max(lat_agg), 2)
    try:
        req = urllib.request.Request(base + "/v1/stop", method="POST", data=b"", headers={"Authorization": "Bearer t"})
        urllib.request.urlopen(req, timeout=30).read()
    except Exception:
        pass
    try:
        coord.wait(timeout=60)
    except subprocess.TimeoutExpired:
        coord.kill()
    if moto:
        moto.stop()
    res["tmp"] = tmp
    print(json.dumps(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
