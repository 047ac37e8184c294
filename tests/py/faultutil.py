"""Helpers for the fault-tolerance tests (test_faults.py, test_faults_s3.py): a small corpus, the
single-process reference run, and a Cluster that starts `switchyard-coordinator` and
`switchyard-worker` processes directly (no launcher), so a test decides exactly when and what to
kill, and watches the run through RUN.state_dir/events.jsonl, metrics.jsonl and GET /v1/status.

Every process a Cluster starts is SIGKILLed (after SIGCONT) by Cluster.close(); use it in a
`finally` block or as a context manager."""
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import sytest
from sytest import SY, COORD, WORKER, CFG

TOL = 0.0  # exact: the CPU math is thread- and W-invariant bit for bit (docs/architecture.md)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def prepare_data(tmp):
    """A small text corpus → tmp/data/train_*.bin (as tests/py/test_cluster.py)."""
    rnd = random.Random(11)
    os.makedirs(f"{tmp}/text", exist_ok=True)
    words = ["mixture", "of", "experts", "routes", "each", "token", "to", "one", "feed", "forward",
             "network", "and", "the", "capacity", "factor", "bounds", "load"]
    with open(f"{tmp}/text/c.txt", "w") as f:
        for _ in range(6000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError("data prepare failed: " + r.stderr[-1000:])


def settings(tmp, name, steps, every, store=None, extra=None):
    """The run's overrides (dict); the coordinator and the reference get the same ones."""
    s = {"data.train": f"{tmp}/data/train_*.bin", "data.val": "", "run.name": name, "run.state_dir": f"{tmp}/state-{name}",
         "checkpoint.store": store or f"{tmp}/store", "run.steps": str(steps), "checkpoint.every": str(every),
         "train.threads": "1"}
    s.update(extra or {})
    return s


def set_args(s):
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def read_metrics(path):
    """step → the last line of that step (re-runs after a restore append new lines)."""
    by_step = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        m = json.loads(line)
                    except ValueError:
                        continue  # a line being written
                    by_step[m["step"]] = m
    return by_step


def read_lines(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    return out


def reference(tmp, steps, every):
    """One `switchyard train` process over the same data and seed: step → loss."""
    s = settings(tmp, "reference", steps, every)
    t = time.time()
    r = sytest.run([SY, "train", CFG, "--quiet"] + set_args(s), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError("reference run failed: " + r.stderr[-2000:])
    ref = read_metrics(f"{tmp}/state-reference/metrics.jsonl")
    if sorted(ref) != list(range(1, steps + 1)):
        raise RuntimeError(f"reference run has steps {sorted(ref)[:5]}..., expected 1..{steps}")
    print(f"   reference: {steps} steps in one process, {time.time() - t:.1f} s", flush=True)
    return {k: v["loss"] for k, v in ref.items()}


def compare(ref, got):
    """(missing steps, max relative difference over the steps present)."""
    missing = [s for s in ref if s not in got]
    worst = 0.0
    for s in ref:
        if s in got:
            worst = max(worst, abs(got[s]["loss"] - ref[s]) / abs(ref[s]))
    return missing, worst


class Cluster:
    """One run's coordinator (restartable on the same port) and its workers."""

    def __init__(self, tmp, name, s, env=None, hb_ms=None):
        self.tmp, self.name, self.s = tmp, name, s
        self.state_dir = s["run.state_dir"]
        self.logs = f"{tmp}/logs-{name}"
        os.makedirs(self.logs, exist_ok=True)
        self.env = dict(os.environ if env is None else env)
        self.port = None
        self.coord = None
        self.status_url = None
        self.workers = {}  # id → Popen (the latest process of that id)
        self.all_procs = []
        self.files = []
        self.nstart = {}

    # -- processes ---------------------------------------------------------------------------
    def start_coordinator(self, expect=0, timeout=30):
        for attempt in range(5):
            if self.port is None or attempt > 0:
                self.port = free_port()
            log = open(f"{self.logs}/coordinator.log", "a")
            out = f"{self.logs}/coordinator.out"
            outf = open(out, "w")
            self.files += [log, outf]
            cmd = [COORD, CFG] + set_args(self.s) + ["--bind", f"tcp://127.0.0.1:{self.port}",
                                                    "--status-addr", "127.0.0.1:0"]
            if expect:
                cmd += ["--expect-workers", str(expect)]
            p = sytest.Popen(cmd, stdout=outf, stderr=log, env=self.env)
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
            if p.poll() is None:
                p.kill()
                p.wait()
                raise RuntimeError("coordinator did not print its ready line:\n" + self.tail("coordinator.log"))
            # exited: most likely the port was taken meanwhile; try another
        raise RuntimeError("coordinator would not start:\n" + self.tail("coordinator.log"))

    def start_worker(self, wid, env=None, args=()):
        n = self.nstart.get(wid, 0)
        self.nstart[wid] = n + 1
        log = open(f"{self.logs}/{wid}.{n}.log", "w")
        self.files.append(log)
        e = dict(self.env)
        e.update(env or {})
        p = sytest.Popen([WORKER, "--coordinator", f"tcp://127.0.0.1:{self.port}", "--id", wid,
                          "--threads", "1"] + list(args), stdout=log, stderr=subprocess.STDOUT, env=e)
        self.workers[wid] = p
        self.all_procs.append(p)
        return p

    def kill(self, *wids):
        """kill -9 of the named workers (all signals sent before anything else); the time."""
        t = time.time()
        for w in wids:
            os.kill(self.workers[w].pid, signal.SIGKILL)
        for w in wids:
            self.workers[w].wait()
        return t

    def close(self):
        for p in self.all_procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for f in self.files:
            f.close()
        self.files = []

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # -- observation -------------------------------------------------------------------------
    def events(self, name=None):
        ev = read_lines(f"{self.state_dir}/events.jsonl")
        return [e for e in ev if name is None or e.get("event") == name]

    def metrics(self):
        return read_metrics(f"{self.state_dir}/metrics.jsonl")

    def metric_lines(self):
        return read_lines(f"{self.state_dir}/metrics.jsonl")

    def max_step(self):
        lines = self.metric_lines()
        return lines[-1]["step"] if lines else 0

    def status(self):
        with urllib.request.urlopen(self.status_url + "/v1/status", timeout=5) as r:
            return json.loads(r.read())

    def post(self, path, token=None):
        req = urllib.request.Request(self.status_url + path, data=b"", method="POST",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait(self, pred, timeout, what, poll=0.01):
        """Polls pred() until it returns a true value (returned) or the coordinator exits / time out
        (RuntimeError with the coordinator log's tail)."""
        deadline = time.time() + timeout
        while True:
            v = pred()
            if v:
                return v
            if self.coord is not None and self.coord.poll() is not None:
                raise RuntimeError(f"waiting for {what}: the coordinator exited ({self.coord.returncode})\n" +
                                   self.tail("coordinator.log"))
            if time.time() > deadline:
                raise RuntimeError(f"waiting for {what}: nothing after {timeout} s\n" + self.tail("coordinator.log"))
            time.sleep(poll)

    def wait_step(self, k, timeout=120):
        return self.wait(lambda: self.max_step() >= k, timeout, f"step {k} in metrics.jsonl")

    def wait_event(self, name, timeout, after=0, where=None, poll=0.01):
        """The first event `name` with index >= after (in events.jsonl order) matching where(e)."""
        def find():
            ev = self.events()
            for e in ev[after:]:
                if e.get("event") == name and (where is None or where(e)):
                    return e
            return None
        return self.wait(find, timeout, f"event {name}", poll=poll)

    def finish(self, timeout=180):
        """Waits for the coordinator to exit; its exit status (None on time-out)."""
        try:
            return self.coord.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, log, n=2500):
        try:
            with open(f"{self.logs}/{log}", errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def dump(self):
        """Prints the end of every log (after a failure)."""
        for f in sorted(os.listdir(self.logs)):
            print(f"---- {self.name}/{f}")
            print(self.tail(f, 1500))
        print(f"---- {self.name}/events.jsonl")
        for e in self.events():
            print("  ", json.dumps(e)[:300])
