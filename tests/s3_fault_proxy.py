#!/usr/bin/env python3
"""A fault-injecting HTTP proxy for S3 tests: sits between a client and an S3 server (moto)
and, at a configurable rate, answers 503 SlowDown, resets the connection (after reading the
request, so the client cannot know whether it was applied... it was not), stalls past the
client's timeout, or forwards the request and truncates the reply body (full Content-Length
header, then the connection closes early).

Use from Python (tests):  p = FaultProxy("http://127.0.0.1:5000").start(); p.configure(rate=0.3)
... p.stats ... p.stop()
or standalone:  s3_fault_proxy.py --upstream http://127.0.0.1:5000 --port 8000 --rate 0.3

Faults apply to requests whose "METHOD path?query" contains `match` (default: all) and whose
method is in `methods` (default: all). With `after_forward` faults of kind "reset" happen
after the upstream applied the request (the reply is lost). Thread-per-connection; keep-alive.
"""
import argparse
import http.client
import random
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}
KINDS = ["503", "reset", "stall", "truncate"]


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    def __init__(self, upstream, port=0, host="127.0.0.1"):
        u = urllib.parse.urlsplit(upstream)
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.lock = threading.Lock()
        self.rng = random.Random(1)
        self.configure()
        self.reset_stats()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                with proxy.lock:
                    proxy.stats["connections"] += 1
                self.upstream = None

            def finish(self):
                try:
                    super().finish()
                finally:
                    if self.upstream:
                        self.upstream.close()

            def _handle(self):
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = _Server((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://%s:%d" % (host, self.port)

    def configure(self, rate=0.0, kinds=None, match="", methods=None, stall_s=3.0, after_forward=False,
                  seed=None):
        with self.lock:
            self.rate = rate
            self.kinds = list(kinds or KINDS)
            self.match = match
            self.methods = set(methods) if methods else None
            self.stall_s = stall_s
            self.after_forward = after_forward
            if seed is not None:
                self.rng = random.Random(seed)

    def reset_stats(self):
        with self.lock:
            self.stats = {"connections": 0, "requests": 0, "faults": {k: 0 for k in KINDS}, "log": []}

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # -------------------------------------------------------------------------------------------
    def _pick(self, line, method):
        with self.lock:
            self.stats["requests"] += 1
            fault = None
            if (self.match in line and (self.methods is None or method in self.methods)
                    and self.rate > 0 and self.rng.random() < self.rate):
                kinds = self.kinds
                if method == "HEAD":  # no body to truncate
                    kinds = [k for k in kinds if k != "truncate"] or ["503"]
                fault = self.rng.choice(kinds)
                self.stats["faults"][fault] += 1
            self.stats["log"].append((line, fault))
            return fault, self.stall_s, self.after_forward

    @staticmethod
    def _reset(h):
        try:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        h.close_connection = True
        try:
            h.connection.close()
        except OSError:
            pass

    def _serve(self, h):
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        line = "%s %s" % (h.command, h.path)
        fault, stall_s, after = self._pick(line, h.command)
        if fault == "503":
            msg = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
                   b"<Message>Please reduce your request rate (fault proxy).</Message></Error>")
            h.send_response(503)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(msg)
            return
        if fault == "stall":
            time.sleep(stall_s)
            self._reset(h)
            return
        if fault == "reset" and not after:
            self._reset(h)
            return
        # forward
        try:
            if h.upstream is None:
                h.upstream = http.client.HTTPConnection(self.up_host, self.up_port, timeout=120)
            up = h.upstream
            up.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in HOP and k.lower() != "content-length":
                    up.putheader(k, v)
            if h.command in ("PUT", "POST") or body:
                up.putheader("Content-Length", str(len(body)))
            up.endheaders(body)
            resp = up.getresponse()
            data = resp.read()
        except Exception as e:  # upstream trouble: report it as a 502
            if h.upstream:
                h.upstream.close()
                h.upstream = None
            msg = ("<Error><Code>BadGateway</Code><Message>%s</Message></Error>" % e).encode()
            h.send_response(502)
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            h.wfile.write(msg)
            return
        if fault == "reset":  # applied upstream, reply lost
            self._reset(h)
            return
        h.send_response(resp.status, resp.reason)
        clen = None
        for k, v in resp.getheaders():
            if k.lower() in HOP or k.lower() in ("date", "server"):
                continue
            if k.lower() == "content-length":
                clen = v
                continue
            h.send_header(k, v)
        if h.command == "HEAD":
            h.send_header("Content-Length", clen if clen is not None else "0")
        else:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            self._reset(h)
            return
        h.wfile.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="http://host:port of the S3 server")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="fraction of requests that get a fault")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ",".join(KINDS))
    ap.add_argument("--match", default="", help="only requests whose 'METHOD path?query' contains this")
    ap.add_argument("--stall-s", type=float, default=3.0)
    ap.add_argument("--after-forward", action="store_true", help="resets happen after the upstream applied it")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    p = FaultProxy(a.upstream, a.port)
    p.configure(a.rate, a.kinds.split(","), a.match, None, a.stall_s, a.after_forward, a.seed)
    print(p.url, flush=True)
    try:
        p.server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
