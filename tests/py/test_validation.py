"""Periodic validation (train.eval_every) and the bf16-router ablation (model.router_precision).

1. `switchyard train` with train.eval_every=4, train.eval_batches=5, 9 steps: metrics.jsonl
   carries val_loss at steps 4, 8 and 9 (the last) and nowhere else; each equals, within the 8
   decimals it prints, what `switchyard eval --batches 5` reports for that step's checkpoint
   (the same micro-batches through the CLI's own loop).
2. W-invariance with 4 micro-batches per step (global_batch_seqs 32): `switchyard run
   --workers 2` and `--workers 3` record exactly the single process's loss, ce, aux, z and
   val_loss at every step (the fp64 values of metrics.jsonl). With 3 workers rank 0 runs
   micro-batches 0 and 3: the coordinator must sum the per-micro-batch terms in micro-batch
   order (StepDone.micro_terms), not the ranks' totals, to get the single process's bits.
   /v1/history carries the validation points, /metrics exports switchyard_val_loss.
3. model.router_precision=bf16 is refused with train.precision fp32 (exit 2, naming the field);
   with bf16 it trains, repeats itself exactly, differs from the selective-precision recipe,
   and is W-invariant too (--workers 2 equals train).
4. A data.val that matches nothing is refused at start naming data.val (train, and run before
   any process starts)."""
import json
import os
import random
import subprocess
import sys
import time
import urllib.request

import sytest
from sytest import SY, CFG, check, failures, metrics

TIMING = {"tokens_per_s", "step_ms", "time", "ckpt_stall_ms", "ckpt_upload_ms", "ckpt_step", "world", "generation"}
KEYS = ("loss", "ce", "aux", "z", "lr", "grad_norm", "dropped_frac", "val_loss")


def sets(tmp, name, extra=()):
    s = {"data.train": f"{tmp}/data/train_*.bin", "data.val": f"{tmp}/data/val_*.bin", "run.name": name,
         "run.state_dir": f"{tmp}/state-{name}", "checkpoint.store": f"{tmp}/store", "run.steps": "9",
         "checkpoint.every": "4", "train.threads": "1", "train.eval_every": "4", "train.eval_batches": "5",
         "train.global_batch_seqs": "32", "train.warmup_steps": "2"}
    s.update(dict(extra))
    out = []
    for k, v in s.items():
        out += ["--set", f"{k}={v}"]
    return out


def train(tmp, name, extra=()):
    r = sytest.run([SY, "train", CFG, "--quiet"] + sets(tmp, name, extra), capture_output=True, text=True, timeout=900)
    check(r.returncode == 0, f"train {name} ({r.stderr.strip()[-300:]})")
    return metrics(tmp, name)


def cluster(tmp, name, workers, extra=(), probe=False):
    args = [SY, "run", CFG, "--workers", str(workers)] + ([] if probe else ["--quiet"]) + sets(tmp, name, extra)
    log = f"{tmp}/run-{name}.log"
    with open(log, "w") as lf:
        p = sytest.Popen(args, stdout=lf, stderr=lf)
    seen = {"polls": 0, "answers": 0}
    base = None
    deadline = time.time() + 600
    while probe and time.time() < deadline and p.poll() is None:
        # "switchyard run: coordinator at tcp://..., status http://127.0.0.1:PORT; ..."; then read
        # /v1/history and /metrics once a validation point is in
        if base is None:
            base = next((ln.split(" status ")[1].split(";")[0].strip() for ln in open(log) if " status http" in ln), None)
        if base:
            seen["polls"] += 1
            try:
                h = json.load(urllib.request.urlopen(f"{base}/v1/history", timeout=5))
                seen["answers"] += 1
                if len(h.get("val", [])) >= 1:
                    seen["history"] = h
                    seen["metrics"] = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
                    break
            except OSError:
                pass
        time.sleep(0.1)
    p.wait(timeout=900)
    check(p.returncode == 0, f"run --workers {workers} {name} ({open(log).read().strip()[-400:]})")
    return metrics(tmp, name), seen


def base_note(seen):
    return f"/v1/history: {seen['answers']} answers to {seen['polls']} polls"


def same(a, b, what):
    bad = [(s, k, a[s].get(k), b.get(s, {}).get(k)) for s in sorted(a) for k in KEYS
           if a[s].get(k) != b.get(s, {}).get(k)]
    if bad:
        print("   first differences:", bad[:3])
    check(not bad and sorted(a) == sorted(b), what)


