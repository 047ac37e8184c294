"""CurveZMQ on the control plane (system spec §2 "Security", docs/protocol.md "Security"), with
real processes over loopback:

1. `switchyard run --workers 2` with CURVE on gives exactly the losses of the same run without.
2. While that run trains, a worker whose key is not in cluster.curve_authorized_keys is refused:
   the coordinator logs the key, the worker exits 4 with a clear message in bounded time.
3. A plaintext worker (no CURVE flags), and a worker with a wrong server public key, are
   refused too; the run's listed workers are unaffected (world 2 throughout, exit 0).
4. At the socket level: the coordinator's ZMTP greeting demands CURVE, and a peer that greets
   with the NULL mechanism gets the connection closed without one byte of application data.
Plus `switchyard keygen` (mode 0600, no overwrite) and the launcher's early key checks.
"""
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import sytest
from sytest import SY, COORD, WORKER, CFG, check, failures, metrics

STEPS = 24
REFUSE_BOUND_S = 15  # a refused worker must exit within this


def sets(tmp, name, extra=()):
    s = {"data.train": f"{tmp}/data/train_*.bin", "data.val": "", "run.name": name, "run.state_dir": f"{tmp}/state-{name}",
         "checkpoint.store": f"{tmp}/store", "run.steps": str(STEPS), "checkpoint.every": "0",
         "train.threads": "1", "model.n_layers": "2", "model.d_model": "64", "model.d_ff": "128",
         "model.seq_len": "64", "train.global_batch_seqs": "8", "train.micro_batch_seqs": "4",
         "train.warmup_steps": "5"}
    s.update(dict(extra))
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def dump_logs(tmp, name):
    d = f"{tmp}/state-{name}/logs"
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        print("----", f)
        print(open(f"{d}/{f}").read()[-2000:])


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def keygen(path):
    return sytest.run([SY, "keygen", path], capture_output=True, text=True, timeout=30)


def pubkey(path):
    for line in open(path):
        if line.startswith("public-key"):
            return line.split("=", 1)[1].strip()
    return None


def zmtp_probe(endpoint):
    """Greets the coordinator as a NULL-mechanism ZMTP 3.0 peer would, in the stages libzmq
    uses (signature + major version, then the rest once the peer's greeting is in). Returns
    (the server's mechanism, bytes it sent after its 64-byte greeting, whether it closed)."""
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.settimeout(5)
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
    s.sendall(greeting[:11])
    got, sent_rest, closed = b"", False, False
    t0 = time.time()
    while time.time() - t0 < 5:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        got += chunk
        if len(got) >= 11 and not sent_rest:
            s.sendall(greeting[11:])
            sent_rest = True
    s.close()
    mech = got[12:32].rstrip(b"\0").decode(errors="replace") if len(got) >= 32 else "?"
    return mech, got[64:], closed


