"""The data plane against a stranger on a worker's data port (issue 12 #2; docs/security.md
"Data plane"), with real processes over loopback. A coordinator and two workers are started by
hand; once they train, `sy_dpforge` connects to each worker's data port and injects well-formed
data-plane rows (the 32-byte header of comm_tcp.c) for every generation up to two beyond the
current one and 200 round numbers each:

1. CURVE (the workers have --curve-key; the Assign names both members' keys, here one shared
   pair as `switchyard run` may give): the stranger, with a key pair of its own, is refused at the
   handshake (sy_dpforge sees "handshake refused"), each worker counts the refusal
   (/v1/status workers[].dataplane.refused, /metrics switchyard_dataplane_refused_total) and logs
   it, and the run's losses equal the fault-free single-process run exactly.
2. Plaintext: malformed frames and well-formed rows of an old generation are dropped and counted
   (workers[].dataplane.dropped) and the losses are again exact. (A well-formed row of the
   current round is taken as data in plaintext: the risk cluster.insecure accepts, shown in
   tests/test_comm_curve.c plain_forgery; it is not injected here, as it would change the run.)
"""
import os
import re
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sytest  # noqa: E402
import faultutil as fu  # noqa: E402
from sytest import SY, check, failures  # noqa: E402

STEPS, EVERY = 60, 20  # long enough that the run is still going when the counters are read
FORGE = sytest.tool("sy_dpforge")


def keygen(path):
    r = sytest.run([SY, "keygen", path], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)


def pubkey(path):
    for line in open(path):
        if line.startswith("public-key"):
            return line.split("=", 1)[1].strip()
    return None


def metric(c, name, wid):
    with urllib.request.urlopen(c.status_url.rstrip("/") + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf'{name}{{worker="{wid}"}} (\d+)', text)
    return int(m.group(1)) if m else -1


def one(tmp, label, ref, curve):
    name = f"dp-{label}"
    extra = {"cluster.data_timeout_ms": "4000"}  # also the CURVE hold time of an unknown key
    wargs = []
    if curve:
        k = f"{tmp}/keys"
        extra.update({"cluster.curve_server_key": f"{k}/coord.key", "cluster.curve_server_public": f"{k}/coord.pub",
                      "cluster.curve_authorized_keys": f"{k}/authorized"})
        wargs = ["--curve-server-public", f"{k}/coord.pub", "--curve-key", f"{k}/worker.key"]
    c = fu.Cluster(tmp, name, fu.settings(tmp, name, STEPS, EVERY, extra=extra))
    ok = False
    t0 = time.time()
    try:
        c.start_coordinator(expect=2)
        for w in ["w0", "w1"]:
            c.start_worker(w, args=wargs)
        c.wait_step(2, timeout=120)
        st = c.status()
        gen = st["generation"]
        eps = {w["id"]: w["data_endpoint"] for w in st["workers"]}
        forgers = []
        for wid, ep in sorted(eps.items()):
            # CURVE: held long enough for the worker's ZAP to hold, then refuse, the stranger
            cmd = [FORGE, "--endpoint", ep, "--seqs", "200", "--hold-ms", "7000" if curve else "1500"]
            if curve:
                cmd += ["--gen-from", "1", "--gen-to", str(gen + 2), "--server-key", pubkey(f"{tmp}/keys/worker.pub")]
            else:
                cmd += ["--gen-from", "0", "--gen-to", "0"]  # generation 0 is older than every generation
            forgers.append((wid, sytest.Popen(cmd, stdout=__import__("subprocess").PIPE, text=True)))
        if not curve:
            forgers += [(wid, sytest.Popen([FORGE, "--endpoint", ep, "--malformed", "--seqs", "100", "--hold-ms", "1000"],
                                           stdout=__import__("subprocess").PIPE, text=True))
                        for wid, ep in sorted(eps.items())]
        outs = {}
        for wid, p in forgers:
            out, _ = p.communicate(timeout=30)
            outs.setdefault(wid, []).append(out)
        key = "refused" if curve else "dropped"
        want = 1 if curve else 300  # plaintext: 200 old-generation rows + 100 malformed frames per worker
        got = {}
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                st = c.status()
            except OSError as e:  # the run ended meanwhile: the counters are gone with it
                check(False, f"{label}: the run was still going when the counters were read ({e})")
                break
            got = {w["id"]: w.get("dataplane", {}).get(key, -1) for w in st["workers"]}
            if all(v >= want for v in got.values()) or st.get("state") == "finished":
                break
            time.sleep(0.2)
        for wid in sorted(eps):
            text = "".join(outs.get(wid, []))
            if curve:
                check("handshake refused" in text and "handshake ok" not in text,
                      f"{label}: the stranger's handshake with {wid} is refused ({text.strip().splitlines()[-1:]})")
            check(got.get(wid, -1) >= want, f"{label}: {wid} counts {got.get(wid)} {key} (/v1/status workers[].dataplane, "
                                            f"want >= {want})")
            check(metric(c, f"switchyard_dataplane_{key}_total", wid) >= want,
                  f"{label}: /metrics switchyard_dataplane_{key}_total for {wid}")
        rc = c.finish(timeout=120)
        ok = check(rc == 0, f"{label}: the run finishes (exit {rc})")
        logs = "".join(open(f"{c.logs}/{w}.0.log").read() for w in ["w0", "w1"])
        check(("(CURVE)" if curve else "(plaintext)") in logs, f"{label}: the workers' data plane is "
                                                                f"{'CURVE' if curve else 'plaintext'}")
        if curve:
            check("data plane: refused a CURVE client" in logs, f"{label}: the workers log the refused stranger")
        got = c.metrics()
        missing, worst = fu.compare(ref, got)
        ok &= check(not missing and worst <= fu.TOL, f"{label}: all {STEPS} steps, losses equal the fault-free run "
                                                     f"(missing {missing[:5]}, max rel diff {worst:.2e})")
        print(f"   {label}: {time.time() - t0:.1f} s", flush=True)
        return ok
    finally:
        c.close()
        if not ok:
            c.dump()


def main():
    tmp = sytest.make_tmp("sy-dpauth-")
    fu.prepare_data(tmp)
    os.makedirs(f"{tmp}/keys")
    for n in ["coord", "worker"]:
        keygen(f"{tmp}/keys/{n}")
    with open(f"{tmp}/keys/authorized", "w") as f:
        f.write(open(f"{tmp}/keys/worker.pub").read())
    ref = fu.reference(tmp, STEPS, EVERY)
    one(tmp, "curve", ref, True)
    one(tmp, "plain", ref, False)
    if failures:
        print(f"{len(failures)} FAILED")
        sys.exit(1)
    print("all ok")


if __name__ == "__main__":
    main()
