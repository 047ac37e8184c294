"""The status server's hardening (issue 12 #4): HTTPS, the token for GET, and limits that keep a
slow or flooding client from stalling it. A coordinator with no workers serves /v1/status
("waiting"); nothing else runs.

1. HTTPS (status.tls_cert/tls_key: a self-signed EC certificate made here with openssl) with
   status.auth_get: `curl --cacert CERT` with the bearer token gets 200 and the status JSON;
   without the token 401 (with WWW-Authenticate), with a wrong one 403; GET / (the dashboard)
   answers 200 without it; curl without --cacert fails certificate verification; plain http://
   to the TLS port gets no HTTP answer; `openssl s_client` completes TLS 1.2 and 1.3 handshakes
   and fails with TLS 1.1; `switchyard status --url https://... --cacert CERT` with
   SY_STATUS_TOKEN prints the table (exit 0), and exits 1 naming SY_STATUS_TOKEN without it and
   failing verification without --cacert. POST /v1/stop over HTTPS with the token stops the
   coordinator (exit 3).
2. Bad TLS settings are refused at start (exit != 0) with a message naming the file and the
   fault: a key file readable by others (0644), a missing key file, a certificate file that is
   not PEM, a key that is not the certificate's, tls_cert without tls_key; and auth_get without
   a token. On 0.0.0.0 without auth_get and TLS it starts with a warning naming both settings.
3. Slowloris, on the plain and on the HTTPS server: 200 half-open connections from 127.0.0.1
   (plain: silent / a partial request line / headers trickled one byte a second; HTTPS: silent,
   a partial ClientHello record, a finished handshake then trickled headers) are all held by
   the server (its descriptor count grows by >= 200), and meanwhile every one of 15 GETs of
   /v1/status answers 200 within 1 s. The silent ones are closed by the server after the
   10 s idle timeout while the trickling ones are kept.
4. A request with 100 kB of headers is refused (431/413) or closed, a POST with a 200 kB body
   gets 413, and /v1/status answers 200 afterwards.
5. `switchyard run --workers 2` with HTTPS + auth_get and chaos (kill -9 of a worker, then of
   the coordinator): the run finishes (exit 0); the launcher's lost-worker report reached the
   coordinator over HTTPS (verified against status.tls_ca = the certificate; the coordinator
   log names it) and no report failed; the restarted coordinator serves HTTPS on the same port.
The per-address limit (256) is above the 200 + 1 connections from 127.0.0.1, so the test's own
GETs are not refused by it."""
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu
import sytest
from sytest import COORD, SY, CFG, check, failures

TOKEN = "hardening-token"
N_HALF = 200
LIMIT_S = 1.0
procs = []


def start_coord(tmp, name, *sets, env=None):
    """(process, status URL or None, stderr text when it did not start)."""
    args = [COORD, CFG, "--set", f"run.name={name}", "--set", f"run.state_dir={tmp}/state-{name}",
            "--set", f"checkpoint.store={tmp}/store"]
    for s in sets:
        args += ["--set", s]
    args += ["--bind", "tcp://127.0.0.1:0", "--status-addr", "127.0.0.1:0"]
    err = f"{tmp}/{name}.err"
    p = sytest.Popen(args, stdout=subprocess.PIPE, stderr=open(err, "w"), text=True, env=env)
    procs.append(p)
    r, _, _ = select.select([p.stdout], [], [], 15)
    line = p.stdout.readline() if r else ""
    if not line.startswith("coordinator ready"):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        return p, None, open(err).read()
    return p, line.split("status=")[1].split()[0], ""


def get(url, ctx=None, token=None, timeout=5, method="GET", data=None):
    """(HTTP code or None, body, headers)."""
    req = urllib.request.Request(url, method=method, data=data)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        return None, str(e), {}


