#!/usr/bin/env python3
"""Streaming training data (issue 17): a synthetic corpus of --gb GiB of llm.c shards on local disk
and on moto_server, trained on by `switchyard train` (the tiny model, one worker) in five ways:

  local          local files (pread, validated at open), prefetch thread
  s3 whole       data.stream=false: every shard read whole into memory at start
  s3 stream      ranged GETs of the windows used, prefetch_steps ahead, no cache
  s3 cold cache  the same with an empty data.cache_dir
  s3 warm cache  the same steps again with that cache
  local again    the first run repeated: how much the machine's load drifted meanwhile

For each: time to the first step (launch to its line in metrics.jsonl), steady-state step time
(median step_ms of steps 6..), how many micro-batches had to wait for the prefetcher, bytes fetched by ranges / header bytes / bytes of windows used
(the reader's counters, logged at close), the peak resident memory of the process (VmHWM), and
the CPU time of the reader's own threads (named sy-prefetch, sy-fetch, sy-cache-evict; sampled
from /proc/PID/task every 50 ms) against the whole process's: the steady-state cost of
streaming that a loaded machine cannot blur (a step that never waits for data pays only that
CPU, and only where the cores are all busy). Not part of the test suite.

moto answers a ranged GET by reading the whole object (cost grows with the object's size, unlike
S3's), so streamed step times on moto depend on --shard-mb: with big shards the prefetcher
cannot keep up on a loaded machine. Bytes and memory are exact; times depend on the
machine's load (moto on loopback, shared CPUs): compare them only within one invocation.

Usage: /usr/bin/python3 bench/data_stream_bench.py [--build build] [--gb 2] [--shard-mb 128]
       [--steps 40] [--dir /tmp] [--keep]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "py"))
from s3util import Moto  # noqa: E402

STATS = re.compile(r"data: fetched (\d+) bytes in (\d+) range reads \(\+(\d+) header bytes\) for (\d+) bytes of "
                   r"windows; cache: (\d+) hits, (\d+) misses, (\d+) rejected; prefetch: (\d+) micro-batches, "
                   r"(\d+) waited")


def make_corpus(d, gb, shard_mb, seed=1):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = (shard_mb << 20) // 2 - 512
    n = max(1, int(round(gb * 1024 / shard_mb)))
    for i in range(n):
        hdr = np.zeros(256, dtype=np.int32)
        hdr[0], hdr[1], hdr[2] = 20240520, 1, per
        tok = rng.integers(0, 256, size=per, dtype=np.uint16)
        with open(f"{d}/train_{i:06d}.bin", "wb") as f:
            f.write(hdr.tobytes())
            f.write(tok.tobytes())
    return [f"{d}/train_{i:06d}.bin" for i in range(n)]


DATA_THREADS = ("sy-prefetch", "sy-fetch", "sy-cache-evict")  # pthread names of src/data's threads
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid):
    """(tid, thread name, user + system CPU seconds) of every thread of a live process."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            st = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        comm = st[st.index("(") + 1:st.rindex(")")]
        f = st[st.rindex(")") + 2:].split()
        out.append((int(tid), comm, (int(f[11]) + int(f[12])) / TICK))  # utime, stime
    return out


