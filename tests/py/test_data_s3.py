"""Training data read from S3 (system spec §7: data.train / data.val entries may be s3:// URLs).

A moto_server with SigV4 checking holds the shards of a prepared corpus. `switchyard train` with
data.train / data.val as s3:// patterns must give exactly the losses (and `eval` over s3://
validation shards) of the same run on the local files; so must a 2-worker `switchyard run`, whose launcher checks the
data first. Then the refusals: a pattern matching no object, a missing object, a truncated object
(size mismatch) and an out-of-vocabulary token each fail with a message naming the s3:// URL;
missing credentials name the variable."""
import glob
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from s3util import Moto  # noqa: E402

import sytest
from sytest import SY, CFG, check, failures, metrics, tool

BUCKET = "sy-data"


def sets(tmp, name, train, val, steps=12):
    s = {"data.train": train, "data.val": val, "run.name": name, "run.state_dir": f"{tmp}/state-{name}",
         "checkpoint.store": f"{tmp}/store", "run.steps": str(steps), "checkpoint.every": "6",
         "train.threads": "1"}
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def losses(tmp, name):
    """step → loss (the last line of a step)."""
    return {s: m["loss"] for s, m in metrics(tmp, name).items()}


def same(a, b):
    """Every step's loss equal (exact)."""
    if set(a) != set(b):
        return False, f"different steps: {sorted(set(a) ^ set(b))[:6]}"
    bad = [s for s in a if a[s] != b[s]]
    return not bad, (f"step {bad[0]}: {a[bad[0]]} vs {b[bad[0]]}" if bad else "")


def evaluate(tmp, name, data, env=None):
    r = sytest.run([SY, "eval", "--checkpoint", f"{tmp}/store/{name}", "--data", data, "--batches", "4"],
                   capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        return None, r.stderr[-300:]
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


def main():
    tmp = sytest.make_tmp("sy-data-s3-")
    moto = Moto(auth=True, log=os.path.join(tmp, "moto.log"))
    try:
        rnd = random.Random(3)
        words = ["router", "expert", "token", "capacity", "switch", "layer", "load", "balance", "the", "of"]
        os.makedirs(f"{tmp}/text")
        with open(f"{tmp}/text/c.txt", "w") as f:
            for _ in range(4000):
                f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) + ".\n")
        r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data",
                        "--shard-tokens", "20000"], capture_output=True, text=True)
        check(r.returncode == 0, f"data prepared ({r.stderr[-300:]})")
        shards = sorted(os.path.basename(p) for p in glob.glob(f"{tmp}/data/*.bin"))
        check(sum(s.startswith("train_") for s in shards) >= 2, f"several train shards ({shards})")
        moto.start()
        moto.make_bucket(BUCKET)
        env = moto.env()

        def put(path, key):  # the store's own client (tests/tools/sy_storecli.c)
            r = sytest.run([tool("sy_storecli"), f"s3://{BUCKET}", "put", path, key],
                           capture_output=True, text=True, env=env, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"put {key}: {r.stderr}")
        for s in shards:
            put(f"{tmp}/data/{s}", f"corpus/v1/{s}")
        # a look-alike that the pattern must not take ('*' stops at '/')
        put(f"/dev/null", f"corpus/v1/old/train_000000.bin")
        local = (f"{tmp}/data/train_*.bin", f"{tmp}/data/val_*.bin")
        remote = (f"s3://{BUCKET}/corpus/v1/train_*.bin", f"s3://{BUCKET}/corpus/v1/val_*.bin")

        r = sytest.run([SY, "train", CFG, "--quiet"] + sets(tmp, "local", *local), capture_output=True,
                       text=True, timeout=600)
        check(r.returncode == 0, f"local run ({r.stderr[-300:]})")
        r = sytest.run([SY, "train", CFG, "--quiet"] + sets(tmp, "s3", *remote), capture_output=True,
                       text=True, timeout=600, env=env)
        check(r.returncode == 0, f"train with s3:// data ({r.stderr[-500:]})")
        if r.returncode == 0:
            a, b = losses(tmp, "local"), losses(tmp, "s3")
            ok, why = same(a, b)
            check(ok and len(a) == 12, f"train: s3:// data gives the local run's losses exactly ({len(a)} steps) {why}")
            e1, err1 = evaluate(tmp, "local", local[1])
            e2, err2 = evaluate(tmp, "local", remote[1], env)
            check(e1 is not None and e2 is not None and e1["loss"] == e2["loss"] and e1["tokens"] == e2["tokens"],
                  f"eval over s3:// validation shards equals eval over the local ones ({e1}, {e2}) {err1}{err2}")

        r = sytest.run([SY, "run", CFG, "--workers", "2", "--quiet"] + sets(tmp, "s3run", *remote),
                       capture_output=True, text=True, timeout=600, env=env)
        check(r.returncode == 0, f"switchyard run --workers 2 with s3:// data ({r.stderr[-500:]})")
        if r.returncode == 0:
            a, b = losses(tmp, "local"), losses(tmp, "s3run")
            ok, why = same(a, b)
            check(ok, f"run --workers 2: s3:// data gives the single-process local losses exactly {why}")

        def refused(label, train, want, e=env, cmd="train"):
            args = [SY, cmd, CFG, "--quiet"] + (["--workers", "1"] if cmd == "run" else []) + \
                sets(tmp, "bad", train, "")
            r = sytest.run(args, capture_output=True, text=True, timeout=120, env=e)
            check(r.returncode != 0 and all(w in r.stderr for w in want),
                  f"{label}: refused naming {want} (exit {r.returncode}: {r.stderr.strip()[-300:]})")

        refused("no object matches", f"s3://{BUCKET}/corpus/v2/train_*.bin", [f"s3://{BUCKET}/corpus/v2/train_*.bin",
                                                                             "matches no object"])
        refused("launcher: no object matches", f"s3://{BUCKET}/corpus/v2/train_*.bin", ["matches no object"], cmd="run")
        refused("missing object", f"s3://{BUCKET}/corpus/v1/train_999999.bin", ["train_999999.bin", "not found"])
        refused("no key", f"s3://{BUCKET}", ["expected s3://BUCKET/KEY"])
        data = open(f"{tmp}/data/{shards[-1]}", "rb").read()
        with open(f"{tmp}/trunc.bin", "wb") as f:
            f.write(data[:len(data) - 10])
        put(f"{tmp}/trunc.bin", f"bad/trunc.bin")
        refused("truncated object", f"s3://{BUCKET}/bad/trunc.bin", [f"s3://{BUCKET}/bad/trunc.bin", "size mismatch"])
        ba = bytearray(data)
        ba[1024:1026] = (65535).to_bytes(2, "little")
        with open(f"{tmp}/oov.bin", "wb") as f:
            f.write(bytes(ba))
        put(f"{tmp}/oov.bin", f"bad/oov.bin")
        refused("token outside the vocabulary", f"s3://{BUCKET}/bad/oov.bin", [f"s3://{BUCKET}/bad/oov.bin", "vocab_size"])
        noenv = {k: v for k, v in env.items() if k != "AWS_ACCESS_KEY_ID"}
        refused("no credentials", remote[0], ["AWS_ACCESS_KEY_ID"], e=noenv)
    finally:
        moto.stop()
        if not failures:
            sytest.remove_tmp(tmp)
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
