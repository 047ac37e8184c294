"""W-invariance in bf16 (model spec §4-5): the tiny config with train.precision=bf16, run
STEPS steps by `switchyard run --workers 3` (real coordinator and worker processes on loopback;
E = 8 experts over 3 workers is an uneven expert placement, so the all-to-alls carry rows)
gives exactly the same loss at every step (the fp64 values metrics.jsonl records) as
`switchyard run --workers 1` and as `switchyard train` (one process). Exact, as for fp32
(test_cluster.py): the rounding points of §4 are per element and the reductions run in the same
order whatever the world size, so nothing may change with W.
Also checks that bf16 ran (the bf16 losses differ from an fp32 run's), so the equality is not
two fp32 runs agreeing."""
import os
import random
import sys
import time

import sytest
from sytest import SY, CFG, check, failures, metrics

STEPS = 20


def sets(tmp, name, precision="bf16", threads=1):
    s = {"data.train": f"{tmp}/data/train_*.bin", "data.val": "", "run.name": name,
         "run.state_dir": f"{tmp}/state-{name}", "checkpoint.store": f"{tmp}/store", "run.steps": str(STEPS),
         "checkpoint.every": "0", "train.threads": str(threads), "train.precision": precision}
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def launch(tmp, name, args):
    t = time.time()
    r = sytest.run([SY] + args, capture_output=True, text=True, timeout=800)
    print(f"   {' '.join(args[:4])}: {time.time() - t:.1f} s, exit {r.returncode}", flush=True)
    if r.returncode != 0:
        print(r.stderr[-3000:])
        logs = f"{tmp}/state-{name}/logs"
        for f in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            print("----", f)
            print(open(f"{logs}/{f}").read()[-1500:])
    return r


def compare(ref, got, what):
    check(sorted(got) == list(range(1, STEPS + 1)), f"{what}: {STEPS} steps in metrics.jsonl")
    diff = [s for s in ref if s in got and got[s]["loss"] != ref[s]["loss"]]
    for s in diff[:5]:
        print(f"   step {s}: {got[s]['loss']!r} vs {ref[s]['loss']!r}")
    check(not diff, f"{what}: every step's loss equals --workers 1 exactly ({len(diff)} steps differ)")


def main():
    tmp = sytest.make_tmp("sy-bf16w-")
    rnd = random.Random(12)
    os.makedirs(f"{tmp}/text")
    words = ["mixture", "of", "experts", "routes", "each", "token", "to", "one", "feed", "forward",
             "network", "and", "bfloat16", "keeps", "eight", "bits", "of", "mantissa"]
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                       capture_output=True, text=True)
    check(r.returncode == 0, "data prepared")

    r = launch(tmp, "w1", ["run", CFG, "--workers", "1", "--quiet"] + sets(tmp, "w1"))
    check(r.returncode == 0, "switchyard run --workers 1 (bf16) completes")
    if r.returncode != 0:
        sys.exit(1)
    ref = metrics(tmp, "w1")
    check(sorted(ref) == list(range(1, STEPS + 1)), f"--workers 1: {STEPS} steps in metrics.jsonl")

    r = launch(tmp, "w3", ["run", CFG, "--workers", "3", "--quiet"] + sets(tmp, "w3"))
    check(r.returncode == 0, "switchyard run --workers 3 (bf16) completes")
    if r.returncode == 0:
        got = metrics(tmp, "w3")
        compare(ref, got, "--workers 3")
        check(all(got[s].get("world") == 3 for s in got), "--workers 3: world = 3 in metrics")

    r = launch(tmp, "single", ["train", CFG, "--quiet"] + sets(tmp, "single", threads=2))
    check(r.returncode == 0, "switchyard train (bf16, one process) completes")
    if r.returncode == 0:
        compare(ref, metrics(tmp, "single"), "switchyard train")

    # bf16 really ran: an fp32 run of the same steps has other losses
    r = launch(tmp, "fp32", ["train", CFG, "--quiet"] + sets(tmp, "fp32", precision="fp32", threads=2))
    check(r.returncode == 0, "switchyard train (fp32) completes")
    if r.returncode == 0:
        fp = metrics(tmp, "fp32")
        check(all(fp[s]["loss"] != ref[s]["loss"] for s in ref if s in fp),
              "the bf16 losses differ from the fp32 run's at every step (bf16 mode is in effect)")

    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
