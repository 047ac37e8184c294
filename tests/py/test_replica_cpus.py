"""cluster.replica_cpus (docs/fault-tolerance.md "A core for the replication"): real `switchyard
run`s of 3 workers, their threads' CPUs read from /proc while they train.

  A. replica_cpus = the last CPU this test may use: in every worker, the replica thread
     ("sy-replica") and exactly one data plane's ZeroMQ threads (the replica plane's I/O thread and
     reaper) may run only there, and every other thread (the training thread, the training data
     plane's ZeroMQ threads, the data readers) only on the other CPUs; the worker's log says so;
     the replicas were exchanged; and every metric but the timings equals an unpinned run's.
  B. a CPU this host does not have (1023): the run still completes; each worker says in its log
     that the setting was not applied, and no thread was moved.
  C. the run started under `taskset -c` of that last CPU only: nothing is left to train on; the
     run completes, each worker says so, and no thread was moved.
  D. a list that is not one: `switchyard run` exits 2 naming cluster.replica_cpus.

Skipped (77) where this process may use a single CPU: there is nothing to keep apart."""
import glob
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402
import sytest  # noqa: E402
from sytest import SY, CFG, check  # noqa: E402

TIMING = {"tokens_per_s", "step_ms", "time", "ckpt_stall_ms", "ckpt_upload_ms"}


def cpulist(cpus):
    """Linux's CPU list form, ranges joined ("0-2,5"), as the workers print it."""
    out, cs = [], sorted(cpus)
    i = 0
    while i < len(cs):
        j = i
        while j + 1 < len(cs) and cs[j + 1] == cs[j] + 1:
            j += 1
        out.append(str(cs[i]) if i == j else f"{cs[i]}-{cs[j]}")
        i = j + 1
    return ",".join(out)