def main():
    tmp = sytest.make_tmp("sy-curve-")
    t_start = time.time()
    rnd = random.Random(7)
    os.makedirs(f"{tmp}/text")
    words = ["curve", "keys", "encrypt", "the", "control", "plane", "and", "zap", "admits", "workers"]
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "data prepared")

    # --- keygen ----------------------------------------------------------------------------
    keys = f"{tmp}/keys"
    os.makedirs(keys)
    for name in ["coord", "worker", "rogue"]:
        r = keygen(f"{keys}/{name}")
        check(r.returncode == 0, f"keygen {name} ({r.stderr.strip()})")
    check(stat.S_IMODE(os.stat(f"{keys}/worker.key").st_mode) == 0o600, "keygen: the .key file is mode 0600")
    pw = pubkey(f"{keys}/worker.pub")
    check(pw is not None and len(pw) == 40 and pw == pubkey(f"{keys}/worker.key"),
          "keygen: .pub holds the 40-character Z85 public key of the .key")
    before = open(f"{keys}/worker.key").read()
    r = keygen(f"{keys}/worker")
    check(r.returncode != 0 and "exists already" in r.stderr and open(f"{keys}/worker.key").read() == before,
          f"keygen refuses to overwrite ({r.stderr.strip()})")
    with open(f"{keys}/authorized", "w") as f:
        f.write("# the workers of this test\n" + open(f"{keys}/worker.pub").read())
    curve = {"cluster.curve_server_key": f"{keys}/coord.key",
             "cluster.curve_server_public": f"{keys}/coord.pub",
             "cluster.curve_worker_key": f"{keys}/worker.key",
             "cluster.curve_authorized_keys": f"{keys}/authorized"}

    # --- the launcher refuses bad key setups before starting anything -------------------
    r = sytest.run([SY, "run", CFG, "--workers", "2", "--quiet"] +
                   sets(tmp, "badkey", {**curve, "cluster.curve_worker_key": f"{keys}/rogue.key"}),
                   capture_output=True, text=True, timeout=60)
    check(r.returncode != 0 and "cluster.curve_worker_key" in r.stderr and "not listed" in r.stderr,
          f"run: a worker key not in the authorized list is refused up front ({r.stderr.strip()[-200:]})")
    r = sytest.run([SY, "run", CFG, "--workers", "2", "--quiet"] +
                   sets(tmp, "nopub", {**curve, "cluster.curve_server_public": ""}),
                   capture_output=True, text=True, timeout=60)
    check(r.returncode != 0 and "cluster.curve_server_public" in r.stderr,
          f"run: CURVE without cluster.curve_server_public is refused ({r.stderr.strip()[-200:]})")
    r = sytest.run([SY, "config", "show", CFG, "--set", f"cluster.curve_server_key={keys}/coord.key"],
                   capture_output=True, text=True, timeout=60)
    check(r.returncode != 0 and "cluster.curve_authorized_keys" in r.stderr,
          f"config: a server key without authorized keys is refused ({r.stderr.strip()[-200:]})")

    # --- 1. reference run without CURVE -------------------------------------------------------
    t = time.time()
    # (switchyard run makes per-run keys by default: cluster.insecure turns CURVE off)
    r = sytest.run([SY, "run", CFG, "--workers", "2", "--quiet"] + sets(tmp, "plain", {"cluster.insecure": "true"}),
                   capture_output=True, text=True, timeout=300)
    print(f"   plaintext run: {time.time() - t:.1f} s", flush=True)
    check(r.returncode == 0, "plaintext run completes")
    check("CURVE on" not in read(f"{tmp}/state-plain/logs/coordinator.log"), "the plaintext run is plaintext")
    if r.returncode != 0:
        print(r.stderr[-2000:])
        dump_logs(tmp, "plain")

    # --- 1. the same run with CURVE: `switchyard run` hands the keys to its workers --------
    t = time.time()
    r = sytest.run([SY, "run", CFG, "--workers", "2", "--quiet"] + sets(tmp, "curve", curve),
                   capture_output=True, text=True, timeout=300)
    print(f"   CURVE run: {time.time() - t:.1f} s", flush=True)
    check(r.returncode == 0, f"CURVE run completes (exit {r.returncode})")
    clog = read(f"{tmp}/state-curve/logs/coordinator.log")
    check("CURVE on" in clog, "coordinator.log says CURVE is on")
    wlog = read(f"{tmp}/state-curve/logs/worker-0.log")
    check("control plane: CURVE" in wlog, "the launcher's workers use CURVE")
    if r.returncode != 0:
        print(r.stderr[-2000:])
        dump_logs(tmp, "curve")
    else:
        a, b = metrics(tmp, "plain"), metrics(tmp, "curve")
        check(sorted(b) == list(range(1, STEPS + 1)), f"CURVE run logged steps 1..{STEPS}")
        same = sorted(a) == sorted(b) and all(a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"]
                                              for s in a)
        check(same, "CURVE run: exactly the losses and grad norms of the plaintext run")

    # --- 2-4. a coordinator by hand: refused workers knock while a listed one waits ---------
    # min_workers 2: the run starts only when the second listed worker comes, after the refusals.
    name = "knock"
    os.makedirs(f"{tmp}/state-{name}", exist_ok=True)
    clog_path = f"{tmp}/state-{name}/coordinator.log"
    coord = sytest.Popen([COORD, CFG, "--bind", "tcp://127.0.0.1:0", "--status-addr", "127.0.0.1:0"] +
                         sets(tmp, name, {**curve, "cluster.min_workers": "2"}),
                         stdout=subprocess.PIPE, stderr=open(clog_path, "w"), text=True)
    ready = coord.stdout.readline()
    m = re.match(r"coordinator ready bind=(\S+) status=(\S+)", ready)
    check(m is not None, f"the CURVE coordinator is up ({ready.strip()})")
    good = []
    outcomes = {}
    if m:
        ep, status = m.group(1), m.group(2)
        wflags = ["--curve-server-public", f"{keys}/coord.pub", "--curve-key", f"{keys}/worker.key"]

        def worker(wid, flags, **kw):
            return sytest.Popen([WORKER, "--coordinator", ep, "--id", wid, "--threads", "1"] + flags,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

        good.append(worker("good0", wflags))
        # 4. socket level: the greeting demands CURVE; a NULL-mechanism peer gets nothing
        mech, after, closed = zmtp_probe(ep)
        check(mech == "CURVE", f"the coordinator's ZMTP greeting names the CURVE mechanism ({mech})")
        check(closed and after == b"",
              f"a NULL-mechanism peer is disconnected without any byte after the greeting ({after[:32]!r})")
        bad = {
            "rogue": ["--curve-server-public", f"{keys}/coord.pub", "--curve-key", f"{keys}/rogue.key"],
            "plain": [],
            "wrongserver": ["--curve-server-public", f"{keys}/rogue.pub", "--curve-key", f"{keys}/worker.key"],
        }
        t0 = time.time()
        procs = {n: worker(n, f) for n, f in bad.items()}
        for n, wp in procs.items():
            try:
                out, _ = wp.communicate(timeout=max(1, REFUSE_BOUND_S - (time.time() - t0)))
                outcomes[n] = (wp.returncode, out, time.time() - t0)
            except subprocess.TimeoutExpired:
                wp.kill()
                out, _ = wp.communicate()
                outcomes[n] = (None, out, time.time() - t0)
        try:
            with urllib.request.urlopen(status + "/v1/status", timeout=5) as resp:
                st = json.load(resp)
            sec = st.get("security", {})
            check(sec.get("curve") is True and sec.get("authorized_keys") == 1,
                  f"/v1/status: security.curve true, 1 authorized key ({sec})")
            check(sec.get("refused_keys") == 1 and sec.get("failed_handshakes", 0) >= 1,
                  f"/v1/status counts the refused key and the failed handshakes ({sec})")
        except OSError as e:
            check(False, f"/v1/status reachable ({e})")
        good.append(worker("good1", wflags))
    try:
        rc = coord.wait(timeout=120)
    except subprocess.TimeoutExpired:
        coord.kill()
        rc = None
    for g in good:
        try:
            g.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            g.kill()
    check(rc == 0, f"the run of the listed workers completes (coordinator exit {rc})")
    check(all(g.returncode == 0 for g in good), "the listed workers exit 0")

    for n, want in [("rogue", "refused our CURVE key"), ("plain", "requires CURVE"),
                    ("wrongserver", "--curve-server-public")]:
        wrc, out, dt = outcomes.get(n, (None, "", 0))
        check(wrc == 4, f"worker '{n}' is refused: exit 4 within {REFUSE_BOUND_S} s (exit {wrc}, {dt:.1f} s)")
        check(want in out and "giving up" in out, f"worker '{n}' says why: '{want}'")
        check("registered with coordinator" not in out, f"worker '{n}' never registered")
        if wrc != 4 or want not in out:
            print(out[-1500:])
    wrc, out, _ = outcomes.get("rogue", (None, "", 0))
    check("curve_authorized_keys" in out, "the refused worker's message names cluster.curve_authorized_keys")

    clog = read(clog_path)
    rogue_pub = pubkey(f"{keys}/rogue.pub")
    check(re.search(r"refused a CURVE client at 127\.0\.0\.1 with public key " + re.escape(rogue_pub), clog)
          is not None, "coordinator log names the refused key and the peer address")
    check("CURVE handshake failed" in clog, "coordinator log reports failed handshakes (plaintext, wrong key)")
    events = [json.loads(l) for l in read(f"{tmp}/state-{name}/events.jsonl").splitlines()]
    joined = {e.get("worker") for e in events if e.get("event") == "worker_joined"}
    check(joined == {"good0", "good1"}, f"only the listed workers ever joined ({sorted(map(str, joined))})")
    if rc != 0:
        print(clog[-3000:])
    else:
        a, b = metrics(tmp, "plain"), metrics(tmp, name)
        check(all(b[s]["world"] == 2 for s in b), "the run trained with world 2 at every step")
        same = sorted(a) == sorted(b) and all(a[s]["loss"] == b[s]["loss"] for s in a)
        check(same, "the run after the refusals has exactly the losses of the plaintext run")

    print(f"total {time.time() - t_start:.1f} s")
    if failures:
        print(f"{len(failures)} FAILED")
        return 1
    print("all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
