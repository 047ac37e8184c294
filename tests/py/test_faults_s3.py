"""Fault tolerance with checkpoints on S3 (issue 5, "Proof": the same kill test with checkpoints on
moto S3, and through the fault-injecting proxy of the storage issue).

A moto_server with SigV4 checking (tests/py/s3util.py) holds checkpoint.store =
s3://sy-faults/ck. Four workers and a coordinator are started directly; one worker is killed -9
in the middle of a step; the run must complete with every step's loss equal to a fault-free
single-process run (exactly equal; the maximum difference is printed). Then the same again with
every S3 request of the coordinator and the workers going through tests/s3_fault_proxy.py at a
modest fault rate (503 SlowDown, connection resets, truncated replies, short stalls).
Usage: test_faults_s3.py [direct|proxy ...]   (default: both)"""
import os
import re
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import faultutil as fu  # noqa: E402
import sytest  # noqa: E402
from sytest import check  # noqa: E402
from s3util import Moto  # noqa: E402
from s3_fault_proxy import FaultProxy  # noqa: E402

STEPS, EVERY, KILL_AT = 30, 5, 12
HB_MS, FAIL_MS = 250, 2000
BUCKET = "sy-faults"


def s3_settings(tmp, name):
    return fu.settings(tmp, name, STEPS, EVERY, store=f"s3://{BUCKET}/ck",
                       extra={"cluster.heartbeat_ms": str(HB_MS), "cluster.failure_timeout_ms": str(FAIL_MS),
                              "checkpoint.s3_addressing": "path",
                              "cluster.replicas": "0"})  # the checkpoint path (replicas: test_replicas.py)


def kill_run(tmp, name, env, ref, moto, label, proxy=None):
    c = fu.Cluster(tmp, name, s3_settings(tmp, name), env=env)
    ok = False
    try:
        c.start_coordinator(expect=4)
        for k in range(4):
            c.start_worker(f"w{k}")
        c.wait_step(KILL_AT, timeout=180)
        n0 = len(c.events())
        if proxy:
            proxy.reset_stats()
        t = c.kill("w2")
        done_before = [e for e in c.events() if e["event"] == "run_finished"]
        check(not done_before and max(c.metrics(), default=0) < STEPS,
              f"{label}: the kill lands before the last step (the coordinator's view keeps up with the workers)")
        d = c.wait_event("restore_done", timeout=60, after=n0)
        ev = c.events()
        if proxy:
            # Survivors restore dense and their own experts from their in-memory copy and fetch from
            # the store only the experts they newly own: those of the killed worker.
            g1 = [e for e in ev[:n0] if e["event"] == "generation_opened"][-1]
            rank = g1["workers"].index("w2")
            want = {f"expert-{e:04d}" for e, r in enumerate(g1["placement"]) if r == rank}
            gets = {line.split()[1].split("?")[0].rsplit("/", 1)[-1] for line, _ in proxy.stats["log"]
                    if line.startswith("GET ") and "/ckpt/step-" in line}
            # objects are "g<generation>-r<rank>.<file>" (docs/fault-tolerance.md "Stale workers")
            got_objs = {re.sub(r"^g\d+-r\d+\.", "", g).split(".")[0] for g in gets if g.endswith(".safetensors")}
            print(f"   {label}: checkpoint objects read during the recovery: {sorted(gets)}", flush=True)
            check(got_objs == want, f"{label}: the survivors read from the store exactly the killed worker's "
                                    f"experts {sorted(want)} (read {sorted(got_objs)})")
        lost = [e for e in ev[n0:] if e["event"] == "worker_lost"]
        check([e["worker"] for e in lost] == ["w2"], f"{label}: worker_lost w2 ({[e['worker'] for e in lost]})")
        i_lost = ev.index(lost[0]) if lost else len(ev)
        g = [e for e in ev[i_lost:] if e["event"] == "generation_opened"]
        # A commit in flight at the loss decides the restore point: the coordinator waits for it.
        i_gen = ev.index(g[0]) if g else i_lost
        latest = max([e["step"] for e in ev[:i_gen] if e["event"] == "checkpoint_committed"], default=-1)
        check(bool(g) and g[0]["world"] == 3 and g[0]["restore_step"] == latest and latest > 0,
              f"{label}: a generation of 3 from the latest committed checkpoint, step {latest} "
              f"({g[0]['world'] if g else None} workers, restore step {g[0]['restore_step'] if g else None})")
        if lost:
            detect = lost[0]["time"] - t
            rec = d["time"] - lost[0]["time"]
            ph = d.get("phases_ms", {})
            print(f"   timing: {label}: detect {detect * 1e3:.0f} ms (kill → worker_lost); worker_lost → "
                  f"restore_done (first step after) {rec * 1e3:.0f} ms; kill → first step after "
                  f"{(d['time'] - t) * 1e3:.0f} ms (phases: " + ", ".join(f"{k} {v:.0f}" for k, v in ph.items()) +
                  ")", flush=True)
            check(detect <= FAIL_MS / 1e3 + 1.0, f"{label}: detected within failure_timeout_ms + 1 s ({detect * 1e3:.0f} ms)")
            check(rec <= 10.0, f"{label}: restore_done within 10 s of worker_lost ({rec * 1e3:.0f} ms)")
        rc = c.finish(timeout=240)
        ok = check(rc == 0, f"{label}: the coordinator exits 0 (exit {rc})")
        ev = c.events()
        check(any(e["event"] == "run_finished" for e in ev), f"{label}: run_finished")
        got = c.metrics()
        missing, worst = fu.compare(ref, got)
        print(f"   {label}: max relative loss difference to the fault-free reference: {worst:.3e}", flush=True)
        ok &= check(not missing, f"{label}: all {STEPS} steps in metrics.jsonl (missing {missing[:8]})")
        ok &= check(worst <= fu.TOL, f"{label}: every step's loss equals the fault-free run exactly (max relative difference {worst:.2e})")
        for w in ["w0", "w1", "w3"]:
            try:
                wrc = c.workers[w].wait(timeout=20)
            except Exception:
                wrc = None
            ok &= check(wrc == 0, f"{label}: worker {w} exits 0 (exit {wrc})")
        code, body = moto.curl("GET", f"/{BUCKET}/ck/{name}/ckpt/step-{STEPS:09d}/MANIFEST.json", check=False)
        ok &= check(code == 200 and b'"step"' in body,
                    f"{label}: the final checkpoint's MANIFEST.json is in the bucket (HTTP {code})")
        return ok
    finally:
        c.close()
        if not ok:
            c.dump()


