"""Streaming training data from S3 (issue 17): workers read only the windows their micro-batches use.

A moto_server (SigV4 checked) holds the train shards of a prepared corpus. Checked here:
- losses: a run streaming s3:// shards by ranged GETs, 20 steps on 2 workers then resumed on 3 to
  step 30 (a world-size change), equals exactly the run that reads every shard whole into memory
  (data.stream=false) and the run on the local files;
- bytes: each worker (each generation) fetched by ranges at most 1.1x the bytes of the windows its
  micro-batches used (headers counted apart), from the counters the data reader logs;
- the cache: a rerun with a warm data.cache_dir is served from it (hits, few bytes fetched) with the
  same losses; after every shard is rewritten in S3 (new ETags) a run with the same cache gives the
  losses of the new data, never the cached old tokens;
- crash safety: a process killed while writing a cache entry (test hook) leaves only a tmp file;
  with a torn and a corrupt entry planted as well, a rerun on that cache rejects them and gives the
  reference losses;
- faults: range GETs through tests/s3_fault_proxy.py (503, resets, truncated bodies) are retried
  and the losses do not change; shards truncated in S3, or removed, mid-run stop the run with an
  error naming the s3:// URL."""
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from s3util import Moto  # noqa: E402
from s3_fault_proxy import FaultProxy  # noqa: E402

import sytest  # noqa: E402
from sytest import BUILD, SY, CFG, check, failures  # noqa: E402

BUCKET = "sy-stream"
STATS = re.compile(r"data: fetched (\d+) bytes in (\d+) range reads \(\+(\d+) header bytes\) for (\d+) bytes of "
                   r"windows; cache: (\d+) hits, (\d+) misses, (\d+) rejected")
