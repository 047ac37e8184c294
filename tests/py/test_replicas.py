"""Peer replicas of expert state (issue 18, "Proof"): real coordinator and worker processes, real
kill -9, every step's loss compared with a single-process fault-free reference (exactly: fu.TOL).

  A. kill -9 of one worker of 3 mid-run, checkpoint.every far beyond the kill step: the new
     generation restores from replicas (restore_source "replicas") at a step no older than the
     last step recorded before the kill minus one (the replicas of step L travel while L + 1
     computes: docs/fault-tolerance.md "Overlapped exchange"), so at most one step is run twice
     (metrics.jsonl lines per step), and the losses equal the reference; w0's log says its
     exchanges were overlapped, on the replica data plane, and that after each generation's
     first exchange (whole states) its exchanges sent gradients (sy_replica_stepped: the
     replicas restored were built by the buddies' own AdamW updates).
  B. two buddies (ranks 0 and 1) of 4 killed at once with cluster.replicas=1: rank 0's only
     replica was on rank 1, so the recovery falls back to the latest committed checkpoint
     (restore_source "checkpoint"), and the losses still equal.
  C. the same kill with cluster.replicas=2: rank 0's second replica is on rank 2: no fallback.
  D. a worker dies (SIGKILL, test hook SY_TEST_REPLICA_KILL=ID@STEP) after sending the first of
     several pieces of step K's replicas: its buddy holds a half-received replica of K, which is
     never used: the restore step is K - 1 (whole replicas), and the losses equal.
  E. kill -9 of one worker of 3, then a new worker joins (what `--chaos kill-worker@...,respawn=new`
     does): the survivors' generation of 2 gets its peer table as an edit without a fresh entry,
     and must keep the replica data plane (no Fault, every generation of 2 or more exchanges
     overlapped: before the fix a survivor dropped its replica endpoints, replicated on the
     training plane while the others used theirs, and the next edit was refused); the membership
     change at the next checkpoint restores from replicas (the members' newest whole step, not
     the checkpoint: restore step >= the checkpoint's); the old generation ends at a step
     boundary (EndAfter: the restore step is the last step recorded before the new generation
     opened), so at most one step runs twice in all (the kill's), and the losses equal.

usage: test_replicas.py [A B C D ...]"""
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402
import sytest  # noqa: E402
from sytest import check  # noqa: E402

STEPS = 12
HB_MS, FAIL_MS = 250, 2000
CURRENT = []


def settings(tmp, name, every, replicas):
    return fu.settings(tmp, name, STEPS, every, extra={
        "cluster.heartbeat_ms": str(HB_MS), "cluster.failure_timeout_ms": str(FAIL_MS),
        "cluster.replicas": str(replicas)})


def start(tmp, name, n, every, replicas, env=None):
    c = fu.Cluster(tmp, name, settings(tmp, name, every, replicas), env=env)
    CURRENT.append(c)
    c.start_coordinator(expect=n)
    for k in range(n):
        c.start_worker(f"w{k}")
    return c


def first_gen(c):
    return c.wait_event("generation_opened", 60)


def verify(c, ref, label):
    """Exit 0, every step present, losses equal; returns (metric lines per step, events)."""
    rc = c.finish(timeout=180)
    check(rc == 0, f"{label}: the coordinator exits 0 (exit {rc})")
    got = c.metrics()
    missing, worst = fu.compare(ref, got)
    check(not missing, f"{label}: all {STEPS} steps in metrics.jsonl (missing {missing[:8]})")
    check(worst <= fu.TOL, f"{label}: every step's loss equals the fault-free run (max relative difference {worst:.2e})")
    per = {}
    for m in c.metric_lines():
        per[m["step"]] = per.get(m["step"], 0) + 1
    return per, c.events()


def recovery_gens(ev, after_gen):
    return [e for e in ev if e["event"] == "generation_opened" and e["generation"] > after_gen]


