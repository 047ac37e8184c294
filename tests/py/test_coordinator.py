"""switchyard-coordinator against fake workers (tests/tools/sy_fakeworker.c), on loopback with
free ports:
  1. a 2-worker run completes while a hostile client sends garbage, truncated protobufs, wrong
     versions / run ids / incarnations, stale generations, an oversize frame, duplicate
     registrations and unknown messages: metrics.jsonl holds the summed losses, checkpoints are
     committed, /v1/status has the documented fields, /metrics parses with prometheus_client
     and its drop counters grew by reason, the dashboard is HTML, mutating endpoints need the
     token, `switchyard status` prints the table;
  2. a worker that goes silent is declared lost within failure_timeout_ms and the survivors
     resume from the latest committed checkpoint in a new generation;
  3. POST /v1/stop and SIGTERM stop the coordinator (exit 3); without a token the mutating
     endpoints are refused; a bad config is refused (exit 2);
  4. a drained worker leaves and a newcomer joins, each at the next committed checkpoint.
The fake workers' reports are chosen so that sums over ranks are known: rank r of W sends the
share (r+1)/(W(W+1)/2) of ce = 1/step, aux = 0.01, z = 0.001; counts[l][e] = (r+1)(e+1) + l."""
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

import sytest
from sytest import COORD, check, failures

FAKE = sytest.tool("sy_fakeworker")
STATUSCLI = sytest.tool("sy_statuscli")
TOKEN = "s3cret-token"
procs = []


def write_cfg(tmp, name, **over):
    cl = {"min_workers": 2, "max_workers": 2, "heartbeat_ms": 100, "failure_timeout_ms": 1000}
    cl.update(over.get("cluster", {}))
    y = [
        "run:", f"  name: {name}", f"  steps: {over.get('steps', 40)}", f"  state_dir: {tmp}/state-{name}",
        "  log_every: 10",
        "checkpoint:", f"  store: {tmp}/store", "  every: 5", "  keep_last: 2",
        "cluster:",
    ] + [f"  {k}: {v}" for k, v in cl.items()]
    if over.get("token", TOKEN):
        y += ["status:", f"  token: {over.get('token', TOKEN)}"]
    path = f"{tmp}/{name}.yaml"
    with open(path, "w") as f:
        f.write("\n".join(y) + "\n")
    return path


def start_coord(cfg, *extra, env=None):
    p = sytest.Popen([COORD, cfg, "--bind", "tcp://127.0.0.1:0", "--status-addr", "127.0.0.1:0"] + list(extra),
                     stdout=subprocess.PIPE, stderr=open(cfg + ".log", "w"), text=True, env=env)
    procs.append(p)
    r, _, _ = select.select([p.stdout], [], [], 10)
    line = p.stdout.readline() if r else ""
    fields = dict(kv.split("=", 1) for kv in line.split()[2:]) if line.startswith("coordinator ready") else {}
    return p, fields.get("bind"), fields.get("status"), line


