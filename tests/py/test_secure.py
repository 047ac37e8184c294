"""Secure by default (issue 12 #1 and #3; docs/security.md), with real processes:

1. A coordinator whose control endpoint other machines can reach (tcp://0.0.0.0, tcp://*) without
   CurveZMQ refuses to start (exit 2) with a message naming the fix (switchyard keygen, the
   cluster.curve_* keys, cluster.insecure); with cluster.insecure: true it starts, warns at start,
   and every generation_opened log line carries the INSECURE warning. Same for a worker whose
   --data-bind is off-loopback without --curve-key (exit 2; --insecure: it trains, and its
   generation lines carry the warning). An off-loopback status server without a token is warned
   about.
2. Token files: mode 0644 refused (exit 2, "chmod 600") by the coordinator, `switchyard run` and
   `switchyard status`; status.token and status.token_file together refused; a 0600 file is the
   token (POST without it 401, with it 202); `switchyard status` sends the token of --token-file,
   else of SY_STATUS_TOKEN, else none (a header-recording HTTP server).
3. `switchyard run --workers 2` (token from SY_STATUS_TOKEN, so the test knows it): while the run
   is live, no process it started has the token or a secret key (Z85 text of the per-run .key
   files) in /proc/PID/cmdline or /proc/PID/environ; the per-run folder is 0700 with 0600 files;
   /v1/status says CURVE is on (security.curve) and, like /metrics, holds neither secret; the
   token from the environment works (POST /v1/checkpoint 202); afterwards no log, metrics,
   events or checkpoint file holds either, and the per-run folder is gone. A second run stopped
   with SIGTERM removes its folder too; with cluster.insecure: true the run makes no keys
   (security.curve false).
"""
import glob
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import sytest
from sytest import SY, COORD, WORKER, CFG, check, failures

SMALL = {"run.steps": "40", "checkpoint.every": "20", "train.threads": "1", "model.n_layers": "2",
         "model.d_model": "64", "model.d_ff": "128", "model.seq_len": "64", "train.global_batch_seqs": "8",
         "train.micro_batch_seqs": "4", "train.warmup_steps": "5", "data.val": ""}


def sets(tmp, name, extra=()):
    s = dict(SMALL)
    s.update({"data.train": f"{tmp}/data/train_*.bin", "run.name": name, "run.state_dir": f"{tmp}/state-{name}",
              "checkpoint.store": f"{tmp}/store"})
    s.update(dict(extra))
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def http(method, url, token=None):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return "" if mode == "r" else b""


