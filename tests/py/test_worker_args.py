"""Bad addresses and arguments, an unreachable coordinator, SIGTERM and allocation failure
(issue 16 #5, #6; docs/security.md "Hostile peers and arguments"):

1. switchyard-worker --coordinator X for X in garbage, '', tcp://, udp://..., a port above
   65535, an IPv4 part above 255 (and the same for --data-bind), --threads beyond the cores or
   not a number: exit 2 at once, with a message naming the argument and the value.
   switchyard-coordinator --bind garbage: exit 2 naming --bind. Every binary's --help: exit 0.
2. An unreachable coordinator (a free port, an unresolvable name, a missing ipc path): the
   worker logs "no answer ... still trying" and gives up after --connect-timeout (exit 1).
3. SIGTERM ends a worker within 2 s: one waiting for a coordinator that accepts TCP but never
   answers, and one stuck mid-step (a large model with --threads 1).
4. A worker that cannot allocate its model (ulimit -v) exits non-zero with a message naming
   the memory, instead of spinning; so does one whose OpenBLAS buffers do not fit (at start,
   before any library constructor, and when --threads adds threads): OpenBLAS itself retries
   a failed buffer allocation for ever.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import sytest
from sytest import check

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402

NPROC = len(os.sched_getaffinity(0))


def run(cmd, timeout=10, **kw):
    t = time.time()
    try:
        r = sytest.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        return r.returncode, r.stdout + r.stderr, time.time() - t
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        return None, out, time.time() - t


def term_within(p, bound):
    t = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=bound + 3)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None, time.time() - t
    return rc, time.time() - t


def main():
    tmp = sytest.make_tmp("sy-args-")
    W = fu.WORKER

    # --- 1. bad arguments ----------------------------------------------------------------------
    bad = ["garbage", "", "tcp://", "udp://127.0.0.1:5555", "tcp://127.0.0.1:99999", "tcp://256.1.1.1:5555",
           "tcp://127.0.0.1", "tcp://:5555", "tcp://127.0.0.1:0", "tcp://host name:5"]
    for ep in bad:
        rc, out, dt = run([W, "--coordinator", ep, "--connect-timeout", "5"])
        check(rc == 2 and "--coordinator" in out and (ep in out or ep == "") and dt < 5,
              f"--coordinator {ep!r}: exit 2 naming it ({rc}, {dt:.1f} s: {out.strip()[-140:]!r})")
    for ep in ["garbage", "tcp://127.0.0.1:70000", "udp://127.0.0.1:1", "ipc:///tmp/x"]:
        rc, out, dt = run([W, "--coordinator", "tcp://127.0.0.1:5555", "--data-bind", ep])
        check(rc == 2 and "--data-bind" in out, f"--data-bind {ep!r}: exit 2 naming it ({rc}: {out.strip()[-140:]!r})")
    for t in [str(NPROC + 1), "4096", "abc", "-1", ""]:
        rc, out, dt = run([W, "--coordinator", "tcp://127.0.0.1:5555", "--threads", t])
        check(rc == 2 and "--threads" in out, f"--threads {t!r}: exit 2 ({rc}: {out.strip()[-140:]!r})")
    for t in ["abc", "-5"]:
        rc, out, dt = run([W, "--coordinator", "tcp://127.0.0.1:5555", "--connect-timeout", t])
        check(rc == 2 and "--connect-timeout" in out, f"--connect-timeout {t!r}: exit 2 ({rc})")
    for b in ["garbage", "tcp://127.0.0.1:99999", "udp://1.2.3.4:5"]:
        rc, out, dt = run([fu.COORD, fu.CFG, "--bind", b, "--status-addr", "127.0.0.1:0",
                           "--set", f"run.state_dir={tmp}/st", "--set", f"checkpoint.store={tmp}/store"])
        check(rc == 2 and "--bind" in out, f"switchyard-coordinator --bind {b!r}: exit 2 ({rc}: {out.strip()[-140:]!r})")
    for binary in [W, fu.COORD, fu.SY]:
        rc, out, dt = run([binary, "--help"])
        check(rc == 0 and "usage" in out.lower(), f"{os.path.basename(binary)} --help: exit 0")

    # --- 2. unreachable coordinator ------------------------------------------------------------
    for ep in [f"tcp://127.0.0.1:{fu.free_port()}", "tcp://no-such-host.invalid:5555", f"ipc://{tmp}/missing/sock"]:
        rc, out, dt = run([W, "--coordinator", ep, "--id", "u", "--connect-timeout", "4"], timeout=30)
        check(rc == 1 and "still trying" in out and "giving up" in out and 3.5 <= dt <= 12,
              f"unreachable {ep}: 'still trying', then gives up after --connect-timeout 4 ({rc}, {dt:.1f} s)")

    # --- 3. SIGTERM ----------------------------------------------------------------------------
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    p = sytest.Popen([W, "--coordinator", f"tcp://127.0.0.1:{port}", "--id", "mute"], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
    time.sleep(1.5)
    rc, dt = term_within(p, 2)
    check(rc is not None and dt <= 2.0, f"SIGTERM ends a worker whose coordinator never answers in {dt:.2f} s (exit {rc})")
    srv.close()

    fu.prepare_data(tmp)
    big = {"model.n_layers": "4", "model.d_model": "512", "model.d_ff": "2048", "model.seq_len": "256",
           "model.n_experts": "8", "train.global_batch_seqs": "16", "train.micro_batch_seqs": "8"}
    s = fu.settings(tmp, "busy", 1000, 0, extra=big)
    with fu.Cluster(tmp, "busy", s) as c:
        c.start_coordinator(expect=1)
        w = c.start_worker("b0")
        # wait until it trains (first step started), then SIGTERM mid-step
        c.wait(lambda: any(x["activity"] == "training" for x in c.status()["workers"]), 120, "b0 training")
        time.sleep(1.0)
        step_before = c.max_step()
        rc, dt = term_within(w, 2)
        check(rc is not None and dt <= 2.0, f"SIGTERM ends a worker busy in a step in {dt:.2f} s (exit {rc}; "
              f"{step_before} step(s) done before)")

    # --- 4. allocation failure ------------------------------------------------------------------
    # max_memory_gb: past the start-up estimate (which would refuse this config on a machine with
    # less than ~20 GiB available), so that the allocation itself fails under ulimit -v
    huge = dict(big, **{"model.n_experts": "64", "model.n_layers": "8", "train.max_memory_gb": "1000"})
    s = fu.settings(tmp, "nomem", 10, 0, extra=huge)
    with fu.Cluster(tmp, "nomem", s) as c:
        c.start_coordinator(expect=1)
        log = f"{tmp}/nomem-worker.log"
        with open(log, "w") as lf:
            p = sytest.Popen(["/bin/sh", "-c", f"ulimit -v 1500000; exec {W} --coordinator tcp://127.0.0.1:{c.port} "
                              f"--id m0 --threads 1 --connect-timeout 30"], stdout=lf, stderr=subprocess.STDOUT)
            try:
                rc = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = None
        out = open(log).read()
        check(rc not in (None, 0) and "memory" in out,
              f"a worker that cannot allocate its model exits with a message ({rc}: {out.strip()[-200:]!r})")

    # OpenBLAS retries a failed buffer allocation for ever: its start-up buffers (one per thread,
    # in its library constructor) are checked before any constructor runs ...
    env = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    rc, out, dt = run(["/bin/sh", "-c", f"ulimit -v 200000; exec {W} --help"], timeout=20, env=env)
    check(rc == 1 and "no address space for OpenBLAS" in out and "ulimit -v" in out,
          f"ulimit -v below OpenBLAS's start-up buffers: exit 1 with a message, no spin ({rc}, {dt:.1f} s: "
          f"{out.strip()[-160:]!r})")
    # ... and so are the buffers of the threads a worker adds (--threads)
    if NPROC >= 2:
        s = fu.settings(tmp, "nothr", 10, 0)
        with fu.Cluster(tmp, "nothr", s) as c:
            c.start_coordinator(expect=1)
            env1 = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
            rc, out, dt = run(["/bin/sh", "-c", f"ulimit -v 250000; exec {W} --coordinator tcp://127.0.0.1:{c.port} "
                               f"--id t0 --threads 2 --connect-timeout 30"], timeout=60, env=env1)
            check(rc == 1 and "OpenBLAS needs about" in out,
                  f"no address space for another OpenBLAS thread: the worker exits 1 with a message ({rc}, "
                  f"{dt:.1f} s: {out.strip()[-200:]!r})")

    if check.failures:
        print(f"{len(check.failures)} failure(s); files kept in {tmp}")
        sys.exit(1)
    sytest.remove_tmp(tmp)
    print("all ok")


if __name__ == "__main__":
    main()
