"""The Grafana dashboard (deploy/grafana/switchyard.json) asks only for what the coordinator
exports (issue 15 #3). A live switchyard-coordinator, driven by two fake workers
(tests/tools/sy_fakeworker) until steps and expert counts flow, is scraped at /metrics; then every
PromQL expression of the dashboard (panel targets, annotations, template variables) is parsed:
  - each names at least one metric, and every metric it names is one the coordinator exports
    (a family's name, or a sample name such as a counter's *_total);
  - every label it matches on or groups by (selectors, by/without, on/ignoring, label_values)
    is a label of one of its metrics, or one Prometheus adds at scrape time (instance, job);
  - every {{label}} of a legend is such a label too.
Also: the file is valid JSON with a title, a uid and panels with unique ids."""
import json
import os
import re
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sytest  # noqa: E402
from sytest import SRC, check, failures  # noqa: E402
import test_coordinator as tc  # noqa: E402

DASH = os.path.join(SRC, "deploy", "grafana", "switchyard.json")
SCRAPE_LABELS = {"instance", "job"}
# PromQL words that are not metric names (functions are recognised by the "(" after them)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def exports(text):
    """name → label names, for every family and sample name of a /metrics text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
            out[fam.name].update(s.labels)
    # families without samples yet (HELP/TYPE only) still count as exported
    for m in re.finditer(r"^# TYPE (\S+) ", text, re.M):
        out.setdefault(m.group(1), set())
    return out


def parse(expr):
    """(metric names, label names) an expression refers to."""
    labels = set()
    metrics = set()
    e = expr
    for m in re.finditer(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)", e):
        metrics.add(m.group(1))
        labels.add(m.group(2))
    e = re.sub(r"label_values\([^)]*\)", " ", e)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)                      # string literals
    for m in re.finditer(r"\{([^}]*)\}", e):                         # label matchers
        labels.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(1)))
    e = re.sub(r"\{[^}]*\}", " ", e)
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        labels.update(x.strip() for x in m.group(2).split(",") if x.strip())
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)                                # range selectors
    e = re.sub(r"\$\w+|\$\{\w+\}", " ", e)                           # dashboard variables
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS or word == "label_values":
            continue
        metrics.add(word)
    return metrics, labels


def expressions(node, where="dashboard"):
    """(where, expr, legend) of every PromQL string: targets' expr, annotations' expr, the
    query of query variables."""
    out = []
    if isinstance(node, dict):
        title = node.get("title") or node.get("name") or where
        if isinstance(node.get("expr"), str):
            out.append((title, node["expr"], node.get("legendFormat", "")))
        if node.get("type") == "query" and isinstance(node.get("query"), str):
            out.append((f"variable {node.get('name')}", node["query"], ""))
        for k, v in node.items():
            if k not in ("expr", "query"):
                out += expressions(v, title)
    elif isinstance(node, list):
        for v in node:
            out += expressions(v, where)
    return out


def scrape():
    tmp = sytest.make_tmp("sy-grafana-")
    cfg = tc.write_cfg(tmp, "graf", steps=400)
    p, ep, base, line = tc.start_coord(cfg)
    try:
        if not check(base is not None, f"coordinator ready ({line.strip()})"):
            return None, tmp
        run = "graf"
        for wid in ("g0", "g1"):
            tc.fake(ep, run, wid)
        ok = tc.wait_for(lambda: (tc.status(base) or {}).get("step", 0) >= 5, 60)
        check(ok, "fake workers drive the coordinator to step 5")
        code, text, _ = tc.http("GET", base + "/metrics")
        check(code == 200, f"GET /metrics: {code}")
        return text, tmp
    finally:
        for q in tc.procs:
            if q.poll() is None:
                q.kill()
                q.wait()


def main():
    dash = json.load(open(DASH))
    check(dash.get("title") and dash.get("uid") and dash.get("panels"), "dashboard JSON has a title, a uid and panels")
    ids = [p["id"] for p in dash["panels"]]
    check(len(ids) == len(set(ids)), "panel ids are unique")
    text, tmp = scrape()
    if text is None:
        return 1
    names = exports(text)
    print(f"   the coordinator exports {len(names)} names: {', '.join(sorted(names))}")
    exprs = expressions(dash)
    check(len(exprs) >= 10, f"{len(exprs)} PromQL expressions in the dashboard")
    used = set()
    for where, expr, legend in exprs:
        metrics, labels = parse(expr)
        used |= metrics
        unknown = sorted(m for m in metrics if m not in names)
        check(metrics and not unknown,
              f"{where}: `{expr}` names exported metrics ({sorted(metrics)}; unknown {unknown})")
        have = set(SCRAPE_LABELS)
        for m in metrics:
            have |= names.get(m, set())
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        bad = sorted((labels | legend_labels) - have)
        check(not bad, f"{where}: labels {sorted(labels | legend_labels)} exist on its metrics (unknown {bad})")
    # the checker itself: it must refuse a name the coordinator does not export
    m, _ = parse('rate(switchyard_no_such_metric_total{instance=~"$instance"}[5m]) / switchyard_step')
    check(m == {"switchyard_no_such_metric_total", "switchyard_step"} and "switchyard_no_such_metric_total" not in names,
          "the parser finds every metric of an expression (a made-up one included)")
    missing = sorted(n for n in names if n.startswith("switchyard_") and not n.endswith("_created") and n not in used
                     and n + "_total" not in used and not any(u.startswith(n) for u in used))
    print(f"   exported but not on the dashboard: {missing or 'none'}")
    if not failures:
        sytest.remove_tmp(tmp)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