def make_cert(tmp):
    cert, key = f"{tmp}/cert.pem", f"{tmp}/key.pem"
    r = sytest.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("openssl req failed: " + r.stderr.decode())
    os.chmod(key, 0o600)
    return cert, key


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def test_https(tmp, cert, key):
    print("--- 1. HTTPS with the token for GET")
    p, url, err = start_coord(tmp, "tls", f"status.tls_cert={cert}", f"status.tls_key={key}",
                              f"status.token={TOKEN}", "status.auth_get=true")
    if not check(url is not None and url.startswith("https://127.0.0.1:"), f"the ready line names an https URL ({url}) {err[-500:]}"):
        return
    ctx = ssl.create_default_context(cafile=cert)
    r = sytest.run(["curl", "-sS", "--cacert", cert, "-H", f"Authorization: Bearer {TOKEN}", "-w", "\n%{http_code}",
                    url + "/v1/status"], capture_output=True, text=True, timeout=30)
    body, _, code = r.stdout.rpartition("\n")
    try:
        st = json.loads(body)
    except ValueError:
        st = {}
    check(r.returncode == 0 and code == "200" and st.get("run") == "tls" and st.get("state") == "waiting",
          f"curl --cacert CERT with the token: 200 and the status JSON (rc {r.returncode}, {code}, {body[:80]!r})")
    code, body, hdr = get(url + "/v1/status", ctx)
    check(code == 401 and "Bearer" in (hdr.get("WWW-Authenticate") or ""),
          f"without the token: 401 with WWW-Authenticate ({code}, {hdr.get('WWW-Authenticate') if hdr else None})")
    for path in ("/v1/history", "/metrics"):
        code, _, _ = get(url + path, ctx)
        check(code == 401, f"GET {path} without the token: 401 ({code})")
        code, _, _ = get(url + path, ctx, TOKEN)
        check(code == 200, f"GET {path} with the token: 200 ({code})")
    code, _, _ = get(url + "/v1/status", ctx, "wrong")
    check(code == 403, f"with a wrong token: 403 ({code})")
    code, body, _ = get(url + "/", ctx)
    check(code == 200 and "<html" in body.lower(), f"GET / (the dashboard page) without the token: 200 ({code})")
    r = sytest.run(["curl", "-sS", "-o", "/dev/null", url + "/v1/status"], capture_output=True, text=True, timeout=30)
    check(r.returncode == 60, f"curl without --cacert fails verification (exit {r.returncode}: {r.stderr.strip()[:100]})")
    plain = "http://" + url[len("https://"):]
    r = sytest.run(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", plain + "/v1/status"],
                   capture_output=True, text=True, timeout=30)
    check(r.returncode != 0 and r.stdout.strip() in ("", "000"),
          f"plain http:// to the TLS port gets no HTTP answer (curl exit {r.returncode}, code {r.stdout!r})")
    code, _, _ = get(url + "/v1/status", ctx, TOKEN)
    check(code == 200, f"the server answers after the plain-HTTP attempt ({code})")
    hostport = url[len("https://"):]
    proto = {}
    for v in ("tls1_1", "tls1_2", "tls1_3"):
        r = sytest.run(["openssl", "s_client", "-connect", hostport, "-" + v, "-cipher", "DEFAULT@SECLEVEL=0"],
                       input=b"", capture_output=True, timeout=30)
        proto[v] = r.returncode == 0 and b"Cipher is (NONE)" not in r.stdout
    check(proto == {"tls1_1": False, "tls1_2": True, "tls1_3": True},
          f"TLS 1.2 and 1.3 handshakes succeed, TLS 1.1 is refused (openssl s_client: {proto})")

    env = dict(os.environ, SY_STATUS_TOKEN=TOKEN)
    r = sytest.run([SY, "status", "--url", url, "--cacert", cert], capture_output=True, text=True, timeout=30, env=env)
    check(r.returncode == 0 and "run tls: waiting" in r.stdout,
          f"switchyard status --cacert with SY_STATUS_TOKEN prints the table (exit {r.returncode}: {(r.stdout + r.stderr)[:160]!r})")
    env.pop("SY_STATUS_TOKEN")
    r = sytest.run([SY, "status", "--url", url, "--cacert", cert], capture_output=True, text=True, timeout=30, env=env)
    check(r.returncode == 1 and "401" in r.stderr and "SY_STATUS_TOKEN" in r.stderr,
          f"switchyard status without the token: exit 1 naming SY_STATUS_TOKEN ({r.returncode}: {r.stderr.strip()[:160]!r})")
    env["SY_STATUS_TOKEN"] = TOKEN
    r = sytest.run([SY, "status", "--url", url], capture_output=True, text=True, timeout=30, env=env)
    check(r.returncode == 1 and "certificate" in r.stderr.lower(),
          f"switchyard status without --cacert: exit 1, certificate not verified ({r.returncode}: {r.stderr.strip()[:160]!r})")

    code, _, _ = get(url + "/v1/stop", ctx, TOKEN, method="POST", data=b"")
    check(code == 202, f"POST /v1/stop over HTTPS with the token: 202 ({code})")
    try:
        rc = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    check(rc == 3, f"the coordinator stops (exit {rc}, expected 3)")