def sets(tmp, name, train, steps=30, extra=()):
    s = {"data.train": train, "data.val": "", "run.name": name, "run.state_dir": f"{tmp}/state-{name}",
         "checkpoint.store": f"{tmp}/store", "run.steps": str(steps), "checkpoint.every": "10",
         "train.threads": "1"}
    s.update(dict(extra))
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def losses(tmp, name):
    by = {}
    with open(f"{tmp}/state-{name}/metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            by[m["step"]] = m["loss"]
    return by


def same(a, b, steps):
    bad = [s for s in steps if a.get(s) != b.get(s)]
    return not bad, (f"step {bad[0]}: {a.get(bad[0])} vs {b.get(bad[0])}" if bad else "")


def train(tmp, name, data, env, steps=30, extra=(), timeout=600):
    r = sytest.run([SY, "train", CFG] + sets(tmp, name, data, steps, extra), capture_output=True, text=True,
                       timeout=timeout, env=env)
    if r.returncode != 0:
        print(r.stderr[-2000:], flush=True)
    return r


def run(tmp, name, data, env, workers, steps=30, extra=(), resume=False):
    r = sytest.run([SY, "run", CFG, "--workers", str(workers), "--quiet"] + (["--resume"] if resume else []) +
                       sets(tmp, name, data, steps, extra), capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        print(r.stderr[-2000:], flush=True)
    return r


def worker_stats(tmp, name):
    """The data reader's counter lines of every worker log of a run: [(fetched, reads, header, used, hits,
    misses, rejected)]."""
    out = []
    for f in sorted(glob.glob(f"{tmp}/state-{name}/logs/*")):
        if "coord" in os.path.basename(f):
            continue
        out += [tuple(int(x) for x in m.groups()) for m in STATS.finditer(open(f, errors="replace").read())]
    return out


def main():
    tmp = sytest.make_tmp("sy-data-stream-")
    moto = Moto(auth=True, log=os.path.join(tmp, "moto.log"))
    proxy = None
    try:
        rnd = random.Random(17)
        words = ["router", "expert", "token", "capacity", "switch", "layer", "load", "balance", "the", "of", "gate"]
        os.makedirs(f"{tmp}/text")
        with open(f"{tmp}/text/c.txt", "w") as f:
            for _ in range(30000):
                f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) + ".\n")
        r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data",
                            "--shard-tokens", "100000"], capture_output=True, text=True)
        check(r.returncode == 0, f"data prepared ({r.stderr[-300:]})")
        shards = sorted(os.path.basename(p) for p in glob.glob(f"{tmp}/data/train_*.bin"))
        corpus = sum(os.path.getsize(f"{tmp}/data/{s}") for s in shards)
        check(len(shards) >= 4, f"{len(shards)} train shards, {corpus} bytes")
        moto.start()
        moto.make_bucket(BUCKET)
        env = moto.env()

        def put(path, key):
            r = sytest.run([os.path.join(BUILD, "tests", "sy_storecli"), f"s3://{BUCKET}", "put", path, key],
                               capture_output=True, text=True, env=env, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"put {key}: {r.stderr}")
        for s in shards:
            put(f"{tmp}/data/{s}", f"corpus/{s}")
        local = f"{tmp}/data/train_*.bin"
        remote = f"s3://{BUCKET}/corpus/train_*.bin"
        steps = range(1, 31)

        # references: the local files, and S3 read whole into memory
        check(train(tmp, "local", local, env).returncode == 0, "reference run on the local files")
        ref = losses(tmp, "local")
        check(train(tmp, "whole", remote, env, extra={"data.stream": "false"}).returncode == 0,
              "run with s3:// shards read whole (data.stream=false)")
        ok, why = same(ref, losses(tmp, "whole"), steps)
        check(ok, f"whole-object S3 run equals the local run {why}")

        # streaming, with a world-size change: 20 steps on 2 workers, then on 3 to step 30
        cache = f"{tmp}/cache"
        r = run(tmp, "grow", remote, env, 2, steps=20)
        check(r.returncode == 0, "streaming run: 20 steps on 2 workers")
        r = run(tmp, "grow", remote, env, 3, steps=30, resume=True, extra={"data.cache_dir": cache})
        check(r.returncode == 0, "streaming run resumed on 3 workers to step 30 (with a cache)")
        if r.returncode == 0:
            ok, why = same(ref, losses(tmp, "grow"), steps)
            check(ok, f"streaming run across 2 -> 3 workers: every loss equals the in-memory run exactly {why}")
        st = worker_stats(tmp, "grow")
        check(len(st) >= 5 and sum(s[3] for s in st) == 30 * 16 * 129 * 2,
              f"reader counters of every worker generation ({len(st)} lines): together they used every window of "
              f"30 steps once")
        for fetched, reads, header, used, hits, misses, _ in st:
            check(fetched <= 1.1 * used,  # a rank past M (3 workers, M = 2) has no micro-batch: 0 and 0
                  f"worker fetched {fetched} bytes by {reads} range reads (+{header} header bytes) for {used} bytes "
                  f"of windows (<= 1.1x; corpus {corpus} bytes)")
        fetched_all = sum(s[0] + s[2] for s in st)
        check(fetched_all < corpus, f"all workers together fetched {fetched_all} bytes of a {corpus}-byte corpus")

        # the warm cache serves a rerun of the same steps
        r = train(tmp, "warm", remote, env, extra={"data.cache_dir": cache})
        check(r.returncode == 0, "rerun with the warm cache")
        if r.returncode == 0:
            ok, why = same(ref, losses(tmp, "warm"), steps)
            check(ok, f"warm-cache run equals the in-memory run {why}")
            m = STATS.search(r.stderr)
            check(m is not None and int(m.group(5)) > 0 and int(m.group(1)) < int(m.group(4)),
                  f"warm cache: hits, and fewer bytes fetched than used ({m.group(0) if m else r.stderr[-300:]})")

        # killed while writing the cache: a tmp file only; a torn and a corrupt entry planted too
        crash_cache = f"{tmp}/cache-crash"
        r = train(tmp, "crash", remote, dict(env, SY_DATA_CACHE_TEST_CRASH="40"),
                  extra={"data.cache_dir": crash_cache})
        check(r.returncode in (-9, 137), f"the test hook killed the run while it wrote a cache entry (rc {r.returncode})")
        tmps = os.listdir(f"{crash_cache}/sy-data-v1/tmp")
        check(any(t[0].isdigit() for t in tmps), f"the half-written entry is a tmp file ({tmps})")
        entries = sorted(p for p in glob.glob(f"{crash_cache}/sy-data-v1/*/*/*")
                         if not os.path.relpath(p, f"{crash_cache}/sy-data-v1").startswith("tmp"))
        check(len(entries) >= 10, f"the entries written before the kill are in place ({len(entries)})")
        if len(entries) >= 2:
            with open(entries[0], "r+b") as f:
                f.truncate(os.path.getsize(entries[0]) - 7)
            with open(entries[1], "r+b") as f:
                f.seek(40)
                b = f.read(1)
                f.seek(40)
                f.write(bytes([b[0] ^ 0x55]))
        r = train(tmp, "recrash", remote, env, extra={"data.cache_dir": crash_cache})
        check(r.returncode == 0, "rerun on the cache the killed run left")
        if r.returncode == 0:
            ok, why = same(ref, losses(tmp, "recrash"), steps)
            check(ok, f"run on the crashed cache equals the in-memory run {why}")
            m = STATS.search(r.stderr)
            check(m is not None and int(m.group(7)) >= 2 and int(m.group(5)) > 0,
                  f"the torn and the corrupt entries were rejected, the good ones served "
                  f"({m.group(0) if m else r.stderr[-300:]})")
            left = [t for t in os.listdir(f"{crash_cache}/sy-data-v1/tmp") if t[0].isdigit()]
            check(not left, f"the dead writer's tmp file is gone ({left})")

        # faults on the range GETs: retried, same losses
        proxy = FaultProxy(moto.endpoint).start()
        proxy.configure(rate=0.08, kinds=["503", "reset", "truncate"], methods=["GET"], match="/corpus/", seed=7)
        r = train(tmp, "faults", remote, moto.env(AWS_ENDPOINT_URL=proxy.url), steps=12)
        faults = sum(proxy.stats["faults"].values())
        check(r.returncode == 0 and faults > 0, f"run through the fault proxy completes ({faults} faults injected "
                                                f"in {proxy.stats['requests']} requests)")
        if r.returncode == 0:
            ok, why = same(ref, losses(tmp, "faults"), range(1, 13))
            check(ok, f"retried range GETs: the losses do not change {why}")
        proxy.stop()
        proxy = None

        # every shard rewritten (new ETags): the cache must not serve the old tokens
        os.makedirs(f"{tmp}/data2")
        for s in shards:
            raw = open(f"{tmp}/data/{s}", "rb").read()
            toks = raw[1024:]
            pairs = [toks[i:i + 2] for i in range(0, len(toks), 2)]
            new = raw[:1024] + b"".join(pairs[7:] + pairs[:7])  # the same tokens, rotated
            with open(f"{tmp}/data2/{s}", "wb") as f:
                f.write(new)
            put(f"{tmp}/data2/{s}", f"corpus/{s}")
        check(train(tmp, "local2", f"{tmp}/data2/train_*.bin", env).returncode == 0, "reference on the rewritten data")
        ref2 = losses(tmp, "local2")
        r = train(tmp, "changed", remote, env, extra={"data.cache_dir": cache})
        check(r.returncode == 0, "run on the rewritten objects with the old cache")
        if r.returncode == 0:
            ok, why = same(ref2, losses(tmp, "changed"), steps)
            differs = any(ref2[s] != ref[s] for s in steps)
            check(ok and differs, f"new ETags: the run trains on the new tokens, not the cached old ones {why}")

        def mid_run(name, damage, want):
            """Starts a long run, damages every shard in S3 after its second step: a clean error naming one."""
            p = sytest.Popen([SY, "train", CFG] + sets(tmp, name, remote, 300), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
            t0 = time.time()
            while time.time() - t0 < 120 and p.poll() is None:
                try:
                    if len(open(f"{tmp}/state-{name}/metrics.jsonl").readlines()) >= 2:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            for s in shards:
                damage(s)
            try:
                out, err = p.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            check(p.returncode not in (0, None) and f"s3://{BUCKET}/corpus/train_" in err and want in err
                  and "Segmentation" not in err,
                  f"{name}: exit {p.returncode} naming the object ({err.strip()[-400:]})")

        def truncate(s):
            raw = open(f"{tmp}/data2/{s}", "rb").read()
            with open(f"{tmp}/short.bin", "wb") as f:
                f.write(raw[:len(raw) // 3])
            put(f"{tmp}/short.bin", f"corpus/{s}")

        def remove(s):
            sytest.run([os.path.join(BUILD, "tests", "sy_storecli"), f"s3://{BUCKET}", "rm", f"corpus/{s}"],
                           capture_output=True, env=env, timeout=60, check=True)
        mid_run("truncated", truncate, "changed while in use")
        for s in shards:  # whole again, then gone mid-run
            put(f"{tmp}/data2/{s}", f"corpus/{s}")
        mid_run("removed", remove, "disappeared while in use")
    finally:
        if proxy:
            proxy.stop()
        moto.stop()
        if not failures:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