def fake(ep, run, wid, *args, out=None):
    p = sytest.Popen([FAKE, "--coordinator", ep, "--run", run, "--id", wid] + list(args),
                     stdout=out or subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    return p


def http(method, url, token=None, timeout=5):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type", "")
    except (urllib.error.URLError, ConnectionError, OSError):
        return None, "", ""


def status(base):
    code, body, _ = http("GET", base + "/v1/status")
    return json.loads(body) if code == 200 else None


def wait_for(pred, timeout, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def metrics_samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def drops(samples):
    return {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "switchyard_dropped_messages_total"}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def last_per_step(lines):
    d = {}
    for m in lines:
        d[m["step"]] = m
    return d


def test_run_and_hostile(tmp):
    print("--- 1. a run with a hostile client in parallel")
    run = "basic"
    cfg = write_cfg(tmp, run, steps=60)
    coord, ep, base, line = start_coord(cfg)
    check(ep and ep.startswith("tcp://127.0.0.1:") and not ep.endswith(":0"), f"ready line names the bound port ({line.strip()})")
    check(base and base.startswith("http://127.0.0.1:") and not base.endswith(":0"), "ready line names the status URL")
    if not ep or not base:
        return
    s0 = status(base)
    check(s0 is not None and s0["state"] == "waiting", "before any worker: state waiting")
    w0 = fake(ep, run, "w0", "--step-ms", "50")
    w1 = fake(ep, run, "w1", "--step-ms", "50")
    s = wait_for(lambda: (lambda x: x if x and x["world"] == 2 and x["state"] == "running" else None)(status(base)), 10)
    check(s is not None, "generation 1 opens over the two workers")
    code, text, _ = http("GET", base + "/metrics")
    before = drops(metrics_samples(text)) if code == 200 else {}

    hostile = fake(ep, run, "hostile", "--hostile", "--linger-ms", "800", out=subprocess.PIPE)
    # Mid-run checks, while the hostile client works.
    s = status(base)
    for key in ["run", "state", "step", "total_steps", "generation", "world", "workers", "placement",
                "latest_checkpoint", "recent_loss", "loss", "tokens_per_second", "expert_load",
                "dropped_fraction", "recoveries", "goodput", "dropped_messages", "events"]:
        check(s is not None and key in s, f"/v1/status has '{key}'")
    if s:
        ws = {w["id"]: w for w in s["workers"]}
        for key in ["id", "host", "pid", "rank", "state", "last_heartbeat_ms", "step_ms"]:
            check(all(key in w for w in s["workers"]), f"/v1/status workers carry '{key}'")
        joined = [e["worker"] for e in s["events"] if e["event"] == "worker_joined"]
        check(joined[:2] in (["w0", "w1"], ["w1", "w0"]) and [ws[i]["rank"] for i in joined[:2]] == [0, 1],
              f"ranks by join order ({joined})")
        check(s["placement"] == [0, 0, 0, 0, 1, 1, 1, 1], f"balanced placement of 8 experts on 2 ranks ({s['placement']})")
        check(s["total_steps"] == 60 and s["run"] == run, "run name and total steps")
    code, html, ctype = http("GET", base + "/")
    check(code == 200 and "text/html" in ctype and "<svg" in html and "/v1/status" in html and "http://" not in html.replace(base, ""),
          "GET / is a self-contained HTML dashboard polling /v1/status")
    check(http("GET", base + "/nope")[0] == 404, "unknown path: 404")
    c, b, ct = http("POST", base + "/v1/checkpoint")
    check(c == 401 and "application/json" in ct and "error" in json.loads(b), "POST without a token: 401 with a JSON error")
    check(http("POST", base + "/v1/checkpoint", token="wrong")[0] == 403, "POST with a wrong token: 403")
    check(http("GET", base + "/v1/stop")[0] == 405, "GET on a POST endpoint: 405")
    check(http("POST", base + "/v1/workers/nobody/drain", token=TOKEN)[0] == 404, "drain of an unknown worker: 404")
    c, b, _ = http("POST", base + "/v1/checkpoint", token=TOKEN)
    check(c == 202, f"POST /v1/checkpoint with the token: 202 ({c} {b.strip()})")
    r = sytest.run([STATUSCLI, "--url", base], capture_output=True, text=True, timeout=10)
    check(r.returncode == 0 and f"run {run}:" in r.stdout and "w0" in r.stdout and "w1" in r.stdout and "RANK" in r.stdout,
          f"`switchyard status` prints the run and the worker table ({r.stdout[:120]!r} {r.stderr[:200]})")
    r = sytest.run([STATUSCLI, "--url", base, "--json"], capture_output=True, text=True, timeout=10)
    check(r.returncode == 0 and json.loads(r.stdout)["run"] == run, "`switchyard status --json` prints the JSON")

    try:
        hout, _ = hostile.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        hostile.kill()
        hout = ""
    check(hostile.returncode == 0 and "hostile: done" in hout, f"hostile client went through its list ({hout.strip()[-80:]!r})")
    after, last_text = {}, ""
    code, last_text, _ = http("GET", base + "/metrics")
    if code == 200:
        after = drops(metrics_samples(last_text))
    expect = {"parse": 2, "version": 1, "run_id": 1, "unknown_worker": 1, "unknown_message": 2, "oversize": 1,
              "bad_frame": 2, "incarnation": 1, "stale_generation": 1}
    for reason, n in expect.items():
        check(after.get(reason, 0) - before.get(reason, 0) >= n,
              f"drop counter '{reason}' grew by >= {n} ({before.get(reason)} -> {after.get(reason)})")
    samples = metrics_samples(last_text) if last_text else {}
    names = {k[0] for k in samples}
    for n in ["switchyard_step", "switchyard_loss", "switchyard_ce", "switchyard_aux", "switchyard_z",
              "switchyard_tokens_per_second", "switchyard_workers", "switchyard_expert_tokens",
              "switchyard_dropped_fraction", "switchyard_checkpoint_seconds", "switchyard_recoveries_total",
              "switchyard_dropped_messages_total", "switchyard_goodput"]:
        check(n in names, f"/metrics has {n}")
    s = status(base)
    if s:
        ws = {w["id"]: w for w in s["workers"]}
        check("hostile" in ws and ws["hostile"]["rank"] == -1, "the duplicate-registering hostile client is a spare, not in the generation")
        check(sum(1 for e in s["events"] if e["event"] == "worker_joined" and e["worker"] == "hostile") <= 1,
              "a duplicate Hello does not register twice")
        if s["expert_load"]["layers"]:
            want = [[(e + 1) * 3 + 2 * l for e in range(8)] for l in range(2)]
            check(s["expert_load"]["layers"] == want, f"expert load summed over ranks ({s['expert_load']['layers']})")

    try:
        rc = coord.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 0, f"coordinator exits 0 at the end of the run (rc {rc})")
    for p in (w0, w1):
        try:
            check(p.wait(timeout=5) == 0, "fake worker exits 0 on Stop")
        except subprocess.TimeoutExpired:
            check(False, "fake worker exits on Stop")

    m = read_jsonl(f"{tmp}/state-{run}/metrics.jsonl")
    check(len(m) == 60 and [x["step"] for x in m] == list(range(1, 61)), f"metrics.jsonl has steps 1..60 once each ({len(m)} lines)")
    check(all(abs(x["loss"] - (1.0 / x["step"] + 0.011)) < 1e-12 for x in m), "loss = sum over ranks of the parts (1/step + 0.011)")
    check(all(abs(x["ce"] - 1.0 / x["step"]) < 1e-12 for x in m), "ce summed over ranks")
    check(all(abs(x["dropped_frac"] - 3 / 200) < 1e-12 and x["world"] == 2 and x["generation"] == 1 for x in m),
          "dropped fraction (3/200), world 2, generation 1 on every line")
    for key in ["step", "loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s", "dropped_frac", "world", "generation", "time"]:
        check(all(key in x for x in m), f"metrics.jsonl lines carry '{key}'")
    ev = read_jsonl(f"{tmp}/state-{run}/events.jsonl")
    kinds = [e["event"] for e in ev]
    for k in ["worker_joined", "generation_opened", "checkpoint_committed", "checkpoint_requested", "run_finished"]:
        check(k in kinds, f"events.jsonl has {k}")
    check(kinds[-1] == "run_finished", "run_finished is the last event")
    committed = [e["step"] for e in ev if e["event"] == "checkpoint_committed"]
    req = [e["step"] for e in ev if e["event"] == "checkpoint_requested"]
    check(set(range(5, 61, 5)) <= set(committed), f"checkpoints committed every 5 steps ({committed})")
    check(req and req[0] in committed, f"the requested checkpoint step {req} was committed")
    store = f"{tmp}/store/{run}/ckpt"
    steps = sorted(os.listdir(store)) if os.path.isdir(store) else []
    check(steps == ["step-000000055", "step-000000060"], f"retention keeps the last 2 checkpoints ({steps})")
    man = f"{store}/step-000000060/MANIFEST.json"
    if os.path.exists(man):
        mj = json.load(open(man))
        names = sorted(f["name"] for f in mj["files"])
        check(len(names) == 18 and "dense.safetensors" in names and "expert-0007.optim.safetensors" in names,
              "manifest lists dense + 8 experts (with optimizer files)")
        check(mj["step"] == 60 and mj["optimizer_step"] == 60 and mj["world"] == 2 and mj["config"]["run"]["name"] == run,
              "manifest carries step, optimizer step, world and config")
    else:
        check(False, "final manifest exists")


def test_recovery(tmp):
    print("--- 2. a worker goes silent: recovery from the latest checkpoint")
    run = "recover"
    cfg = write_cfg(tmp, run, steps=20, cluster={"min_workers": 2, "max_workers": 3})
    coord, ep, base, _ = start_coord(cfg)
    if not ep:
        check(False, "coordinator starts")
        return
    ws = [fake(ep, run, "w0", "--step-ms", "60"), fake(ep, run, "w1", "--step-ms", "60"),
          fake(ep, run, "w2", "--step-ms", "60", "--die-at", "8")]
    saw_recovery = wait_for(lambda: (lambda x: x if x and x["recoveries"] else None)(status(base)), 15)
    check(saw_recovery is not None and saw_recovery["recoveries"][0]["lost"] == ["w2"],
          "/v1/status lists the recovery and the lost worker")
    try:
        rc = coord.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 0, f"the run finishes after the recovery (rc {rc})")
    ev = read_jsonl(f"{tmp}/state-{run}/events.jsonl")
    m = read_jsonl(f"{tmp}/state-{run}/metrics.jsonl")
    gens = [e for e in ev if e["event"] == "generation_opened"]
    check(len(gens) == 2 and gens[0]["world"] == 3 and gens[0]["placement"] == [0, 0, 0, 1, 1, 1, 2, 2],
          "generation 1: 3 workers, uneven placement 3/3/2")
    survivors = [w for w in gens[0]["workers"] if w != "w2"] if gens else []
    check(len(gens) == 2 and gens[1]["world"] == 2 and gens[1]["workers"] == survivors and gens[1]["restore_step"] == 5
          and gens[1]["start_step"] == 6, f"generation 2 over the survivors from checkpoint 5 ({gens[1:] })")
    lost = [e for e in ev if e["event"] == "worker_lost"]
    check(len(lost) == 1 and lost[0]["worker"] == "w2", "worker_lost names the silent worker")
    step7 = [x for x in m if x["step"] == 7 and x["generation"] == 1]
    if lost and step7:
        delay = lost[0]["time"] - step7[0]["time"]
        check(delay < 1.0 + 0.6, f"declared lost within failure_timeout_ms + margin ({delay * 1000:.0f} ms after its last step)")
    check(any(e["event"] == "restore_done" and e["restore_step"] == 5 for e in ev), "restore_done after the first step of generation 2")
    d = last_per_step(m)
    check(sorted(d) == list(range(1, 21)), "every step 1..20 has a metrics line")
    check(all(abs(d[s]["loss"] - (1.0 / s + 0.011)) < 1e-12 for s in d), "losses are right before and after the recovery")
    check(all(d[s]["world"] == (3 if s <= 5 else 2) for s in d), "steps after the restore point re-ran with world 2")
    check(ev[-1]["event"] == "run_finished", "run_finished")
    for p in ws:
        if p.poll() is None:
            p.kill()