def test_bad_settings(tmp, cert, key):
    print("--- 2. bad TLS settings are refused at start")
    open_key = f"{tmp}/key-0644.pem"
    with open(key) as f, open(open_key, "w") as g:
        g.write(f.read())
    os.chmod(open_key, 0o644)
    garbage = f"{tmp}/garbage.pem"
    with open(garbage, "w") as f:
        f.write("not a certificate\n")
    other = f"{tmp}/other-key.pem"
    sytest.run(["openssl", "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", other],
               capture_output=True, timeout=60)
    os.chmod(other, 0o600)
    cases = [
        ("a key file readable by others", [f"status.tls_cert={cert}", f"status.tls_key={open_key}"],
         [open_key, "0644", "chmod 600"]),
        ("a missing key file", [f"status.tls_cert={cert}", f"status.tls_key={tmp}/nope.pem"],
         ["status.tls_key", f"{tmp}/nope.pem", "No such file"]),
        ("a certificate file that is not PEM", [f"status.tls_cert={garbage}", f"status.tls_key={key}"],
         ["status.tls_cert", garbage, "no PEM certificate"]),
        ("a key that is not the certificate's", [f"status.tls_cert={cert}", f"status.tls_key={other}"],
         ["status.tls_key", other, "not the private key"]),
        ("tls_cert without tls_key", [f"status.tls_cert={cert}"], ["status.tls_key", "status.tls_cert"]),
        ("auth_get without a token", ["status.auth_get=true"], ["status.auth_get", "status.token"]),
    ]
    # off loopback without auth_get or TLS: it starts, with a warning naming each missing setting
    p = sytest.Popen([COORD, CFG, "--set", f"run.state_dir={tmp}/state-open", "--set", f"checkpoint.store={tmp}/store",
                      "--bind", "tcp://127.0.0.1:0", "--status-addr", "0.0.0.0:0"],
                     stdout=subprocess.PIPE, stderr=open(f"{tmp}/open.err", "w"), text=True)
    procs.append(p)
    r, _, _ = select.select([p.stdout], [], [], 15)
    ready = p.stdout.readline() if r else ""
    p.kill()
    p.wait()
    err = open(f"{tmp}/open.err").read()
    check("coordinator ready" in ready and "status.auth_get: true" in err and "status.tls_cert and status.tls_key" in err,
          f"status server on 0.0.0.0 without auth_get and TLS: starts and warns about both "
          f"({[ln for ln in err.splitlines() if 'status server on' in ln]})")
    for i, (what, sets, words) in enumerate(cases):
        p, url, err = start_coord(tmp, f"bad{i}", *sets)
        if url is not None:
            p.kill()
            p.wait()
        check(url is None and p.returncode not in (0, None) and all(w in err for w in words),
              f"{what}: refused (exit {p.returncode}) naming {words}: {err.strip().splitlines()[-1:] if err.strip() else ''}")


def half_open_plain(port, n):
    socks = {"silent": [], "partial": [], "trickle": []}
    kinds = ["silent", "partial", "trickle"]
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        k = kinds[i % 3]
        if k == "partial":
            s.sendall(b"GET /v1/sta")
        elif k == "trickle":
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks[k].append(s)
    return socks


