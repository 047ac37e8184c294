"""Worker identity is proven, not taken from the routing id (issue 16 #1; docs/protocol.md
"Identities", docs/security.md), with real coordinator and worker processes over loopback:

1. While w0 and w1 train, impostors connect with ZMQ_ROUTING_ID "w0" and send a garbage frame,
   a forged Hello (another pid), a Heartbeat and a StepDone without w0's session secret. The
   coordinator never declares w0 lost: no worker_lost event, the generation stays the same, both
   stay active, the run goes on; the forged messages are counted as "auth". (Before the fix w0
   was lost for good after 3 s.)
2. w1 is killed (kill -9): lost. An impostor's Heartbeat and StepDone as "w1" are dropped and
   counted as "auth" in /v1/status and /metrics, and do not bring "w1" back as a spare.
   A Heartbeat from an unknown sender gets Welcome{reregister} (and registers nothing).
   A restarted w1 (a new process, same id) is taken back.
3. A worker the coordinator dropped while it was alive (SIGSTOP for longer than
   failure_timeout_ms) notices and is back as a spare within REJOIN_BOUND_S of SIGCONT
   (failure_timeout_ms + 2 x heartbeat_ms, plus 1 s of slack for a loaded machine), then
   rejoins a generation.
5. The coordinator is stopped past the workers' coordinator timeout (2 x failure_timeout_ms):
   they reopen their sockets, register again and train on in a new generation.
6. With CURVE on, a worker id is bound to the public key it registered with: after w0 (key k0)
   dies, an impostor with another authorized key (k1) cannot register as "w0" (Hello dropped
   as "auth", no worker_joined), while the restarted w0 with k0 is taken back.
"""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import sytest
from sytest import check

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402

SPOOF = sytest.tool("sy_spoof")
FAILURE_TIMEOUT_S = 3.0  # cluster.failure_timeout_ms default
HEARTBEAT_S = 0.5        # cluster.heartbeat_ms default
REJOIN_BOUND_S = FAILURE_TIMEOUT_S + 2 * HEARTBEAT_S + 1.0


def spoof(ep, wid, mode, run="idt", **kw):
    cmd = [SPOOF, "--coordinator", ep, "--id", wid, "--mode", mode, "--run", run]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return sytest.run(cmd, capture_output=True, text=True, timeout=30)


def drops(c):
    return c.status().get("dropped_messages", {})


