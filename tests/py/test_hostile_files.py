"""Hostile input to files, checkpoints and config (issue 16, part A), end to end with the
`switchyard` CLI on the file store:

- #4 a fresh run into a store that holds committed checkpoints of its name is refused (naming
  --resume and --overwrite) instead of "already committed; keeping it" and exit 0; --overwrite
  moves the old run aside; two trainers of one run: the newer claim wins and the older one
  fails loudly; `switchyard run` refuses the same way; a broken step a resume fell back from is
  rewritten and listed as committed again;
- #9 --resume with a changed model or data-order field is refused naming the field and both
  values (run.resume_allow lets it through);
- #3 a shard truncated while training stops the run with an error naming the file (it used
  to die of SIGBUS, exit 135);
- a token >= vocab in a local shard: `switchyard data check` names shard and index; training
  opens the shard (headers and sizes only) and stops at the batch that reads the token, naming
  both, with the checkpoints committed before it intact;
- #7 ckpt export --out refuses a device, a symlink and a FIFO;
- #8 --set model.n_experts=100000 fails at start with the memory estimate;
- a data.val pattern that matches nothing is an error; a bad --set value is reported against
  the --set, not the YAML file."""
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import sytest
from sytest import BUILD, SY, CFG, check, failures


def run(args, timeout=600, **kw):
    return sytest.run([SY] + args, capture_output=True, text=True, timeout=timeout, **kw)


def small(tmp, name, steps=20, every=10, data=None, extra=()):
    s = ["--set", f"data.train={data or tmp + '/data'}/train_*.bin", "--set", "data.val=",
         "--set", f"run.name={name}", "--set", f"run.state_dir={tmp}/state-{name}",
         "--set", f"checkpoint.store={tmp}/store", "--set", "model.n_layers=2", "--set", "model.d_model=64",
         "--set", "model.d_ff=128", "--set", "model.n_heads=2", "--set", "model.seq_len=64",
         "--set", "train.global_batch_seqs=8", "--set", "train.micro_batch_seqs=4",
         "--set", f"run.steps={steps}", "--set", "train.warmup_steps=5", "--set", f"checkpoint.every={every}",
         "--set", "train.threads=1", "--quiet"]
    for e in extra:
        s += ["--set", e]
    return s


def manifest(tmp, name, step):
    with open(f"{tmp}/store/{name}/ckpt/step-{step:09d}/MANIFEST.json") as f:
        return json.load(f)


def run_owner(tmp, name):
    try:
        with open(f"{tmp}/store/{name}/RUN.json") as f:
            return json.load(f).get("writer")
    except (OSError, ValueError):
        return None


def wait_for(path, timeout):
    """True once a file matching `path` (a glob) exists."""
    t = time.time()
    while time.time() - t < timeout:
        if glob.glob(path):
            return True
        time.sleep(0.05)
    return False


def take_over(tmp, name, stop_after, who):
    """`train --resume` of run `name` while another process commits a step every 2: when the
    trainer's listing meets a commit in flight it refuses with "the store answers
    inconsistently; try again" (by design: it cannot tell which step is the newest), and a user
    tries again. Returns the last attempt's result."""
    for attempt in range(10):
        r = run(["train", CFG] + small(tmp, name, steps=100000, every=2) + ["--resume", "--stop-after", stop_after])
        if not (r.returncode == 1 and "try again" in r.stderr):
            return r
        print(f"   {who}, attempt {attempt + 1}: the store moved under it (a commit in flight); again", flush=True)
    return r


