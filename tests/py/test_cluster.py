"""The local cluster (`switchyard run`) end to end, with real coordinator and worker processes
on loopback.

W-invariance, the headline property (model spec §5): the tiny config run 30 steps with
`switchyard train` (one process) and with `switchyard run --workers 1, 2, 3, 4` gives the same
loss at every step exactly (the fp64 values metrics.jsonl records; E = 8 experts, so 3 workers is an uneven placement).
Also: a run restored from a checkpoint with a different number of workers continues correctly;
Ctrl-C stops everything cleanly; bad flags are refused."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import sytest
from sytest import SY, CFG, check, failures, metrics


def sets(tmp, name, steps=30, extra=()):
    s = {"data.train": f"{tmp}/data/train_*.bin", "data.val": "", "run.name": name, "run.state_dir": f"{tmp}/state-{name}",
         "checkpoint.store": f"{tmp}/store", "run.steps": str(steps), "checkpoint.every": "10",
         "train.threads": "1"}
    s.update(dict(extra))
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def run_cluster(tmp, name, workers, steps=30, extra=(), timeout=600, resume=False):
    t = time.time()
    r = sytest.run([SY, "run", CFG, "--workers", str(workers), "--quiet"] + (["--resume"] if resume else []) + sets(tmp, name, steps, extra),
                   capture_output=True, text=True, timeout=timeout)
    print(f"   run --workers {workers}: {time.time() - t:.1f} s, exit {r.returncode}", flush=True)
    if r.returncode != 0:
        print(r.stderr[-3000:])
        for f in sorted(os.listdir(f"{tmp}/state-{name}/logs")) if os.path.isdir(f"{tmp}/state-{name}/logs") else []:
            print("----", f)
            print(open(f"{tmp}/state-{name}/logs/{f}").read()[-1500:])
    return r


def main():
    tmp = sytest.make_tmp("sy-cluster-")
    rnd = random.Random(11)
    os.makedirs(f"{tmp}/text")
    words = ["mixture", "of", "experts", "routes", "each", "token", "to", "one", "feed", "forward",
             "network", "and", "the", "capacity", "factor", "bounds", "load"]
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(6000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True)
    check(r.returncode == 0, "data prepared")

    # reference: one process
    r = sytest.run([SY, "train", CFG, "--quiet"] + sets(tmp, "single", extra={"train.threads": "2"}),
                   capture_output=True, text=True, timeout=600)
    check(r.returncode == 0, f"single-process run ({r.stderr[-300:]})")
    ref = metrics(tmp, "single")
    check(sorted(ref) == list(range(1, 31)), "single-process run has 30 steps")

    for w in [1, 2, 3, 4]:
        name = f"w{w}"
        r = run_cluster(tmp, name, w)
        check(r.returncode == 0, f"switchyard run --workers {w} completes")
        if r.returncode != 0:
            continue
        got = metrics(tmp, name)
        check(sorted(got) == list(range(1, 31)), f"--workers {w}: 30 steps in metrics.jsonl")
        worst = max(abs(got[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in ref if s in got)
        check(worst == 0.0, f"--workers {w}: every step's loss equals the single process exactly (worst {worst:.2e})")
        check(all(got[s]["world"] == w for s in got), f"--workers {w}: world = {w} in metrics")
        check(os.path.exists(f"{tmp}/store/{name}/ckpt/step-000000030/MANIFEST.json"), f"--workers {w}: final checkpoint committed")
        if w == 3:
            man = json.load(open(f"{tmp}/store/{name}/ckpt/step-000000030/MANIFEST.json"))
            names = sorted(f["name"] for f in man["files"])
            check(len(names) == 18, f"--workers 3: manifest lists dense + 8 experts, 18 files ({len(names)})")

    # restore with another number of workers: 20 steps on 2 workers, then continue to 30 on 3
    r = run_cluster(tmp, "regrow", 2, steps=20)
    check(r.returncode == 0, "20 steps on 2 workers")
    r = run_cluster(tmp, "regrow", 3, steps=30, resume=True)
    check(r.returncode == 0, "continued to 30 steps on 3 workers from the step-20 checkpoint")
    if r.returncode == 0:
        got = metrics(tmp, "regrow")
        worst = max(abs(got[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in range(21, 31))
        check(worst == 0.0, f"steps 21..30 after the change of world size equal the single process exactly (worst {worst:.2e})")

    # Ctrl-C: the launcher stops the coordinator and workers and exits non-zero
    p = sytest.Popen([SY, "run", CFG, "--workers", "2", "--quiet"] + sets(tmp, "interrupt", steps=100000),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=30)
        check(p.returncode != 0, f"Ctrl-C: exit status non-zero ({p.returncode})")
    except subprocess.TimeoutExpired:
        p.kill()
        check(False, "Ctrl-C: the launcher stopped within 30 s")
    left = sytest.run(["pgrep", "-f", f"{tmp}/state-interrupt"], capture_output=True, text=True).stdout.split()
    time.sleep(1)
    left = [x for x in sytest.run(["pgrep", "-f", "switchyard-(worker|coordinator)"], capture_output=True, text=True).stdout.split()]
    # only processes of this test would match the interrupt run's ports; check none of ours survive
    ours = []
    for pid in left:
        try:
            cmd = open(f"/proc/{pid}/cmdline").read()
            if "interrupt" in cmd or tmp in cmd:
                ours.append(pid)
        except OSError:
            pass
    check(not ours, f"Ctrl-C: no coordinator or worker left running ({ours})")

    r = sytest.run([SY, "run", CFG, "--workers", "2", "--set", f"data.train={tmp}/nowhere/train_*.bin"],
                   capture_output=True, text=True, timeout=60)
    check(r.returncode == 1 and "data.train" in r.stderr and "nowhere" in r.stderr,
          f"missing data refused before any process starts ({r.stderr.strip()[-160:]})")
    r = sytest.run([SY, "run", CFG, "--workers", "0"], capture_output=True, text=True)
    check(r.returncode == 2 and "--workers" in r.stderr, "--workers 0 refused")
    r = sytest.run([SY, "run", "--help"], capture_output=True, text=True)
    check(r.returncode == 0 and "usage" in r.stdout, "run --help")

    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
