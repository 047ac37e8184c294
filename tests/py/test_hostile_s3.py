"""Hostile input on the S3 checkpoint store (issue 16 #4, part A), against moto_server:

- a fresh run into a bucket that holds committed checkpoints of its name is refused, --resume
  continues it, --overwrite moves it aside (on S3 as on the file store);
- an endpoint that answers 200 with garbage to every request (so a listing would look empty,
  a HEAD of MANIFEST.json would "succeed" and nothing would be stored) makes `switchyard train`
  and `switchyard run` fail with a clear error instead of exiting 0 with "done";
- the same for a server whose PUT replies carry no ETag.
Skips (exit 77) when moto_server is not installed."""
import glob
import http.server
import os
import socketserver
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3util import Moto, find_moto  # noqa: E402

import sytest
from sytest import SY, CFG, check, failures

BUCKET = "hostile"


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def garbage_server(mode):
    """A loopback HTTP server: mode 'garbage' answers 200 with a non-S3 body to everything;
    'no-etag' answers like S3 would for a listing (empty ListBucketResult) but PUTs and HEADs
    get a 200 without an ETag."""

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _answer(self, body, head=False):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _body(self):
            if mode == "no-etag" and "list-type=2" in self.path:
                return (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>%s</Name>'
                        b'<IsTruncated>false</IsTruncated></ListBucketResult>' % BUCKET.encode())
            return b"<html><body>hello from a captive portal</body></html>"

        def do_GET(self):
            self._answer(self._body())

        def do_HEAD(self):
            self._answer(self._body(), head=True)

        def do_PUT(self):
            self._answer(b"")

        def do_POST(self):
            self._answer(self._body())

        def do_DELETE(self):
            self._answer(b"")

    srv = _Server(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, "http://127.0.0.1:%d" % srv.server_address[1]


def small(tmp, name, store, steps=6, every=3):
    return ["--set", f"data.train={tmp}/data/train_*.bin", "--set", "data.val=", "--set", f"run.name={name}",
            "--set", f"run.state_dir={tmp}/state-{name}", "--set", f"checkpoint.store={store}",
            "--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "model.d_ff=128",
            "--set", "model.seq_len=64", "--set", "train.global_batch_seqs=8", "--set", "train.micro_batch_seqs=4",
            "--set", f"run.steps={steps}", "--set", "train.warmup_steps=2", "--set", f"checkpoint.every={every}",
            "--set", "checkpoint.s3_retries=2", "--set", "checkpoint.s3_timeout_ms=5000",
            "--set", "train.threads=1", "--quiet"]


def sy(args, env, timeout=300):
    return sytest.run([SY] + args, env=env, capture_output=True, text=True, timeout=timeout)


def main():
    if not find_moto():
        print("moto_server not installed: skipping")
        return 77
    tmp = sytest.make_tmp("sy-hostile-s3-")
    os.makedirs(f"{tmp}/text")
    with open(f"{tmp}/text/c.txt", "w") as f:
        for i in range(2000):
            f.write(" ".join(["switch", "expert", "router", "token", "loss"][(i + k) % 5] for k in range(3 + i % 7)) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "data prepare")
    store = f"s3://{BUCKET}/runs"
    moto = Moto(auth=True, log=os.path.join(tmp, "moto.log"))
    try:
        moto.start()
        moto.make_bucket(BUCKET)
        env = moto.env()

        # --- a second fresh run of one name on S3 ----------------------------------------------
        r = sy(["train", CFG] + small(tmp, "dup", store), env)
        check(r.returncode == 0 and "done" in r.stderr, f"first run on S3 ({r.stderr.strip()[-200:]})")
        r = sy(["train", CFG] + small(tmp, "dup", store), env)
        check(r.returncode == 1 and "--resume" in r.stderr and "--overwrite" in r.stderr,
              f"a second fresh run on S3 is refused ({r.stderr.strip()[-300:]})")
        r = sy(["train", CFG] + small(tmp, "dup", store, steps=9) + ["--resume"], env)
        check(r.returncode == 0 and "resumed from checkpoint step 6" in r.stderr, f"--resume on S3 ({r.stderr[-200:]})")
        r = sy(["train", CFG] + small(tmp, "dup", store) + ["--overwrite"], env)
        check(r.returncode == 0 and "moved the old run aside" in r.stderr, f"--overwrite on S3 ({r.stderr[-300:]})")
        code, body = moto.curl("GET", f"/{BUCKET}?list-type=2&prefix=runs/dup.replaced-")
        check(b"MANIFEST.json" in body, "the old run's manifests are under dup.replaced-* in the bucket")
        r = sy(["run", CFG, "--workers", "1"] + small(tmp, "dup", store), env)
        check(r.returncode == 1 and "--resume" in r.stderr, f"`switchyard run` on S3 refuses it too ({r.stderr.strip()[-200:]})")
    finally:
        moto.stop()

    # --- endpoints that do not answer like S3 --------------------------------------------------
    for mode in ["garbage", "no-etag"]:
        srv, url = garbage_server(mode)
        env = dict(os.environ, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_REGION="us-east-1",
                   AWS_ENDPOINT_URL=url)
        t = time.time()
        r = sy(["train", CFG] + small(tmp, f"g-{mode}", store), env, timeout=120)
        check(r.returncode == 1 and "done" not in r.stderr and "s3" in r.stderr,
              f"[{mode}] train against it fails with a clear error in {time.time() - t:.1f} s ({r.stderr.strip()[-300:]})")
        r = sy(["train", CFG] + small(tmp, f"g-{mode}", store) + ["--resume"], env, timeout=120)
        check(r.returncode == 1 and "done" not in r.stderr, f"[{mode}] train --resume fails too ({r.stderr.strip()[-200:]})")
        r = sy(["run", CFG, "--workers", "1"] + small(tmp, f"g-{mode}", store), env, timeout=120)
        check(r.returncode == 1 and "completed" not in r.stderr, f"[{mode}] `switchyard run` fails ({r.stderr.strip()[-200:]})")
        srv.shutdown()

    sytest.remove_tmp(tmp)
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
