"""Thread-count invariance (docs/architecture.md "Determinism"): `switchyard train` on the tiny
model's shapes with train.threads 1, 2 and 3 writes identical metrics (every field but the
timings, compared as the exact floats metrics.jsonl records) and bit-identical final weights.
It holds on whatever OpenBLAS kernels this machine picks; the fixed-tile GEMM
(src/backend/gemm_cpu.h) makes it structural. OPENBLAS_CORETYPE is left as the machine has it.
Also: a switchyard process runs with a short libgomp spin (GOMP_SPINCOUNT=10000, src/backend/cpu_setup.h)
unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY, which it keeps."""
import filecmp
import glob
import json
import os
import random
import subprocess
import sys
import time

import sytest
from sytest import SY, CFG, check, failures

TIMING = {"tokens_per_s", "step_ms", "time", "ckpt_stall_ms", "ckpt_upload_ms"}


def main():
    tmp = sytest.make_tmp("sy-threads-")
    rnd = random.Random(11)
    words = ["switch", "expert", "router", "token", "capacity", "the", "a", "of", "loss",
             "layer", "gradient", "batch", "worker", "shard", "fault", "checkpoint"]
    os.makedirs(f"{tmp}/text")
    with open(f"{tmp}/text/corpus.txt", "w") as f:
        for _ in range(4000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) + ".\n")
    r = sytest.run([SY, "data", "prepare", "--input", f"{tmp}/text", "--out", f"{tmp}/data"],
                   capture_output=True, text=True, timeout=300)
    check(r.returncode == 0, f"data prepare ({r.stderr.strip()[-200:]})")

    runs = {}
    for th in (1, 2, 3):
        name = f"t{th}"
        args = [SY, "train", CFG, "--quiet", "--set", f"train.threads={th}",
                "--set", f"data.train={tmp}/data/train_*.bin", "--set", f"data.val={tmp}/data/val_*.bin",
                "--set", f"run.name={name}", "--set", f"run.state_dir={tmp}/state-{name}",
                "--set", f"checkpoint.store={tmp}/store", "--set", "run.steps=8",
                "--set", "train.warmup_steps=2", "--set", "checkpoint.every=0"]
        r = sytest.run(args, capture_output=True, text=True, timeout=600)
        check(r.returncode == 0, f"train with {th} thread(s) ({r.stderr.strip()[-300:]})")
        with open(f"{tmp}/state-{name}/metrics.jsonl") as f:
            runs[th] = [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in f]
    check(len(runs[1]) == 8, f"8 steps recorded ({len(runs[1])})")
    for th in (2, 3):
        same = runs[th] == runs[1]
        if not same:
            for a, b in zip(runs[1], runs[th]):
                if a != b:
                    print(f"  first difference at step {a['step']}: 1 thread {a} vs {th}: {b}")
                    break
        check(same, f"{th} threads: every metric of every step equals 1 thread's exactly")
        w1 = sorted(glob.glob(f"{tmp}/store/t1/ckpt/*/*.safetensors"))
        wt = sorted(glob.glob(f"{tmp}/store/t{th}/ckpt/*/*.safetensors"))
        check(len(w1) > 0 and len(w1) == len(wt) and
              all(filecmp.cmp(a, b, shallow=False) for a, b in zip(w1, wt)),
              f"{th} threads: final weights equal 1 thread's bit for bit ({len(w1)} file(s))")

    # the OpenMP wait policy sy_cpu_setup picks (read from the running process after its re-exec)
    for env_set, want in ((None, "GOMP_SPINCOUNT=10000"), ("OMP_WAIT_POLICY", "OMP_WAIT_POLICY=active"),
                          ("GOMP_SPINCOUNT", "GOMP_SPINCOUNT=123")):
        env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        if env_set:
            env[env_set] = want.split("=", 1)[1]
        p = sytest.Popen([SY, "train", CFG, "--quiet", "--set", f"data.train={tmp}/data/train_*.bin",
                          "--set", f"data.val={tmp}/data/val_*.bin", "--set", "run.name=env",
                          "--set", f"run.state_dir={tmp}/state-env", "--set", f"checkpoint.store={tmp}/store-env",
                          "--set", "run.steps=1000", "--set", "checkpoint.every=0"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        environ = b""
        for _ in range(100):
            time.sleep(0.05)
            try:
                with open(f"/proc/{p.pid}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                break
            if b"GOMP_SPINCOUNT" in environ or b"OMP_WAIT_POLICY" in environ:
                break
        p.kill()
        p.wait()
        vars_ = [v.decode() for v in environ.split(b"\0") if v.startswith((b"GOMP_SPINCOUNT=", b"OMP_WAIT_POLICY="))]
        check(vars_ == [want], f"user set {env_set or 'nothing'}: the process runs with {vars_} (want [{want!r}])")

    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