def metric_auth(c):
    with urllib.request.urlopen(c.status_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('switchyard_dropped_messages_total{reason="auth"}'):
                return int(float(line.split()[-1]))
    return None


def wstate(c):
    return {w["id"]: w["state"] for w in c.status()["workers"]}


def curve_binding(tmp):
    keys = f"{tmp}/keys"
    os.makedirs(keys, exist_ok=True)
    for k in ["coord", "k0", "k1"]:
        r = sytest.run([fu.SY, "keygen", f"{keys}/{k}"], capture_output=True, text=True, timeout=30)
        check(r.returncode == 0, f"keygen {k}")
    with open(f"{keys}/authorized", "w") as f:
        f.write(open(f"{keys}/k0.pub").read() + open(f"{keys}/k1.pub").read())
    s = fu.settings(tmp, "idc", 200000, 50, extra={
        "model.n_layers": "2", "model.d_model": "64", "model.d_ff": "128", "model.seq_len": "64",
        "train.global_batch_seqs": "8", "train.micro_batch_seqs": "4", "cluster.min_workers": "1",
        "cluster.curve_server_key": f"{keys}/coord.key", "cluster.curve_authorized_keys": f"{keys}/authorized",
        "status.token": "idt-token"})
    c = fu.Cluster(tmp, "idc", s)

    def worker(wid, key):
        log = open(f"{c.logs}/{wid}-{key}-{len(c.all_procs)}.log", "w")
        c.files.append(log)
        p = sytest.Popen([fu.WORKER, "--coordinator", f"tcp://127.0.0.1:{c.port}", "--id", wid, "--threads", "1",
                          "--curve-server-public", f"{keys}/coord.pub", "--curve-key", f"{keys}/{key}.key"],
                         stdout=log, stderr=subprocess.STDOUT)
        c.workers[wid] = p
        c.all_procs.append(p)
        return p

    try:
        c.start_coordinator(expect=1)
        worker("w0", "k0")
        c.wait_step(3, 120)
        c.kill("w0")
        c.wait(lambda: wstate(c).get("w0") == "lost", 10, "w0 lost after kill -9")
        auth0 = drops(c).get("auth", 0)
        n_ev = len(c.events())
        ep = f"tcp://127.0.0.1:{c.port}"
        r = spoof(ep, "w0", "hello", count=3, hold_ms=300, run="idc",
                  curve_server_public=f"{keys}/coord.pub", curve_key=f"{keys}/k1.key")
        check(r.returncode == 0 and "received welcome" not in r.stdout,
              f"CURVE: an impostor with another authorized key gets no Welcome as w0 ({r.stdout.strip()[-120:]!r})")
        time.sleep(0.5)
        check(drops(c).get("auth", 0) - auth0 >= 3, f"CURVE: its Hellos are dropped as auth ({drops(c).get('auth')})")
        joined = [e for e in c.events()[n_ev:] if e["event"] == "worker_joined"]
        check(not joined and wstate(c).get("w0") == "lost", f"CURVE: w0 stays lost, nobody joined ({joined[:1]})")
        worker("w0", "k0")
        c.wait(lambda: wstate(c).get("w0") in ("idle", "active"), 15, "w0 with its own key back")
        check(True, "CURVE: the restarted w0 with its own key is taken back")
        c.post("/v1/stop", token="idt-token")
        check(c.finish(60) == 3, "CURVE run stopped (exit 3)")
    except Exception as e:  # noqa: BLE001
        check(False, f"CURVE section: exception: {e}")
    finally:
        if check.failures:
            c.dump()
        c.close()


def main():
    tmp = sytest.make_tmp("sy-identity-")
    fu.prepare_data(tmp)
    s = fu.settings(tmp, "idt", 200000, 50, extra={
        "model.n_layers": "2", "model.d_model": "64", "model.d_ff": "128", "model.seq_len": "64",
        "train.global_batch_seqs": "8", "train.micro_batch_seqs": "4", "status.token": "idt-token"})
    c = fu.Cluster(tmp, "idt", s)
    try:
        c.start_coordinator(expect=2)
        c.start_worker("w0")
        c.start_worker("w1")
        c.wait_step(5, 120)
        ep = f"tcp://127.0.0.1:{c.port}"
        gen = c.status()["generation"]
        n_ev = len(c.events())

        # --- 1. impostors of a live worker -----------------------------------------------------
        auth_start = drops(c).get("auth", 0)
        for mode in ["garbage", "hello", "heartbeat", "stepdone"]:
            r = spoof(ep, "w0", mode, pid=999999, count=3, hold_ms=300)
            check(r.returncode == 0, f"impostor as w0 sent {mode} ({r.stderr.strip()[-200:]})")
        step0 = c.max_step()
        time.sleep(FAILURE_TIMEOUT_S + 2.0)
        lost = [e for e in c.events()[n_ev:] if e["event"] == "worker_lost"]
        check(not lost, f"no worker declared lost after the impostors ({lost[:1]})")
        st = c.status()
        check(st["generation"] == gen, f"the generation stays {gen} ({st['generation']})")
        ws = wstate(c)
        check(ws.get("w0") == "active" and ws.get("w1") == "active", f"w0 and w1 stay active ({ws})")
        check(c.max_step() > step0, f"training went on ({step0} -> {c.max_step()})")
        auth = drops(c).get("auth", 0)
        check(auth - auth_start >= 9, f"the impostors' Hellos, Heartbeats and StepDones are dropped as auth "
                                      f"({auth_start} -> {auth})")

        # --- 2. impostors of a lost worker -----------------------------------------------------
        auth0 = drops(c).get("auth", 0)
        c.kill("w1")
        c.wait(lambda: wstate(c).get("w1") == "lost", 10, "w1 lost after kill -9")
        n_ev = len(c.events())
        for mode in ["heartbeat", "stepdone"]:
            r = spoof(ep, "w1", mode, count=2, hold_ms=200, session="00112233445566778899aabbccddeeff")
            check(r.returncode == 0, f"impostor as lost w1 sent {mode}")
        time.sleep(0.5)
        auth1 = drops(c).get("auth", 0)
        check(auth1 - auth0 >= 4, f"/v1/status dropped_messages.auth counts the impostor ({auth0} -> {auth1})")
        m = metric_auth(c)
        check(m is not None and m >= auth1, f"/metrics switchyard_dropped_messages_total{{reason=\"auth\"}} = {m}")
        check(wstate(c).get("w1") == "lost", f"the impostor did not bring w1 back ({wstate(c).get('w1')})")
        joined = [e for e in c.events()[n_ev:] if e["event"] == "worker_joined"]
        check(not joined, f"no worker_joined for the impostor ({joined[:1]})")
        r = spoof(ep, "ghost", "heartbeat", hold_ms=500)
        check("received welcome reregister" in r.stdout,
              f"a Heartbeat from an unknown sender is answered with Welcome{{reregister}} ({r.stdout.strip()!r})")
        check("ghost" not in wstate(c), "the unknown sender is not registered by its Heartbeat")
        c.start_worker("w1")
        t = time.time()
        c.wait(lambda: wstate(c).get("w1") in ("idle", "active"), 15, "restarted w1 registered")
        check(True, f"a restarted w1 (same id) is taken back ({time.time() - t:.1f} s)")
        c.wait(lambda: c.status()["world"] == 2 and wstate(c).get("w1") == "active", 60, "w1 back in a generation")

        # --- 3. a worker dropped while alive finds its way back ----------------------------------
        n_ev = len(c.events())
        os.kill(c.workers["w0"].pid, signal.SIGSTOP)
        c.wait(lambda: wstate(c).get("w0") == "lost", 15, "w0 lost while stopped")
        time.sleep(1.0)  # long enough for the coordinator to close its connection too
        os.kill(c.workers["w0"].pid, signal.SIGCONT)
        t = time.time()
        c.wait(lambda: wstate(c).get("w0") in ("idle", "active"), 30, "w0 back")
        took = time.time() - t
        check(took <= REJOIN_BOUND_S, f"w0 is a spare again {took:.1f} s after SIGCONT (bound {REJOIN_BOUND_S:.1f} s)")
        c.wait(lambda: c.status()["world"] == 2 and wstate(c).get("w0") == "active", 60, "w0 back in a generation")
        check(True, "w0 rejoined a generation (world 2)")

        # --- 5. the coordinator goes silent: workers reopen their sockets and register again -----
        n_ev = len(c.events())
        os.kill(c.coord.pid, signal.SIGSTOP)
        time.sleep(2 * FAILURE_TIMEOUT_S + 1.5)  # past the workers' coordinator timeout
        step1 = c.max_step()
        os.kill(c.coord.pid, signal.SIGCONT)
        t = time.time()
        c.wait_event("generation_opened", 60, after=n_ev, where=lambda e: e["world"] == 2)
        c.wait(lambda: c.max_step() >= step1 + 20, 60, "steps after the coordinator's silence")
        check(True, f"after {2 * FAILURE_TIMEOUT_S + 1.5:.1f} s of coordinator silence both workers train in a "
                    f"new generation of world 2 ({time.time() - t:.1f} s after SIGCONT)")
        logs = c.tail("w0.0.log", 100000) + c.tail("w1.1.log", 100000)
        check("reconnecting and registering again" in logs, "the workers reopened their sockets ('reconnecting')")
        status, body = c.post("/v1/stop", token="idt-token")
        check(status in (200, 202), f"POST /v1/stop ({status})")
        rc = c.finish(60)
        check(rc == 3, f"coordinator exit status 3 after stop ({rc})")
    except Exception as e:  # noqa: BLE001
        check(False, f"exception: {e}")
    finally:
        if check.failures:
            c.dump()
        c.close()
    curve_binding(tmp)
    if check.failures:
        print(f"{len(check.failures)} failure(s); files kept in {tmp}")
        sys.exit(1)
    sytest.remove_tmp(tmp)
    print("all ok")


if __name__ == "__main__":
    main()
