"""Network partitions between real network stacks (issue 13, item 2): the coordinator and every
worker run in their own Linux network namespace on one bridge (tests/py/netns.py), started with
the multi-host commands (`switchyard-coordinator --bind tcp://ADDR:PORT`, `switchyard-worker
--coordinator tcp://ADDR:PORT --data-bind tcp://ADDR:*`), and links are cut by `ip link set
down` (packets dropped, no RST/FIN: half-open TCP on both sides, like a pulled cable).

Every completed run's losses (metrics.jsonl, last line per step) must equal a fault-free
single-process run exactly (the cluster is W-invariant). Scenarios (STEPS steps, checkpoint every
EVERY, heartbeat HB_MS, failure timeout FAIL_MS, data timeout DATA_MS):
  a. 3 workers across namespaces, no fault
  b. one worker cut for 2 x FAIL_MS: detected, the others recover and go on; healed, it comes
     back as a spare (or in a later generation), nothing stale accepted, no hang
  c. the coordinator cut from every worker for 2 x FAIL_MS: the workers stop stepping; after the
     heal the run continues
  f. one worker cut for FAIL_MS / 3: no recovery, no step re-run
  d. one pair of workers cut from each other (data plane only; both still reach the coordinator):
     no hang, the coordinator opens a new generation within DATA_MS + a bound
"timing:" lines give detection and recovery times. Needs root and `ip netns` (exit 77 otherwise).
Usage: test_partitions.py [SCENARIO ...]   (default: all)"""
import json
import os
import re
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402
import netns  # noqa: E402
import s3util  # noqa: E402
import sytest  # noqa: E402
from sytest import check, COORD, WORKER, CFG  # noqa: E402

STEPS, EVERY = 30, 5
HB_MS, FAIL_MS, DATA_MS = 200, 1500, 3000
NET = None
CURRENT = []