def main():
    tmp = sytest.make_tmp("sy-validation-")
    rnd = random.Random(5)
    words = ["switch", "expert", "router", "token", "capacity", "the", "a", "of", "loss", "layer"]
    os.makedirs(f"{tmp}/text")
    with open(f"{tmp}/text/corpus.txt", "w") as f:
        for _ in range(5000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=300)
    check(r.returncode == 0, f"data prepare ({r.stderr.strip()[-200:]})")

    # 1. single process
    ref = train(tmp, "single")
    vsteps = [s for s in sorted(ref) if "val_loss" in ref[s]]
    check(vsteps == [4, 8, 9], f"val_loss at steps 4, 8 and 9 only ({vsteps})")
    for s in vsteps:
        r = sytest.run([SY, "eval", "--checkpoint", f"{tmp}/store/single/ckpt/step-{s:09d}", "--data",
                        f"{tmp}/data/val_*.bin", "--batches", "5", "--set", "train.threads=1"],
                       capture_output=True, text=True, timeout=300)
        ok = r.returncode == 0
        ev = json.loads(r.stdout) if ok else {}
        check(ok and abs(ev["loss"] - ref[s]["val_loss"]) <= 5e-9,
              f"step {s}: val_loss {ref[s].get('val_loss')} = switchyard eval's {ev.get('loss')} ({r.stderr.strip()[-200:]})")
    check(ref[9]["val_loss"] < ref[4]["val_loss"], "validation loss falls from step 4 to step 9")

    # 2. workers, 4 micro-batches per step
    for w in (2, 3):
        got, seen = cluster(tmp, f"w{w}", w, probe=(w == 3))
        same(ref, got, f"--workers {w}: loss, ce, aux, z, lr, grad_norm, dropped_frac and val_loss equal the single process exactly at every step")
        if w == 3:
            h = seen.get("history", {})
            pts = [tuple(v) for v in h.get("val", [])]
            print(f"   {base_note(seen)}")
            check(len(pts) >= 1 and all(s in ref and abs(ref[s]["val_loss"] - v) <= 1e-6 * ref[s]["val_loss"] for s, v in pts),
                  f"/v1/history 'val' holds the validation points ({pts})")
            check("\nswitchyard_val_loss " in seen.get("metrics", ""), "/metrics exports switchyard_val_loss")

    # 3. bf16 router ablation
    r = sytest.run([SY, "train", CFG, "--quiet"] + sets(tmp, "bad", {"model.router_precision": "bf16"}),
                   capture_output=True, text=True, timeout=120)
    check(r.returncode == 2 and "model.router_precision" in r.stderr,
          f"router_precision bf16 with fp32 training refused naming the field (exit {r.returncode}: {r.stderr.strip()[-200:]})")
    bf = {"train.precision": "bf16", "run.steps": "6", "train.eval_every": "3"}
    sel = train(tmp, "sel", bf)
    r16 = train(tmp, "r16", dict(bf, **{"model.router_precision": "bf16"}))
    r16b = train(tmp, "r16b", dict(bf, **{"model.router_precision": "bf16"}))
    same(r16, r16b, "bf16 router: two runs equal exactly")
    check(len(r16) == 6 and all(r16[s]["loss"] != sel[s]["loss"] for s in r16),
          "bf16 router: every step's loss differs from the fp32 router's")
    check(all(abs(r16[s]["loss"] - sel[s]["loss"]) < 0.05 * sel[s]["loss"] for s in r16 if s in sel),
          "bf16 router: losses within 5 % of the fp32 router's over 6 steps")
    got, _ = cluster(tmp, "r16w2", 2, dict(bf, **{"model.router_precision": "bf16"}))
    same(r16, got, "bf16 router: --workers 2 equals the single process exactly")

    # 4. a validation pattern that matches nothing
    r = sytest.run([SY, "train", CFG, "--quiet"] + sets(tmp, "noval", {"data.val": f"{tmp}/nothing_*.bin"}),
                   capture_output=True, text=True, timeout=120)
    check(r.returncode != 0 and "data.val" in r.stderr, f"an empty data.val glob is refused naming data.val ({r.stderr.strip()[-200:]})")
    r = sytest.run([SY, "run", CFG, "--workers", "2", "--quiet"] + sets(tmp, "noval2", {"data.val": f"{tmp}/nothing_*.bin"}),
                   capture_output=True, text=True, timeout=120)
    check(r.returncode == 1 and "data.val" in r.stderr,
          f"... by switchyard run too, before any worker starts (exit {r.returncode}: {r.stderr.strip()[-200:]})")

    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