def background_threads(pid, seconds=5.0):
    """Samples the worker's threads until its replica data plane's ZeroMQ threads are seen in the
    idle scheduling class (cluster.replica_background): (seen, the training data plane's ZeroMQ
    threads ever idle, the main thread's policy)."""
    end = time.time() + seconds
    seen, other_idle, main = False, False, None
    while time.time() < end and not seen:
        idle_by_serial, names = {}, {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                pol = os.sched_getscheduler(int(tid))
            except (OSError, ProcessLookupError):
                continue
            if int(tid) == pid:
                main = pol
            if "/ZMQbg" in comm:
                serial = comm.split("/")[0]
                names.setdefault(serial, []).append(comm)
                idle_by_serial[serial] = idle_by_serial.get(serial, False) or pol == os.SCHED_IDLE
        idle = [k for k, v in idle_by_serial.items() if v]
        # the training data plane is made first: the lower serial; the replica one the next
        if len(names) >= 2:
            lo = min(names, key=int)
            other_idle = other_idle or lo in idle
            seen = any(k != lo for k in idle)
        time.sleep(0.01)
    return seen, other_idle, main


def scenario_a(tmp, ref):
    label = "A: kill one of 3"
    c = start(tmp, "rep-a", 3, 1000, 1)
    try:
        g1 = first_gen(c)
        c.wait_step(2, timeout=120)
        # background on where the worker may leave the idle class again (root with CAP_SYS_NICE,
        # or ulimit -e >= 20); elsewhere it logs that it runs the exchange in the normal class
        normal = "runs in the normal scheduling class" in c.tail("w0.0.log", 100000)
        if normal:
            print(f"   {label}: w0 cannot leave the idle scheduling class here: the background check is skipped")
        else:
            seen, other_idle, main = background_threads(c.workers["w0"].pid)
            check(seen and not other_idle and main == os.SCHED_OTHER,
                  f"{label}: w0's replica data plane threads run in the idle class between steps, its training "
                  f"data plane's and its main thread in the normal one (seen {seen}, training plane idle "
                  f"{other_idle}, main thread policy {main})")
        c.wait_step(7, timeout=120)
        recorded = c.max_step()
        c.kill("w1")
        c.wait_event("restore_done", 30)
        per, ev = verify(c, ref, label)
        g = recovery_gens(ev, g1["generation"])
        check(bool(g) and g[0]["restore_source"] == "replicas" and g[0]["world"] == 2,
              f"{label}: the new generation of 2 restores from replicas ({[(e['world'], e['restore_source'], e['restore_step']) for e in g]})")
        check(bool(g) and g[0]["restore_step"] >= recorded - 1,
              f"{label}: restore step {g[0]['restore_step'] if g else None} >= {recorded - 1}, the last step "
              f"recorded before the kill minus one")
        rerun = sum(n - 1 for n in per.values())
        print(f"   {label}: {rerun} step(s) run twice; restore step {g[0]['restore_step'] if g else None}")
        check(rerun <= 1 and max(per.values()) <= 2, f"{label}: at most one step run twice ({per})")
        done = [e for e in ev if e["event"] == "restore_done"]
        check(bool(done) and done[0].get("restore_source") == "replicas", f"{label}: restore_done says replicas")
        check("(overlapped: on their own data plane)" in c.tail("w0.0.log", 100000),
              f"{label}: the replicas went over the replica data plane, overlapped (w0's log)")
        # after each generation's first exchange (whole states), the steps' exchanges send
        # gradients (a third of the bytes): the replicas restored above were built from them
        deltas = [int(x) for x in re.findall(r"; (\d+) of the exchanges sent gradients", c.tail("w0.0.log", 100000))]
        check(bool(deltas) and deltas[0] >= 4,
              f"{label}: w0's first generation sent gradients in its step exchanges ({deltas} delta exchanges)")
    finally:
        c.close()


def scenario_two(tmp, ref, replicas):
    label = f"{'B' if replicas == 1 else 'C'}: two buddies of 4 killed, replicas={replicas}"
    c = start(tmp, f"rep-{replicas}", 4, 5, replicas)
    try:
        g1 = first_gen(c)
        r0, r1 = g1["workers"][0], g1["workers"][1]  # rank r's first replica is on rank r + 1
        c.wait_step(8, timeout=120)
        c.wait(lambda: any(e["event"] == "checkpoint_committed" and e["step"] == 5 for e in c.events()), 30,
               "checkpoint 5 committed")
        recorded = c.max_step()
        c.kill(r0, r1)
        c.wait_event("restore_done", 40)
        per, ev = verify(c, ref, label)
        g = recovery_gens(ev, g1["generation"])
        last = g[-1] if g else None
        src = [(e["world"], e["restore_source"], e["restore_step"]) for e in g]
        check(bool(last) and last["world"] == 2 and sorted(last["workers"]) == sorted(set(g1["workers"]) - {r0, r1}),
              f"{label}: the last generation is the 2 survivors ({src})")
        rerun = sum(n - 1 for n in per.values())
        print(f"   {label}: generations after the kill {src}; {rerun} step(s) run twice")
        if replicas == 1:
            committed = [e["step"] for e in ev if e["event"] == "checkpoint_committed"]
            check(bool(last) and last["restore_source"] == "checkpoint" and last["restore_step"] in committed,
                  f"{label}: falls back to a committed checkpoint ({src})")
        else:
            check(bool(g) and all(e["restore_source"] == "replicas" for e in g) and last["restore_step"] >= recorded - 1,
                  f"{label}: restores from replicas, no fallback, at step >= {recorded - 1} ({src})")
            check(rerun <= 1, f"{label}: at most one step run twice ({per})")
    finally:
        c.close()


def scenario_d(tmp, ref):
    K = 6
    label = "D: death in the middle of step K's replicas"
    env = dict(os.environ)
    env["SY_TEST_REPLICA_KILL"] = f"w1@{K}"
    # the gradients of step K (a delta exchange, 1 MiB an expert here) in pieces of 256 KiB
    env["SY_TEST_REPLICA_PIECE_BYTES"] = str(256 << 10)
    c = start(tmp, "rep-d", 3, 1000, 1, env=env)
    try:
        g1 = first_gen(c)
        c.wait_event("restore_done", 120)
        per, ev = verify(c, ref, label)
        g = recovery_gens(ev, g1["generation"])
        log = c.tail("w1.0.log", 100000)
        check("SY_TEST_REPLICA_KILL: dying after piece 1 of" in log and "piece 1 of 1 " not in log,
              f"{label}: w1 died after the first of several pieces of step {K}'s replicas")
        src = [(e["world"], e["restore_source"], e["restore_step"]) for e in g]
        check(bool(g) and g[0]["restore_source"] == "replicas" and g[0]["restore_step"] == K - 1,
              f"{label}: restores step {K - 1} from replicas, never the half-received step {K} ({src})")
        rerun = sum(n - 1 for n in per.values())
        check(rerun <= 1, f"{label}: at most one step run twice ({per})")
    finally:
        c.close()


def scenario_e(tmp, ref):
    label = "E: kill one of 3, a new worker joins"
    c = start(tmp, "rep-e", 3, 2, 1)
    try:
        g1 = first_gen(c)
        c.wait_step(3, timeout=120)
        c.kill("w1")
        c.wait_event("restore_done", 30)
        c.start_worker("w3")
        grow = c.wait_event("generation_opened", 60, where=lambda e: e["world"] == 3 and "w3" in e["workers"])
        per, ev = verify(c, ref, label)
        gens = [(e["generation"], e["world"], e["restore_source"], e["restore_step"])
                for e in ev if e["event"] == "generation_opened"]
        print(f"   {label}: generations {gens}")
        faults = [e.get("detail", "") for e in ev if e["event"] == "worker_fault"]
        check(not faults, f"{label}: no worker reports a fault ({faults})")
        committed = [e["step"] for e in ev if e["event"] == "checkpoint_committed" and e["time"] <= grow["time"]]
        check(grow["restore_source"] == "replicas" and committed and grow["restore_step"] >= max(committed),
              f"{label}: the generation of 3 restores from replicas at a step >= the checkpoint that triggered it "
              f"({grow['restore_source']} {grow['restore_step']}, committed {committed})")
        # the join ends the generation at a step boundary (EndAfter) and restores that step
        before = max([m["step"] for m in c.metric_lines() if m["time"] <= grow["time"]] or [0])
        check(grow["restore_step"] == before and "ends after step" in c.tail("coordinator.log", 1000000),
              f"{label}: the join restores the last step recorded before it ({grow['restore_step']} vs {before}): "
              f"the generation ended at a step boundary (EndAfter), nothing was cut short")
        # the kill: at most one step run twice; the join: none
        check(sum(n - 1 for n in per.values()) <= 1 and max(per.values()) <= 2,
              f"{label}: at most one step run twice in all ({per})")
        for w in ("w0.0.log", "w2.0.log"):  # the survivors (a log gets the line when a generation ends)
            lines = [ln for ln in c.tail(w, 1000000).splitlines() if "replicas (1 per worker)" in ln]
            check(bool(lines) and all("(overlapped: on their own data plane)" in ln for ln in lines),
                  f"{label}: {w}: every generation exchanged its replicas overlapped, on the replica data plane "
                  f"({[ln[:40] + ' ... ' + ln[-60:] for ln in lines]})")
    finally:
        c.close()


SCENARIOS = {"A": scenario_a, "B": lambda t, r: scenario_two(t, r, 1), "C": lambda t, r: scenario_two(t, r, 2),
             "D": scenario_d, "E": scenario_e}


def main():
    which = sys.argv[1:] or sorted(SCENARIOS)
    tmp = sytest.make_tmp("sy-replicas-")
    t0 = time.time()
    fu.prepare_data(tmp)
    ref = fu.reference(tmp, STEPS, 1000)
    for k in which:
        t = time.time()
        nfail = len(check.failures)
        CURRENT.clear()
        print(f"== scenario {k}", flush=True)
        try:
            SCENARIOS[k](tmp, ref)
        except Exception as e:
            traceback.print_exc()
            check(False, f"scenario {k}: {str(e)[:3000]}")
        if len(check.failures) > nfail:
            for c in CURRENT:
                c.dump()
        print(f"   scenario {k}: {time.time() - t:.1f} s", flush=True)
    print(f"total {time.time() - t0:.1f} s; {len(check.failures)} failed", flush=True)
    for f in check.failures:
        print("  FAILED:", f[:300])
    if not check.failures:
        sytest.remove_tmp(tmp)
    sys.exit(1 if check.failures else 0)


if __name__ == "__main__":
    main()