class NetCluster(fu.Cluster):
    """faultutil.Cluster with the coordinator in namespace 'coord' and worker wK in 'wK'."""

    def __init__(self, net, tmp, name, s, env=None):
        super().__init__(tmp, name, s, env=env)
        self.net = net
        self.port = 5555

    def start_coordinator(self, expect=0, timeout=30):
        addr = self.net.addr("coord")
        log = open(f"{self.logs}/coordinator.log", "a")
        out = f"{self.logs}/coordinator.out"
        outf = open(out, "w")
        self.files += [log, outf]
        # addresses of the namespaces' links, off-loopback: plaintext needs cluster.insecure (the
        # partitions, not CurveZMQ, are under test here)
        cmd = [COORD, CFG] + fu.set_args(self.s) + ["--set", "cluster.insecure=true", "--bind",
                                                    f"tcp://{addr}:{self.port}", "--status-addr", f"{addr}:0"]
        if expect:
            cmd += ["--expect-workers", str(expect)]
        p = self.net.Popen("coord", cmd, stdout=outf, stderr=log, env=self.env)
        self.all_procs.append(p)
        deadline = time.time() + timeout
        while time.time() < deadline and p.poll() is None:
            with open(out) as f:
                line = f.read()
            if "coordinator ready" in line:
                self.status_url = line.split("status=")[1].split()[0]
                self.coord = p
                return p
            time.sleep(0.02)
        raise RuntimeError("coordinator did not start:\n" + self.tail("coordinator.log"))

    def start_worker(self, wid, env=None):
        n = self.nstart.get(wid, 0)
        self.nstart[wid] = n + 1
        log = open(f"{self.logs}/{wid}.{n}.log", "w")
        self.files.append(log)
        addr = self.net.addr(wid)
        p = self.net.Popen(wid, [WORKER, "--coordinator", f"tcp://{self.net.addr('coord')}:{self.port}", "--id", wid,
                                 "--data-bind", f"tcp://{addr}:*", "--insecure", "--threads", "1"],
                           stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.workers[wid] = p
        self.all_procs.append(p)
        return p

    def status(self):
        body = self.net.http_get("coord", self.status_url + "/v1/status")
        return json.loads(body) if body else None

    def worker_log(self, wid):
        return self.tail(f"{wid}.0.log", 10 ** 7)


def base_settings(tmp, name, store=None, extra=None):
    e = {"cluster.heartbeat_ms": str(HB_MS), "cluster.failure_timeout_ms": str(FAIL_MS),
         "cluster.data_timeout_ms": str(DATA_MS),
         "cluster.replicas": "0"}  # restores from committed checkpoints (replicas: test_replicas.py)
    e.update(extra or {})
    return fu.settings(tmp, name, STEPS, EVERY, store=store, extra=e)


def start(tmp, name, n=3, store=None, extra=None, env=None):
    c = NetCluster(NET, tmp, name, base_settings(tmp, name, store, extra), env=env)
    CURRENT.append(c)
    c.start_coordinator(expect=n)
    for k in range(n):
        c.start_worker(f"w{k}")
    return c


def verify(c, ref, label, workers):
    """Coordinator exit 0, run_finished, every loss equal to the reference, restore points
    committed, the named workers exit 0 (no hang)."""
    rc = c.finish(timeout=120)
    ok = check(rc == 0, f"{label}: the coordinator exits 0 (exit {rc})")
    ev = c.events()
    ok &= check(any(e["event"] == "run_finished" for e in ev), f"{label}: run_finished in events.jsonl")
    missing, worst = fu.compare(ref, c.metrics())
    ok &= check(not missing, f"{label}: all {STEPS} steps in metrics.jsonl (missing {missing[:8]})")
    ok &= check(worst <= fu.TOL, f"{label}: every loss equals the 1-process run exactly (max rel. diff {worst:.2e})")
    committed = []
    for e in ev:
        if e["event"] == "checkpoint_committed":
            committed.append(e["step"])
        if e["event"] == "generation_opened" and e.get("restore_step", -1) > 0:
            ok &= check(e["restore_step"] in committed,
                        f"{label}: generation {e['generation']} restores a committed step ({e['restore_step']})")
    for w in workers:
        try:
            wrc = c.workers[w].wait(timeout=20)
        except subprocess.TimeoutExpired:
            wrc = None
        ok &= check(wrc == 0, f"{label}: worker {w} exits 0 at the end (exit {wrc}: no hang)")
    return ok


def scenario_a(tmp, ref):
    label = "a: 3 workers across namespaces"
    c = start(tmp, "a")
    try:
        ok = verify(c, ref, label, ["w0", "w1", "w2"])
        check(len(c.events("generation_opened")) == 1, f"{label}: one generation")
        return ok
    finally:
        c.close()


def scenario_b(tmp, ref):
    label = "b: one worker cut for 2 x failure_timeout_ms"
    c = start(tmp, "b")
    try:
        c.wait_step(8, timeout=120)
        n0 = len(c.events())
        t_cut = time.time()
        NET.cut("w2")
        lost = c.wait_event("worker_lost", timeout=FAIL_MS / 1e3 + 5, after=n0, where=lambda e: e["worker"] == "w2")
        detect = lost["time"] - t_cut
        check(detect <= FAIL_MS / 1e3 + 1.0, f"{label}: w2 lost within failure_timeout_ms + 1 s ({detect * 1e3:.0f} ms)")
        done = c.wait_event("restore_done", timeout=20, after=n0)
        gen = [e for e in c.events()[n0:] if e["event"] == "generation_opened"]
        check(bool(gen) and "w2" not in gen[0]["workers"], f"{label}: the next generation is without w2")
        time.sleep(max(0.0, t_cut + 2 * FAIL_MS / 1e3 - time.time()))
        t_heal = time.time()
        NET.heal("w2")
        back = c.wait_event("worker_joined", timeout=4 * FAIL_MS / 1e3 + 10, after=n0, where=lambda e: e["worker"] == "w2")
        print(f"   timing: {label}: detect {detect * 1e3:.0f} ms (cut → worker_lost); worker_lost → restore_done "
              f"{(done['time'] - lost['time']) * 1e3:.0f} ms; heal → w2 registered again "
              f"{(back['time'] - t_heal) * 1e3:.0f} ms", flush=True)
        ok = verify(c, ref, label, ["w0", "w1", "w2"])
        ev = c.events()
        later = [e for e in ev if e["event"] == "generation_opened" and e["time"] > back["time"]]
        print(f"   {label}: generations after w2 came back: {[(e['generation'], e['workers']) for e in later]}")
        stale = [l for l in c.tail("coordinator.log", 10 ** 7).splitlines() if "stale_generation" in l]
        print(f"   {label}: the coordinator dropped {len(stale)} stale-generation message(s) "
              f"{'(last: ' + stale[-1][-160:] + ')' if stale else ''}")
        return ok
    finally:
        c.close()


def show_events(c, n0, t0, label):
    """Prints the events since index n0, times relative to t0 (the cut)."""
    for e in c.events()[n0:]:
        what = e.get("worker") or e.get("workers") or e.get("step", "")
        extra = e.get("reason") or e.get("detail") or ""
        print(f"   {label}: +{e['time'] - t0:6.2f} s {e['event']} {what} {extra[:110]}")


STEP_SLACK_MS = 1000  # a step in flight at the cut, and the scheduler of a loaded 2-core machine


def pause_after(log, t0):
    """(step, ms after t0) of the first "pausing before step N" line of a worker log after t0
    (log times are UTC HH:MM:SS.mmm of today); None if there is none."""
    day = t0 - t0 % 86400
    for m in re.finditer(r"^(\d\d):(\d\d):(\d\d\.\d+) .*pausing before step (\d+)", log, re.M):
        t = day + int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        if t >= t0 - 1:
            return int(m.group(4)), round((t - t0) * 1e3)
    return None


def scenario_c(tmp, ref):
    label = "c: the coordinator cut for 2 x failure_timeout_ms"
    c = start(tmp, "c")
    try:
        c.wait_step(8, timeout=120)
        n0 = len(c.events())
        t_cut = time.time()
        NET.cut("coord")
        at_cut = c.max_step()
        time.sleep(2 * FAIL_MS / 1e3)
        logs = {w: c.worker_log(w) for w in ("w0", "w1", "w2")}
        paused = {w: pause_after(logs[w], t_cut) for w in logs}
        t_heal = time.time()
        NET.heal("coord")
        print(f"   {label}: the coordinator's last step before the cut {at_cut}; (step, ms after the cut) at "
              f"which each worker paused: {paused}")
        # Workers step in lock-step (every step has collectives): once one pauses before step S,
        # the others wait in step S's first collective, so no one completes S.
        first = min((p for p in paused.values() if p), default=None, key=lambda p: p[1])
        check(first is not None, f"{label}: the workers stop stepping while they hear nothing from the coordinator")
        bound = min(3 * HB_MS, FAIL_MS) + STEP_SLACK_MS
        check(first is not None and first[1] <= bound,
              f"{label}: the first pause comes within 3 heartbeats + {STEP_SLACK_MS} ms of the cut "
              f"({first} (step, ms), bound {bound} ms)")
        check(all(p[0] == first[0] for p in paused.values() if p) if first else False,
              f"{label}: every worker that paused did so before the same step (none ran ahead)")
        t_next = c.wait(lambda: c.max_step() > at_cut + 1 and time.time(), 60, "a step after the heal")
        ev = c.events()[n0:]
        lost = [e for e in ev if e["event"] == "worker_lost"]
        print(f"   timing: {label}: {len(lost)} worker_lost after the cut (first {min((e['time'] for e in lost), default=t_cut) - t_cut:.2f} s after it); "
              f"heal → next new step {(t_next - t_heal) * 1e3:.0f} ms", flush=True)
        ok = verify(c, ref, label, ["w0", "w1", "w2"])
        show_events(c, n0, t_cut, "c")
        return ok
    finally:
        c.close()


def scenario_f(tmp, ref):
    label = "f: one worker cut for failure_timeout_ms / 3"
    c = start(tmp, "f")
    try:
        c.wait_step(8, timeout=120)
        n0 = len(c.events())
        NET.cut("w1")
        time.sleep(FAIL_MS / 3e3)
        NET.heal("w1")
        ok = verify(c, ref, label, ["w0", "w1", "w2"])
        ev = c.events()[n0:]
        ok &= check(not [e for e in ev if e["event"] in ("worker_lost", "generation_opened", "worker_fault")],
                    f"{label}: no worker_lost, fault or new generation ({[e['event'] for e in ev][:10]})")
        ok &= check(len(c.metric_lines()) == STEPS, f"{label}: no step re-run ({len(c.metric_lines())} metric lines)")
        return ok
    finally:
        c.close()


def scenario_d(tmp, ref):
    label = "d: workers w1 and w2 cut from each other only"
    c = start(tmp, "d")
    try:
        c.wait_step(8, timeout=120)
        n0 = len(c.events())
        t_cut = time.time()
        NET.cut_pair("w1", "w2")
        lost = c.wait_event("worker_lost", timeout=2 * DATA_MS / 1e3 + 15, after=n0)
        t_lost = lost["time"] - t_cut
        bound = 2 * DATA_MS / 1e3 + 2
        check(lost["worker"] in ("w1", "w2") and "data plane" in lost["reason"],
              f"{label}: one of the cut pair is excluded as unreachable on the data plane ({lost['worker']}: {lost['reason']})")
        check(t_lost <= bound, f"{label}: decided within 2 x data_timeout_ms + 2 s ({t_lost:.2f} s, bound {bound:.0f} s)")
        done = c.wait_event("restore_done", timeout=60, after=n0, where=lambda e: e.get("step", 0) > 0)
        print(f"   timing: {label}: cut → worker_lost {t_lost * 1e3:.0f} ms; cut → restore_done "
              f"{(done['time'] - t_cut) * 1e3:.0f} ms", flush=True)
        NET.heal_pair("w1", "w2")
        ok = verify(c, ref, label, ["w0", "w1", "w2"])
        show_events(c, n0, t_cut, "d")
        ev = c.events()[n0:]
        ok &= check(not [e for e in ev if e["event"] == "worker_lost" and e["worker"] == "w0"],
                    f"{label}: w0 (reaching both) is never excluded")
        return ok
    finally:
        c.close()


MOTO_PORT, BUCKET = 5000, "sy-parts"
S3_TIMEOUT_MS, S3_RETRIES = 1000, 5


def start_moto(tmp):
    """moto_server in namespace 's3' (no SigV4 check: the test is about the network), a bucket;
    the environment that points the store at it."""
    cmd = s3util.find_moto()
    if not cmd:
        return None, None
    addr = NET.addr("s3")
    url = f"http://{addr}:{MOTO_PORT}"
    NET.Popen("s3", cmd + ["-H", addr, "-p", str(MOTO_PORT)], stdout=open(f"{tmp}/moto.log", "ab"),
              stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while NET.http_get("s3", url + "/moto-api/data.json", timeout=2) is None:
        if time.time() > deadline:
            raise RuntimeError("moto_server did not start")
        time.sleep(0.2)
    r = NET.run("s3", ["curl", "-sS", "-X", "PUT", f"{url}/{BUCKET}"], capture_output=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError("cannot create the bucket: " + r.stderr.decode()[-300:])
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="secret", AWS_REGION="us-east-1",
               AWS_ENDPOINT_URL=url)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        env.pop(k, None)
    return url, env


def scenario_e(tmp, ref):
    label = "e: the S3 server cut from one worker during a checkpoint upload"
    url, env = start_moto(tmp)
    if not url:
        print(f"   {label}: skipped: moto_server not found (deploy/install-deps.sh installs moto[server])")
        return True
    store = f"s3://{BUCKET}/runs"
    c = start(tmp, "e", store=store, env=env,
              extra={"checkpoint.s3_timeout_ms": str(S3_TIMEOUT_MS), "checkpoint.s3_retries": str(S3_RETRIES),
                     "checkpoint.keep_last": "100"})
    try:
        K = 2 * EVERY
        c.wait_step(K - 2, timeout=120)
        n0 = len(c.events())
        t_cut = time.time()
        NET.cut_pair("w1", "s3")
        time.sleep(2 * S3_TIMEOUT_MS / 1e3 + 1)
        NET.heal_pair("w1", "s3")
        t_heal = time.time()
        ok = verify(c, ref, label, ["w0", "w1", "w2"])
        show_events(c, n0, t_cut, "e")
        print(f"   timing: {label}: cut {(t_heal - t_cut) * 1e3:.0f} ms around the step-{K} checkpoint", flush=True)
        ck = [e for e in c.events()[n0:] if e["event"] == "checkpoint_committed" and e["step"] == K]
        ok &= check(bool(ck) and ck[0]["time"] > t_heal,
                    f"{label}: the cut held up the step-{K} upload (committed {ck[0]['time'] - t_heal if ck else None} s "
                    f"after the heal)")
        for w in ("w0", "w1", "w2"):
            for line in c.worker_log(w).splitlines():
                if re.search(r"retry|storage|s3|checkpoint", line, re.I):
                    print(f"   e: {w}: {line[:200]}")
        # every committed checkpoint is whole: its manifest's files present, sizes and SHA-256 right
        steps = sorted({e["step"] for e in c.events("checkpoint_committed")})
        bad = []
        for st in steps:
            r = NET.run("s3", [fu.SY, "ckpt", "show", f"{store}/e@{st}"], capture_output=True, text=True,
                        timeout=60, env=env)
            if r.returncode != 0:
                bad.append((st, r.stderr.strip()[-200:]))
        ok &= check(steps and not bad, f"{label}: every committed checkpoint ({steps}) verifies (ckpt show: sizes and "
                    f"SHA-256 of every file) {bad}")
        return ok
    finally:
        c.close()


SCENARIOS = {"a": scenario_a, "f": scenario_f, "b": scenario_b, "c": scenario_c, "d": scenario_d, "e": scenario_e}


def main():
    global NET
    ok, why = netns.available()
    if not ok:
        print(f"skipped: {why}")
        return 77
    want = sys.argv[1:] or list(SCENARIOS)
    tmp = sytest.make_tmp("sy-netns-")
    t0 = time.time()
    try:
        NET = netns.Net()
        for n in ("coord", "w0", "w1", "w2", "s3"):
            NET.add(n)
        fu.prepare_data(tmp)
        ref = fu.reference(tmp, STEPS, EVERY)
        for name in want:
            print(f"== scenario {name}", flush=True)
            t = time.time()
            nfail = len(sytest.failures)
            CURRENT.clear()
            NET.heal_all()
            try:
                SCENARIOS[name](tmp, ref)
            except Exception:
                traceback.print_exc()
                check(False, f"scenario {name} raised")
            if len(sytest.failures) > nfail:
                for c in CURRENT:
                    c.dump()
            print(f"   scenario {name}: {time.time() - t:.1f} s", flush=True)
    finally:
        if NET:
            NET.close()
        sytest.remove_tmp(tmp)
    print(f"total {time.time() - t0:.1f} s; {len(sytest.failures)} failure(s)")
    for f in sytest.failures:
        print("  FAIL:", f)
    return 1 if sytest.failures else 0


if __name__ == "__main__":
    sys.exit(main())