def test_stop_and_refusals(tmp):
    print("--- 3. stop over HTTP, SIGTERM, no token, bad config")
    cfg = write_cfg(tmp, "stopme", steps=10)
    coord, ep, base, _ = start_coord(cfg)
    c, b, _ = http("POST", base + "/v1/stop", token=TOKEN) if base else (None, "", "")
    check(c == 202, f"POST /v1/stop with the token: 202 ({c})")
    try:
        rc = coord.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 3, f"coordinator stopped over HTTP exits 3 (rc {rc})")
    ev = read_jsonl(f"{tmp}/state-stopme/events.jsonl")
    check(ev and ev[-1]["event"] == "run_stopped", "events.jsonl ends with run_stopped")

    cfg = write_cfg(tmp, "notoken", steps=10, token="")
    coord, ep, base, _ = start_coord(cfg)
    c, b, _ = http("POST", base + "/v1/checkpoint") if base else (None, "", "")
    check(c == 403 and "status.token" in b, f"no token configured: mutating endpoints refused with 403 naming status.token ({c})")
    coord.send_signal(signal.SIGTERM)
    try:
        rc = coord.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 3, f"SIGTERM stops the coordinator (exit 3, rc {rc})")

    # SY_STATUS_TOKEN stands in for an empty status.token (deployments keep it out of ps)
    coord, ep, base, _ = start_coord(cfg, env=dict(os.environ, SY_STATUS_TOKEN="from-env"))
    c1 = http("POST", base + "/v1/workers/nobody/drain")[0] if base else None
    c2 = http("POST", base + "/v1/workers/nobody/drain", token="from-env")[0] if base else None
    check(c1 == 401 and c2 == 404, f"SY_STATUS_TOKEN is the token when status.token is empty (no token {c1}, with it {c2})")
    coord.send_signal(signal.SIGTERM)
    coord.wait(timeout=10)

    r = sytest.run([COORD, cfg, "--set", "cluster.min_workers=0"], capture_output=True, text=True, timeout=10)
    check(r.returncode == 2 and "cluster.min_workers" in r.stderr, f"a bad config is refused naming the field ({r.stderr.strip()})")
    r = sytest.run([COORD, "--help"], capture_output=True, text=True, timeout=10)
    check(r.returncode == 0 and "--status-addr" in r.stdout, "--help")