def half_open_tls(port, n, ctx):
    socks = {"silent": [], "partial": [], "trickle": []}
    kinds = ["silent", "partial", "trickle"]
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        k = kinds[i % 3]
        if k == "partial":  # a handshake record header announcing 512 bytes, then 8 of them
            s.sendall(b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03\x00\x00")
        elif k == "trickle":
            try:
                s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            except OSError as e:  # refused by the server: counted as not held
                print(f"   TLS connection {i}: {e}")
                s.close()
                continue
        socks[k].append(s)
    return socks


def slowloris(tmp, name, url, pid, socks_fn, ctx, token):
    before = open_fds(pid)
    t_open = time.time()
    socks = socks_fn()
    n = sum(len(v) for v in socks.values())
    time.sleep(0.5)
    held = open_fds(pid) - before
    check(n == N_HALF and held >= N_HALF,
          f"{name}: {n} half-open connections from 127.0.0.1, the server holds them (+{held} descriptors)")
    worst, codes = 0.0, []
    for i in range(15):
        for s in socks["trickle"]:  # one more header byte each
            try:
                s.sendall(b"a")
            except OSError:
                pass
        t = time.time()
        code, body, _ = get(url + "/v1/status", ctx, token, timeout=5)
        worst = max(worst, time.time() - t)
        codes.append(code)
        time.sleep(0.3)
    check(all(c == 200 for c in codes) and worst < LIMIT_S,
          f"{name}: 15 GETs of /v1/status during the slowloris all answer 200, the slowest in {worst * 1000:.0f} ms "
          f"(limit {LIMIT_S * 1000:.0f} ms; codes {sorted(set(map(str, codes)))})")
    # keep the tricklers going until the idle timeout (10 s) has passed for the silent ones
    while time.time() - t_open < 13:
        for s in socks["trickle"]:
            try:
                s.sendall(b"a")
            except OSError:
                pass
        time.sleep(1)
    # one more byte to every trickler, then look at all sockets at once (a loop with a timeout
    # per socket would leave the last tricklers idle past the timeout)
    for s in socks["trickle"]:
        try:
            s.sendall(b"a")
        except OSError:
            pass
    readable, _, _ = select.select(socks["silent"] + socks["trickle"], [], [], 1.0)
    closed = 0
    for s in socks["silent"]:
        if s in readable:  # EOF, a reset, or (HTTPS) a TLS alert the server sends as it closes
            try:
                d = s.recv(100)
                closed += d == b"" or d[:1] == b"\x15"
            except OSError:
                closed += 1
    alive = sum(1 for s in socks["trickle"] if s not in readable)  # the server sent nothing: open
    check(closed == len(socks["silent"]) and alive == len(socks["trickle"]),
          f"{name}: after the 10 s idle timeout the server closed {closed}/{len(socks['silent'])} silent connections "
          f"and kept {alive}/{len(socks['trickle'])} trickling ones")
    for v in socks.values():
        for s in v:
            s.close()
    code, _, _ = get(url + "/v1/status", ctx, token)
    check(code == 200, f"{name}: /v1/status answers after the slowloris ({code})")


def test_slowloris(tmp, cert, key):
    print("--- 3. slowloris: 200 half-open connections")
    p, url, err = start_coord(tmp, "slow")
    if check(url is not None, f"plain coordinator starts {err[-300:]}"):
        port = int(url.rsplit(":", 1)[1])
        slowloris(tmp, "http", url, p.pid, lambda: half_open_plain(port, N_HALF), None, None)
        print("--- 4. oversized requests")
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        reply = b""
        try:
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 100000 + b"\r\n\r\n")
            reply = s.recv(100)
        except OSError:
            pass
        s.close()
        first = reply.split(b"\r\n")[0].decode(errors="replace")
        check(first == "" or " 431 " in first + " " or " 413 " in first + " ",
              f"100 kB of headers: refused or closed ({first!r})")
        code2, _, _ = get(url + "/v1/checkpoint", None, TOKEN, method="POST", data=b"x" * 200000)
        check(code2 == 413, f"a POST with a 200 kB body: 413 ({code2})")
        code, body, _ = get(url + "/v1/status")
        check(code == 200 and json.loads(body).get("run") == "slow", f"/v1/status answers after them ({code})")
        p.kill()
        p.wait()
    p, url, err = start_coord(tmp, "slowtls", f"status.tls_cert={cert}", f"status.tls_key={key}",
                              f"status.token={TOKEN}", "status.auth_get=true")
    if check(url is not None, f"HTTPS coordinator starts {err[-300:]}"):
        port = int(url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=cert)
        slowloris(tmp, "https", url, p.pid, lambda: half_open_tls(port, N_HALF, ctx), ctx, TOKEN)
        p.kill()
        p.wait()


def test_launcher(tmp, cert, key):
    print("--- 5. switchyard run over HTTPS: the launcher's reports, a coordinator restart")
    fu.prepare_data(tmp)
    name = "launch"
    s = fu.settings(tmp, name, 60, 5, extra={
        "cluster.heartbeat_ms": "250", "cluster.failure_timeout_ms": "3000", "status.token": TOKEN,
        "status.auth_get": "true", "status.tls_cert": cert, "status.tls_key": key, "status.tls_ca": cert})
    log = f"{tmp}/run-{name}.log"
    with open(log, "w") as f:
        r = sytest.run([SY, "run", CFG, "--workers", "2", "--chaos", "kill-worker@step=15",
                        "--chaos", "kill-coordinator@step=35"] + fu.set_args(s),
                       stdout=f, stderr=subprocess.STDOUT, timeout=600)
    out = open(log).read()
    clog = open(f"{tmp}/state-{name}/logs/coordinator.log").read()
    ms = fu.read_metrics(f"{tmp}/state-{name}/metrics.jsonl")
    check(r.returncode == 0 and max(ms, default=0) == 60,
          f"the run finishes with both faults (exit {r.returncode}, last step {max(ms, default=0)})"
          + (f"\n{out[-1500:]}" if r.returncode else ""))
    check(" status https://127.0.0.1:" in out, "switchyard run prints an https status URL")
    reported = "reported by the launcher" in clog or "lost report for" in clog
    check(reported and "could not report" not in out,
          f"the launcher's lost-worker report reached the coordinator over HTTPS (in its log: {reported}; "
          f"failed reports: {out.count('could not report')})")
    starts = [e for e in fu.read_lines(f"{tmp}/state-{name}/events.jsonl") if e["event"] == "coordinator_started"]
    check(len(starts) >= 2 and all(e["status"] == starts[0]["status"] and e["status"].startswith("https://")
                                   for e in starts),
          f"the restarted coordinator serves HTTPS on the same address ({[e['status'] for e in starts]})")


def main():
    tmp = sytest.make_tmp("sy-hard-")
    try:
        cert, key = make_cert(tmp)
        test_https(tmp, cert, key)
        test_bad_settings(tmp, cert, key)
        test_slowloris(tmp, cert, key)
        test_launcher(tmp, cert, key)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if not failures:
        sytest.remove_tmp(tmp)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