def start_coord(args, env=None, stderr_path=None):
    err = open(stderr_path, "w") if stderr_path else subprocess.PIPE
    p = sytest.Popen([COORD, CFG] + args, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = p.stdout.readline()
    m = re.match(r"coordinator ready bind=(\S+) status=(\S+)", line)
    return p, m


def refused_coordinator(tmp):
    for bind in ["tcp://0.0.0.0:0", "tcp://*:0"]:
        r = sytest.run([COORD, CFG, "--bind", bind, "--status-addr", "127.0.0.1:0"] + sets(tmp, "refused"),
                       capture_output=True, text=True, timeout=30)
        check(r.returncode == 2 and "reachable from other machines" in r.stderr and "switchyard keygen" in r.stderr
              and "cluster.curve_server_key" in r.stderr and "cluster.insecure" in r.stderr,
              f"coordinator --bind {bind} without CURVE: refused, exit 2, the message names the fix "
              f"({r.returncode}: {r.stderr.strip()[-300:]})")
    r = sytest.run([COORD, CFG, "--status-addr", "127.0.0.1:0"] +
                   sets(tmp, "refused", {"cluster.bind": "tcp://10.255.255.1:0"}), capture_output=True, text=True,
                   timeout=30)
    check(r.returncode == 2 and "cluster.bind = tcp://10.255.255.1:0" in r.stderr,
          f"coordinator with cluster.bind on an interface address: refused, the message names cluster.bind "
          f"({r.stderr.strip()[-160:]})")


def insecure_cluster(tmp):
    """cluster.insecure: a coordinator on 0.0.0.0 and a worker with an off-loopback data plane
    (--insecure) train; warnings at start and on every generation line."""
    name = "insec"
    os.makedirs(f"{tmp}/state-{name}", exist_ok=True)
    clog = f"{tmp}/state-{name}/coord.log"
    coord, m = start_coord(["--bind", "tcp://0.0.0.0:0", "--status-addr", "0.0.0.0:0"] +
                           sets(tmp, name, {"cluster.insecure": "true", "run.steps": "6",
                                            "checkpoint.every": "0"}), stderr_path=clog)
    if not check(m is not None, "cluster.insecure: a coordinator bound to tcp://0.0.0.0 starts"):
        coord.kill()
        return
    port = m.group(1).rsplit(":", 1)[1]
    ep = f"tcp://127.0.0.1:{port}"
    r = sytest.run([WORKER, "--coordinator", ep, "--id", "wx", "--threads", "1", "--data-bind", "tcp://0.0.0.0:*",
                    "--connect-timeout", "20"], capture_output=True, text=True, timeout=30)
    check(r.returncode == 2 and "--data-bind tcp://0.0.0.0:*" in r.stderr and "--curve-key" in r.stderr
          and "--insecure" in r.stderr,
          f"worker --data-bind tcp://0.0.0.0:* without --curve-key: refused, exit 2, the message names the fix "
          f"({r.returncode}: {r.stderr.strip()[-240:]})")
    wlog = f"{tmp}/state-{name}/worker.log"
    w = sytest.Popen([WORKER, "--coordinator", ep, "--id", "w0", "--threads", "1", "--data-bind", "tcp://0.0.0.0:*",
                      "--insecure", "--connect-timeout", "20"], stdout=subprocess.DEVNULL,
                     stderr=open(wlog, "w"))
    try:
        rc, wrc = coord.wait(timeout=120), w.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = wrc = None
    c, wl = read(clog), read(wlog)
    check(rc == 0 and wrc == 0, f"cluster.insecure: the run on 0.0.0.0 finishes (coordinator {rc}, worker {wrc})")
    check("INSECURE" in c and "cluster.insecure is true" in c, "cluster.insecure: the coordinator warns at start")
    check("reachable from other machines" in c and "status server" in c,
          "an off-loopback status server without a token is warned about")
    gens = [ln for ln in c.splitlines() if "generation_opened" in ln]
    check(gens and all("INSECURE" in ln for ln in gens),
          f"cluster.insecure: every generation_opened log line carries the warning ({len(gens)} lines)")
    wg = [ln for ln in wl.splitlines() if re.search(r"generation \d+: rank", ln)]
    check("INSECURE" in wl.split("\n")[0] + wl and wg and all("[INSECURE" in ln for ln in wg),
          f"worker --insecure: warned at start and on every generation line ({len(wg)} lines)")
    # the plain loopback default needs none of this, and says nothing of it
    coord, m = start_coord(["--bind", "tcp://127.0.0.1:0", "--status-addr", "127.0.0.1:0"] + sets(tmp, "lo"))
    if m:
        coord.send_signal(signal.SIGTERM)
        _, err = coord.communicate(timeout=30)
        check("INSECURE" not in err and "reachable from other machines" not in err,
              "a loopback coordinator starts without CURVE and without warnings")
    else:
        check(False, "a loopback coordinator starts without CURVE")


def token_files(tmp):
    d = f"{tmp}/tok"
    os.makedirs(d)
    tf = f"{d}/token"
    with open(tf, "w") as f:
        f.write("file-token-0123\n")
    os.chmod(tf, 0o644)
    r = sytest.run([COORD, CFG, "--bind", "tcp://127.0.0.1:0", "--status-addr", "127.0.0.1:0"] +
                   sets(tmp, "tok", {"status.token_file": tf}), capture_output=True, text=True, timeout=30)
    check(r.returncode == 2 and "status.token_file" in r.stderr and "too open" in r.stderr and "chmod 600" in r.stderr,
          f"a token file of mode 0644 is refused (exit {r.returncode}: {r.stderr.strip()[-200:]})")
    r = sytest.run([COORD, CFG, "--bind", "tcp://127.0.0.1:0", "--status-addr", "127.0.0.1:0"] +
                   sets(tmp, "tok", {"status.token_file": tf, "status.token": "x"}), capture_output=True, text=True,
                   timeout=30)
    check(r.returncode == 2 and "status.token_file" in r.stderr,
          f"status.token and status.token_file together are refused ({r.stderr.strip()[-160:]})")
    r = sytest.run([SY, "run", CFG, "--workers", "1", "--quiet"] + sets(tmp, "tokrun", {"status.token_file": tf}),
                   capture_output=True, text=True, timeout=60)
    check(r.returncode != 0 and "too open" in r.stderr, f"switchyard run refuses the 0644 token file too "
          f"({r.stderr.strip()[-160:]})")
    r = sytest.run([SY, "status", "--url", "http://127.0.0.1:9", "--token-file", tf], capture_output=True, text=True,
                   timeout=30)
    check(r.returncode == 2 and "too open" in r.stderr, f"switchyard status refuses the 0644 token file too "
          f"({r.stderr.strip()[-160:]})")
    os.chmod(tf, 0o600)
    # switchyard status sends the file's (else SY_STATUS_TOKEN's) token: a server that records headers
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import threading
    seen = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    r1 = sytest.run([SY, "status", "--json", "--url", url, "--token-file", tf], capture_output=True, text=True, timeout=30)
    r2 = sytest.run([SY, "status", "--json", "--url", url], capture_output=True, text=True, timeout=30,
                    env=dict(os.environ, SY_STATUS_TOKEN="env-token-9"))
    env_no = {k: v for k, v in os.environ.items() if k != "SY_STATUS_TOKEN"}
    r3 = sytest.run([SY, "status", "--json", "--url", url], capture_output=True, text=True, timeout=30, env=env_no)
    srv.shutdown()
    check([r1.returncode, r2.returncode, r3.returncode] == [0, 0, 0]
          and seen == ["Bearer file-token-0123", "Bearer env-token-9", None],
          f"switchyard status sends the token of --token-file, else of SY_STATUS_TOKEN, else none ({seen})")
    coord, m = start_coord(["--bind", "tcp://127.0.0.1:0", "--status-addr", "127.0.0.1:0"] +
                           sets(tmp, "tok", {"status.token_file": tf}))
    if check(m is not None, "a coordinator with a 0600 token file starts"):
        base = m.group(2)
        c1 = http("POST", base + "/v1/checkpoint")[0]
        c2 = http("POST", base + "/v1/checkpoint", "file-token-0123")[0]
        check(c1 == 401 and c2 == 202, f"the file's token guards the POST endpoints (without {c1}, with {c2})")
        coord.send_signal(signal.SIGTERM)
        coord.communicate(timeout=30)


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = read(f"/proc/{d}/stat")
            if st and int(st.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def secret_keys(folder):
    keys = []
    for f in glob.glob(f"{folder}/*.key"):
        for line in read(f).splitlines():
            if line.startswith("secret-key"):
                keys.append(line.split("=", 1)[1].strip())
    return keys


def launcher_run(tmp):
    token = "tok-" + "%032x" % random.Random(11).getrandbits(128)
    ktmp = f"{tmp}/ktmp"
    os.makedirs(ktmp)
    env = dict(os.environ, SY_STATUS_TOKEN=token, TMPDIR=ktmp)
    name = "live"
    p = sytest.Popen([SY, "run", CFG, "--workers", "2"] + sets(tmp, name, {"run.steps": "400",
                                                                         "checkpoint.every": "50"}),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    status = None
    lines = []
    while True:
        ln = p.stderr.readline()
        if not ln:
            break
        lines.append(ln)
        m = re.search(r"status (http://\S+);", ln)
        if m:
            status = m.group(1)
            break
    if not check(status is not None, f"switchyard run starts ({''.join(lines)[-400:]})"):
        p.kill()
        return
    folders = glob.glob(f"{ktmp}/switchyard-run-*")
    check(len(folders) == 1 and stat.S_IMODE(os.stat(folders[0]).st_mode) == 0o700,
          f"the run's private folder is $TMPDIR/switchyard-run-*, mode 0700 ({folders})")
    folder = folders[0] if folders else "/nonexistent"
    modes = {os.path.basename(f): stat.S_IMODE(os.stat(f).st_mode) for f in glob.glob(folder + "/*")}
    check({"status.token", "coordinator.key", "worker.key", "authorized_workers"} <= set(modes)
          and all(modes[f] == 0o600 for f in modes if not f.endswith(".pub")),
          f"it holds the token and per-run key pairs, secrets mode 0600 ({ {k: oct(v) for k, v in modes.items()} })")
    keys = secret_keys(folder)
    check(len(keys) == 2 and all(len(k) == 40 for k in keys), f"two per-run secret keys ({len(keys)})")
    secrets = [token] + keys
    # every process of the run, while it trains
    t0 = time.time()
    procs = []
    while time.time() - t0 < 30:
        kids = children_of(p.pid)
        procs = [(k, read(f"/proc/{k}/cmdline", "rb"), read(f"/proc/{k}/environ", "rb")) for k in kids]
        if len(procs) >= 3 and sum(b"switchyard-worker" in c for _, c, _ in procs) == 2 and \
                sytest.jsonl(f"{tmp}/state-{name}/metrics.jsonl"):
            break
        time.sleep(0.2)
    own = read(f"/proc/{p.pid}/cmdline", "rb")
    names = [os.path.basename(c.split(b"\0")[0].decode()) for _, c, _ in procs]
    check(len(procs) == 3, f"the run's coordinator and 2 workers are live ({names})")
    leaks = [(k, s[:8]) for k, c, e in procs + [(p.pid, own, b"")] for s in secrets
             if s.encode() in c]
    check(not leaks, f"no process of the run has the token or a secret key in /proc/PID/cmdline ({leaks})")
    eleaks = [(k, s[:8]) for k, c, e in procs for s in secrets if s.encode() in e]
    check(not eleaks, f"nor in /proc/PID/environ of the coordinator and workers ({eleaks})")
    coord_cmd = [c for _, c, _ in procs if b"switchyard-coordinator" in c]
    check(coord_cmd and b"status.token_file=" + folder.encode() in coord_cmd[0],
          "the coordinator gets the token as a file of the private folder")
    sc, body = http("GET", status + "/v1/status")
    sec = json.loads(body).get("security", {}) if sc == 200 else {}
    check(sec.get("curve") is True and sec.get("insecure") is False and sec.get("accepted", 0) >= 2,
          f"/v1/status: the run uses CURVE with per-run keys ({sec})")
    mc, mbody = http("GET", status + "/metrics")
    hc, hbody = http("GET", status + "/v1/history")
    check(sc == 200 and mc == 200 and not any(s in body or s in mbody or s in hbody for s in secrets),
          "/v1/status, /metrics and /v1/history hold neither the token nor a secret key")
    c1 = http("POST", status + "/v1/checkpoint")[0]
    c2 = http("POST", status + "/v1/checkpoint", token)[0]
    check(c1 == 401 and c2 == 202, f"SY_STATUS_TOKEN is the run's token (POST without {c1}, with it {c2})")
    try:
        rc = p.wait(timeout=300)
        err = "".join(lines) + p.stderr.read()
    except subprocess.TimeoutExpired:
        rc, err = None, ""
    check(rc == 0, f"the run completes (exit {rc}) {err[-300:] if rc else ''}")
    check(not os.path.exists(folder) and not glob.glob(f"{ktmp}/switchyard-run-*"),
          "the private folder is gone after the run")
    files = [f for f in glob.glob(f"{tmp}/state-{name}/**", recursive=True) + glob.glob(f"{tmp}/store/{name}/**",
                                                                                         recursive=True)
             if os.path.isfile(f)]
    hits = [(os.path.relpath(f, tmp), s[:8]) for f in files for s in secrets if s.encode() in read(f, "rb")]
    check(files and not hits and not any(s in err for s in secrets),
          f"no log, metrics, events or checkpoint file ({len(files)}), nor the launcher's output, holds a secret "
          f"({hits[:5]})")

    # SIGTERM mid-run: the folder goes too
    p = sytest.Popen([SY, "run", CFG, "--workers", "2", "--quiet"] + sets(tmp, "term", {"run.steps": "100000",
                                                                                     "checkpoint.every": "0"}),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seen = False
    t0 = time.time()
    while time.time() - t0 < 60 and not (seen and sytest.jsonl(f"{tmp}/state-term/metrics.jsonl")):
        seen = seen or bool(glob.glob(f"{ktmp}/switchyard-run-*"))
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        rc = None
    check(seen and rc == 1 and not glob.glob(f"{ktmp}/switchyard-run-*"),
          f"SIGTERM stops the run (exit {rc}) and removes its private folder")

    # cluster.insecure: no keys made, plaintext on loopback
    r = sytest.run([SY, "run", CFG, "--workers", "2", "--quiet"] + sets(tmp, "plain", {"cluster.insecure": "true",
                                                                                   "run.steps": "4",
                                                                                   "checkpoint.every": "0"}),
                   capture_output=True, text=True, timeout=120, env=env)
    clog = read(f"{tmp}/state-plain/logs/coordinator.log")
    check(r.returncode == 0 and "CURVE on" not in clog and not glob.glob(f"{ktmp}/switchyard-run-*"),
          f"cluster.insecure: true: the run makes no keys and uses plaintext (exit {r.returncode})")


def main():
    tmp = sytest.make_tmp("sy-secure-")
    t0 = time.time()
    rnd = random.Random(5)
    os.makedirs(f"{tmp}/text")
    words = ["keys", "stay", "in", "files", "never", "on", "the", "command", "line", "please"]
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "data prepared")
    for part in (refused_coordinator, insecure_cluster, token_files, launcher_run):
        try:
            part(tmp)
        except Exception as e:  # one broken part must not hide the others
            check(False, f"{part.__name__}: {type(e).__name__}: {e}")
    print(f"{len(failures)} failed ({time.time() - t0:.1f} s)")
    if not failures:
        sytest.remove_tmp(tmp)
    else:
        print(f"files kept in {tmp}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
