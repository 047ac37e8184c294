"""The dashboard's documents without a browser (issue 15 #1), against switchyard-coordinator and
fake workers (tests/tools/sy_fakeworker):
  - GET / loads nothing from outside: every src/href is a path on the coordinator, and the
    charting library it names (/dygraph.min.js, /dygraph.min.css) is served, byte for byte the
    file of the Debian package libjs-dygraphs the build embedded;
  - GET /v1/history: the documented columns, one row per step with steps increasing, the same
    steps and losses as metrics.jsonl, expert-load imbalance per layer and load shares that sum
    to 1 per layer;
  - a restarted coordinator (continuing the run) serves the history of the steps metrics.jsonl
    already holds, before any worker has come back."""
import json
import os
import re
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sytest  # noqa: E402
from sytest import check, failures  # noqa: E402
import test_coordinator as tc  # noqa: E402

DYGRAPHS = "/usr/share/javascript/dygraphs"


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def history(base):
    return json.loads(get(base + "/v1/history")[2])


def main():
    tmp = sytest.make_tmp("sy-hist-")
    cfg = tc.write_cfg(tmp, "hist", steps=400)
    p, ep, base, line = tc.start_coord(cfg)
    try:
        if not check(base is not None, f"coordinator ready ({line.strip()})"):
            return 1
        code, ctype, page = get(base + "/")
        html = page.decode()
        refs = re.findall(r'(?:src|href)="([^"]*)"', html)
        check(code == 200 and ctype.startswith("text/html"), f"GET /: 200 text/html ({code} {ctype})")
        check(refs and all(r.startswith("/") or r.startswith("data:") for r in refs),
              f"the page refers only to the coordinator's own paths ({refs})")
        for path, ct in (("/dygraph.min.js", "text/javascript"), ("/dygraph.min.css", "text/css")):
            code, ctype, body = get(base + path)
            want = open(os.path.join(DYGRAPHS, path[1:]), "rb").read() if os.path.exists(os.path.join(DYGRAPHS, path[1:])) else None
            check(code == 200 and ctype.startswith(ct) and (want is None or body == want),
                  f"GET {path}: {ct}, the libjs-dygraphs file ({len(body)} bytes)")
        for w in ("h0", "h1"):
            tc.fake(ep, "hist", w)
        check(tc.wait_for(lambda: (tc.status(base) or {}).get("step", 0) >= 15, 60), "fake workers reach step 15")
        time.sleep(1.5)  # the history is republished at most once a second
        h = history(base)
        cols = h["columns"]
        check(cols[:13] == ["step", "time", "loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s", "dropped_frac",
                            "step_ms", "world", "generation"] and cols[13:] == [f"imbalance_{i}" for i in range(h["layers"])],
              f"/v1/history columns ({cols})")
        steps = [r[0] for r in h["rows"]]
        check(steps == list(range(1, len(steps) + 1)) and len(steps) >= 15, f"one row per step, increasing (1..{steps[-1]})")
        m = tc.last_per_step(tc.read_jsonl(f"{tmp}/state-hist/metrics.jsonl"))
        li = cols.index("loss")
        check(all(abs(r[li] - m[r[0]]["loss"]) <= 1e-6 * abs(m[r[0]]["loss"]) for r in h["rows"] if r[0] in m),
              "each row's loss is metrics.jsonl's")
        ld = h["load"]
        ok = ld["steps"] and all(abs(sum(layer) - 1) < 1e-3 for sample in ld["shares"] for layer in sample)
        check(ok and len(ld["shares"][0]) == h["layers"] and len(ld["shares"][0][0]) == h["experts"],
              f"load shares: {len(ld['steps'])} samples of layers × experts, each layer summing to 1")
        # a refused or timed-out request (None) is sent again: the run must stop, not run out its steps
        code = None
        for _ in range(3):
            code = tc.http("POST", base + "/v1/stop", token=tc.TOKEN, timeout=10)[0]
            if code is not None:
                break
        check(code == 202, f"POST /v1/stop accepted ({code})")
        rc = sytest.wait_exit(p, 60, log=cfg + ".log")
        if not check(rc == 3, f"the coordinator stops on /v1/stop with exit status 3 ({rc})"):
            return 1
        for q in tc.procs:
            if q.poll() is None:
                q.kill()
                q.wait()
        steps_before = sorted(tc.last_per_step(tc.read_jsonl(f"{tmp}/state-hist/metrics.jsonl")))
        p, ep, base, line = tc.start_coord(cfg)
        check(base is not None, "the coordinator restarts on the same run")
        h2 = tc.wait_for(lambda: (lambda d: d if d["rows"] else None)(history(base)), 10)
        got = [r[0] for r in h2["rows"]] if h2 else []
        check(got == steps_before, f"the restarted coordinator's history holds the {len(steps_before)} steps of metrics.jsonl "
                                   f"({len(got)})")
    finally:
        for q in tc.procs:
            if q.poll() is None:
                q.kill()
                q.wait()
    if not failures:
        sytest.remove_tmp(tmp)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
