#!/usr/bin/python3
"""Cost of the peer replicas per step (issue 18): one fault-free `switchyard run` of configs/tiny.yaml
(plus any --set), then, from the workers' logs and metrics.jsonl of that same run: the bytes each
worker sent to its buddies per step, the time of the exchange and of the copy of the previous
step, and their ratio to the mean step time (the step time includes both).

usage: /usr/bin/python3 bench/replica_cost.py [--build DIR] [--steps N] [--workers W] [--threads T]
                                              [--set KEY=VALUE ...] [--keep]
The "606 MB" state of docs/performance.md: --set model.d_model=512 --set model.d_ff=2048
--set model.n_experts=10 --set model.n_heads=8."""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goodput import jsonl, replication  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
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
    state = f"{tmp}/state"
    cmd = [sy, "run", os.path.join(src, "configs", "tiny.yaml"), "--workers", str(args.workers), "--quiet",
           "--set", f"data.train={tmp}/data/train_*.bin", "--set", "data.val=", "--set", f"run.state_dir={state}",
           "--set", f"checkpoint.store={tmp}/store", "--set", f"run.steps={args.steps}",
           "--set", "checkpoint.every=0", "--set", f"train.threads={args.threads}", "--set", "run.log_every=100000"]
    for kv in args.set:
        cmd += ["--set", kv]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        sys.exit(f"replica_cost.py: the run failed (exit {r.returncode}); logs in {state}/logs")
    last = {}
    for m in jsonl(f"{state}/metrics.jsonl"):
        last[m["step"]] = m
    rp = replication(f"{state}/logs", last)
    steady = [m["step_ms"] for k, m in last.items() if k > 1] or [m["step_ms"] for m in last.values()]
    print(f"# {' '.join(args.set) or 'tiny'}: {args.steps} steps, {args.workers} workers x {args.threads} thread(s), "
          f"{time.time() - t0:.0f} s; mean step (steps 2..) {sum(steady) / len(steady):.0f} ms, "
          f"median {sorted(steady)[len(steady) // 2]:.0f} ms")
    print(json.dumps(rp))
    if rp:
        print(f"{rp['bytes'] / 1e6:.2f} MB sent per worker per step; exchange {rp['exchange_ms']:.1f} ms + copy "
              f"{rp['keep_ms']:.1f} ms per step = {rp['ratio'] * 100:.2f} % of the mean step {rp['step_ms']:.0f} ms")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
