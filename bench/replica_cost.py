#!/usr/bin/python3
"""Cost of the peer replicas per step (issue 18): fault-free `switchyard run`s of configs/tiny.yaml
(plus any --set) in up to four modes, one after the other, --rounds times (side by side, so the
machine's load moves them alike):
  off      cluster.replicas=0
  inline   cluster.replicas=1, the exchange on the training thread between steps (the workers get
           SY_TEST_REPLICA_INLINE=1: no replica data plane)
  overlap  cluster.replicas=1, the exchange on the replica thread while the next step computes, in
           the idle scheduling class (cluster.replica_background=true, the default)
  foreground  the same in the normal scheduling class (cluster.replica_background=false)
A mode may name another build: MODE@DIR runs MODE with DIR/switchyard (a reference build of
another commit, side by side in the same rounds), e.g. --modes off,overlap,overlap@../old/build.
Step times are of steps 3 on; steps 1 and 2 are printed apart (the model's buffers and then the
replicas' are first used there, once a process). For each run, from its workers' logs and
metrics.jsonl: the bytes each worker sent to its buddies
per step, the exchange and copy times (on whichever thread runs them), the training thread's
share (inline: exchange + copy; overlap: its waits for them), its ratio to the mean step time of
that run, and the CPU seconds of the whole run (every process, getrusage of the children) per
step.

--replica-cpus LIST keeps those CPUs for the replication (docs/fault-tolerance.md "A core for the
replication"): every run, of every mode, starts under `taskset -c` of this process's other CPUs,
and the modes with replicas get cluster.replica_cpus=LIST, which moves the replica thread and its
data plane's threads there. Training has the same CPUs in every mode, and the ratios then show
what the replicas cost a step when they have CPUs of their own (a GPU worker's host, a CPU host
with a core to spare), not the CPU time they take from the training on shared cores.

usage: /usr/bin/python3 bench/replica_cost.py [--build DIR] [--steps N] [--workers W] [--threads T]
                                              [--rounds R] [--modes off,inline,overlap,foreground[@DIR]]
                                              [--replica-cpus LIST] [--set KEY=VALUE ...] [--keep]
The "606 MB" state of docs/performance.md: --set model.d_model=512 --set model.d_ff=2048
--set model.n_experts=10 --set model.n_heads=8."""
import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goodput import jsonl, replication  # noqa: E402