def vm_hwm_kb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def train(sy, cfg, tmp, name, data, steps, env, extra=()):
    state = f"{tmp}/state-{name}"
    sets = {"data.train": data, "data.val": "", "run.name": name, "run.state_dir": state,
            "checkpoint.store": f"{tmp}/store", "run.steps": str(steps), "checkpoint.every": "0",
            "train.threads": "2"}
    sets.update(dict(extra))
    args = [sy, "train", cfg, "--quiet"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    t0 = time.time()
    errf = open(f"{tmp}/{name}.err", "w+")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=errf, text=True, env=env)
    first = None
    cpu = {}  # tid -> (thread name, CPU seconds), the last sample of each thread
    rss_kb = 0
    while p.poll() is None:
        if first is None:
            try:
                if os.path.getsize(f"{state}/metrics.jsonl") > 0:
                    first = time.time() - t0
            except OSError:
                pass
        for tid, comm, sec in thread_cpu(p.pid):
            cpu[tid] = (comm, sec)
        rss_kb = max(rss_kb, vm_hwm_kb(p.pid))
        time.sleep(0.05)
    wall = time.time() - t0
    errf.seek(0)
    err = errf.read()
    errf.close()
    if p.returncode != 0:
        raise RuntimeError(f"{name}: exit {p.returncode}: {err[-1500:]}")
    data_cpu = sum(sec for comm, sec in cpu.values() if comm.startswith(DATA_THREADS))
    all_cpu = sum(sec for _, sec in cpu.values())
    ms = [json.loads(line)["step_ms"] for line in open(f"{state}/metrics.jsonl")]
    m = STATS.search(err)
    fetched, reads, header, used, hits, served, waited = (
        (int(m.group(i)) for i in (1, 2, 3, 4, 5, 8, 9)) if m else (0,) * 7)
    return {"name": name, "first_s": first, "step_ms": statistics.median(ms[5:] or ms), "wall_s": wall,
            "rss_mib": int(rss_kb) / 1024, "fetched": fetched, "reads": reads, "header": header, "used": used,
            "hits": hits, "prefetched": served, "waited": waited, "data_cpu_s": data_cpu, "cpu_s": all_cpu}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--shard-mb", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    sy = os.path.join(a.build, "switchyard")
    cfg = os.path.join(HERE, "..", "configs", "tiny.yaml")
    tmp = tempfile.mkdtemp(prefix="sy-stream-bench-", dir=a.dir)
    moto = Moto(auth=True, log=os.path.join(tmp, "moto.log"))
    try:
        t = time.time()
        files = make_corpus(f"{tmp}/data", a.gb, a.shard_mb)
        size = sum(os.path.getsize(f) for f in files)
        print(f"corpus: {len(files)} shards, {size / 2**30:.2f} GiB ({time.time() - t:.0f} s to write)", flush=True)
        moto.start()
        moto.make_bucket("bench")
        env = moto.env()
        t = time.time()
        for f in files:
            r = subprocess.run([os.path.join(a.build, "tests", "sy_storecli"), "s3://bench", "put", f,
                                "corpus/" + os.path.basename(f)], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
        print(f"uploaded to moto in {time.time() - t:.0f} s", flush=True)
        remote = "s3://bench/corpus/train_*.bin"
        cache = f"{tmp}/cache"
        runs = [("local", f"{tmp}/data/train_*.bin", ()),
                ("s3 whole", remote, (("data.stream", "false"),)),
                ("s3 stream", remote, ()),
                ("s3 cold cache", remote, (("data.cache_dir", cache),)),
                ("s3 warm cache", remote, (("data.cache_dir", cache),)),
                ("local again", f"{tmp}/data/train_*.bin", ())]  # drift of the machine over the runs
        rows = []
        for name, data, extra in runs:
            r = train(sy, cfg, tmp, name.replace(" ", "-"), data, a.steps, env, extra)
            rows.append(r)
            print(json.dumps(r), flush=True)
        print()
        print(f"| run ({a.steps} steps, tiny model, 1 worker) | first step s | step ms (median) | peak RSS MiB | "
              f"fetched by ranges | header bytes | window bytes used | fetched / used | cache hits | "
              f"micro-batches waited for data | CPU s of the data threads / of the process |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = f"{r['fetched'] / r['used']:.3f}" if r["used"] else "-"
            share = f"{r['data_cpu_s']:.2f} / {r['cpu_s']:.1f} ({100 * r['data_cpu_s'] / r['cpu_s']:.2f} %)" if r["cpu_s"] else "-"
            print(f"| {r['name']} | {r['first_s']:.2f} | {r['step_ms']:.1f} | {r['rss_mib']:.0f} | {r['fetched']} | "
                  f"{r['header']} | {r['used']} | {ratio} | {r['hits']} | "
                  f"{str(r['waited']) + ' of ' + str(r['prefetched']) if r['used'] else '-'} | {share} |")
    finally:
        moto.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
