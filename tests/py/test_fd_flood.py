"""The coordinator keeps serving /v1/status with more than 1,024 descriptors open (issue 16 #2):
libmicrohttpd used to run on select(), and every connection on a descriptor >= FD_SETSIZE was
reset ("New connection socket descriptor (1030) is not less than FD_SETSIZE").

1. 1,100 idle TCP connections to the control port (ZeroMQ), then 1,100 idle TCP connections to
   the HTTP port, from 127.0.0.2..127.0.0.23 (50 per address, under the per-address limit):
   GET /v1/status from 127.0.0.1 still answers 200 with the run's JSON, and so do /metrics and
   a POST (a lost-worker report, as the launcher sends).
2. 600 connections from one address (127.0.0.99): those over the per-address limit are closed
   by the server, and /v1/status from 127.0.0.1 still answers.
3. A request with 200 kB of headers is refused (4xx), not buffered; the server goes on.
4. After the floods close, the coordinator still runs a 2-worker run to the end (exit 0).
"""
import json
import os
import resource
import socket
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402
import sytest  # noqa: E402
from sytest import check  # noqa: E402

N = 1100
PER_ADDR = 50


def flood(port, n, addrs):
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((addrs[i % len(addrs)], 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError as e:
            s.close()
            print(f"   connect {i}: {e}")
            continue
        socks.append(s)
    return socks


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except Exception as e:  # noqa: BLE001
        return None, str(e)


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * N and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * N), hard))
    tmp = sytest.make_tmp("sy-fdflood-")
    fu.prepare_data(tmp)
    s = fu.settings(tmp, "fdf", 40, 20, extra={
        "model.n_layers": "2", "model.d_model": "64", "model.d_ff": "128", "model.seq_len": "64",
        "train.global_batch_seqs": "8", "train.micro_batch_seqs": "4", "status.token": "fdf-token"})
    c = fu.Cluster(tmp, "fdf", s)
    socks = []
    try:
        c.start_coordinator(expect=2)
        http_port = int(c.status_url.rsplit(":", 1)[1])
        addrs = [f"127.0.0.{2 + i}" for i in range((N + PER_ADDR - 1) // PER_ADDR)]

        socks += flood(c.port, N, addrs)
        check(len(socks) >= N - 10, f"{len(socks)} TCP connections to the control port")
        socks += flood(http_port, N, addrs)
        check(len(socks) >= 2 * N - 20, f"{len(socks)} connections in all (control + HTTP)")
        time.sleep(0.5)
        fds = open_fds(c.coord.pid)
        check(fds > 1024 + 500, f"the coordinator has {fds} descriptors open (> FD_SETSIZE)")
        code, body = get(c.status_url + "/v1/status")
        ok = code == 200 and json.loads(body).get("run") == "fdf"
        check(ok, f"GET /v1/status answers with > 1,024 descriptors open ({code}, {body[:100]!r})")
        code, body = get(c.status_url + "/metrics")
        check(code == 200 and "switchyard_step" in body, f"GET /metrics answers too ({code})")
        check(c.coord.poll() is None, "the coordinator is still running")
        code, body = c.post("/v1/workers/nobody/lost", token="fdf-token")
        check(code in (202, 404), f"a POST (the launcher's lost-worker report) is served too ({code} {body.strip()[:80]})")

        one = flood(http_port, 600, ["127.0.0.99"])
        time.sleep(0.5)
        closed = 0
        for sk in one:
            sk.settimeout(0.05)
            try:
                if sk.recv(1) == b"":
                    closed += 1
            except socket.timeout:
                pass
            except OSError:
                closed += 1
        check(closed >= 600 - 256 - 5, f"connections over the per-address limit are closed by the server ({closed} of 600)")
        code, body = get(c.status_url + "/v1/status")
        check(code == 200, f"GET /v1/status still answers from another address ({code})")
        for sk in one:
            sk.close()

        req = urllib.request.Request(c.status_url + "/v1/status", headers={"X-Big": "a" * 200000})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                big = r.status
        except urllib.error.HTTPError as e:
            big = e.code
        except Exception as e:  # noqa: BLE001
            big = str(e)
        check(isinstance(big, int) and 400 <= big < 500 or isinstance(big, str),
              f"a request with 200 kB of headers is refused ({big})")

        for sk in socks:
            sk.close()
        socks = []
        code, _ = get(c.status_url + "/v1/status")
        check(code == 200, f"GET /v1/status after the floods ({code})")
        c.start_worker("w0")
        c.start_worker("w1")
        rc = c.finish(240)
        check(rc == 0, f"the run completes after the floods (exit {rc})")
    except Exception as e:  # noqa: BLE001
        check(False, f"exception: {e}")
    finally:
        for sk in socks:
            sk.close()
        if check.failures:
            c.dump()
        c.close()
    if check.failures:
        print(f"{len(check.failures)} failure(s); files kept in {tmp}")
        sys.exit(1)
    sytest.remove_tmp(tmp)
    print("all ok")


if __name__ == "__main__":
    main()
