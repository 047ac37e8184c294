"""Helpers for tests against a local S3 server: start and stop `moto_server` on a free loopback
port, turn on its SigV4 checking with an IAM user of its own, create a bucket with a signed
request, and give the environment a client needs.

What moto (5.x) checks once auth is on (`POST /moto-api/reset-auth` with "0", the server-mode
form of INITIAL_NO_AUTH_ACTION_COUNT=0): the access key id must belong to an IAM user (or an
assumed role) created in moto, the SigV4 signature is recomputed and compared (wrong secret:
403 SignatureDoesNotMatch; unknown key: 403 InvalidAccessKeyId), and the user's IAM policy must
allow the s3 action. Before that, moto accepts any credentials.
"""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import sytest

HERE = os.path.dirname(os.path.abspath(__file__))


def find_moto():
    """Command line (list) that runs moto_server, or None."""
    for c in [shutil.which("moto_server"), "/root/.pyenv/shims/moto_server",
              os.path.expanduser("~/.pyenv/shims/moto_server"), os.path.expanduser("~/.local/bin/moto_server")]:
        if c and os.path.exists(c):
            return [c]
    for py in ["/root/.pyenv/shims/python3", shutil.which("python3")]:
        if py and os.path.exists(py) and sytest.run([py, "-c", "import moto.server"],
                                                    capture_output=True).returncode == 0:
            return [py, "-m", "moto.server"]
    return None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _fake_auth(service):
    # Routes an unauthenticated request (before auth is on) to the right moto backend.
    return ("AWS4-HMAC-SHA256 Credential=setup/20240101/us-east-1/%s/aws4_request, "
            "SignedHeaders=host, Signature=0" % service)


class Moto:
    """A moto_server on 127.0.0.1:<free port> with an IAM user; use as a context manager."""

    def __init__(self, auth=True, log=None):
        self.cmd = find_moto()
        if not self.cmd:
            raise RuntimeError("moto_server not found (deploy/install-deps.sh installs moto[server])")
        self.proc = None
        self.auth = auth
        self.log = log
        self.key_id = "AKIDEXAMPLE"
        self.secret = "secret"

    def start(self):
        for _ in range(10):
            port = free_port()
            out = open(self.log, "ab") if self.log else subprocess.DEVNULL
            self.proc = sytest.Popen(self.cmd + ["-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            self.port = port
            self.endpoint = "http://127.0.0.1:%d" % port
            deadline = time.time() + 30
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    urllib.request.urlopen(self.endpoint + "/moto-api/data.json", timeout=2).read()
                    break
                except Exception:
                    time.sleep(0.1)
            if self.proc.poll() is None:
                break
            self.proc = None  # the port was taken meanwhile: try another one
        if not self.proc:
            raise RuntimeError("moto_server did not start")
        if self.auth:
            self._make_user()
            self._post("/moto-api/reset-auth", b"0", {"Content-Type": "text/plain"})
        return self

    def _post(self, path, data, headers=None):
        req = urllib.request.Request(self.endpoint + path, data=data, headers=headers or {}, method="POST")
        return urllib.request.urlopen(req, timeout=10).read()

    def _iam(self, **params):
        params["Version"] = "2010-05-08"
        body = urllib.parse.urlencode(params).encode()
        return self._post("/", body, {"Authorization": _fake_auth("iam"),
                                      "Content-Type": "application/x-www-form-urlencoded"}).decode()

    def _make_user(self):
        import re
        self._iam(Action="CreateUser", UserName="switchyard")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        self._iam(Action="PutUserPolicy", UserName="switchyard", PolicyName="s3",
                  PolicyDocument=json.dumps(policy))
        xml = self._iam(Action="CreateAccessKey", UserName="switchyard")
        self.key_id = re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", xml).group(1)
        self.secret = re.search(r"<SecretAccessKey>([^<]+)</SecretAccessKey>", xml).group(1)

    def env(self, base=None, **over):
        e = dict(os.environ if base is None else base)
        for k in ["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"]:
            e.pop(k, None)
        e.update(AWS_ACCESS_KEY_ID=self.key_id, AWS_SECRET_ACCESS_KEY=self.secret, AWS_REGION="us-east-1",
                 AWS_ENDPOINT_URL=self.endpoint)
        e.update(over)
        return e

    def curl(self, method, path, *extra, endpoint=None, check=True):
        """A signed request with the curl command line (as the storage notes prescribe)."""
        cmd = ["curl", "-sS", "-X", method, "--aws-sigv4", "aws:amz:us-east-1:s3",
               "--user", "%s:%s" % (self.key_id, self.secret), "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
               "-w", "\n%{http_code}", *extra, (endpoint or self.endpoint) + path]
        r = sytest.run(cmd, capture_output=True, timeout=600)
        body, _, code = r.stdout.rpartition(b"\n")
        if check and (r.returncode != 0 or not code.startswith(b"2")):
            raise RuntimeError("curl %s %s: rc %d, HTTP %s: %s %s" % (method, path, r.returncode, code,
                                                                      body[:300], r.stderr[:300]))
        return int(code or 0), body

    def make_bucket(self, name):
        self.curl("PUT", "/" + name)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()
