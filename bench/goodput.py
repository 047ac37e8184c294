#!/usr/bin/python3
"""Goodput benchmark (issue 5): the tiny run on a local cluster with one random worker kill per
period (`switchyard run --chaos kill-worker@every=PERIOD,respawn=new`) against the same run without
faults, in one invocation, one run after the other; plus every recovery's phase times.

usage: /usr/bin/python3 bench/goodput.py [--build DIR] [--steps N] [--workers W] [--every DUR]
                                         [--ckpt-every N] [--seed S] [--replicas K] [--keep]
defaults: build/, 1200 steps, 3 workers, 60s, checkpoint.every 50, chaos seed 1.

Data: a synthetic corpus (the generator of tests/py/test_cluster.py), prepared with
`switchyard data prepare` (its train and validation shards: nothing else needs preparing). Config: configs/tiny.yaml with run.steps, checkpoint.every,
train.threads=1 and a local checkpoint store.

Reported per run:
  wall        the launcher's wall time (process start to exit)
  train wall  first generation opened -> run_finished (events.jsonl)
  useful      sum over steps of the step time of the run of each step that was kept (the last
              line of each step in metrics.jsonl: steps re-run after a restore count once)
  goodput     useful / train wall (the coordinator's definition); `coord` is the last
              switchyard_goodput the coordinator exported on /metrics (polled every second)
Per recovery (from chaos.jsonl and events.jsonl):
  kill->lost       the SIGKILL (chaos.jsonl) to worker_lost (the detection delay)
  reconfigure      worker_lost to the new generation_opened
  restore          generation opened to every member restored (the coordinator's phases_ms, when
                   it reports them; else the restore and the first step together)
  first step       to the first step of the new generation aggregated (restore_done)
  lost steps       steps re-run: the furthest step reached before the kill minus the restore step
                   (0 when the restore step is past it)
  source           the restore's source (generation_opened restore_source: replicas | checkpoint)
Per generation change that no kill caused (a respawned worker joining at a checkpoint): the gap
between the last step recorded before the new generation and the first after it (against the
median interval between steps), the steps run again, the restore's source.
Per run, from the workers' logs (cluster.replicas > 0): the replica traffic and time per step
(issue 18): bytes each worker sent, ms in the exchange and in the copy of the live state (on the
replica thread when overlapped), the training thread's share (inline: exchange + copy;
overlapped: its waits inside steps), and that share's ratio to the mean step time of that run.
Prints a Markdown summary (the rows of docs/performance.md "## Fault tolerance (goodput)")."""
import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def jsonl(path):
    out = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


def poll_goodput(state_dir, stop, box):
    """Keeps the last switchyard_goodput of the coordinator's /metrics in box['goodput']."""
    url = None
    while not stop.is_set():
        if url is None:
            for e in jsonl(f"{state_dir}/events.jsonl"):
                if e.get("event") == "coordinator_started":
                    url = e["status"]
        if url:
            try:
                with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
                    m = re.search(r"^switchyard_goodput ([0-9.eE+-]+)$", r.read().decode(), re.M)
                    if m:
                        box["goodput"] = float(m.group(1))
            except Exception:
                pass
        stop.wait(1.0)