def main():
    tmp = sytest.make_tmp("sy-hostile-")
    os.makedirs(f"{tmp}/text")
    words = ["switch", "expert", "router", "token", "capacity", "the", "a", "of", "loss", "layer"]
    with open(f"{tmp}/text/corpus.txt", "w") as f:
        for i in range(3000):
            f.write(" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 9)) + ".\n")
    r = run(["data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"])
    check(r.returncode == 0, f"data prepare ({r.stderr.strip()[-200:]})")

    # --- #4: a second fresh run of one name -------------------------------------------------
    r = run(["train", CFG] + small(tmp, "dup", extra=["run.seed=1"]))
    check(r.returncode == 0, f"first run of 'dup' ({r.stderr[-300:]})")
    before = open(f"{tmp}/store/dup/ckpt/step-000000020/MANIFEST.json").read()
    r = run(["train", CFG] + small(tmp, "dup", extra=["run.seed=2"]))
    check(r.returncode == 1 and "--resume" in r.stderr and "--overwrite" in r.stderr
          and "already has committed checkpoints" in r.stderr,
          f"a fresh run into a store holding 'dup' is refused naming --resume/--overwrite ({r.stderr.strip()[-300:]})")
    check("keeping it" not in r.stderr, "no 'already committed; keeping it'")
    check(open(f"{tmp}/store/dup/ckpt/step-000000020/MANIFEST.json").read() == before,
          "the committed checkpoint is untouched")
    r = run(["train", CFG] + small(tmp, "dup", extra=["run.seed=2"]) + ["--overwrite"])
    check(r.returncode == 0 and "moved the old run aside" in r.stderr, f"--overwrite starts afresh ({r.stderr[-300:]})")
    aside = glob.glob(f"{tmp}/store/dup.replaced-*")
    check(len(aside) == 1 and os.path.exists(f"{aside[0]}/ckpt/step-000000020/MANIFEST.json"),
          f"the old run was moved aside, not deleted ({aside})")
    m = manifest(tmp, "dup", 20)
    check(m["config"]["run"]["seed"] == 2 and m.get("writer"), "the new run's checkpoint holds seed 2 and a writer id")
    if aside:
        r = run(["ckpt", "show", aside[0]])
        check(r.returncode == 0 and "verified" in r.stdout, "the moved-aside run still verifies under its new name")
    r = run(["train", CFG] + small(tmp, "dup") + ["--overwrite", "--resume"])
    check(r.returncode == 2 and "exclude" in r.stderr, "--resume with --overwrite is a usage error")

    # --- #4: two trainers of one run at once -------------------------------------------------
    a = sytest.Popen([SY, "train", CFG] + small(tmp, "two", steps=100000, every=2),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # any committed step: a fast trainer's retention (keep_last) can delete step 2 between polls
    ok = wait_for(f"{tmp}/store/two/ckpt/step-*/MANIFEST.json", 120)
    check(ok, "trainer A committed its first checkpoint")
    r = run(["train", CFG] + small(tmp, "two", steps=100000, every=2))
    check(r.returncode == 1 and "--resume" in r.stderr, "a second fresh trainer B of the run is refused")
    r = take_over(tmp, "two", "8", "trainer B")
    check(r.returncode == 0 and "resumed from checkpoint" in r.stderr,
          f"trainer B resumes the run (takes it over) ({r.stderr[-300:]})")
    try:
        _, err = a.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        a.kill()
        _, err = a.communicate()
    check(a.returncode == 1 and ("owned by writer" in err or "another writer" in err),
          f"trainer A fails loudly at its next checkpoint instead of keeping on ({a.returncode}: {err.strip()[-300:]})")

    # a coordinator is fenced off the same way: its run fails instead of committing over the new owner
    c = sytest.Popen([SY, "run", CFG, "--workers", "1", "--threads", "1"] + small(tmp, "cfence", steps=100000, every=2),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ok = wait_for(f"{tmp}/store/cfence/ckpt/step-*/MANIFEST.json", 120)
    check(ok, "the cluster run committed its first checkpoint")
    r = take_over(tmp, "cfence", "4", "the trainer")
    check(r.returncode == 0 and "resumed from checkpoint" in r.stderr, f"a trainer takes the cluster's run over ({r.stderr[-200:]})")
    try:
        _, err = c.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        c.kill()
        _, err = c.communicate()
    clog = open(f"{tmp}/state-cfence/logs/coordinator.log").read() if os.path.exists(f"{tmp}/state-cfence/logs/coordinator.log") else ""
    check(c.returncode == 1 and "now owned by writer" in clog,
          f"the coordinator's next commit is refused and the run fails ({c.returncode}: {err.strip()[-200:]})")

    # --- #4: a broken step is rewritten -----------------------------------------------------
    r = run(["train", CFG] + small(tmp, "brk", steps=20, every=10))
    check(r.returncode == 0, "run 'brk' to 20")
    os.remove(f"{tmp}/store/brk/ckpt/step-000000020/expert-0003.safetensors")
    old_writer = manifest(tmp, "brk", 20).get("writer")
    r = run(["train", CFG] + small(tmp, "brk", steps=30, every=10) + ["--resume"])
    check(r.returncode == 0 and "resumed from checkpoint step 10" in r.stderr and "is retired" in r.stderr,
          f"resume falls back to step 10 and retires step 20 ({r.stderr[-400:]})")
    check("keeping it" not in r.stderr, "the broken step 20 is not 'kept'")
    m = manifest(tmp, "brk", 20)
    check(m.get("writer") and m.get("writer") != old_writer and os.path.exists(f"{tmp}/store/brk/ckpt/step-000000020/expert-0003.safetensors"),
          "step 20 was rewritten by the resumed run")
    r = run(["ckpt", "show", f"{tmp}/store/brk@20"])
    check(r.returncode == 0 and "verified" in r.stdout, "the rewritten step 20 verifies")

    # --- #9: resume with a changed model field ------------------------------------------------
    r = run(["train", CFG] + small(tmp, "cfgm", steps=20, every=10) + ["--stop-after", "10"])
    check(r.returncode == 0, "run 'cfgm' to 10")
    owner = run_owner(tmp, "cfgm")
    r = run(["train", CFG] + small(tmp, "cfgm", steps=20, every=10, extra=["model.n_heads=4"]) + ["--resume"])
    check(r.returncode == 1 and "model.n_heads" in r.stderr and "4" in r.stderr and "2" in r.stderr,
          f"--resume with model.n_heads changed is refused naming the field and both values ({r.stderr.strip()[-300:]})")
    check(owner and run_owner(tmp, "cfgm") == owner,
          "the refused resume did not take the run over from its writer")
    r = run(["train", CFG] + small(tmp, "cfgm", steps=20, every=10, extra=["run.seed=99"]) + ["--resume"])
    check(r.returncode == 1 and "run.seed" in r.stderr, "a changed data-order field (run.seed) is refused")
    r = run(["train", CFG] + small(tmp, "cfgm", steps=20, every=10, extra=["train.lr=0.001"]) + ["--resume", "--stop-after", "12"])
    check(r.returncode == 1 and "train.lr" in r.stderr and "resume_allow" in r.stderr, "a changed train.lr is refused")
    r = run(["train", CFG] + small(tmp, "cfgm", steps=20, every=10,
                                   extra=["train.lr=0.001", "run.resume_allow=train.lr"]) + ["--resume", "--stop-after", "12"])
    check(r.returncode == 0, f"run.resume_allow=train.lr lets that change through ({r.stderr[-200:]})")
    r = run(["train", CFG] + small(tmp, "cfgm", steps=20, every=10, extra=["train.threads=2", "run.log_every=3",
                                                                         "checkpoint.keep_last=5"]) + ["--resume"])
    check(r.returncode == 0, f"threads, logging and checkpoint fields may change on resume ({r.stderr[-200:]})")

    # --- #3: a shard truncated while training -------------------------------------------------
    os.makedirs(f"{tmp}/trunc")
    shutil.copy(glob.glob(f"{tmp}/data/train_*.bin")[0], f"{tmp}/trunc/train_000000.bin")
    p = sytest.Popen([SY, "train", CFG] + small(tmp, "trunc", steps=100000, every=0, data=f"{tmp}/trunc"),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(f"{tmp}/state-trunc/metrics.jsonl", 60)
    time.sleep(1.0)
    os.truncate(f"{tmp}/trunc/train_000000.bin", 2048)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    check(p.returncode == 1 and "train_000000.bin" in err,
          f"truncating a shard mid-run is an error naming the file, not SIGBUS ({p.returncode}: {err.strip()[-300:]})")

    # the same under `switchyard run`: the workers fail naming the file (they died of SIGBUS)
    os.makedirs(f"{tmp}/trunc2")
    shutil.copy(glob.glob(f"{tmp}/data/train_*.bin")[0], f"{tmp}/trunc2/train_000000.bin")
    p = sytest.Popen([SY, "run", CFG, "--workers", "2", "--threads", "1"]
                     + small(tmp, "trunc2", steps=100000, every=0, data=f"{tmp}/trunc2"),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(f"{tmp}/state-trunc2/metrics.jsonl", 120)
    time.sleep(1.0)
    os.truncate(f"{tmp}/trunc2/train_000000.bin", 2048)
    try:
        _, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    logs = "".join(open(f).read() for f in glob.glob(f"{tmp}/state-trunc2/logs/worker-*.log"))
    check(p.returncode == 1 and "train_000000.bin changed while in use" in logs and "signal" not in err,
          f"under `switchyard run` the workers report the truncated file and the run fails ({p.returncode}: {err.strip()[-200:]})")

    # --- a token >= vocab in a local shard: open checks headers and sizes only (so a big corpus
    # opens in a few reads per shard), the batch that reads the window stops the run naming the
    # shard and the token's index, committed checkpoints stay; `data check` finds it up front
    os.makedirs(f"{tmp}/badtok")
    src = sorted(glob.glob(f"{tmp}/data/train_*.bin"))[0]
    raw = bytearray(open(src, "rb").read())
    n_tok = (len(raw) - 1024) // 2
    at = (n_tok // 2 // 64) * 64 + 5  # inside window n_tok/2/64 only (seq_len 64); every epoch reads it
    raw[1024 + 2 * at:1024 + 2 * at + 2] = (300).to_bytes(2, "little")
    open(f"{tmp}/badtok/train_000000.bin", "wb").write(bytes(raw))
    r = run(["data", "check", CFG] + small(tmp, "badtok", data=f"{tmp}/badtok")[:-1])
    check(r.returncode == 1 and "train_000000.bin" in r.stderr and f"token 300 at index {at} >= vocab_size 256" in r.stderr,
          f"`switchyard data check` names the shard and the bad token ({r.returncode}: {r.stderr.strip()[-300:]})")
    r = run(["data", "check", CFG] + small(tmp, "badtok")[:-1])
    check(r.returncode == 0 and "data.train: 1 shards" in r.stdout and "every token < 256" in r.stdout,
          f"`switchyard data check` passes the good corpus ({r.returncode}: {r.stdout.strip()[-300:]} {r.stderr.strip()[-200:]})")
    r = run(["train", CFG] + small(tmp, "badtok", steps=100000, every=2, data=f"{tmp}/badtok"), timeout=300)
    committed = sorted(glob.glob(f"{tmp}/store/badtok/ckpt/step-*/MANIFEST.json"))
    check(r.returncode == 1 and "train_000000.bin" in r.stderr and f"token 300 at index {at} >= vocab_size 256" in r.stderr,
          f"training stops at the batch holding the bad token, naming shard and index ({r.returncode}: {r.stderr.strip()[-300:]})")
    if committed:
        v = run(["ckpt", "show", f"{tmp}/store/badtok"])
        check(v.returncode == 0 and "verified" in v.stdout, f"the {len(committed)} checkpoint(s) committed before it verify")

    # --- #7: export refuses what is not a regular file ----------------------------------------
    os.symlink(f"{tmp}/target.safetensors", f"{tmp}/link")
    os.mkfifo(f"{tmp}/fifo")
    for out, kind in [("/dev/full", stat.S_ISCHR), (f"{tmp}/link", stat.S_ISLNK), (f"{tmp}/fifo", stat.S_ISFIFO)]:
        r = run(["ckpt", "export", f"{tmp}/store/dup", "--out", out], timeout=60)
        check(r.returncode == 1 and out in r.stderr and "not a regular file" in r.stderr
              and kind(os.lstat(out).st_mode),
              f"export --out {os.path.basename(out)} refused, left as it was ({r.stderr.strip()})")
    check(not os.path.exists(f"{tmp}/target.safetensors"), "nothing written through the symlink")
    r = run(["ckpt", "export", f"{tmp}/store/dup", "--out", f"{tmp}/ok.safetensors"])
    check(r.returncode == 0 and os.path.getsize(f"{tmp}/ok.safetensors") > 0, "export to a new file still works")

    # --- #8: no bound on model size ----------------------------------------------------------
    t = time.time()
    r = run(["train", CFG] + small(tmp, "huge", extra=["model.n_experts=100000"]), timeout=120)
    check(r.returncode == 1 and "GiB" in r.stderr and "train.max_memory_gb" in r.stderr and time.time() - t < 30,
          f"n_experts=100000 fails fast with the estimate ({time.time() - t:.1f} s: {r.stderr.strip()[-300:]})")
    r = run(["train", CFG] + small(tmp, "tiny-bound", extra=["train.max_memory_gb=0.001"]))
    check(r.returncode == 1 and "0.00 GiB" in r.stderr, "train.max_memory_gb bounds a small model too")
    r = run(["run", CFG, "--workers", "2"] + small(tmp, "huge-run", extra=["model.n_experts=100000"]), timeout=120)
    check(r.returncode == 1 and "GiB" in r.stderr, f"`switchyard run` checks the bound too ({r.stderr.strip()[-200:]})")

    # --- small ones ---------------------------------------------------------------------------
    r = run(["train", CFG] + small(tmp, "val") + ["--set", f"data.val={tmp}/nowhere/val_*.bin"])
    check(r.returncode == 1 and f"{tmp}/nowhere/val_*.bin" in r.stderr and "data.val" in r.stderr,
          f"a data.val pattern that matches nothing is an error naming it ({r.stderr.strip()})")
    r = run(["train", CFG, "--set", "model.d_model=0"])
    check(r.returncode == 2 and "--set model.d_model=0" in r.stderr and "tiny.yaml" not in r.stderr,
          f"a bad --set value is reported against the --set ({r.stderr.strip()})")
    bad = f"{tmp}/bad.yaml"
    with open(bad, "w") as f:
        f.write(open(CFG).read().replace("d_model: 128", "d_model: 0"))
    r = sytest.run([os.path.join(BUILD, "switchyard-coordinator"), bad], capture_output=True, text=True, timeout=60)
    check(r.returncode == 2 and "bad.yaml" in r.stderr, f"a bad YAML value is reported against the file ({r.stderr.strip()})")

    # --- #4 with `switchyard run` ---------------------------------------------------------------
    rargs = ["run", CFG, "--workers", "1"] + small(tmp, "rdup", steps=4, every=2)
    r = run(rargs, timeout=300)
    check(r.returncode == 0, f"`switchyard run` of 'rdup' ({r.stderr[-300:]})")
    r = run(rargs, timeout=300)
    check(r.returncode == 1 and "--resume" in r.stderr and "--overwrite" in r.stderr,
          f"a second fresh `switchyard run` of 'rdup' is refused ({r.stderr.strip()[-300:]})")
    r = run(rargs + ["--resume", "--set", "model.n_heads=4", "--set", "run.steps=6"], timeout=300)
    check(r.returncode == 1 and "model.n_heads is 4 here but 2" in r.stderr,
          f"`switchyard run --resume` with a changed model is refused by the coordinator ({r.stderr.strip()[-200:]})")
    r = run(rargs + ["--resume", "--set", "run.steps=6"], timeout=300)
    check(r.returncode == 0 and os.path.exists(f"{tmp}/store/rdup/ckpt/step-000000006/MANIFEST.json"),
          f"`switchyard run --resume` continues the run to step 6 ({r.stderr.strip()[-200:]})")
    r = run(rargs + ["--overwrite"], timeout=300)
    check(r.returncode == 0 and glob.glob(f"{tmp}/store/rdup.replaced-*"), f"`switchyard run --overwrite` ({r.stderr[-300:]})")

    sytest.remove_tmp(tmp)
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
