"""The dashboard (GET /) in a real browser (issue 15 #2): a live `switchyard run --workers 2`
opened in headless Chromium, driven by chromedriver's WebDriver HTTP protocol with urllib (no
Selenium). The checks read the RENDERED page, not the HTML source:
  - the loss chart (a dygraphs chart) holds one point per step of metrics.jsonl up to the step it
    shows (the steps replayed after a recovery replace the lost ones: metrics.jsonl's distinct
    steps), and its steps are exactly those; with train.eval_every=3 its validation series holds
    metrics.jsonl's val_loss at exactly the validation steps;
  - every chart (loss, tokens/s, drop rate, learning rate, gradient norm, imbalance) has points,
    and moving the mouse over the loss chart shows the step and its values in the legend;
  - the worker table lists both live workers, with their ranks and owned experts;
  - the expert-load heat map has layers × experts cells;
  - after `kill -9` of one worker the table shows it lost, the events list the loss and the
    recovery (newest first), and the loss chart carries a recovery marker (an annotation) at the
    first step of the new generation;
  - the browser console has no errors.
The run has status.auth_get: true (the run's data needs the bearer token): the page is opened as
/#token=TOKEN and sends the token on its fetches; without it /v1/status and /v1/history answer
401 while the page itself loads.
It saves a screenshot (PNG) in the test's folder (SY_DASHBOARD_PNG overrides the path; the one
in the README is docs/dashboard.png). Without chromium and chromedriver it exits 77 (skipped;
tests/CMakeLists.txt sets SKIP_RETURN_CODE), never passing silently."""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402
import sytest  # noqa: E402
from sytest import SY, CFG, check, failures  # noqa: E402

SKIP = 77
TOKEN = "dash-token"


