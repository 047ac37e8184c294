"""Fencing of a stale worker (issue 12 #5; docs/security.md "Stale workers"), with the file store
and with S3 (moto_server):

Three workers train with a checkpoint every 2 steps (async uploads, so a worker is often in the
middle of writing a part). One worker is SIGSTOPped; the coordinator loses it, opens a new
generation of two from the latest committed checkpoint, and commits newer checkpoints. Then:
  - every object a committed manifest lists carries the tag of the generation that committed it
    ("g<generation>-r<rank>.<file>"), and the manifest's generation is that one;
  - the stopped worker is resumed (SIGCONT) and left to run for a few seconds: whatever it had in
    flight finishes (an upload, a step report, a fault report). Afterwards every object of every
    checkpoint committed before the resume is unchanged (file store: size, SHA-256, mtime; S3:
    size, ETag, Last-Modified), every object the stale worker wrote carries its old generation
    and is listed by no manifest, and every committed checkpoint verifies
    (`switchyard ckpt verify`: sizes + SHA-256 against the manifest);
  - the coordinator counts messages of the old generation as dropped (stale_generation), and no
    step of the new generation was aggregated from the stale worker (metrics.jsonl: world 2);
  - the run finishes with exactly the fault-free losses.
"""
import hashlib
import json
import os
import re
import signal
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sytest  # noqa: E402
import faultutil as fu  # noqa: E402
from sytest import SY, CFG, check, failures  # noqa: E402

# long enough that generation 2 still runs when the checks after the resume read /metrics (at
# 40 steps a fast machine finished the run first: connection refused)
STEPS, EVERY = 60, 2
HB_MS, FAIL_MS = 200, 1500
BUCKET = "sy-stale"