def test_drain_and_grow(tmp):
    print("--- 4. drain a worker, then a newcomer joins, both at checkpoint boundaries")
    run = "elastic"
    cfg = write_cfg(tmp, run, steps=30, cluster={"min_workers": 2, "max_workers": 3})
    coord, ep, base, _ = start_coord(cfg)
    if not ep:
        check(False, "coordinator starts")
        return
    ws = [fake(ep, run, w, "--step-ms", "50") for w in ("w0", "w1", "w2")]
    s = wait_for(lambda: (lambda x: x if x and x["world"] == 3 else None)(status(base)), 10)
    check(s is not None, "generation 1 over three workers")
    c, _, _ = http("POST", base + "/v1/workers/w2/drain", token=TOKEN)
    check(c == 202, f"POST /v1/workers/w2/drain: 202 ({c})")
    s = wait_for(lambda: (lambda x: x if x and x["generation"] == 2 else None)(status(base)), 10)
    check(s is not None and s["world"] == 2, "after the next checkpoint, generation 2 without the drained worker")
    try:
        check(ws[2].wait(timeout=5) == 0, "the drained worker got Stop and exited 0")
    except subprocess.TimeoutExpired:
        check(False, "the drained worker exits")
    ws.append(fake(ep, run, "w3", "--step-ms", "50"))
    s = wait_for(lambda: (lambda x: x if x and x["generation"] == 3 else None)(status(base)), 10)
    check(s is not None and s["world"] == 3, "a newcomer joins at the next checkpoint: generation 3 over three workers")
    try:
        rc = coord.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 0, f"the elastic run finishes (rc {rc})")
    ev = read_jsonl(f"{tmp}/state-{run}/events.jsonl")
    gens = [e for e in ev if e["event"] == "generation_opened"]
    committed = [e["step"] for e in ev if e["event"] == "checkpoint_committed"]
    check(len(gens) == 3 and gens[1]["restore_step"] in committed and gens[2]["restore_step"] in committed
          and gens[1]["restore_step"] < gens[2]["restore_step"], "each membership change restarts from a committed checkpoint")
    check(len(gens) == 3 and "w2" not in gens[1]["workers"] and "w3" in gens[2]["workers"], "drained out, newcomer in")
    check(not any(e["event"] == "worker_lost" for e in ev) and not any(e["event"] == "restore_done" for e in ev),
          "no worker lost and no recovery for planned membership changes")
    d = last_per_step(read_jsonl(f"{tmp}/state-{run}/metrics.jsonl"))
    check(sorted(d) == list(range(1, 31)) and all(abs(d[s]["loss"] - (1.0 / s + 0.011)) < 1e-12 for s in d),
          "every step's loss right across the membership changes")
    for p in ws:
        if p.poll() is None:
            p.kill()


def main():
    tmp = sytest.make_tmp("sy-coord-")
    t0 = time.time()
    try:
        test_run_and_hostile(tmp)
        test_recovery(tmp)
        test_stop_and_refusals(tmp)
        test_drain_and_grow(tmp)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"{time.time() - t0:.1f} s; logs in {tmp}")
    if failures:
        print(f"{len(failures)} failure(s)")
        sys.exit(1)
    print("all passed")


if __name__ == "__main__":
    main()