def find(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


def http(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode() or "{}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: HTTP {e.code}: {e.read().decode()[:500]}")


def code_of(url):
    """The HTTP status of a plain GET (no token)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Browser:
    """One headless Chromium session through chromedriver (W3C WebDriver over HTTP)."""

    def __init__(self, chromium, driver, tmp):
        port = fu.free_port()
        self.proc = sytest.Popen([driver, f"--port={port}"], stdout=open(f"{tmp}/chromedriver.log", "w"),
                                 stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                http("GET", self.base + "/status", timeout=2)
                break
            except Exception:
                time.sleep(0.05)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1640", "--hide-scrollbars", f"--user-data-dir={tmp}/chromium-profile"]}}}}
        v = http("POST", self.base + "/session", caps, timeout=60)["value"]
        self.sid = v["sessionId"]
        self.url = f"{self.base}/session/{self.sid}"

    def get(self, url):
        http("POST", self.url + "/url", {"url": url})

    def js(self, script, *args):
        return http("POST", self.url + "/execute/sync", {"script": script, "args": list(args)})["value"]

    def hover(self, css):
        """Moves the mouse to the middle of the first element matching css."""
        x, y = self.js("var r = document.querySelector(arguments[0]).getBoundingClientRect();"
                       "return [Math.round(r.left + r.width / 2), Math.round(r.top + r.height / 2)];", css)
        http("POST", self.url + "/actions", {"actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [{"type": "pointerMove", "duration": 0, "origin": "viewport", "x": x - 5, "y": y},
                        {"type": "pointerMove", "duration": 100, "origin": "viewport", "x": x, "y": y}]}]})

    def logs(self):
        return http("POST", self.url + "/se/log", {"type": "browser"})["value"]

    def screenshot(self, path):
        png = base64.b64decode(http("GET", self.url + "/screenshot")["value"])
        with open(path, "wb") as f:
            f.write(png)
        return len(png)

    def close(self):
        try:
            http("DELETE", self.url, timeout=10)
        except Exception:
            pass
        self.proc.kill()
        self.proc.wait()


def wait(pred, timeout, what, poll=0.25):
    t = time.time()
    last = None
    while time.time() - t < timeout:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 (a page mid-update, a file mid-write)
            last = e
        time.sleep(poll)
    print(f"   timed out after {timeout} s waiting for {what} (last: {last!r})", flush=True)
    return None


PAGE = """
var c = window.sy && sy.charts.loss, h = window.sy && sy.history;
if (!c || !h) return null;
var xs = [];
for (var i = 0; i < c.numRows(); i++) xs.push(c.getValue(i, 0));
var vals = [];
for (var i = 0; i < c.numRows(); i++) if (c.numColumns() == 4 && c.getValue(i, 3) !== null && !isNaN(c.getValue(i, 3))) vals.push([c.getValue(i, 0), c.getValue(i, 3)]);
return {rows: c.numRows(), xs: xs, vals: vals, labels: c.getLabels(),
        workers: Array.from(document.querySelectorAll('#workers tr[data-worker]')).map(function(r) {
            return {id: r.dataset.worker, state: r.querySelector('td.state').textContent,
                    cells: Array.from(r.cells).map(function(td) { return td.textContent; })}; }),
        cells: document.querySelectorAll('#heat rect.heat-cell').length,
        layers: h.layers, experts: h.experts,
        events: Array.from(document.querySelectorAll('#events li')).map(function(li) {
            return [li.dataset.event, li.textContent]; }),
        marks: Array.from(document.querySelectorAll('.dygraphDefaultAnnotation')).map(function(a) {
            return [a.textContent, a.title]; }),
        charts: Object.keys(sy.charts).filter(function(k) { return sy.charts[k].numRows() > 0; }),
        state: document.getElementById('state').textContent};
"""


def metric_steps(path):
    """Distinct steps of metrics.jsonl (complete lines only)."""
    return sorted({m["step"] for m in fu.read_lines(path)})


def main():
    chromium, driver = find("chromium", "chromium-browser", "google-chrome"), find("chromedriver")
    if not chromium or not driver:
        print("SKIP: chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
        return SKIP
    tmp = sytest.make_tmp("sy-dash-")
    fu.prepare_data(tmp)
    name = "dash"
    s = fu.settings(tmp, name, 100000, 10, extra={
        "cluster.heartbeat_ms": "250", "cluster.failure_timeout_ms": "3000", "status.token": TOKEN,
        "status.auth_get": "true", "data.val": f"{tmp}/data/val_*.bin", "train.eval_every": "3",
        "train.eval_batches": "2"})
    log = open(f"{tmp}/run.log", "w")
    run = sytest.Popen([SY, "run", CFG, "--workers", "2"] + fu.set_args(s), stdout=log, stderr=log)
    # "switchyard run: coordinator at tcp://..., status http://127.0.0.1:PORT; 2 workers; ..."
    base = wait(lambda: next((ln.split(" status ")[1].split(";")[0] for ln in open(f"{tmp}/run.log")
                              if " status http" in ln), None), 60, "the status address")
    mpath = f"{tmp}/state-{name}/metrics.jsonl"
    browser = None
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def get_json(path):
        req = urllib.request.Request(base + path, headers=auth)
        return json.loads(urllib.request.urlopen(req, timeout=2).read())
    try:
        st = wait(lambda: (lambda j: j if j["world"] == 2 and j["step"] >= 3 else None)(get_json("/v1/status")),
                  120, "2 workers training")
        if not check(st is not None, "the run trains with 2 workers"):
            print(open(f"{tmp}/run.log").read()[-2000:])
            return 1
        for path in ("/v1/status", "/v1/history"):
            code = code_of(base + path)
            check(code == 401, f"status.auth_get: GET {path} without the token answers 401 ({code})")
        code = code_of(base + "/")
        check(code == 200, f"status.auth_get: the page itself (GET /) stays open ({code})")
        browser = Browser(chromium, driver, tmp)
        browser.get(base + "/#token=" + TOKEN)
        p = wait(lambda: (lambda v: v if v and v["rows"] >= 5 and len(v["workers"]) == 2 else None)(browser.js(PAGE)),
                 60, "the page to render")
        if not check(p is not None, "the dashboard renders (loss chart, worker table)"):
            return 1
        # one point per step, the same steps as metrics.jsonl up to the chart's last one
        steps = [x for x in metric_steps(mpath) if x <= p["xs"][-1]]
        check(p["xs"] == steps and p["rows"] == len(steps),
              f"the loss chart holds {p['rows']} points, one per step of metrics.jsonl up to step {p['xs'][-1]} ({len(steps)})")
        # validation every 3 steps: the loss chart's third series holds those points and no others
        vm = {m["step"]: m["val_loss"] for m in fu.read_lines(mpath) if "val_loss" in m and m["step"] <= p["xs"][-1]}
        check(p["labels"][-1] == "validation" and [x for x, _ in p["vals"]] == sorted(vm) and len(vm) >= 1 and
              all(abs(v - vm[x]) <= 1e-6 * vm[x] for x, v in p["vals"]),
              f"the loss chart's validation series holds the val_loss of metrics.jsonl at steps {sorted(vm)} ({p['vals']})")
        check(set(p["charts"]) >= {"loss", "tps", "drop", "lr", "gn", "imb"},
              f"every chart has points ({sorted(p['charts'])})")
        live = {w["id"]: w for w in p["workers"]}
        check(sorted(live) == sorted(w["id"] for w in st["workers"]) and all(w["state"] == "active" for w in live.values()),
              f"the worker table lists the 2 live workers as active ({[(w['id'], w['state']) for w in p['workers']]})")
        check(all(w["cells"][5] not in ("", "–") for w in live.values()),
              f"each live worker's owned experts are listed ({[w['cells'][5] for w in live.values()]})")
        check(p["layers"] > 0 and p["cells"] == p["layers"] * p["experts"],
              f"the heat map has layers × experts = {p['layers']} × {p['experts']} cells ({p['cells']})")
        def hovered():
            browser.hover("#c-loss")
            t = browser.js("return document.getElementById('l-loss').textContent")
            return t if re.search(r"\d+:.*loss:\s*\d+\.\d+", t) else None
        legend = wait(hovered, 10, "hover values")
        check(legend is not None, f"hovering the loss chart shows the step and its values ({legend!r})")
        logs = browser.logs()
        errs = [entry for entry in logs if entry.get("level") == "SEVERE"]
        check(not errs, f"no errors in the browser console ({errs[:3]})")

        # kill -9 one worker after a checkpoint, and watch the page show it
        wait(lambda: any(e["event"] == "checkpoint_committed" for e in fu.read_lines(f"{tmp}/state-{name}/events.jsonl")),
             120, "a checkpoint")
        wait(lambda: browser.js(PAGE)["xs"][-1] >= 40, 120, "40 steps on the page")
        victim = st["workers"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        print(f"   killed {victim['id']} (pid {victim['pid']})", flush=True)
        ok = wait(lambda: (lambda v: v if any(e[0] == "restore_done" for e in v["events"]) and any(m[0] == "R" for m in v["marks"]) else None)(browser.js(PAGE)), 120,
                  "the recovery on the page")
        p = browser.js(PAGE)
        row = {w["id"]: w for w in p["workers"]}.get(victim["id"])
        check(row is not None and row["state"] == "lost", f"the worker table shows {victim['id']} lost ({row and row['state']})")
        evs = [e[0] for e in p["events"]]
        check("worker_lost" in evs and "restore_done" in evs and evs.index("restore_done") < evs.index("worker_lost"),
              f"the events show the loss and the recovery, newest first ({evs[:6]})")
        lost_line = next((e[1] for e in p["events"] if e[0] == "worker_lost"), "")
        check(victim["id"] in lost_line, f"the loss is a readable line naming the worker ('{lost_line}')")
        check(ok is not None and any(m[0] == "R" for m in p["marks"]),
              f"the loss chart carries a recovery marker ({p['marks']})")
        ev = fu.read_lines(f"{tmp}/state-{name}/events.jsonl")
        gens = [e for e in ev if e["event"] == "generation_opened"]
        if len(gens) >= 2 and p["marks"]:
            check(any(f"step {gens[-1]['start_step']}:" in m[1] for m in p["marks"]),
                  f"the marker sits at the first step of generation {gens[-1]['generation']} (step {gens[-1]['start_step']})")
        # after the restore the chart still has one point per surviving step (replayed steps replaced)
        p = wait(lambda: (lambda v: v if v["xs"][-1] > gens[-1]["start_step"] + 25 else None)(browser.js(PAGE)), 90,
                 "steps after the recovery")
        if p:
            steps = [x for x in metric_steps(mpath) if x <= p["xs"][-1]]
            check(p["xs"] == steps, f"after the recovery: {p['rows']} points, one per step of metrics.jsonl up to "
                                    f"step {p['xs'][-1]} ({len(steps)}, {len(fu.read_lines(mpath))} lines with replays)")
        time.sleep(2.5)  # one more refresh, then the picture
        png = os.environ.get("SY_DASHBOARD_PNG", f"{tmp}/dashboard.png")
        n = browser.screenshot(png)
        check(n > 10000, f"screenshot saved: {png} ({n} bytes)")
        errs = [entry for entry in browser.logs() if entry.get("level") == "SEVERE"]
        check(not errs, f"no errors in the browser console after the recovery ({errs[:3]})")
    finally:
        if browser:
            browser.close()
        try:
            req = urllib.request.Request(base + "/v1/stop", data=b"", method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
            urllib.request.urlopen(req, timeout=5).read()
            run.wait(timeout=60)
        except Exception:
            run.kill()
            run.wait()
        log.close()
        if failures:
            print(open(f"{tmp}/run.log").read()[-3000:])
    if not failures:
        sytest.remove_tmp(tmp)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