def main():
    which = sys.argv[1:] or ["direct", "proxy"]
    tmp = sytest.make_tmp("sy-faults-s3-")
    print(f"temp dir {tmp}", flush=True)
    t0 = time.time()
    moto = Moto(auth=True, log=os.path.join(tmp, "moto.log"))
    proxy = None
    try:
        fu.prepare_data(tmp)
        ref = fu.reference(tmp, STEPS, EVERY)  # local store: the store does not change the math
        moto.start()
        moto.make_bucket(BUCKET)
        if "direct" in which:
            print("== kill -9 of one worker of 4, checkpoints on moto S3", flush=True)
            t = time.time()
            try:
                kill_run(tmp, "s3kill", moto.env(), ref, moto, "S3 kill")
            except Exception as e:
                traceback.print_exc()
                check(False, f"S3 kill: {str(e)[:3000]}")
            print(f"   {time.time() - t:.1f} s", flush=True)
        if "proxy" in which:
            print("== the same through the fault-injecting proxy", flush=True)
            proxy = FaultProxy(moto.endpoint).start()
            proxy.configure(rate=0.05, kinds=["503", "reset", "truncate", "stall"], stall_s=1.0, seed=5)
            t = time.time()
            try:
                kill_run(tmp, "s3proxy", moto.env(AWS_ENDPOINT_URL=proxy.url), ref, moto, "S3 kill via fault proxy",
                         proxy)
            except Exception as e:
                traceback.print_exc()
                check(False, f"S3 kill via fault proxy: {str(e)[:3000]}")
            st = proxy.stats
            print(f"   fault proxy: {st['requests']} requests, faults injected {st['faults']}", flush=True)
            check(sum(st["faults"].values()) > 0, f"the proxy injected faults ({st['faults']})")
            print(f"   {time.time() - t:.1f} s", flush=True)
    finally:
        if proxy:
            proxy.stop()
        moto.stop()
    print(f"total {time.time() - t0:.1f} s; {len(check.failures)} failed", flush=True)
    for f in check.failures:
        print("  FAILED:", f[:300])
    if not check.failures:
        sytest.remove_tmp(tmp)
    sys.exit(1 if check.failures else 0)


if __name__ == "__main__":
    main()