def workers_of(pid):
    """Pids of the switchyard-worker processes below pid."""
    kids = {}
    for st in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(st) as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        ppid = int(s[s.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append((int(st.split("/")[2]), comm))
    out, todo = [], [pid]
    while todo:
        for child, comm in kids.get(todo.pop(), []):
            todo.append(child)
            if comm.startswith("switchyard-work"):
                out.append(child)
    return out


def threads(pid):
    """[(name, CPUs it may run on)] of every thread of pid."""
    out = []
    for t in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{t}/comm") as f:
                name = f.read().strip()
            with open(f"{t}/status") as f:
                allowed = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue
        cpus = set()
        for part in allowed.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        out.append((name, cpus))
    return out


def run(tmp, name, steps, extra, prefix=(), watch=None):
    """A run of 3 workers; watch(workers' pids) is called every 0.2 s until it returns True.
    Returns (exit status, stderr, the workers' logs joined, metrics without timings, watched)."""
    args = list(prefix) + [SY, "run", CFG, "--workers", "3", "--quiet"] + fu.set_args(
        fu.settings(tmp, name, steps, 0, extra=extra))
    p = sytest.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched = watch is None
    while p.poll() is None:
        if not watched:
            pids = workers_of(p.pid)
            watched = len(pids) == 3 and watch(pids)
        time.sleep(0.2)
    err = p.stderr.read()
    logs = ""
    for lg in sorted(glob.glob(f"{tmp}/state-{name}/logs/*")):
        with open(lg, errors="replace") as f:
            logs += f.read()
    mets = []
    path = f"{tmp}/state-{name}/metrics.jsonl"
    if os.path.exists(path):
        with open(path) as f:
            mets = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f if line.strip()]
    return p.returncode, err, logs, mets, watched


def main():
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        print(f"skipped: this process may run on CPU {cpulist(mine)} only: nothing to keep apart")
        sys.exit(77)
    rep = max(mine)
    train = mine - {rep}
    tmp = sytest.make_tmp("sy-repcpus-")
    fu.prepare_data(tmp)
    steps = 30

    # A
    seen = {}

    def pinned(pids):
        """True once every worker has its replica thread; records each thread's CPUs then."""
        per = {pid: threads(pid) for pid in pids}
        if not all(any(n == "sy-replica" for n, _ in th) for th in per.values()):
            return False
        seen.update(per)
        return True

    rc, err, logs, got, watched = run(tmp, "a", steps, {"cluster.replica_cpus": str(rep)}, watch=pinned)
    check(rc == 0, f"A: the pinned run completes (exit {rc}: {err.strip()[-300:]})")
    check(watched and len(seen) == 3, "A: every worker's threads were seen with a replica thread running")
    for pid, th in seen.items():
        names = {}
        for n, cpus in th:
            names.setdefault(n, []).append(cpus)
        check(names.get("sy-replica") and all(c == {rep} for c in names["sy-replica"]),
              f"A: worker {pid}: its replica thread runs only on CPU {rep} ({names.get('sy-replica')})")
        groups = {}
        for n, cpus in th:
            m = re.match(r"(\d+)/ZMQbg", n)
            if m:
                groups.setdefault(m.group(1), []).append(cpus)
        on_rep = [g for g, cs in groups.items() if all(c == {rep} for c in cs)]
        check(len(on_rep) == 1 and len(groups[on_rep[0]]) >= 2,
              f"A: worker {pid}: exactly one data plane's ZeroMQ threads (I/O, reaper) run only on CPU {rep} "
              f"({groups})")
        rest = [(n, c) for n, c in th
                if n != "sy-replica" and not (on_rep and n.startswith(on_rep[0] + "/ZMQbg"))]
        bad = [(n, sorted(c)) for n, c in rest if c != train]
        check(len(rest) >= 3 and not bad,
              f"A: worker {pid}: its {len(rest)} other threads run only on CPUs {cpulist(train)} "
              f"(not so: {bad[:6]})")
    said = re.findall(r"cluster\.replica_cpus: the replication runs on CPUs (\S+), training on CPUs (\S+)", logs)
    check(len(said) == 3 and all(s == (str(rep), cpulist(train)) for s in said),
          f"A: each worker's log says where the replication and the training run ({said})")
    ex = [int(x) for x in re.findall(r"replicas \(1 per worker\): (\d+) exchanges", logs)]
    check(len(ex) == 3 and min(ex) >= steps - 1, f"A: every worker exchanged its replicas after each step ({ex})")
    rc0, err0, _, ref, _ = run(tmp, "ref", steps, {})
    check(rc0 == 0 and len(ref) == steps and got == ref,
          f"A: every metric of all {steps} steps equals the unpinned run's (exit {rc0}, {len(got)} and {len(ref)} lines)")

    # B and C: the setting cannot be met; the run goes on unpinned
    def unmoved(label, want):
        def look(pids):
            per = {pid: threads(pid) for pid in pids}
            if not all(any(n == "sy-replica" for n, _ in th) for th in per.values()):
                return False
            bad = [(n, sorted(c)) for th in per.values() for n, c in th if c != want]
            check(not bad, f"{label}: no thread was moved off CPUs {cpulist(want)} (moved: {bad[:6]})")
            return True
        return look

    rc, err, logs, got, watched = run(tmp, "b", 6, {"cluster.replica_cpus": "1023"} if 1023 not in mine else {},
                                      watch=unmoved("B", mine))
    check(rc == 0 and len(got) == 6, f"B: a CPU this host lacks: the run completes (exit {rc}: {err.strip()[-300:]})")
    check(watched, "B: the workers' threads were seen")
    n = len(re.findall(r"cluster\.replica_cpus 1023: .*not applied", logs))
    check(n == 3, f"B: each worker's log says the setting was not applied ({n} of 3)")

    rc, err, logs, got, watched = run(tmp, "c", 6, {"cluster.replica_cpus": str(rep)},
                                      prefix=("taskset", "-c", str(rep)), watch=unmoved("C", {rep}))
    check(rc == 0 and len(got) == 6, f"C: nothing left to train on: the run completes (exit {rc}: {err.strip()[-300:]})")
    check(watched, "C: the workers' threads were seen")
    n = len(re.findall(rf"cluster\.replica_cpus {rep}: leaves this worker no CPU to train on", logs))
    check(n == 3, f"C: each worker's log says no CPU is left to train on ({n} of 3)")

    # D
    r = sytest.run([SY, "run", CFG, "--workers", "3", "--set", "cluster.replica_cpus=1-"],
                   capture_output=True, text=True, timeout=60)
    check(r.returncode == 2 and "cluster.replica_cpus" in r.stderr and "not a CPU list" in r.stderr,
          f"D: a bad list: exit 2 naming cluster.replica_cpus (exit {r.returncode}: {r.stderr.strip()[-300:]})")

    sytest.remove_tmp(tmp)
    sys.exit(1 if sytest.failures else 0)


if __name__ == "__main__":
    main()
