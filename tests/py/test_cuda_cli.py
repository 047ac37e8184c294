"""Asking for the CUDA backend where there is no usable GPU (docs/architecture.md "CUDA backend",
"Wiring"): every entry point fails fast (well under the time limits below, no hang) with a
message that names what was asked for, why it cannot be had, and the fix.

1. `switchyard run --set cluster.backend=cuda` exits 1 before starting any process, naming
   cluster.backend, the reason (no CUDA device / the CUDA runtime's error, or a build without
   CUDA) and the fix (cluster.backend=cpu).
2. `switchyard train --set cluster.backend=cuda` exits non-zero naming cluster.backend and the
   reason.
3. `switchyard-worker --backend cuda --device 0` exits 2 at once naming --backend cuda and the
   reason; `--backend tpu` exits 2 naming the known backends; `--device -1` exits 2.
4. The same binaries still run CPU work: `switchyard-worker --help` exits 0 (the CUDA module is
   loaded only when a CUDA backend is asked for).
5. The nccl data plane (docs/protocol.md "NCCL data plane"): `switchyard-worker --comm nccl`
   (no --backend) exits 2 at once naming --comm nccl, the reason (no usable CUDA device / built
   without NCCL) and the fix (--comm tcp); `--backend cpu --comm nccl` exits 2 naming --backend
   cuda; `--comm threads` exits 2 naming tcp or nccl; `switchyard run --set cluster.comm=nccl`
   with the cpu backend exits 2 naming cluster.comm and cluster.backend: cuda, nothing started;
   `switchyard run --set cluster.backend=cuda` (cluster.comm auto: nccl) still fails as in 1.
On a machine with a usable GPU the premise does not hold: the test exits 77 (skipped)."""
import os
import shutil
import subprocess
import sys
import time

import sytest
from sytest import CFG, SY, WORKER, check, failures


def run(cmd, timeout=30, **kw):
    t = time.time()
    r = sytest.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    return r.returncode, r.stdout + r.stderr, time.time() - t


def have_gpu():
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def reason_named(out):
    return ("cudaGetDeviceCount" in out or "built without CUDA" in out or
            "CUDA backend module" in out)


def main():
    if have_gpu():
        print("skipped: a GPU is present (this test checks the failure without one)")
        return 77
    tmp = sytest.make_tmp("sy-cuda-cli-")
    rc, out, dt = run([SY, "run", CFG, "--workers", "2", "--set", "cluster.backend=cuda"], cwd=tmp)
    check(rc == 1 and "cluster.backend is cuda" in out and reason_named(out) and
          "cluster.backend=cpu" in out and dt < 10,
          f"switchyard run with cluster.backend=cuda: exit 1 in {dt:.1f} s naming the reason and the fix ({out.strip()[-300:]})")
    check(not os.path.exists(os.path.join(tmp, "runs")) or not os.listdir(os.path.join(tmp, "runs")),
          "nothing was started (no run folder with logs)")
    rc, out, dt = run([SY, "train", CFG, "--set", "cluster.backend=cuda", "--set", "run.steps=1"], cwd=tmp)
    check(rc not in (0, None) and "cluster.backend is cuda" in out and reason_named(out) and dt < 10,
          f"switchyard train with cluster.backend=cuda: fails in {dt:.1f} s naming the reason ({out.strip()[-300:]})")
    rc, out, dt = run([WORKER, "--coordinator", "tcp://127.0.0.1:9", "--backend", "cuda", "--device", "0"])
    check(rc == 2 and "--backend cuda --device 0" in out and reason_named(out) and dt < 5,
          f"switchyard-worker --backend cuda: exit 2 in {dt:.1f} s naming the reason ({out.strip()[-300:]})")
    rc, out, _ = run([WORKER, "--coordinator", "tcp://127.0.0.1:9", "--backend", "tpu"])
    check(rc == 2 and "--backend tpu" in out and "cpu or cuda" in out, f"--backend tpu: exit 2 ({out.strip()})")
    rc, out, _ = run([WORKER, "--coordinator", "tcp://127.0.0.1:9", "--backend", "cuda", "--device", "-1"])
    check(rc == 2 and "--device -1" in out, f"--device -1: exit 2 ({out.strip()})")
    rc, out, dt = run([WORKER, "--coordinator", "tcp://127.0.0.1:9", "--comm", "nccl"])
    check(rc == 2 and "--comm nccl" in out and ("cudaGetDeviceCount" in out or "without NCCL" in out or
                                                "NCCL module" in out) and "--comm tcp" in out and dt < 5,
          f"switchyard-worker --comm nccl: exit 2 in {dt:.1f} s naming the reason and the fix ({out.strip()[-300:]})")
    rc, out, _ = run([WORKER, "--coordinator", "tcp://127.0.0.1:9", "--backend", "cpu", "--comm", "nccl"])
    check(rc == 2 and "--comm nccl needs --backend cuda" in out, f"--backend cpu --comm nccl: exit 2 ({out.strip()})")
    rc, out, _ = run([WORKER, "--coordinator", "tcp://127.0.0.1:9", "--comm", "threads"])
    check(rc == 2 and "--comm threads" in out and "tcp or nccl" in out, f"--comm threads: exit 2 ({out.strip()})")
    rc, out, dt = run([SY, "run", CFG, "--workers", "2", "--set", "cluster.comm=nccl"], cwd=tmp)
    check(rc == 2 and "cluster.comm" in out and "cluster.backend: cuda" in out and dt < 10,
          f"switchyard run with cluster.comm=nccl on the cpu backend: exit 2 naming the fix ({out.strip()[-300:]})")
    check(not os.path.exists(os.path.join(tmp, "runs")) or not os.listdir(os.path.join(tmp, "runs")),
          "nothing was started (cluster.comm=nccl refused)")
    rc, out, _ = run([WORKER, "--help"])
    check(rc == 0 and "--device N" in out, "switchyard-worker --help documents --device and exits 0")
    sytest.remove_tmp(tmp)
    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