def run_once(args, src, sy, tmp, label, k, j):
    mode, _, other = label.partition("@")
    if other:
        sy = os.path.join(other, "switchyard")
    state = f"{tmp}/state-{mode}-{j}-{k}"
    replicas = "0" if mode == "off" else "1"
    cmd = [sy, "run", os.path.join(src, "configs", "tiny.yaml"), "--workers", str(args.workers), "--quiet",
           "--set", f"data.train={tmp}/data/train_*.bin", "--set", "data.val=", "--set", f"run.state_dir={state}",
           "--set", f"checkpoint.store={tmp}/store-{mode}-{j}-{k}", "--set", f"run.steps={args.steps}",
           "--set", "checkpoint.every=0", "--set", f"train.threads={args.threads}", "--set", "run.log_every=100000"]
    for kv in args.set:
        cmd += ["--set", kv]
    cmd += ["--set", f"cluster.replicas={replicas}"]
    if args.replica_cpus:
        cmd = ["taskset", "-c", args.train_cpus] + cmd
        if mode != "off":
            cmd += ["--set", f"cluster.replica_cpus={args.replica_cpus}"]
    if mode == "foreground":
        cmd += ["--set", "cluster.replica_background=false"]
    env = dict(os.environ)
    env.pop("SY_TEST_REPLICA_INLINE", None)
    if mode == "inline":
        env["SY_TEST_REPLICA_INLINE"] = "1"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        sys.exit(f"replica_cost.py: the {mode} run failed (exit {r.returncode}); logs in {state}/logs")
    last = {}
    for m in jsonl(f"{state}/metrics.jsonl"):
        last[m["step"]] = m
    # steps 1 and 2 apart: the model's buffers and then the replicas' (the second stage and slot,
    # the gradients' buffers: the first delta exchange) are first used there, once a process
    steady = [m["step_ms"] for st, m in last.items() if st > 2] or [m["step_ms"] for m in last.values()]
    first = sum(m["step_ms"] for st, m in last.items() if st <= 2)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out = {"mode": label, "round": k, "wall_s": round(wall, 1), "step_ms": statistics.mean(steady), "first_ms": first,
           "step_median_ms": statistics.median(steady), "cpu_s_per_step": cpu / args.steps,
           "replication": replication(f"{state}/logs", last) if mode != "off" else None}
    if mode != "off" and out["replication"] and out["replication"]["overlapped"] != (mode in ("overlap", "foreground")):
        sys.exit(f"replica_cost.py: the {mode} run's workers did not run that mode: {out['replication']}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--modes", default="off,inline,overlap")
    ap.add_argument("--replica-cpus", default="")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.replica_cpus:
        rep = set()
        try:
            for part in args.replica_cpus.split(","):
                lo, _, hi = part.partition("-")
                rep.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            sys.exit(f"replica_cost.py: --replica-cpus {args.replica_cpus!r} is not a CPU list (1, 2-3, 0,4-7)")
        mine = os.sched_getaffinity(0)
        train = sorted(mine - rep)
        if not rep <= mine or not train:
            sys.exit(f"replica_cost.py: --replica-cpus {args.replica_cpus}: this process runs on CPUs "
                     f"{sorted(mine)}; the list must name some of them and leave others to train on")
        args.train_cpus = ",".join(map(str, train))
    for label in args.modes.split(","):  # before any run: a typo must not cost the runs before it
        mode, _, other = label.partition("@")
        if mode not in ("off", "inline", "overlap", "foreground"):
            sys.exit(f"replica_cost.py: unknown mode {mode!r} in --modes {args.modes}")
        if other and not os.access(os.path.join(other, "switchyard"), os.X_OK):
            sys.exit(f"replica_cost.py: {label}: no executable {os.path.join(other, 'switchyard')}")
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sy = os.path.join(args.build, "switchyard")
    tmp = tempfile.mkdtemp(prefix="sy-repcost-")
    os.makedirs(f"{tmp}/text")
    rnd = random.Random(11)
    words = ["mixture", "of", "experts", "routes", "each", "token", "to", "one", "feed", "forward"]
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(6000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
    subprocess.run([sy, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"], check=True,
                   capture_output=True)
    cpus = (f"; training on CPUs {args.train_cpus}, the replication on CPUs {args.replica_cpus}"
            if args.replica_cpus else "")
    print(f"# {' '.join(args.set) or 'tiny'}: {args.steps} steps, {args.workers} workers x {args.threads} "
          f"thread(s), {args.rounds} round(s) of {args.modes}{cpus}; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for k in range(args.rounds):
        for j, mode in enumerate(args.modes.split(",")):
            o = run_once(args, src, sy, tmp, mode, k, j)
            rows.append(o)
            rp = o["replication"]
            extra = ""
            if rp:
                extra = (f"; {rp['bytes'] / 1e6:.2f} MB sent/worker/step, exchange {rp['exchange_ms']:.1f} ms + copy "
                         f"{rp['keep_ms']:.1f} ms, training thread {rp['train_ms']:.1f} ms/step = "
                         f"{rp['ratio'] * 100:.2f} % of its mean step")
            print(f"{mode:8s} round {k}: mean step {o['step_ms']:.0f} ms (median {o['step_median_ms']:.0f}; "
                  f"steps 1-2 apart: {o['first_ms']:.0f} ms), "
                  f"CPU {o['cpu_s_per_step']:.3f} s/step, wall {o['wall_s']} s{extra}; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    # each mode's mean step over the `off` run of the same round, by round, and the median
    offs = {o["round"]: o["step_ms"] for o in rows if o["mode"] == "off"}
    for mode in args.modes.split(","):
        rs = [o["step_ms"] / offs[o["round"]] for o in rows if o["mode"] == mode and o["round"] in offs]
        if mode != "off" and rs:
            print(f"ratio {mode} / off (mean step), by round: {', '.join(f'{x:.3f}' for x in rs)}; "
                  f"median {statistics.median(rs):.3f}")
    print(json.dumps(rows))
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