def run(sy, cfg, tmp, name, args, chaos=None):
    state = f"{tmp}/state-{name}"
    cmd = [sy, "run", cfg, "--workers", str(args.workers), "--quiet",
           "--set", f"data.train={tmp}/data/train_*.bin", "--set", f"data.val={tmp}/data/val_*.bin",
           "--set", f"run.name={name}",
           "--set", f"run.state_dir={state}", "--set", f"checkpoint.store={tmp}/store",
           "--set", f"run.steps={args.steps}", "--set", f"checkpoint.every={args.ckpt_every}",
           "--set", "train.threads=1", "--set", "run.log_every=100000"]
    if args.replicas is not None:
        cmd += ["--set", f"cluster.replicas={args.replicas}"]
    if chaos:
        cmd += ["--chaos", chaos, "--chaos-seed", str(args.seed)]
    box, stop = {}, threading.Event()
    th = threading.Thread(target=poll_goodput, args=(state, stop, box), daemon=True)
    th.start()
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    stop.set()
    th.join()
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        sys.exit(f"goodput.py: run {name} failed (exit {r.returncode}); logs in {state}/logs")
    ev = jsonl(f"{state}/events.jsonl")
    met = jsonl(f"{state}/metrics.jsonl")
    last = {}
    for m in met:
        last[m["step"]] = m
    opened = [e for e in ev if e["event"] == "generation_opened"]
    fin = [e for e in ev if e["event"] == "run_finished"]
    train_wall = fin[-1]["time"] - opened[0]["time"]
    useful = sum(m["step_ms"] for m in last.values()) / 1e3
    out = {"name": name, "wall": wall, "train_wall": train_wall, "useful": useful, "goodput": useful / train_wall,
           "coord_goodput": box.get("goodput"), "steps": len(last), "recoveries": []}
    kills = [e for e in jsonl(f"{state}/chaos.jsonl") if e.get("action") == "kill-worker"]
    for k in kills:
        lost = [e for e in ev if e["event"] == "worker_lost" and e["worker"] == k["target"] and e["time"] >= k["time"]]
        if not lost:
            continue
        lo = lost[0]
        gen = [e for e in ev if e["event"] == "generation_opened" and e["time"] >= lo["time"]]
        done = [e for e in ev if e["event"] == "restore_done" and e["time"] >= lo["time"]]
        if not gen or not done:
            continue
        g, d = gen[0], done[0]
        before = [m["step"] for m in met if m["time"] <= k["time"]]
        rec = {"kill_lost": lo["time"] - k["time"], "reconfigure": g["time"] - lo["time"],
               "to_first_step": d["time"] - g["time"], "total": d["time"] - k["time"],
               "lost_steps": max(0, (max(before) if before else 0) - g["restore_step"]), "world": g["world"],
               "source": g.get("restore_source", "checkpoint")}
        ph = d.get("phases_ms")
        if ph:
            rec["restore"] = ph["restore"] / 1e3
            rec["first_step"] = ph["first_step"] / 1e3
        out["recoveries"].append(rec)
    # generation changes that no kill caused (a respawned worker's join at a checkpoint): the gap
    # between the last step recorded before the new generation and the first one after it, against
    # the median interval between steps (what the change cost), and the steps run again
    ivals = sorted(b["time"] - a["time"] for a, b in zip(met, met[1:]))
    out["step_interval"] = ivals[len(ivals) // 2] if ivals else 0.0
    out["joins"] = []
    for g in opened[1:]:
        if any(0 <= g["time"] - e["time"] < 2 for e in ev if e["event"] == "worker_lost"):
            continue
        if any(e["event"] == "worker_fault" and 0 <= g["time"] - e["time"] < 0.5 for e in ev):
            src = "after a fault"
        else:
            src = g.get("restore_source", "checkpoint")
        b = [m for m in met if m["time"] <= g["time"]]
        a = [m for m in met if m["time"] > g["time"]]
        if b and a:
            out["joins"].append({"gap": a[0]["time"] - b[-1]["time"], "rerun": max(0, b[-1]["step"] - g["restore_step"]),
                                 "source": src, "world": g["world"]})
    out["lines"] = len(met)
    out["replication"] = replication(f"{state}/logs", last)
    return out


def replication(logdir, last):
    """The last 'replicas (...)' line of each worker log (process totals) → per-step averages."""
    # wait_ms: the training thread's waits inside the steps (overlapped); start waits: the exchange
    # of a generation's restored or fresh state, once per generation (not a per-step cost)
    pat = re.compile(r"replicas \((\d+) per worker\): (\d+) exchanges, (\d+) bytes sent, (\d+) received, "
                     r"([0-9.]+) ms exchanging, ([0-9.]+) ms copying[^,]*(?:, ([0-9.]+) ms of training waiting[^,]*)?"
                     r"(?:, ([0-9.]+) ms waiting at generation starts)?"
                     r"(.*overlapped)?")
    per = []
    if os.path.isdir(logdir):
        for f in sorted(os.listdir(logdir)):
            if not f.startswith("worker-"):
                continue
            m = None
            for line in open(os.path.join(logdir, f), errors="replace"):
                m = pat.search(line) or m
            if m and int(m.group(2)) > 0:
                n = int(m.group(2))
                ex, kp = float(m.group(5)) / n, float(m.group(6)) / n
                wait = float(m.group(7)) / n if m.group(7) else None
                # the training thread's share: the waits when overlapped, else the whole exchange + copy
                train = wait if m.group(9) and wait is not None else ex + kp
                per.append({"bytes": int(m.group(3)) / n, "exchange_ms": ex, "keep_ms": kp, "exchanges": n,
                            "wait_ms": wait or 0.0, "train_ms": train, "overlapped": bool(m.group(9)),
                            "start_wait_ms": float(m.group(8) or 0) / n})
    if not per or not last:
        return None
    step_ms = statistics.mean(m["step_ms"] for m in last.values())
    ex = statistics.mean(p["exchange_ms"] for p in per)
    kp = statistics.mean(p["keep_ms"] for p in per)
    tr = statistics.mean(p["train_ms"] for p in per)
    return {"bytes": statistics.mean(p["bytes"] for p in per), "exchange_ms": ex, "keep_ms": kp,
            "wait_ms": statistics.mean(p["wait_ms"] for p in per), "train_ms": tr, "step_ms": step_ms,
            "ratio": tr / step_ms, "overlapped": all(p["overlapped"] for p in per), "workers": len(per)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--every", default="60s")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=None, help="cluster.replicas (default: the config's)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sy = os.path.join(args.build, "switchyard")
    if not os.access(sy, os.X_OK):
        sys.exit(f"goodput.py: {sy} not built (cmake --build {args.build})")
    cfg = os.path.join(src, "configs", "tiny.yaml")
    tmp = tempfile.mkdtemp(prefix="sy-goodput-")
    os.makedirs(f"{tmp}/text")
    rnd = random.Random(11)
    words = ["mixture", "of", "experts", "routes", "each", "token", "to", "one", "feed", "forward",
             "network", "and", "the", "capacity", "factor", "bounds", "load"]
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(6000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
    subprocess.run([sy, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"], check=True,
                   capture_output=True)
    chaos = f"kill-worker@every={args.every},respawn=new"
    print(f"# goodput: tiny, {args.steps} steps, {args.workers} workers x 1 thread, checkpoint.every "
          f"{args.ckpt_every}; faults: --chaos {chaos} --chaos-seed {args.seed}", flush=True)
    base = run(sy, cfg, tmp, "nofault", args)
    print(f"# no faults done: {base['wall']:.1f} s", flush=True)
    hit = run(sy, cfg, tmp, "chaos", args, chaos)
    print(f"# with faults done: {hit['wall']:.1f} s, {len(hit['recoveries'])} recoveries", flush=True)

    def cg(x):
        return f"{x:.3f}" if x is not None else "-"

    print()
    print("| run | wall s | train wall s | useful s | goodput | coordinator's goodput | recoveries |")
    print("|---|---|---|---|---|---|---|")
    for r in (base, hit):
        print(f"| {'no faults' if r is base else 'kill every ' + args.every} | {r['wall']:.1f} | {r['train_wall']:.1f} | "
              f"{r['useful']:.1f} | {r['goodput']:.3f} | {cg(r['coord_goodput'])} | {len(r['recoveries'])} |")
    recs = hit["recoveries"]
    if recs:
        print()
        print("| recovery | kill→lost ms | reconfigure ms | restore ms | first step ms | kill→first step ms | steps re-run | world after | source |")
        print("|---|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(recs, 1):
            rs = f"{r['restore'] * 1e3:.0f}" if "restore" in r else "-"
            fs = f"{r['first_step'] * 1e3:.0f}" if "first_step" in r else f"{r['to_first_step'] * 1e3:.0f} (with restore)"
            print(f"| {i} | {r['kill_lost'] * 1e3:.0f} | {r['reconfigure'] * 1e3:.0f} | {rs} | {fs} | "
                  f"{r['total'] * 1e3:.0f} | {r['lost_steps']} | {r['world']} | {r['source']} |")
        med = lambda k: statistics.median(r[k] for r in recs) * 1e3
        print()
        print(f"median kill→lost {med('kill_lost'):.0f} ms, reconfigure {med('reconfigure'):.0f} ms, "
              f"generation opened→first step {med('to_first_step'):.0f} ms, kill→first step {med('total'):.0f} ms")
    js = hit["joins"]
    if js:
        print()
        print(f"generation changes without a kill (joins): {len(js)}; gap from the last step before to the first "
              f"after: median {statistics.median(j['gap'] for j in js) * 1e3:.0f} ms, "
              f"{min(j['gap'] for j in js) * 1e3:.0f}-{max(j['gap'] for j in js) * 1e3:.0f} ms (median interval "
              f"between steps {hit['step_interval'] * 1e3:.0f} ms); steps re-run {sum(j['rerun'] for j in js)}; "
              f"sources {sorted(set(j['source'] for j in js))}")
    for r in (base, hit):
        rp = r.get("replication")
        if rp:
            print(f"replication ({'no faults' if r is base else 'with faults'}, {rp['workers']} worker logs): "
                  f"{rp['bytes'] / 1e6:.2f} MB sent per worker per step, {rp['exchange_ms']:.1f} ms exchange + "
                  f"{rp['keep_ms']:.1f} ms copy of the live state per step "
                  f"({'overlapped' if rp['overlapped'] else 'inline'}); the training thread's share "
                  f"{rp['train_ms']:.2f} ms per step = {rp['ratio'] * 100:.2f} % of the mean step "
                  f"({rp['step_ms']:.0f} ms)")
    print(f"metrics lines: {hit['lines']} for {hit['steps']} steps with faults ({hit['lines'] - hit['steps']} run twice)")
    print(f"goodput with faults / without: {hit['goodput'] / base['goodput']:.3f}; "
          f"wall time with faults / without: {hit['wall'] / base['wall']:.3f}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
