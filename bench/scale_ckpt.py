#!/usr/bin/env python3
"""A checkpoint of 2,048 experts x (weights + optimizer) parts on moto S3 (issue 14, docs/scale.md).

    python3 bench/scale_ckpt.py [--workers 64] [--experts 2048] [--commits 3] [--store s3|file]

The real switchyard-coordinator with --workers simulated workers (tests/tools/sy_loadgen): every
rank writes its experts' two files (tiny real safetensors) per checkpoint, rank 0 the dense two,
and sends CheckpointPart; the coordinator commits MANIFEST.json (which HEADs every object) and
applies retention (checkpoint.keep_last 1). Checkpoints are asked for one at a time (POST
/v1/checkpoint), so a commit never competes with the next checkpoint's uploads. After --commits commits it prints one JSON object:
the commit times from events.jsonl (commit_ms: the commit alone; seconds: first part to the
commit event, retention included), the manifest's size, and the listing of the run's objects by
the store's own client (sy_storecli ls, which pages with continuation tokens) and by an
independent ListObjectsV2 client here (max-keys 1000 a page), which must agree with each other
and with retention (only the newest step left, every file of it listed once).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
BUILD = os.environ.get("SY_BUILD", os.path.join(SRC, "build"))
sys.path.insert(0, os.path.join(SRC, "tests", "py"))


def list_v2(endpoint, bucket, prefix):
    """Keys under prefix, by plain ListObjectsV2 pages of 1000 (moto without auth)."""
    keys, token, pages = [], None, 0
    while True:
        q = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
        if token:
            q["continuation-token"] = token
        body = urllib.request.urlopen(f"{endpoint}/{bucket}?{urllib.parse.urlencode(q)}", timeout=60).read().decode()
        pages += 1
        keys += re.findall(r"<Key>([^<]+)</Key>", body)
        m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
        if "<IsTruncated>true</IsTruncated>" not in body or not m:
            return keys, pages
        token = m.group(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--experts", type=int, default=2048)
    ap.add_argument("--commits", type=int, default=3)
    ap.add_argument("--store", default="s3")
    ap.add_argument("--out")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sy-scale-ckpt-")
    env = dict(os.environ)
    moto = None
    if a.store == "s3":
        import s3util
        moto = s3util.Moto(auth=False, log=f"{tmp}/moto.log")
        moto.start()
        moto.make_bucket("scale")
        env.update(moto.env())
        store = "s3://scale/ckpt"
    else:
        store = f"{tmp}/store"
    cfg = f"{tmp}/ckpt.yaml"
    with open(cfg, "w") as f:
        f.write(f"""run:
  name: scale
  steps: 1000000
  state_dir: {tmp}/state
  log_every: 100000
model:
  n_experts: {a.experts}
  n_layers: 24
  switch_every: 2
checkpoint:
  store: {store}
  every: 100000000
  keep_last: 1
cluster:
  min_workers: {a.workers}
  max_workers: {a.workers}
  failure_timeout_ms: 30000
status:
  token: t
""")
    coord = subprocess.Popen([os.path.join(BUILD, "switchyard-coordinator"), cfg, "--bind", "tcp://127.0.0.1:0",
                              "--status-addr", "127.0.0.1:0", "--expect-workers", str(a.workers)],
                             stdout=subprocess.PIPE, stderr=open(f"{tmp}/coord.log", "w"), text=True, env=env)
    fields = dict(kv.split("=", 1) for kv in coord.stdout.readline().split()[2:])
    lg = subprocess.Popen([os.path.join(BUILD, "tests", "sy_loadgen"), "--coordinator", fields["bind"], "--workers",
                           str(a.workers), "--step-ms", "300", "--counts", "none", "--duration", "600",
                           "--ckpt-threads", "8", "--report", f"{tmp}/report.json"],
                          stderr=open(f"{tmp}/loadgen.log", "w"), env=env)
    # one checkpoint at a time (POST /v1/checkpoint: CheckpointNow), so commits never overlap uploads
    commits = []
    deadline = time.time() + 900

    def committed():
        try:
            return [json.loads(x) for x in open(f"{tmp}/state/events.jsonl") if '"checkpoint_committed"' in x]
        except FileNotFoundError:
            return []
    time.sleep(3)
    while time.time() < deadline and len(commits) < a.commits:
        req = urllib.request.Request(fields["status"] + "/v1/checkpoint", method="POST", data=b"",
                                     headers={"Authorization": "Bearer t"})
        urllib.request.urlopen(req, timeout=30).read()
        n = len(commits)
        while time.time() < deadline and len(commits) == n:
            time.sleep(1)
            commits = committed()
    time.sleep(1)
    lg.terminate()
    lg.wait(timeout=60)
    req = urllib.request.Request(fields["status"] + "/v1/stop", method="POST", data=b"",
                                 headers={"Authorization": "Bearer t"})
    try:
        urllib.request.urlopen(req, timeout=30).read()
    except Exception:
        pass
    coord.wait(timeout=120)
    res = {"workers": a.workers, "experts": a.experts, "store": a.store, "loadavg": open("/proc/loadavg").read().split()[:3],
           "commits": [{k: c[k] for k in ("step", "files", "commit_ms", "seconds")} for c in commits]}
    cli = [os.path.join(BUILD, "tests", "sy_storecli")]
    url = store if a.store == "s3" else store
    ls = subprocess.run(cli + [url, "ls", "scale/ckpt/"], capture_output=True, text=True, env=env)
    keys = sorted(ls.stdout.split())
    steps = sorted({k.split("/")[2] for k in keys if k.count("/") >= 3})
    res["sy_storecli_ls_keys"] = len(keys)
    res["steps_left"] = steps
    if commits:
        last = max(c["step"] for c in commits)
        man = f"{tmp}/MANIFEST.json"
        subprocess.run(cli + [url, "get", f"scale/ckpt/step-{last:09d}/MANIFEST.json", man], env=env, check=True)
        res["manifest_bytes"] = os.path.getsize(man)
        res["manifest_files"] = len(json.load(open(man))["files"])
    if moto:
        keys2, pages = list_v2(moto.endpoint, "scale", "ckpt/scale/ckpt/")
        keys2 = sorted(k[len("ckpt/"):] for k in keys2)
        res["listobjectsv2_keys"] = len(keys2)
        res["listobjectsv2_pages"] = pages
        res["listings_agree"] = keys == keys2
        moto.stop()
    res["tmp"] = tmp
    print(json.dumps(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