def snapshot_file(root):
    """key → (size, sha256, mtime_ns) of every object under root."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if "#tmp" in f:  # the file store's temporary file of a write in progress
                continue
            p = os.path.join(d, f)
            try:  # retention may delete old checkpoints while we read
                with open(p, "rb") as fh:
                    h = hashlib.sha256(fh.read()).hexdigest()
                st = os.stat(p)
            except FileNotFoundError:
                continue
            out[os.path.relpath(p, root)] = (st.st_size, h, st.st_mtime_ns)
    return out


def keys_file(root):
    return [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]


def snapshot_s3(moto, prefix):
    """key → (size, ETag, Last-Modified) from ListObjectsV2 (all pages)."""
    out, token = {}, None
    while True:
        q = f"/{BUCKET}?list-type=2&prefix={prefix}" + (f"&continuation-token={urllib.parse.quote(token)}" if token else "")
        _, body = moto.curl("GET", q)
        text = body.decode()
        for m in re.finditer(r"<Contents>(.*?)</Contents>", text, re.S):
            c = m.group(1)
            key = re.search(r"<Key>(.*?)</Key>", c).group(1)
            out[key[len(prefix):]] = (int(re.search(r"<Size>(\d+)</Size>", c).group(1)),
                                      re.search(r"<ETag>(.*?)</ETag>", c).group(1),
                                      re.search(r"<LastModified>(.*?)</LastModified>", c).group(1))
        t = re.search(r"<NextContinuationToken>(.*?)</NextContinuationToken>", text)
        if not t:
            return out
        token = t.group(1)


def manifests(get, snap, run):
    """step → parsed manifest of every committed checkpoint in the snapshot."""
    out = {}
    for k in snap:
        m = re.match(rf"{re.escape(run)}/ckpt/step-(\d+)/MANIFEST\.json$", k)
        if m:
            try:  # retention may delete old checkpoints while we read
                out[int(m.group(1))] = json.loads(get(k))
            except (OSError, RuntimeError, ValueError):
                pass
    return out


def stop_mid_write(keys, run, gen, rank, nparts, pid, timeout=30):
    """Polls the store's keys and SIGSTOPs pid as soon as a step folder without a manifest holds
    some but not all of the part objects of (gen, rank): the worker is stopped in the middle of
    writing its part. Returns (step, objects seen) or (None, 0) when it never caught one (then it
    stops the worker anyway)."""
    deadline = time.time() + timeout
    pat = re.compile(rf"{re.escape(run)}/ckpt/step-(\d+)/(.*)$")
    done = set()
    while time.time() < deadline:
        steps = {}
        for k in keys():
            m = pat.match(k)
            if m:
                steps.setdefault(int(m.group(1)), []).append(m.group(2))
        for st, names in steps.items():
            mine = [n for n in names if n.startswith(f"g{gen}-r{rank}.") and n.endswith(".safetensors")]
            if st not in done and "MANIFEST.json" not in names and 0 < len(mine) < nparts:
                os.kill(pid, signal.SIGSTOP)
                # a write already handed to the store may still land: count again once settled
                time.sleep(0.5)
                n = len([k for k in keys() if f"/step-{st:09d}/g{gen}-r{rank}." in k and k.endswith(".safetensors")])
                if n < nparts:
                    return st, n
                os.kill(pid, signal.SIGCONT)  # it had finished that part: try the next save
                done.add(st)
        time.sleep(0.002)
    os.kill(pid, signal.SIGSTOP)
    return None, 0


def stale_drops(c):
    """The coordinator's stale_generation drop counter; -1 when it cannot be read (the run over)."""
    try:
        with urllib.request.urlopen(c.status_url.rstrip("/") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        print(f"   /metrics unreadable: {e}", flush=True)
        return -1
    m = re.search(r'switchyard_dropped_messages_total\{reason="stale_generation"\} (\d+)', text)
    return int(m.group(1)) if m else -1


def one(tmp, label, store, env, ref, get, snap, keys, catch_s):
    name = f"stale-{label}"
    s = fu.settings(tmp, name, STEPS, EVERY, store=store,
                    extra={"cluster.heartbeat_ms": str(HB_MS), "cluster.failure_timeout_ms": str(FAIL_MS),
                           "cluster.data_timeout_ms": "3000", "checkpoint.s3_addressing": "path",
                           "cluster.min_workers": "2", "checkpoint.keep_last": "1000",
                           # the checkpoint path: with peer replicas the new generation restores
                           # from memory and the stale part is not the point
                           "cluster.replicas": "0"})
    c = fu.Cluster(tmp, name, s, env=env)
    ok = False
    t0 = time.time()
    try:
        c.start_coordinator(expect=3)
        for k in range(3):
            c.start_worker(f"w{k}")
        c.wait_step(4, timeout=120)
        g1 = [e for e in c.events() if e["event"] == "generation_opened"][-1]
        g_old, rank = g1["generation"], g1["workers"].index("w2")
        nparts = 2 * sum(1 for r in g1["placement"] if r == rank) + (2 if rank == 0 else 0)
        caught, seen = stop_mid_write(keys, name, g_old, rank, nparts, c.workers["w2"].pid,
                                      timeout=catch_s)
        print(f"   {label}: w2 (rank {rank}) stopped " + (f"while writing its part of step {caught} ({seen} of "
              f"{nparts} objects written)" if caught else "(not caught mid-write)"), flush=True)
        n0 = len(c.events())
        lost = c.wait_event("worker_lost", timeout=30, after=n0, where=lambda e: e["worker"] == "w2")
        gen = c.wait_event("generation_opened", timeout=30, after=n0)
        g_new = gen["generation"]
        check(gen["world"] == 2 and g_new > g_old, f"{label}: generation {g_new} of 2 opened after w2 stopped "
                                                   f"(was {g_old})")
        # two commits by the new generation
        i_gen = c.events().index(gen)
        c.wait(lambda: len([e for e in c.events()[i_gen:] if e["event"] == "checkpoint_committed"
                            and e.get("generation") == g_new]) >= 2, 60, "two commits of the new generation")
        before = snap()
        mans = manifests(get, before, name)
        check(len(mans) >= 1, f"{label}: committed checkpoints before the resume: {sorted(mans)}")
        tagged = True
        for step, m in mans.items():
            g = m.get("generation")
            for f in m["files"]:
                tagged &= f.get("object", "").startswith(f"g{g}-r")
        check(tagged, f"{label}: every committed manifest lists only objects tagged with its own generation")
        drops0 = stale_drops(c)
        os.kill(c.workers["w2"].pid, signal.SIGCONT)
        # the stale worker's in-flight work lands (uploads, reports): its part, when caught mid-write
        t_resume = time.time()
        while caught and time.time() - t_resume < 15:
            if len([k for k in keys() if f"/step-{caught:09d}/g{g_old}-r{rank}." in k and "#tmp" not in k]) >= nparts:
                break
            time.sleep(0.1)
        time.sleep(max(0.0, 3 - (time.time() - t_resume)))
        print(f"   {label}: waited {time.time() - t_resume:.1f} s after the resume", flush=True)
        drops1 = stale_drops(c)  # now, while generation 2 still runs
        after = snap()
        changed = [k for k in before if k in after and before[k] != after[k]]
        gone = [k for k in before if k not in after]
        check(not gone, f"{label}: no object disappeared ({gone[:4]})")
        check(not changed, f"{label}: no object of the store changed after the stale worker resumed ({changed[:4]})")
        new = sorted(k for k in after if k not in before)
        stale_new = [k for k in new if re.search(rf"/g{g_old}-r\d+\.", k)]
        listed = {f"{name}/ckpt/step-{st:09d}/{f.get('object', f['name'])}" for st, m in manifests(get, after, name).items()
                  for f in m["files"]}
        check(not (set(stale_new) & listed), f"{label}: no object of generation {g_old} written after the resume is "
                                             f"in a manifest ({len(stale_new)} such objects written)")
        if caught:
            mine = [k for k in stale_new if f"/step-{caught:09d}/g{g_old}-r{rank}." in k]
            check(len(mine) >= 1,
                  f"{label}: the stale worker finished writing its part of step {caught} after the resume "
                  f"({len(mine)} objects), into names no manifest lists")
        print(f"   {label}: objects written by the stale worker after SIGCONT: {stale_new[:6]}"
              f"{' ...' if len(stale_new) > 6 else ''}", flush=True)
        print(f"   {label}: stale_generation drops: {drops0} before the resume, {drops1} after", flush=True)
        # caught mid-write, the stale worker reports its finished part (CheckpointPart of the old
        # generation) after the resume: dropped and counted
        check(drops1 > drops0 if caught else drops1 >= drops0 >= 0,
              f"{label}: the coordinator drops and counts the stale worker's messages ({drops0} -> {drops1})")
        rc = c.finish(timeout=120)
        ok = check(rc == 0, f"{label}: the run finishes (exit {rc})")
        got = c.metrics()
        missing, worst = fu.compare(ref, got)
        ok &= check(not missing and worst <= fu.TOL,
                    f"{label}: all {STEPS} steps, losses equal the fault-free run (missing {missing[:5]}, max rel "
                    f"diff {worst:.2e})")
        after_gen = [v for k, v in got.items() if v.get("generation", 0) == g_new]
        check(all(v.get("world") == 2 for v in after_gen), f"{label}: every step of generation {g_new} has world 2")
        final = manifests(get, snap(), name)
        for st in sorted(final):
            r = sytest.run([SY, "ckpt", "show", f"{store}/{name}@{st}"], capture_output=True,
                           text=True, timeout=60, env=env)
            ok &= check(r.returncode == 0, f"{label}: checkpoint {st} verifies ({(r.stdout + r.stderr).strip()[-200:]})")
        print(f"   {label}: {time.time() - t0:.1f} s", flush=True)
        return ok
    finally:
        c.close()
        if not ok:
            c.dump()


def main():
    tmp = sytest.make_tmp("sy-stale-")
    fu.prepare_data(tmp)
    ref = fu.reference(tmp, STEPS, EVERY)
    store = f"{tmp}/fstore"
    os.makedirs(store)
    one(tmp, "file", store, None, ref, lambda k: open(os.path.join(store, k), "rb").read(),
        lambda: snapshot_file(store), lambda: keys_file(store), 20)
    sys.path.insert(0, HERE)
    from s3util import Moto, find_moto
    if not find_moto():
        print("moto_server not found: the S3 half is skipped")
        sys.exit(1 if failures else 77)
    moto = Moto(auth=True, log=os.path.join(tmp, "moto.log"))
    with moto:
        moto.make_bucket(BUCKET)
        one(tmp, "s3", f"s3://{BUCKET}/ck", moto.env(), ref,
            lambda k: moto.curl("GET", f"/{BUCKET}/ck/{k}")[1], lambda: snapshot_s3(moto, "ck/"), lambda: snapshot_s3(moto, "ck/").keys(), 6)
    if failures:
        print(f"{len(failures)} FAILED")
        sys.exit(1)
    print("all ok")


if __name__ == "__main__":
    main()
